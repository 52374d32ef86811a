"""Disk space: what a run will write, checked against the free space before launch, and the words
for a disk that fills up anyway during a save.

The estimate counts the bytes that dominate (no model is loaded; parameters come from model_facts:
the known FLAN-T5 sizes, tiny-t5's config, or a local directory's config.json):

* a checkpoint: without DeepSpeed the model in fp32 (4 B/parameter) plus AdamW's two moments for
  the trainable parameters (8 B); under DeepSpeed ZeRO the module in bf16 (2 B, fp32 4 B) plus fp32
  master weights and moments (12 B per trainable parameter);
* ``train.keep_checkpoints`` of them, plus the one being written before the oldest is pruned;
* ``final/``: the fp32 model (full) or the adapter (LoRA), and ``final/merged`` if asked for;
* a margin for logs, the tokenized-data cache, predictions and the report.
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path

from launcher.core.errors import UserError
from launcher.core.model_facts import lora_trainable_params, model_facts
from launcher.core.recipe import Recipe
from launcher.core.rundir import RunDir

MIB = 2**20
GIB = 2**30
MARGIN_BYTES = 32 * MIB  # logs, tokenized-data cache, predictions, report


@dataclass(frozen=True)
class Parameters:
    total: int
    trainable: int


def total_parameters(name: str) -> int | None:
    """Parameters of the model without loading it (model_facts; None: a hub id we know nothing about)."""
    try:
        return model_facts(name).params
    except UserError:
        return None  # a config.json transformers cannot read: the ranks will say so


def lora_parameters(recipe: Recipe, total: int) -> int:
    """LoRA's trainable parameters: r x (in + out) per targeted matrix, + out with DoRA (the model's
    shapes when known)."""
    from launcher.core.families import estimate_targets

    try:
        return lora_trainable_params(
            model_facts(recipe.model.name),
            recipe.lora.r,
            estimate_targets(recipe.lora.target_modules),
            recipe.lora.use_dora,
        )
    except UserError:
        return total // 100  # an unknown architecture: about 1%, LoRA's usual size


def parameters(recipe: Recipe) -> Parameters | None:
    total = total_parameters(recipe.model.name)
    if total is None:
        return None
    trainable = lora_parameters(recipe, total) if recipe.train.method == "lora" else total
    return Parameters(total, trainable)


def checkpoint_bytes(recipe: Recipe, params: Parameters) -> int:
    if recipe.launch.zero:
        module = 2 if recipe.model.precision == "bf16" else 4
        return module * params.total + 12 * params.trainable
    return 4 * params.total + 8 * params.trainable


def final_bytes(recipe: Recipe, params: Parameters) -> int:
    if recipe.train.method == "full":
        return 4 * params.total
    return 4 * params.trainable + (4 * params.total if recipe.lora.save_merged else 0)


def estimate_checkpoint_bytes(recipe: Recipe) -> int | None:
    params = parameters(recipe)
    return checkpoint_bytes(recipe, params) if params else None


def human(size: float) -> str:
    return f"{size / GIB:.1f} GiB" if size >= GIB else f"{size / MIB:.1f} MiB"


def existing_bytes(path: Path) -> int:
    """Bytes already under a path (what a resumed run replaces rather than adds)."""
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(recipe: Recipe, run_dir: Path) -> None:
    """Refuse a launch whose checkpoints and final model cannot fit on the output's filesystem."""
    params = parameters(recipe)
    if params is None:
        return  # a hub model we cannot size without downloading it: nothing to check against
    checkpoint = checkpoint_bytes(recipe, params)
    keep = recipe.train.keep_checkpoints
    needed = checkpoint * (keep + 1) + final_bytes(recipe, params) + MARGIN_BYTES
    needed -= existing_bytes(RunDir(run_dir).checkpoints) + existing_bytes(RunDir(run_dir).final)
    free = shutil.disk_usage(nearest_existing(run_dir)).free
    if needed > free:
        raise UserError(
            f"--output {run_dir}: the run will write about {human(needed)} ({keep + 1} checkpoints of "
            f"{human(checkpoint)} while saving with train.keep_checkpoints={keep}, the final model and logs) "
            f"but only {human(free)} is free there; free space, lower train.keep_checkpoints, or pick another --output"
        )


# ---------------------------------------------------------------- a disk that fills during a run


# A write that fails with less than this left on its filesystem failed for want of space:
# torch.save reports ENOSPC only as "unexpected pos N vs M".
LOW_SPACE_BYTES = 16 * MIB


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC however a library words it (safetensors, DeepSpeed and plain writes differ)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if any(
            word in text
            for word in (
                "No space left on device",
                "os error 28",
                "StorageFull",
                "Disk quota exceeded",
                "file write failed",
            )
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(nearest_existing(path)).free
