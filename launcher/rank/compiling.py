"""train.compile: length buckets for the batches a compiled model sees, and its compile counts.

Accelerate applies ``torch.compile`` itself (accelerate.yaml's dynamo_config, render.py). What
the loop adds: batches padded to a few lengths, so an epoch compiles a handful of graphs rather
than one per batch length, and the number of graphs dynamo compiled, for the metrics and report.
Padding is exact: padded source positions are masked (attention_mask 0) and padded labels are
-100, which the token-weighted loss ignores and does not count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SOURCE_MULTIPLE = 64  # source lengths: 64, 128, ..., data.max_source_length
TARGET_MULTIPLE = 16  # target lengths: 16, 32, ..., data.max_target_length


def bucket_length(length: int, multiple: int, cap: int) -> int:
    """The bucket ``length`` is padded to: the next multiple, never above the recipe's maximum
    (truncation already keeps every example at or under it)."""
    return max(length, min(math.ceil(length / multiple) * multiple, cap))


def bucketed_lengths(
    sources: list[int], targets: list[int], max_source: int, max_target: int
) -> tuple[list[int], list[int]]:
    """Each example's source and target lengths as a compiled run pads them (its bucket lengths)."""
    return (
        [bucket_length(n, SOURCE_MULTIPLE, max_source) for n in sources],
        [bucket_length(n, TARGET_MULTIPLE, max_target) for n in targets],
    )


def bucket_count(max_source: int, max_target: int) -> int:
    """How many (source, target) shapes bucketing allows at most."""
    return math.ceil(max_source / SOURCE_MULTIPLE) * math.ceil(max_target / TARGET_MULTIPLE)


@dataclass
class BucketCollator:
    """Pads each example to its batch's bucket lengths, then collates with ``base``
    (DataCollatorForSeq2Seq, which then has nothing left to pad). Records the shapes it made."""

    base: object
    pad_token_id: int
    max_source: int
    max_target: int
    shapes: set[tuple[int, int]] = field(default_factory=set)

    def __call__(self, features: list[dict]) -> dict:
        source = bucket_length(max(len(f["input_ids"]) for f in features), SOURCE_MULTIPLE, self.max_source)
        target = bucket_length(max(len(f["labels"]) for f in features), TARGET_MULTIPLE, self.max_target)
        self.shapes.add((source, target))
        return self.base([pad_example(f, source, target, self.pad_token_id) for f in features])


def pad_example(feature: dict, source: int, target: int, pad_token_id: int) -> dict:
    padded = dict(feature)
    extra = source - len(feature["input_ids"])
    padded["input_ids"] = list(feature["input_ids"]) + [pad_token_id] * extra
    padded["attention_mask"] = list(feature["attention_mask"]) + [0] * extra
    padded["labels"] = list(feature["labels"]) + [-100] * (target - len(feature["labels"]))
    return padded


def compiled_graphs() -> int:
    """Graphs dynamo compiled in this process so far (each with its backward, compiled by
    AOTAutograd alongside): the first compile and every recompilation, graph breaks included."""
    import torch._dynamo.utils

    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
