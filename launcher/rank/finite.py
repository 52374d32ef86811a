"""A run that diverges stops: a non-finite loss, gradient norm or weight ends training at once.

Nothing here reads a device value on the host by itself: the loop checks the numbers it already
reads on its logging steps (the loss and gradient norm, summed over all ranks, so every rank
decides the same) and the weights once before every save (one flag all-reduced per save), so no
step gains a host sync. The stop is a ``Diverged`` failure: every rank raises it at the same step,
exits 1, and the supervisor shows its one line with advice that fits (resuming with the same
settings diverges again).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from launcher.core import checkpoint as ckpt
from launcher.core.errors import DIVERGED, Diverged
from launcher.rank.distributed import any_rank


def non_finite(values: dict[str, float | None]) -> str | None:
    """The first named value that is inf or NaN (``None`` values are absent, not bad)."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            return f"{name} is {value}"
    return None


def diverged_message(run_dir: Path, step: int, what: str, lr: float) -> str:
    """One line: where, what, the checkpoint to go back to, and what to change (``lr``: the
    recipe's peak train.lr, the number a user would lower)."""
    good = ckpt.find_latest_checkpoint(run_dir, checksums=False)
    back = (
        f"last good checkpoint: {good} (continue from it with --resume auto after the change)"
        if good
        else "no checkpoint was written before it (start again with --overwrite after the change)"
    )
    return (
        f"{DIVERGED} at step {step}: the {what}; nothing was saved from this step on; {back}; "
        f"lower train.lr (now {lr:g}) or try model.precision=fp32"
    )


def check_values(run_dir: Path, step: int, lr: float, values: dict[str, float | None]) -> None:
    """Raise Diverged if a value is not finite; call it with values every rank holds alike
    (reduced over ranks), so all ranks stop at the same step and none waits in a collective."""
    what = non_finite(values)
    if what:
        raise Diverged(diverged_message(run_dir, step, what, lr))


def local_values(param: torch.nn.Parameter) -> torch.Tensor:
    """The part of a parameter this rank holds: ZeRO-3's partition, FSDP2's local shard, or all."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor
    if hasattr(param, "to_local"):
        return param.to_local()
    return param.detach()


@torch.no_grad()
def weights_finite(accelerator, model: torch.nn.Module) -> bool:
    """True on every rank when every trainable weight on every rank is finite (one all-reduce).

    Only trainable weights can have been changed by the optimizer (LoRA: the adapters).
    """
    bad = torch.zeros((), dtype=torch.bool, device=accelerator.device)
    for param in model.parameters():
        if param.requires_grad:
            values = local_values(param)
            if values.numel():
                bad |= ~torch.isfinite(values).all()
    return not any_rank(accelerator, bool(bad.item()))


def check_weights(accelerator, model, run_dir: Path, step: int, lr: float) -> None:
    """Before a save: a checkpoint or final/ with inf/NaN weights is never written."""
    if not weights_finite(accelerator, model):
        raise Diverged(diverged_message(run_dir, step, "weights hold inf or NaN values", lr))
