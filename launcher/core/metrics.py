"""Training metrics: one JSON object per logged step in metrics.jsonl, mirrored to the recipe's
experiment trackers (train.report_to: TensorBoard by default) through ``accelerator.log``.

Only the main process writes metrics.jsonl. A resumed run first drops the lines logged after its
checkpoint, a fresh start (also a ``--resume auto`` that found no checkpoint) every line of earlier
attempts, step 0's included: the file reads as one uninterrupted run (the trackers do the same:
trackers.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from launcher.core.jsonl import read_jsonl
from launcher.core.rundir import RunDir
from launcher.core.trackers import rewind_of, scalars, start_trackers


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return []
    return read_jsonl(path)


def json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN or Infinity: a non-finite number becomes null. The loop stops a diverged
    run before logging its loss (finite.py); this keeps any other value from breaking the file."""
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in row.items()
    }


def kept_rows(rows: list[dict[str, Any]], resume_step: int | None) -> list[dict[str, Any]]:
    """The rows of earlier attempts a start keeps: those up to and including its checkpoint's step
    (``resume_step``; that run logged them, step 0's evaluation too), none on a fresh start (None):
    a first attempt stopped before its first checkpoint left rows a new start logs again."""
    if resume_step is None:
        return []
    return [row for row in rows if row.get("step", 0) <= resume_step]


class MetricsLogger:
    """metrics.jsonl (the record the report reads) and the trackers, from one ``log(row)`` call.

    ``resume_step``: the step of the checkpoint this start continues, None for a fresh start."""

    def __init__(self, accelerator, run_dir: Path, recipe, resume_step: int | None = None) -> None:
        self.accelerator = accelerator
        self.path = RunDir(run_dir).metrics
        self.enabled = accelerator.is_main_process
        earlier = read_metrics(run_dir) if self.enabled else []
        kept = kept_rows(earlier, resume_step)
        if self.enabled and self.path.exists():
            self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        start_trackers(accelerator, recipe, run_dir, resume_step, kept, rewind_of(earlier, resume_step))

    def log(self, row: dict[str, Any], untracked: tuple[str, ...] = ()) -> None:
        """One metrics.jsonl line; its numbers, less the keys ``untracked`` (a value the trackers
        already have at this step), to the trackers."""
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
        tracked = {key: value for key, value in scalars(row).items() if key not in untracked}
        self.accelerator.log(tracked, step=row["step"])  # main process only (Accelerate)

    def close(self) -> None:
        """Finish every tracker run (flushes TensorBoard, ends the MLflow / W&B run)."""
        self.accelerator.end_training()
