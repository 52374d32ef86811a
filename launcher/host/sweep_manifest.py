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
from launcher.core.jsonl import is_whole
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
    """The manifest, every field checked: the sweep command, its report and its SLURM tasks
    build folder names, command lines and table columns from it."""
    path = SweepDir(sweep_dir).manifest
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problem = str(exc)
    else:
        problem = manifest_problem(data)
    if problem:
        raise UserError(
            f"{path} is not a sweep manifest ftlaunch can read ({problem}); restore the file "
            "`ftlaunch sweep` wrote, or sweep into a new --output"
        )
    return Sweep(
        dir=sweep_dir,
        method=data["method"],
        args=list(data["args"]),
        keys=list(data["keys"]),
        points=[Point(p["index"], p["name"], dict(p["values"])) for p in data["points"]],
        jobs=list(data.get("jobs", [])),
    )


def is_text_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def manifest_problem(data: Any) -> str | None:
    """What is wrong with a manifest's fields (the first thing found), or None."""
    if not isinstance(data, dict):
        return "not a JSON object"
    if data.get("method") not in ("full", "lora"):
        return f"method is {data.get('method')!r}, not full or lora"
    if not is_text_list(data.get("args")):
        return "args is not a list of strings"
    keys = data.get("keys")
    if not is_text_list(keys) or not keys or len(set(keys)) != len(keys):
        return "keys is not a list of distinct recipe keys"
    points = data.get("points")
    if not isinstance(points, list) or not points:
        return "points is not a list of points"
    for number, point in enumerate(points):
        problem = point_problem(point, keys)
        if problem:
            return f"point {number} {problem}"
    if not isinstance(data.get("jobs", []), list):
        return "jobs is not a list"
    return None


def point_problem(point: Any, keys: list[str]) -> str | None:
    if not isinstance(point, dict):
        return "is not a JSON object"
    if not is_whole(point.get("index")):
        return f"has index {point.get('index')!r}, not a number"
    name = point.get("name")
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name:
        return f"has name {name!r}, not a folder name"
    values = point.get("values")
    if not isinstance(values, dict) or set(values) != set(keys) or not is_text_list(list(values.values())):
        return f"has values {values!r}, not one text value for each of {keys}"
    return None


def write_manifest(sweep: Sweep) -> None:
    """In one rename: a report reading it meanwhile sees the old or the new manifest."""
    sweep.dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(SweepDir(sweep.dir).manifest, sweep.to_json())


def status_path(sweep_dir: Path, index: int) -> Path:
    return SweepDir(sweep_dir).status(index)


def read_status(sweep_dir: Path, index: int) -> dict[str, Any] | None:
    """A point's status record, or None where there is none or it cannot be read."""
    try:
        record = json.loads(status_path(sweep_dir, index).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_status(sweep_dir: Path, index: int, state: str, exit_code: int | None = None) -> None:
    record = {"state": state, "exit_code": exit_code, "time": time.time(), "host": os.uname().nodename}
    path = status_path(sweep_dir, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record) + "\n")
