"""Summarization data: loading (hub id, local directory of JSON Lines, CSV or Parquet files, the
embedded sample), the prompt, tokenization, length-grouped batches and per-rank shards.

Every split is normalised to rows of ``id``, ``dialogue`` (the recipe's ``data.source_field``),
``summary`` (the training target: the first of ``data.target_field``) and ``references`` (every
non-empty target column; with the default ``summary``, DialogSum's layouts: ``summary1..3`` in
the original test file, or the repeated rows of the hub's 1,500-row test split merged back into
500 dialogues).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from launcher.compiling import bucketed_lengths
from launcher.errors import UserError
from launcher.jsonl import read_jsonl, read_jsonl_lines  # noqa: F401 - read_jsonl is this module's API too
from launcher.paths import SAMPLE_DATA_DIR
from launcher.recipe import EMBEDDED_DATA, DataSection, TrainSection

REFERENCE_FIELDS = ("summary1", "summary2", "summary3")
DEFAULT_TARGET = "summary"
FILE_FORMATS = (".jsonl", ".csv", ".parquet")  # a local split is {split}.jsonl, .csv or .parquet


@dataclass
class Table:
    """Rows of one split as read, with their position (line or row number) for messages, and the
    column names present (for the refusal when a mapped column is missing)."""

    rows: list[tuple[int, dict[str, Any]]]
    columns: list[str]
    unit: str = "row"


# ---------------------------------------------------------------- reading


def dataset_dir(dataset: str) -> Path | None:
    """The local directory behind a dataset reference, or None for a hub id."""
    if dataset == EMBEDDED_DATA:
        return SAMPLE_DATA_DIR
    path = Path(dataset).expanduser()
    if path.is_dir():
        return path
    if dataset.startswith((".", "/", "~")) or path.suffix or dataset.count("/") > 1:
        raise UserError(
            f"data {dataset!r} is not a directory; pass a folder with train, validation and test files "
            "(.jsonl, .csv or .parquet), a hub id such as knkarthick/dialogsum, or sample"
        )
    return None


def read_csv_table(path: Path) -> Table:
    """A CSV file with a header row (quoted fields may hold newlines, as dialogues do)."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            rows = [(number, row) for number, row in enumerate(reader, start=1)]
            columns = list(reader.fieldnames or [])
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; re-encode it as UTF-8") from None
    except csv.Error as exc:
        raise UserError(
            f"{path} is not a valid CSV file ({exc}); it needs a header row of column names"
        ) from None
    return Table(rows, columns)


def read_parquet_table(path: Path) -> Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path} is not a readable Parquet file ({str(exc).splitlines()[0][:160]})") from None
    return Table(list(enumerate(table.to_pylist(), start=1)), list(table.column_names))


def read_jsonl_table(path: Path) -> Table:
    rows = read_jsonl_lines(path)
    columns = list(dict.fromkeys(key for _, row in rows for key in row))
    return Table(rows, columns, unit="line")


READERS = {".jsonl": read_jsonl_table, ".csv": read_csv_table, ".parquet": read_parquet_table}


def split_file(directory: Path, split: str) -> Path:
    """The one file of a split: {split}.jsonl, .csv or .parquet."""
    found = [
        directory / f"{split}{suffix}"
        for suffix in FILE_FORMATS
        if (directory / f"{split}{suffix}").is_file()
    ]
    if len(found) > 1:
        raise UserError(
            f"split {split!r} is in {len(found)} files ({', '.join(p.name for p in found)}) in {directory}; "
            "keep one of them"
        )
    if not found:
        present = sorted({p.stem for suffix in FILE_FORMATS for p in directory.glob(f"*{suffix}")})
        raise UserError(
            f"split {split!r} not found: {directory / split}.jsonl does not exist, nor .csv or .parquet "
            f"(splits there: {', '.join(present) or 'none'})"
        )
    return found[0]


def is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def check_columns(table: Table, source: str, source_field: str, targets: list[str]) -> None:
    """The source column and at least one target column must be in the split, or it is refused,
    listing the columns it has. A split may lack some target columns (a training file with one
    summary, a test file with three): there they are just no reference."""
    columns = ", ".join(table.columns) or "none"
    if source_field not in table.columns:
        raise UserError(
            f"data.source_field {source_field!r} is not a column of {source} (columns: {columns}); "
            "set --set data.source_field=COLUMN"
        )
    present = [target for target in targets if target in table.columns]
    if targets == [DEFAULT_TARGET]:
        present += [field for field in REFERENCE_FIELDS if field in table.columns]  # DialogSum's test file
    if not present:
        what = (
            f"data.target_field {targets[0]!r} is not"
            if len(targets) == 1
            else f"none of data.target_field {targets} is"
        )
        raise UserError(
            f"{what} a column of {source} (columns: {columns}); "
            "set --set data.target_field=COLUMN (or [COLUMN1, COLUMN2] for several references)"
        )


def row_references(row: dict[str, Any], targets: list[str]) -> list[str]:
    """The non-empty reference texts of a row, the training target first."""
    if targets == [DEFAULT_TARGET]:
        dialogsum = [row[key] for key in REFERENCE_FIELDS if is_text(row.get(key))]
        if dialogsum:
            return dialogsum
    return [row[key] for key in targets if is_text(row.get(key))]


def normalize_rows(
    table: Table, source: str, source_field: str = "dialogue", targets: list[str] = (DEFAULT_TARGET,)
) -> list[dict[str, Any]]:
    """Map the data's columns onto id/dialogue/summary/references."""
    targets = list(targets)
    if table.rows:  # an empty split is refused as empty by the caller
        check_columns(table, source, source_field, targets)
    out: list[dict[str, Any]] = []
    for number, row in table.rows:
        references = row_references(row, targets)
        dialogue = row.get(source_field)
        if not is_text(dialogue):
            raise UserError(
                f"{source} {table.unit} {number} has no {source_field!r} text; every row needs "
                f"{source_field} and {' or '.join(targets)}"
            )
        if not references:
            also = " (or summary1..3)" if targets == [DEFAULT_TARGET] else ""
            raise UserError(
                f"{source} {table.unit} {number} has no {' or '.join(repr(t) for t in targets)}{also} text; "
                f"every row needs {source_field} and {' or '.join(targets)}"
            )
        out.append(
            {
                "id": str(row.get("id", f"row_{number}")),
                "dialogue": dialogue,
                "summary": references[0],
                "references": references,
            }
        )
    return merge_repeated_dialogues(out)


def merge_repeated_dialogues(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The hub's test split repeats each dialogue once per reference: fold them into one row."""
    merged: dict[str, dict[str, Any]] = {}
    for row in rows:
        first = merged.get(row["dialogue"])
        if first is None:
            merged[row["dialogue"]] = {**row, "references": list(row["references"])}
        else:
            first["references"].extend(ref for ref in row["references"] if ref not in first["references"])
    return list(merged.values())


def load_split(
    dataset: str,
    split: str,
    limit: int | None = None,
    source_field: str = "dialogue",
    target_field: str | list[str] = DEFAULT_TARGET,
) -> list[dict[str, Any]]:
    """Rows of one split, normalised; errors are UserErrors naming what to fix."""
    targets = [target_field] if isinstance(target_field, str) else list(target_field)
    directory = dataset_dir(dataset)
    if directory is not None:
        path = split_file(directory, split)
        table, source = READERS[path.suffix](path), str(path)
    else:
        table, source = load_hub_split(dataset, split), f"{dataset}[{split}]"
    rows = normalize_rows(table, source, source_field, targets)
    if not rows:
        raise UserError(f"split {split!r} of {dataset} is empty; it needs at least one dialogue")
    return rows[:limit] if limit else rows


def load_data_split(data: DataSection, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """A split of the recipe's dataset, through its column mapping."""
    return load_split(data.dataset, split, limit, data.source_field, data.target_fields)


def load_hub_split(dataset: str, split: str) -> Table:
    """A split from the Hugging Face hub (or its local cache), with the dataset's own columns."""
    import datasets

    try:
        loaded = datasets.load_dataset(dataset, split=split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise UserError(f"split {split!r} does not exist in {dataset}: {exc}") from None
        raise
    except (ConnectionError, OSError, FileNotFoundError) as exc:
        raise UserError(
            f"cannot load dataset {dataset!r} from the hub ({type(exc).__name__}); without network, download it "
            "elsewhere and pass --data DIR with train/validation/test.jsonl"
        ) from None
    return Table([(index, dict(row)) for index, row in enumerate(loaded)], list(loaded.column_names))


# ---------------------------------------------------------------- prompt and tokens


def build_prompt(template: str, dialogue: str) -> str:
    return template.replace("{dialogue}", dialogue)


def tokenize_rows(rows: Sequence[dict[str, Any]], tokenizer, data: DataSection) -> list[dict[str, list[int]]]:
    """Prompt + dialogue as the source, the summary as the target; truncated to the recipe's lengths."""
    sources = [build_prompt(data.prompt, row["dialogue"]) for row in rows]
    encoded = tokenizer(sources, max_length=data.max_source_length, truncation=True)
    targets = tokenizer(
        text_target=[row["summary"] for row in rows], max_length=data.max_target_length, truncation=True
    )
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": labels}
        for ids, mask, labels in zip(encoded["input_ids"], encoded["attention_mask"], targets["input_ids"])
    ]


def tokenized_split(rows: Sequence[dict[str, Any]], tokenizer, data: DataSection, cache_dir: Path, key: str):
    """Tokenize once into an Arrow cache file; later calls (other ranks, resumed runs) just load it."""
    import datasets

    digest = hashlib.sha256(
        json.dumps(
            [
                key,
                tokenizer.name_or_path,
                len(tokenizer),
                data.prompt,
                data.source_field,
                data.target_field,
                data.max_source_length,
                data.max_target_length,
                len(rows),
            ]
        ).encode()
    ).hexdigest()[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)
    table = datasets.Dataset.from_list([{"row": index} for index in range(len(rows))])

    def encode(batch: dict[str, list[int]]) -> dict[str, list]:
        encoded = tokenize_rows([rows[index] for index in batch["row"]], tokenizer, data)
        return {name: [item[name] for item in encoded] for name in ("input_ids", "attention_mask", "labels")}

    return table.map(
        encode,
        batched=True,
        remove_columns=["row"],
        cache_file_name=str(cache_dir / f"{digest}.arrow"),
        load_from_cache_file=True,
        desc=f"tokenizing {key}",
    )


def source_lengths(tokenized) -> list[int]:
    return [len(ids) for ids in tokenized["input_ids"]]


def batching_keys(tokenized) -> list[int]:
    """Sort key for length grouping: source length, then target length.

    Grouping on (source, target) pads less than grouping on their sum (measured on DialogSum
    train: 0.941 vs 0.925 real/computed tokens, bench/results/padding.md).
    """
    longest_target = max((len(labels) for labels in tokenized["labels"]), default=0) + 1
    return [
        len(ids) * longest_target + len(labels)
        for ids, labels in zip(tokenized["input_ids"], tokenized["labels"])
    ]


def example_lengths(tokenized) -> list[int]:
    """Cost of an example for batching: source plus target tokens."""
    return [len(a) + len(b) for a, b in zip(tokenized["input_ids"], tokenized["labels"])]


# ---------------------------------------------------------------- batching


class LengthGroupedBatchSampler:
    """Shuffled micro-batches of similar-length examples, grouped into optimizer steps.

    Each epoch: a seeded permutation is cut into megabatches of ``step_size * megabatch``
    examples (``step_size = batch_size * micro_batches_per_step``: the examples of one optimizer
    step over every rank and accumulation), each megabatch is sorted by length and cut into
    steps, the step order is shuffled, and every step is cut into its micro-batches. Padding
    then costs little while steps stay random. The order depends only on (seed, epoch) and the
    step size, so a resumed run sees the same batches, and 2 ranks x accumulation 1, 1 rank x
    accumulation 2 and 1 rank with a doubled micro batch train on the same examples at every
    step. Accelerate deals micro-batches to ranks in turn (rank r takes r, r + W, ...), and a
    rank accumulates its consecutive ones, so the ``micro_batches_per_step`` micro-batches
    emitted together are exactly one optimizer step. Set ``epoch`` before iterating.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int,
        group_by_length: bool = True,
        megabatch: int = 50,
        micro_batches_per_step: int = 1,
    ) -> None:
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.megabatch = megabatch
        self.micro_batches_per_step = micro_batches_per_step
        self.epoch = 0

    def __len__(self) -> int:
        return sum(math.ceil(len(step) / self.batch_size) for step in self.steps())

    def steps(self) -> list[list[int]]:
        """The examples of each optimizer step, in training order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        step_size = self.batch_size * self.micro_batches_per_step
        if not self.group_by_length:
            return [order[i : i + step_size].tolist() for i in range(0, len(order), step_size)]
        size = step_size * self.megabatch
        steps: list[list[int]] = []
        for start in range(0, len(order), size):
            mega = order[start : start + size]
            mega = mega[np.argsort(-self.lengths[mega], kind="stable")]
            steps += [mega[i : i + step_size].tolist() for i in range(0, len(mega), step_size)]
        if len(steps) > 1 and len(steps[-1]) < step_size:
            # The short step stays last so that full micro-batches are dealt evenly to ranks.
            head = [steps[i] for i in rng.permutation(len(steps) - 1)]
            return head + [steps[-1]]
        return [steps[i] for i in rng.permutation(len(steps))]

    def batches(self) -> list[list[int]]:
        return [
            step[i : i + self.batch_size]
            for step in self.steps()
            for i in range(0, len(step), self.batch_size)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())


def train_batch_sampler(
    tokenized,
    train: TrainSection,
    group_by_length: bool,
    micro_batches_per_step: int,
    buckets: tuple[int, int] | None = None,
) -> LengthGroupedBatchSampler | TokenBudgetBatchSampler:
    """The training split's batches: ``train.micro_batch_tokens`` when set (it takes precedence
    over ``train.micro_batch_size``), else ``train.micro_batch_size`` examples per micro-batch.

    ``buckets`` (max source, max target length), when the model is compiled: the collator pads
    to length buckets (compiling.py), so the budget counts an example by its bucket lengths, the
    tensors it really becomes."""
    if train.micro_batch_tokens:
        sources = [len(ids) for ids in tokenized["input_ids"]]
        targets = [len(labels) for labels in tokenized["labels"]]
        if buckets:
            sources, targets = bucketed_lengths(sources, targets, *buckets)
        return TokenBudgetBatchSampler(
            sources,
            targets,
            train.micro_batch_tokens,
            train.seed,
            group_by_length,
            micro_batches_per_step=micro_batches_per_step,
        )
    return LengthGroupedBatchSampler(
        batching_keys(tokenized),
        train.micro_batch_size,
        train.seed,
        group_by_length,
        micro_batches_per_step=micro_batches_per_step,
    )


def padded_tokens(size: int, longest_source: int, longest_target: int) -> int:
    """What a micro-batch costs against ``train.micro_batch_tokens``: the padded tensors it becomes,
    ``size x longest source + size x longest target`` (the collator pads every source to the
    longest source and every target, and the decoder input made from it, to the longest target)."""
    return size * (longest_source + longest_target)


class TokenBudgetBatchSampler:
    """Micro-batches filled up to a token budget, grouped into optimizer steps of exactly
    ``micro_batches_per_step`` micro-batches (accumulation x world size).

    Each epoch: the same seeded permutation as LengthGroupedBatchSampler is cut into megabatches,
    each megabatch is sorted by (source, target) length, longest first, and packed greedily: an
    example joins the open micro-batch while ``padded_tokens`` of the result stays within
    ``max_tokens``. Short dialogues so come in large micro-batches and long ones in small. The
    micro-batches beyond a megabatch's last whole step (fewer than ``micro_batches_per_step``) go
    back into the next megabatch; in the last megabatch the micro-batch with the most examples is
    halved until they make whole steps (a part of a length-sorted micro-batch never costs more than
    the whole). Consecutive micro-batches form a step, and the steps are shuffled. The order
    depends only on (seed, epoch), the budget and ``micro_batches_per_step``: 2 ranks x
    accumulation 1 and 1 rank x accumulation 2 train on the same micro-batches at every step, and a
    resumed run sees the same batches. Every rank runs the same number of micro-batches in every
    step (Accelerate deals them in turn: rank r takes r, r + W, ...). Only the last step of an
    epoch may be short, when the examples left are too few (a budget close to the longest example
    on a tiny split); Accelerate then evens the ranks' counts as it does for fixed-size batches.
    Set ``epoch`` before iterating.
    """

    # Variable-size batches: Accelerate must not judge them by a batch size (BatchSamplerShard
    # holds back a batch shorter than ``batch_size`` as the epoch's incomplete last one).
    batch_size = None
    drop_last = False

    def __init__(
        self,
        source_lengths: Sequence[int],
        target_lengths: Sequence[int],
        max_tokens: int,
        seed: int,
        group_by_length: bool = True,
        megabatch: int = 50,
        micro_batches_per_step: int = 1,
    ) -> None:
        self.source = np.asarray(source_lengths, dtype=np.int64)
        self.target = np.asarray(target_lengths, dtype=np.int64)
        longest = int((self.source + self.target).max(initial=0))
        if longest > max_tokens:
            raise UserError(
                f"train.micro_batch_tokens={max_tokens} is smaller than the longest training example "
                f"({longest} tokens); set it to at least data.max_source_length + data.max_target_length"
            )
        self.max_tokens = max_tokens
        self.seed = seed
        self.group_by_length = group_by_length
        self.micro_batches_per_step = micro_batches_per_step
        # About `megabatch` steps' worth of examples per megabatch, as for fixed-size batches.
        mean = float((self.source + self.target).mean()) if len(self.source) else 1.0
        per_batch = max(1, int(max_tokens // max(mean, 1.0)))
        self.megabatch_examples = megabatch * micro_batches_per_step * per_batch
        self.epoch = 0

    def __len__(self) -> int:
        return sum(len(step) for step in self.steps())

    def pack(self, indices: Sequence[int]) -> list[list[int]]:
        """Greedy packing in the given order: a new micro-batch starts where the budget would burst."""
        batches: list[list[int]] = []
        current: list[int] = []
        longest_source = longest_target = 0
        for index in indices:
            source = max(longest_source, int(self.source[index]))
            target = max(longest_target, int(self.target[index]))
            if current and padded_tokens(len(current) + 1, source, target) > self.max_tokens:
                batches.append(current)
                current, source, target = [], int(self.source[index]), int(self.target[index])
            current.append(int(index))
            longest_source, longest_target = source, target
        if current:
            batches.append(current)
        return batches

    def split_to_multiple(self, batches: list[list[int]]) -> list[list[int]]:
        """Halve the largest micro-batches until their number is a multiple of the step's (or
        nothing is left to halve); each half keeps its place, so the order stays length-sorted."""
        size = self.micro_batches_per_step
        while len(batches) % size:
            largest = max(range(len(batches)), key=lambda i: (len(batches[i]), -i))
            batch = batches[largest]
            if len(batch) < 2:
                break
            half = (len(batch) + 1) // 2
            batches[largest : largest + 1] = [batch[:half], batch[half:]]
        return batches

    def steps(self) -> list[list[list[int]]]:
        """The micro-batches of each optimizer step, in training order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.source))
        size = self.micro_batches_per_step
        batches: list[list[int]] = []
        tail: list[list[int]] = []
        carried = np.zeros(0, dtype=order.dtype)
        for start in range(0, len(order), self.megabatch_examples):
            mega = np.concatenate([carried, order[start : start + self.megabatch_examples]])
            if self.group_by_length:
                keys = self.source[mega] * (int(self.target.max(initial=0)) + 1) + self.target[mega]
                mega = mega[np.argsort(-keys, kind="stable")]
            packed = self.pack(mega)
            if start + self.megabatch_examples >= len(order):  # the last megabatch: nothing to carry on to
                packed = self.split_to_multiple(packed)
            whole = len(packed) - len(packed) % size
            batches += packed[:whole]
            tail = packed[whole:]
            carried = np.asarray([index for batch in tail for index in batch], dtype=order.dtype)
        steps = [batches[i : i + size] for i in range(0, len(batches), size)]
        if self.group_by_length:
            steps = [steps[i] for i in rng.permutation(len(steps))]
        # A short step (too few examples left to fill one) stays last, as with fixed-size batches.
        return steps + ([tail] if tail else [])

    def batches(self) -> list[list[int]]:
        return [batch for step in self.steps() for batch in step]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())


@dataclass
class ShardBatch:
    """One batch of a rank's shard; ``indices`` empty means a placeholder that keeps ranks in step."""

    indices: list[int]


def shard_sorted_batches(lengths: Sequence[int], batch_size: int, rank: int, world: int) -> list[ShardBatch]:
    """Evaluation shards: longest first, every rank gets the same number of batches.

    Global batches of ``batch_size * world`` examples in length order are split across ranks,
    so each generate/forward call sees similar lengths on every rank. Under ZeRO-3 every rank
    must call the model the same number of times; a rank with nothing left gets a placeholder
    batch (run on a dummy input, result dropped).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    step = batch_size * world
    batches = []
    for start in range(0, len(order), step):
        chunk = order[start : start + step]
        per_rank = math.ceil(len(chunk) / world)
        batches.append(ShardBatch(chunk[rank * per_rank : (rank + 1) * per_rank]))
    return batches


def dealt_generation_batches(
    lengths: Sequence[int], batch_size: int, rank: int, world: int
) -> list[ShardBatch]:
    """This rank's generation batches: formed once for the whole split, dealt whole to ranks.

    Batches of ``batch_size`` examples in length order (longest first) do not depend on the
    number of ranks, so every dialogue is generated in the same batch with the same padding on
    1, 2 or 3 ranks: the padded shape changes floating-point sums, which can flip a near-tied
    greedy token. Batch ``b`` goes to rank ``b % world``; every rank gets as many batches as the
    busiest one, placeholders (empty ``indices``) where it has none left, because ZeRO-3 and
    FSDP generation (``synced_gpus``) needs every rank to call ``generate`` equally often.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    mine = [ShardBatch(batch) for batch in batches[rank::world]]
    per_rank = math.ceil(len(batches) / world)
    return mine + [ShardBatch([]) for _ in range(per_rank - len(mine))]
