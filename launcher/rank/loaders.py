"""The training loader of a rank: the run's tokenized splits, its batch sampler (length-grouped
micro-batches or a token budget, one shard per rank) and collator, and the iteration of one
epoch that a resumed run starts mid-way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from launcher.core.dialogues import load_data_split
from launcher.core.recipe import Recipe
from launcher.core.rundir import RunDir
from launcher.rank.data import (
    LengthGroupedBatchSampler,
    TokenBudgetBatchSampler,
    tokenized_split,
    train_batch_sampler,
)


@dataclass
class TrainingData:
    loader: torch.utils.data.DataLoader
    sampler: LengthGroupedBatchSampler | TokenBudgetBatchSampler
    validation: object  # tokenized datasets.Dataset
    collator: object


def build_collator(tokenizer, on_gpu: bool, model=None):
    from transformers import DataCollatorForSeq2Seq

    # Labels are padded with -100 so padding never enters the loss. With the model, batches also
    # carry decoder_input_ids (labels shifted right), so the loop computes the loss itself.
    return DataCollatorForSeq2Seq(
        tokenizer, model=model, label_pad_token_id=-100, pad_to_multiple_of=8 if on_gpu else None
    )


def recipe_collator(recipe: Recipe, tokenizer, on_gpu: bool, model=None):
    """The run's collator: with train.compile, batches padded to length buckets (compiling.py)."""
    if not recipe.compiles:
        return build_collator(tokenizer, on_gpu, model)
    from launcher.rank.compiling import BucketCollator

    data = recipe.data
    base = build_collator(tokenizer, False, model)  # the buckets are multiples of 8 already
    return BucketCollator(base, tokenizer.pad_token_id, data.max_source_length, data.max_target_length)


def prepare_data(recipe: Recipe, tokenizer, accelerator, run_dir: Path, model=None) -> TrainingData:
    data = recipe.data
    cache = RunDir(run_dir).cache
    with accelerator.main_process_first():
        train_rows = load_data_split(data, data.train_split, data.train_limit)
        val_rows = load_data_split(data, data.validation_split, data.validation_limit)
        train = tokenized_split(train_rows, tokenizer, data, cache, f"{data.dataset}:{data.train_split}")
        validation = tokenized_split(
            val_rows, tokenizer, data, cache, f"{data.dataset}:{data.validation_split}"
        )
    sampler = train_batch_sampler(
        train,
        recipe.train,
        data.group_by_length,
        micro_batches_per_step=recipe.train.grad_accum * accelerator.num_processes,
        buckets=(data.max_source_length, data.max_target_length) if recipe.compiles else None,
    )
    collator = recipe_collator(recipe, tokenizer, accelerator.device.type == "cuda", model)
    loader = torch.utils.data.DataLoader(
        train.with_format("python"),
        batch_sampler=sampler,
        collate_fn=collator,
        pin_memory=pins_memory(accelerator),
    )
    return TrainingData(loader, sampler, validation, collator)


def pins_memory(accelerator) -> bool:
    """Page-locked batches on CUDA ranks: only a pinned host tensor is copied with
    ``non_blocking=True`` (build_accelerator) without the host waiting for the copy."""
    return accelerator.device.type == "cuda"


def batches_per_rank_by_epoch(sampler, epochs: int, world: int) -> list[int]:
    """Micro-batches each rank runs in each epoch. Fixed-size batches give the same count every
    epoch; a token budget packs each epoch's shuffle into a slightly different number."""
    if not isinstance(sampler, TokenBudgetBatchSampler):
        return [math.ceil(len(sampler) / world)] * epochs
    counts = []
    for epoch in range(epochs):
        sampler.epoch = epoch
        counts.append(math.ceil(len(sampler) / world))
    sampler.epoch = 0
    return counts


def epoch_batches(accelerator, loader, skip: int):
    """Iterate one epoch; a resumed epoch skips the batches already trained on.

    Starting a DataLoader iteration draws a base seed from torch's global RNG. An uninterrupted
    run drew it at the start of the epoch, before the checkpoint's RNG snapshot; the resumed
    run must not draw it again, or every later dropout mask shifts.
    """
    if not skip:
        yield from loader
        return
    rng = torch.get_rng_state()
    iterator = iter(accelerator.skip_first_batches(loader, skip))
    first = next(iterator, None)  # the iteration (and its seed draw) starts here
    torch.set_rng_state(rng)
    if first is None:
        return
    yield first
    yield from iterator


def epoch_length(epoch: int, batches_by_epoch: list[int]) -> int:
    """This epoch's own number of micro-batches per rank (a token budget packs each epoch into a
    different number)."""
    return batches_by_epoch[min(epoch, len(batches_by_epoch) - 1)]
