"""Training metrics: one JSON object per logged step in metrics.jsonl, mirrored to the recipe's
experiment trackers (train.report_to: TensorBoard by default) through ``accelerator.log``.

Only the main process writes metrics.jsonl. A resumed run first drops the lines logged after its
checkpoint, so the file reads as one uninterrupted run (the trackers do the same: trackers.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from launcher.core.jsonl import read_jsonl
from launcher.core.rundir import RunDir
from launcher.core.trackers import scalars, start_trackers


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


class MetricsLogger:
    """metrics.jsonl (the record the report reads) and the trackers, from one ``log(row)`` call."""

    def __init__(self, accelerator, run_dir: Path, recipe, resume_step: int = 0) -> None:
        self.accelerator = accelerator
        self.path = RunDir(run_dir).metrics
        self.enabled = accelerator.is_main_process
        if self.enabled and self.path.exists():
            kept = [row for row in read_metrics(run_dir) if row.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        start_trackers(accelerator, recipe, run_dir, resume_step)

    def log(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
        self.accelerator.log(scalars(row), step=row["step"])  # main process only (Accelerate)

    def close(self) -> None:
        """Finish every tracker run (flushes TensorBoard, ends the MLflow / W&B run)."""
        self.accelerator.end_training()
