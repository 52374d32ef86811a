"""A run's records as the report, the model card and the sweep table read them back: one
evaluation's ROUGE scores (rouge.json) and the rows of metrics.jsonl, each checked for what those
readers print.

The ranks write these files, but people edit, copy and truncate them; a reader that trusted them
would end in a traceback. Each check returns the first problem in words (or None), and the
readers turn it into one line naming the file, the line or key, and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launcher.core.errors import UserError
from launcher.core.jsonl import is_number, is_whole, read_jsonl_lines
from launcher.core.rundir import RunDir
from launcher.results.rouge import ROUGE_TYPES


def shown(row: dict[str, Any], key: str) -> str:
    return repr(row[key]) if key in row else "missing"


# ---------------------------------------------------------------- rouge.json


def read_json_record(path: Path, fix: str) -> Any:
    """A JSON file a command wrote (rouge.json), parsed; one line naming it and ``fix`` when it
    cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise UserError(f"{path} is not valid JSON ({reason}); {fix}") from None
    except OSError as exc:
        raise UserError(f"{path} cannot be read ({exc.strerror}); {fix}") from None


def scores_problem(scores: Any) -> str | None:
    """What keeps one evaluation's scores from being printed: its four ROUGE values as numbers."""
    if not isinstance(scores, dict):
        return f"is {scores!r}, not an evaluation's scores (a JSON object)"
    for key in ROUGE_TYPES:
        if key not in scores:
            return f"{key} is missing"
        if not is_number(scores[key]):
            return f"{key} is {scores[key]!r}, not a number"
    return None


# ---------------------------------------------------------------- metrics.jsonl

# Numbers the readers print (validation values may be null: metrics.json_safe writes a
# non-finite one so; a diverged run stops before it logs its training loss).
METRIC_NUMBERS = ("loss", "val_loss", "best_value", "elapsed_s", *(f"val_{key}" for key in ROUGE_TYPES))
METRIC_NULLABLE = frozenset(METRIC_NUMBERS) - {"loss", "elapsed_s"}
# The keys a marker row always comes with (launcher/rank/train.py and best.py write them together).
METRIC_COMPANIONS = {
    "restart": ("cause",),
    "best_step": ("best_metric", "best_value"),
    "final": ("val_loss",),
    "compiled_graphs": ("batch_shapes",),
    **{f"val_{key}": ("val_rougeLsum",) for key in ROUGE_TYPES},
}
# A segment row (core/history.segment_row): what its history line formats.
SEGMENT_WHOLE_NUMBERS = ("world_size", "nodes", "grad_accum")
SEGMENT_TEXTS = ("strategy", "start")


def metrics_row_problem(row: dict[str, Any]) -> str | None:
    """What keeps a reader from using one metrics.jsonl row, or None."""
    for key in ("step", "best_step", "model_step"):
        if (key in row or key == "step") and not is_whole(row.get(key)):
            return f"{key} is {row.get(key)!r}, not a whole number"
    for key in METRIC_NUMBERS:
        value = row.get(key)
        if key in row and not is_number(value) and not (value is None and key in METRIC_NULLABLE):
            return f"{key} is {value!r}, not a number"
    for marker, companions in METRIC_COMPANIONS.items():
        missing = [key for key in companions if marker in row and key not in row]
        if missing:
            return f"a row with {marker} has no {missing[0]}"
    return segment_problem(row) if "segment" in row else None


def segment_problem(row: dict[str, Any]) -> str | None:
    for key in SEGMENT_WHOLE_NUMBERS:
        if not is_whole(row.get(key)):
            return f"segment row's {key} is {shown(row, key)}, not a whole number"
    for key in SEGMENT_TEXTS:
        if not isinstance(row.get(key), str):
            return f"segment row's {key} is {shown(row, key)}, not text"
    tokens = row.get("micro_batch_tokens")
    if tokens is not None and not is_whole(tokens):
        return f"micro_batch_tokens is {tokens!r}, not a whole number or null"
    if not tokens and not is_whole(row.get("micro_batch_size")):
        return f"segment row's micro_batch_size is {shown(row, 'micro_batch_size')}, not a whole number"
    return None


def read_checked_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl, every row checked (no rows when the run has none)."""
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return []
    rows = read_jsonl_lines(path)
    for number, row in rows:
        problem = metrics_row_problem(row)
        if problem:
            raise UserError(
                f"{path} line {number}: {problem}; fix or delete that line (training writes one per logged step)"
            )
    return [row for _, row in rows]
