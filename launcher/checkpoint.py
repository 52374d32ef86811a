"""Checkpoints that survive crashes: written to a temporary folder, renamed when complete, and
only then named by the ``latest`` marker.

A checkpoint is ``checkpoints/step_N/``: Accelerate's state (model, optimizer, scheduler, RNG of
every rank; DeepSpeed's sharded engine state under ZeRO) plus ``ftlaunch_state.json`` with the
data position and the shape of the run that wrote it (world size, accumulation, seed).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from launcher.errors import UserError

STATE_FILE = "ftlaunch_state.json"
# Fault injection for the crash-during-save test: the main rank dies after the shards are
# written but before the checkpoint is complete, as a crash or a full disk would leave it.
CRASH_IN_SAVE_ENV = "FTLAUNCH_FAULT_CRASH_IN_SAVE_AT_STEP"
LATEST_FILE = "latest"


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches this rank consumed in `epoch`
    world_size: int = 1
    grad_accum: int = 1
    micro_batch_size: int = 1
    seed: int = 0
    method: str = "full"


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_checkpoint(accelerator, run_dir: Path, state: TrainState, keep: int) -> Path:
    """All ranks call this. The previous checkpoint stays valid until the new one is complete."""
    root = checkpoints_dir(run_dir)
    final = root / f"step_{state.step}"
    tmp = root / f".tmp-step_{state.step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and os.environ.get(CRASH_IN_SAVE_ENV) == str(state.step):
        os._exit(17)
    if accelerator.is_main_process:
        write_text_atomic(tmp / STATE_FILE, json.dumps(asdict(state), indent=2))
        if final.exists():  # the same step saved again (a resumed run): replace it whole
            old = root / f".old-step_{state.step}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        write_text_atomic(root / LATEST_FILE, final.name + "\n")
        prune_checkpoints(root, keep)
    accelerator.wait_for_everyone()
    return final


def remove_incomplete(run_dir: Path) -> None:
    """Drop what a crash left mid-save (``.tmp-step_N``); complete checkpoints are untouched."""
    for leftover in checkpoints_dir(run_dir).glob(".tmp-step_*"):
        shutil.rmtree(leftover, ignore_errors=True)


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a folder counts once its state file is in it)."""
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def prune_checkpoints(root: Path, keep: int) -> None:
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint: the one ``latest`` names, else the newest complete folder."""
    root = checkpoints_dir(run_dir)
    marker = root / LATEST_FILE
    if marker.is_file():
        named = root / marker.read_text().strip()
        if (named / STATE_FILE).is_file():
            return named
    complete = complete_checkpoints(root)
    return complete[-1] if complete else None


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """``auto``: the newest complete checkpoint of this run, if any; a path: that checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        return find_latest_checkpoint(run_dir)
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise UserError(f"--resume {resume}: not a complete ftlaunch checkpoint (no {STATE_FILE} in it)")
    return path


def read_state(checkpoint: Path) -> TrainState:
    return TrainState(**json.loads((checkpoint / STATE_FILE).read_text()))


def check_compatible(saved: TrainState, current: TrainState, checkpoint: Path, force: bool = False) -> None:
    """Refuse to resume a checkpoint written by a run of another shape (DeepSpeed #3810)."""
    problems = [
        f"{name} {getattr(saved, name)} -> {getattr(current, name)}"
        for name in ("world_size", "grad_accum", "micro_batch_size", "method")
        if getattr(saved, name) != getattr(current, name)
    ]
    if problems and not force:
        raise UserError(
            f"checkpoint {checkpoint} was written by a different run shape ({'; '.join(problems)}); resume with "
            "the same --gpus/--nodes and batch settings, or pass --force-resume to accept a changed data order"
        )
