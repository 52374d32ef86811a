"""A training step that runs out of GPU memory, told apart from other crashes: the rank records it
(errors.OutOfMemory -> the failure record's ``out_of_memory``) with the batch shape it ran at, so
that the supervisor can continue with a smaller micro batch (train.auto_find_batch_size,
core/auto_batch.py) or say what to change.

Test hook: ``FTLAUNCH_FAULT_OOM_ABOVE_MICRO_BATCH=N`` (or ``N:STEP``) makes every training step
raise torch's OutOfMemoryError while the micro batch (or token budget) is above N (from optimizer
step STEP on: a long batch later in the epoch), on every start, so that CPU ranks rehearse what a
GPU does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from launcher.core.auto_batch import batch_shape, describe_shape
from launcher.core.errors import OutOfMemory
from launcher.core.ranklog import last_line
from launcher.core.recipe import Recipe

OOM_FAULT_ENV = "FTLAUNCH_FAULT_OOM_ABOVE_MICRO_BATCH"
# What older stacks raise: a RuntimeError with this text (torch.OutOfMemoryError since torch 2.5).
CUDA_OOM_TEXT = "CUDA out of memory"


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (torch.cuda.OutOfMemoryError), or the RuntimeError of older stacks."""
    kind = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, kind) or (isinstance(exc, RuntimeError) and CUDA_OOM_TEXT in str(exc))


def inject_fault(recipe: Recipe, step: int) -> None:
    """The test hook (module docstring): raise as the GPU would, above the micro batch it names."""
    raw = os.environ.get(OOM_FAULT_ENV)
    if not raw:
        return
    limit, _, start = raw.partition(":")
    size = recipe.train.micro_batch_tokens or recipe.train.micro_batch_size
    if size > int(limit) and step >= int(start or 0):
        raise torch.OutOfMemoryError(
            f"CUDA out of memory (injected fault: micro batch {size} > {limit}, {OOM_FAULT_ENV})"
        )


@contextlib.contextmanager
def recorded_as_out_of_memory(recipe: Recipe) -> Iterator[None]:
    """Around a training step: an out-of-memory error leaves as errors.OutOfMemory with the batch shape."""
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        shape = batch_shape(recipe)
        raise OutOfMemory(
            f"out of memory in a training step at {describe_shape(shape)}: {last_line(exc)}", shape
        ) from exc
