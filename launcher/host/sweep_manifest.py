"""A sweep's record on disk: ``SWEEP/sweep.json`` (the manifest: method, shared flags, points)
and ``SWEEP/status/<index>.json`` (how each point's latest attempt stands).

Written by sweep.py (and ``slurm/sweep.sh`` for array tasks), read by sweep.py and
sweep_report.py: the one thing both know, so neither imports the other's module for it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from launcher.core.atomic import write_text_atomic
from launcher.core.errors import UserError
from launcher.core.rundir import SWEEP_MANIFEST, SweepDir
from launcher.host.sweep_grid import Values

MANIFEST = SWEEP_MANIFEST


@dataclass
class Point:
    index: int  # stable: the SLURM array index, the status file
    name: str  # the run directory under SWEEP/
    values: Values

    def sets(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.values.items()]


@dataclass
class Sweep:
    dir: Path
    method: str
    args: list[str]  # the flags of `ftlaunch METHOD` every point shares
    keys: list[str]  # every varied key, first seen first
    points: list[Point] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)  # SLURM array submissions

    def run_dir(self, point: Point) -> Path:
        return SweepDir(self.dir).point(point.name).path

    def to_json(self) -> str:
        data = {
            "ftlaunch_sweep": 1,
            "method": self.method,
            "args": self.args,
            "keys": self.keys,
            "points": [asdict(point) for point in self.points],
            "jobs": self.jobs,
        }
        return json.dumps(data, indent=2) + "\n"


def is_sweep(path: Path) -> bool:
    return SweepDir(path).is_sweep()


def read_sweep(sweep_dir: Path) -> Sweep:
    path = SweepDir(sweep_dir).manifest
    try:
        data = json.loads(path.read_text())
        return Sweep(
            dir=sweep_dir,
            method=data["method"],
            args=list(data["args"]),
            keys=list(data["keys"]),
            points=[Point(p["index"], p["name"], dict(p["values"])) for p in data["points"]],
            jobs=list(data.get("jobs", [])),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"{path} is not a sweep manifest ftlaunch can read ({exc}); pick a new --output"
        ) from None


def write_manifest(sweep: Sweep) -> None:
    """In one rename: a report reading it meanwhile sees the old or the new manifest."""
    sweep.dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(SweepDir(sweep.dir).manifest, sweep.to_json())


def status_path(sweep_dir: Path, index: int) -> Path:
    return SweepDir(sweep_dir).status(index)


def read_status(sweep_dir: Path, index: int) -> dict[str, Any] | None:
    try:
        return json.loads(status_path(sweep_dir, index).read_text())
    except (OSError, ValueError):
        return None


def write_status(sweep_dir: Path, index: int, state: str, exit_code: int | None = None) -> None:
    record = {"state": state, "exit_code": exit_code, "time": time.time(), "host": os.uname().nodename}
    path = status_path(sweep_dir, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record) + "\n")
