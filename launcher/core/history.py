"""A run's history: one marker row in metrics.jsonl for each time training starts (fresh, resumed,
restarted by the supervisor) with the shape it ran in (and its precision and label smoothing,
which a resume may change), read back by the report and the model card.

A run that was preempted on 16 GPUs and finished on 8, or moved from ZeRO-3 to DDP, says so: the
weights alone cannot tell. Rows are plain data (``segment`` marks them), so the host reads them
without the ranks' libraries.
"""

from __future__ import annotations

from typing import Any

from launcher.core.jsonl import is_number


def strategy_label(recipe) -> str:
    """How the weights were spread over the ranks, as a person names it (DDP, ZeRO-3 + optimizer offload, FSDP2)."""
    launch = recipe.launch
    name = "FSDP2" if launch.fsdp else f"ZeRO-{launch.zero}" if launch.zero else "DDP"
    return name + (f" + {launch.offload} offload" if launch.offload != "none" else "")


def segment_row(recipe, step: int, number: int, start: str, checkpoint: str | None) -> dict[str, Any]:
    """The marker of one training segment; ``start`` is fresh, resumed or restarted."""
    launch, train = recipe.launch, recipe.train
    return {
        "step": step,
        "segment": number,
        "start": start,
        "checkpoint": checkpoint,
        "strategy": strategy_label(recipe),
        "world_size": launch.world_size,
        "nodes": launch.nodes,
        "micro_batch_size": train.micro_batch_size,
        "micro_batch_tokens": train.micro_batch_tokens,
        "grad_accum": train.grad_accum,
        "precision": recipe.model.precision,
        "label_smoothing": train.label_smoothing,
    }


def segments(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in metrics if "segment" in row]


def describe_segment(row: dict[str, Any], end_step: int) -> str:
    ranks = row["world_size"]
    where = f"{ranks} rank{'s' if ranks != 1 else ''}" + (
        f" on {row['nodes']} nodes" if row["nodes"] > 1 else ""
    )
    budget = (
        f"token budget {row['micro_batch_tokens']:,}"
        if row.get("micro_batch_tokens")
        else f"micro batch {row['micro_batch_size']}"
    )
    origin = {"fresh": "from scratch", "resumed": "resumed", "restarted": "restarted"}.get(
        row["start"], row["start"]
    )
    if row.get("checkpoint"):
        origin += f" from {row['checkpoint']}"
    precision = f", {row['precision']}" if row.get("precision") else ""  # older runs did not record it
    return (
        f"steps {row['step']}-{end_step}: {row['strategy']} on {where} "
        f"({budget} x accumulation {row['grad_accum']}{precision}{smoothing(row)}), {origin}"
    )


def smoothing(row: dict[str, Any]) -> str:
    """The segment's label smoothing where it had one (a resume may change it; 0, and older runs
    that did not record it, say nothing)."""
    value = row.get("label_smoothing")
    return f", label smoothing {value}" if is_number(value) and value else ""


def history_lines(metrics: list[dict[str, Any]]) -> list[str]:
    """One line per segment, or nothing for a run that trained in one go from scratch (a run that
    began from another run's checkpoint says which)."""
    found = segments(metrics)
    if len(found) < 2 and not (found and found[0]["start"] == "resumed"):
        return []
    last_step = max((row.get("step", 0) for row in metrics), default=0)
    ends = [row["step"] for row in found[1:]] + [last_step]
    return [describe_segment(row, end) for row, end in zip(found, ends, strict=True)]
