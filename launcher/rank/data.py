"""Training batches from dialogue rows: the prompt, tokenization (cached per split), length-grouped
and token-budget micro-batches, per-rank shards, and the generation batches dealt to ranks.
Reading the dialogue files themselves is ``launcher.core.dialogues``.
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

from launcher.core.errors import UserError
from launcher.core.prompt_room import check_room_for_dialogue, prompt_prefix, tokenizer_name
from launcher.core.recipe import DataSection, Recipe, TrainSection
from launcher.rank.compiling import bucketed_lengths

# ---------------------------------------------------------------- prompt and tokens


def build_prompt(template: str, dialogue: str) -> str:
    return template.replace("{dialogue}", dialogue)


def check_prompt_room(tokenizer, recipe: Recipe) -> None:
    """The prompt leaves the dialogue room in data.max_source_length, counted with the tokenizer
    the rank truncates with (the host counted only where the tokenizer was on disk there)."""
    prefix_tokens = len(tokenizer(prompt_prefix(recipe.data.prompt))["input_ids"])
    check_room_for_dialogue(recipe.data, prefix_tokens, tokenizer_name(recipe))


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
    FSDP generation in lockstep (``synced_gpus``, weights gathered per module) needs every rank
    to call ``generate`` equally often; ranks that hold the whole model skip them
    (``gathered.weights_for_generation``).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    mine = [ShardBatch(batch) for batch in batches[rank::world]]
    per_rank = math.ceil(len(batches) / world)
    return mine + [ShardBatch([]) for _ in range(per_rank - len(mine))]
