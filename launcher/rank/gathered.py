"""Generating from sharded weights: the whole model gathered once, not once per token.

Under ZeRO-3 and FSDP2 every module's forward gathers its weights from all ranks and frees them
after. Training runs each forward once per micro-batch; ``generate`` runs the decoder once per
generated token, so a 128-token summary gathers the decoder 128 times, and every rank must stay
in lockstep (``synced_gpus``) however short its own summaries are. When the whole model fits
beside what the rank already holds, it is gathered once for the whole generation instead (as
DeepSpeed's ``unwrap_model_for_generation`` and TRL's ``ds3_gather_for_generation`` do), and
the ranks generate independently; after it, each rank holds its shard again and training goes
on unchanged. ``eval.gather_weights`` decides: ``auto`` gathers when the whole model takes at
most half of the memory free on every rank, ``true`` always, ``false`` never.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from launcher.rank.distributed import any_rank, print_main, uses_fsdp, zero_stage

# auto gathers when the whole model takes at most this share of the free memory: the rest is
# for generation itself (activations, beams, the decoder cache).
FREE_MEMORY_SHARE = 0.5
AUTO = "auto"


def whole_model_bytes(model: torch.nn.Module) -> int:
    """The bytes of every weight at its full size: ZeRO-3 records it beside its partition
    (``ds_numel``), FSDP2's DTensors report it as their size."""
    return sum(
        getattr(param, "ds_numel", param.numel()) * param.element_size() for param in model.parameters()
    )


def free_memory_bytes(device: torch.device) -> int:
    """What a gather can still take here: free device memory plus what PyTorch's caching
    allocator holds unused (CUDA); this rank's share of the host's available memory (CPU ranks:
    the node's ranks gather at the same time, into the same memory)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    import psutil

    return psutil.virtual_memory().available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def gathers_whole(accelerator, model: torch.nn.Module, setting: bool | str) -> bool:
    """Whether to gather the whole model for generation: the same answer on every rank; ``auto``
    says in one line why it does not."""
    if setting != AUTO:
        return bool(setting)
    needed, free = whole_model_bytes(model), free_memory_bytes(accelerator.device)
    fits = fits_beside(needed, free)
    if any_rank(accelerator, not fits):
        print_main(
            accelerator,
            f"generation: the whole model ({needed / 2**30:.2f} GiB) takes more than half the free memory "
            f"of a rank ({free / 2**30:.2f} GiB free on the main rank); each module's weights are gathered "
            "per token instead (eval.gather_weights=true gathers the whole model anyway)",
        )
        return False
    return True


def fits_beside(needed: int, free: int) -> bool:
    return needed <= FREE_MEMORY_SHARE * free


@contextlib.contextmanager
def weights_for_generation(
    accelerator, model, generator: torch.nn.Module, setting: bool | str
) -> Iterator[bool]:
    """Around a whole generation on every rank (a collective: all ranks enter together). Yields
    whether the ranks must generate in lockstep: True while each forward still gathers weights
    (``synced_gpus``), False when the model is whole on every rank or was never sharded."""
    stage3, fsdp = zero_stage(accelerator) == 3, uses_fsdp(accelerator)
    if not (stage3 or fsdp):
        yield False
        return
    if not gathers_whole(accelerator, generator, setting):
        yield True
        return
    if stage3:
        with zero3_gathered(model):
            yield False
    else:
        from launcher.rank.fsdp import all_units_unsharded

        with all_units_unsharded(generator):
            yield False


@contextlib.contextmanager
def zero3_gathered(engine) -> Iterator[None]:
    """Every partitioned weight gathered, and DeepSpeed's hooks off for the duration: those that
    gather and release each module's weights, and the root's start-of-forward hook, which checks
    with the other ranks (a collective) on every forward until its module trace is complete (a
    run that has not trained yet: the original's score, ``ftlaunch eval``). Then registered as
    before, partitions and optimizer state untouched. DeepSpeed's own ``unwrap_model_for_generation``
    leaves the start hook on, so ranks that generate different numbers of tokens wait on each other
    forever; hence this one (DeepSpeed private state, pinned by tests/test_gathered_generation.py)."""
    import deepspeed

    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    root = offload.module
    with deepspeed.zero.GatheredParameters(list(root.parameters())):
        start_of_forward = root._forward_pre_hooks[offload.fwd_pre_hook.id]
        offload.fwd_pre_hook.remove()
        offload._remove_module_hooks()
        try:
            yield
        finally:
            offload.fwd_pre_hook = root.register_forward_pre_hook(start_of_forward, prepend=True)
            offload._register_deepspeed_module(root)
