"""DialogSum data: loading (hub id, local directory, embedded sample), the prompt, tokenization,
length-grouped batches and per-rank shards.

Every split is normalised to rows of ``id``, ``dialogue``, ``summary`` (the training target)
and ``references`` (all human summaries: one for train/validation, ``summary1..3`` for the
original DialogSum test file, or the repeated rows of the hub's 1,500-row test split merged
back into 500 dialogues).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from launcher.errors import UserError
from launcher.paths import SAMPLE_DATA_DIR
from launcher.recipe import EMBEDDED_DATA, DataSection

REFERENCE_FIELDS = ("summary1", "summary2", "summary3")


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
            f"data {dataset!r} is not a directory; pass a folder with train.jsonl, validation.jsonl and "
            "test.jsonl, a hub id such as knkarthick/dialogsum, or sample"
        )
    return None


def read_jsonl_lines(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Strict JSON Lines, as (line number, object): every failure names the file, line and fix.

    A UTF-8 byte-order mark and CRLF line ends (Windows editors, spreadsheet exports) are accepted.
    """
    rows: list[tuple[int, dict[str, Any]]] = []
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(
                    f"{path} line {number} is not UTF-8 text (byte {offset + exc.start}); "
                    "re-encode it as UTF-8"
                ) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                hint = (
                    " (it looks like a Python literal: convert with json.dumps)"
                    if line.lstrip().startswith("{'")
                    else ""
                )
                raise UserError(
                    f"{path} line {number} is not JSON ({exc.msg}){hint}; each line must be one JSON object"
                ) from None
            if not isinstance(row, dict):
                raise UserError(
                    f"{path} line {number} is not a JSON object; each line must be one JSON object"
                )
            rows.append((number, row))
    return rows


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [row for _, row in read_jsonl_lines(path)]


def normalize_rows(
    rows: list[tuple[int, dict[str, Any]]], source: str, unit: str = "line"
) -> list[dict[str, Any]]:
    """Map DialogSum's field layouts onto id/dialogue/summary/references.

    ``rows`` carry their position (a file's line number, or a hub row's index) for messages.
    """
    out: list[dict[str, Any]] = []
    for number, row in rows:
        references = [
            row[key] for key in REFERENCE_FIELDS if isinstance(row.get(key), str) and row[key].strip()
        ]
        if not references and isinstance(row.get("summary"), str) and row["summary"].strip():
            references = [row["summary"]]
        dialogue = row.get("dialogue")
        if not isinstance(dialogue, str) or not dialogue.strip():
            raise UserError(
                f"{source} {unit} {number} has no 'dialogue' text; every row needs dialogue and summary"
            )
        if not references:
            raise UserError(
                f"{source} {unit} {number} has no 'summary' (or summary1..3) text; every row needs dialogue and summary"
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


def load_split(dataset: str, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of one split, normalised; errors are UserErrors naming what to fix."""
    directory = dataset_dir(dataset)
    if directory is not None:
        path = directory / f"{split}.jsonl"
        if not path.is_file():
            present = sorted(p.stem for p in directory.glob("*.jsonl"))
            raise UserError(
                f"split {split!r} not found: {path} does not exist (splits there: {', '.join(present) or 'none'})"
            )
        rows = normalize_rows(read_jsonl_lines(path), str(path))
    else:
        rows = normalize_rows(
            list(enumerate(load_hub_split(dataset, split))), f"{dataset}[{split}]", unit="row"
        )
    if not rows:
        raise UserError(f"split {split!r} of {dataset} is empty; it needs at least one dialogue")
    return rows[:limit] if limit else rows


def load_hub_split(dataset: str, split: str) -> list[dict[str, Any]]:
    """A split from the Hugging Face hub (or its local cache)."""
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
    return [dict(row) for row in loaded]


def data_fingerprint(dataset: str, split: str) -> str:
    """Changes when the data changes: file size and mtime for local files, the id for the hub."""
    directory = dataset_dir(dataset)
    if directory is None:
        return f"hub:{dataset}:{split}"
    stat = (directory / f"{split}.jsonl").stat()
    return f"{(directory / f'{split}.jsonl').resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


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
