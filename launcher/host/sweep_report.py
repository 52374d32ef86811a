"""``ftlaunch report SWEEP``: one table of every point of a sweep (its values, ROUGE, the gain over
the original model, final validation loss, training time, status), sorted by a metric, the best
run named, the metric plotted against each varied key and the training losses overlaid.

It reads only files (manifest, status records, the runs' rouge.json and metrics.jsonl, failure
records), so it works while the sweep is still running: unfinished points show how far they are.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.core.errors import EXIT_INTERRUPTED, UserError
from launcher.core.jsonl import read_jsonl_partial
from launcher.core.recipe import Recipe
from launcher.core.recipe_loading import read_run_recipe
from launcher.core.rundir import ResultDir, RunDir, SweepDir
from launcher.host.sweep_grid import short_keys
from launcher.host.sweep_manifest import Point, Sweep, read_status, read_sweep
from launcher.results.records import metrics_row_problem
from launcher.results.report import check_report_output, eval_scores_problem, read_eval_scores
from launcher.results.rouge import ROUGE_TYPES

DEFAULT_METRIC = "rougeLsum"
METRICS = (*ROUGE_TYPES, "val_loss")  # val_loss: lower is better


@dataclass
class Row:
    point: Point
    status: str  # done | running | pending | interrupted | requeued | failed | missing | incomplete
    detail: str = ""  # progress, or the error line of a failure
    scores: dict[str, Any] | None = None  # fine-tuned ROUGE (fractions)
    original: dict[str, Any] | None = None
    val_loss: float | None = None
    seconds: float | None = None
    step: int | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)

    def value(self, metric: str) -> float | None:
        """The metric of a finished point (None otherwise, and for a NaN: it sorts last)."""
        if metric == "val_loss":
            value = self.val_loss if self.status == "done" else None
        else:
            value = self.scores.get(metric) if self.scores else None
        return value if isinstance(value, int | float) and math.isfinite(value) else None


# ---------------------------------------------------------------- reading one point


def read_rows(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as far as it is written (a line being appended right now is skipped), and as
    far as the run report could read it: a damaged line is left out of this live table."""
    return [row for row in read_jsonl_partial(path) if metrics_row_problem(row) is None]


def read_scores(path: Path) -> dict[str, Any] | None:
    """An optional rouge.json (the original model's) when it holds its four ROUGE numbers, else
    None: the row then shows no gain. A finished point's own scores are read by read_point."""
    try:
        return read_eval_scores(path) if path.is_file() else None
    except UserError:
        return None


def unreadable_scores(run: RunDir) -> str | None:
    """Why a trained point's fine-tuned rouge.json cannot be read (the line `ftlaunch report POINT`
    gives), or None: such a point is not finished, and the sweep command redoes its evaluation."""
    result = run.eval_finetuned
    if not (run.final.is_dir() and result.has_rouge()) or run.is_interrupted():
        return None
    return eval_scores_problem(result.rouge)


def failure_line(run_dir: Path, status: dict[str, Any] | None) -> str:
    """Why a point failed, in one line: the supervisor's first failed rank, else the job log's error."""
    from launcher.core.ranklog import read_failures
    from launcher.host.supervise import first_failure, torchrun_failure

    tail: list[bytes] = []
    for log in RunDir(run_dir).launcher_logs():
        tail += log.read_bytes().splitlines()[-200:]
    try:
        recipe = read_run_recipe(run_dir)
        first = first_failure(run_dir, recipe, 0, read_failures(run_dir), torchrun_failure(tail))
    except UserError:
        first = None
    if first is not None:
        return f"rank {first.rank} (node {first.node}): {first.error}"
    log = Path(status["log"]) if status and isinstance(status.get("log"), str) and status["log"] else None
    if log is not None and log.is_file():
        errors = [line for line in log.read_text(errors="replace").splitlines() if "error:" in line]
        if errors:
            return errors[-1].strip()
    code = status.get("exit_code") if status else None
    return f"exit code {code}" if code is not None else "no error recorded"


def point_state(
    run_dir: Path, status: dict[str, Any] | None, done: bool, on_slurm: bool, unreadable: str | None = None
) -> tuple[str, str]:
    """(state, detail) of one point: its status file's record, checked against its folder
    (``unreadable``: why its fine-tuned rouge.json cannot be read, see unreadable_scores)."""
    if done:
        return "done", ""
    if status and status.get("state") == "running":
        return "running", ""
    ended = bool(status and status.get("state") == "ended")
    if ended:
        code = status.get("exit_code")
        if code == EXIT_INTERRUPTED:
            return "interrupted", "run the sweep again to resume it"
        if code != 0:
            return "failed", failure_line(run_dir, status)
    if unreadable:
        return "incomplete", f"{unreadable}; or run the sweep command again to redo its evaluation"
    if ended:
        return ended_unfinished(run_dir, on_slurm)
    if RunDir(run_dir).is_interrupted():
        return "interrupted", "run the sweep again to resume it"
    return "pending", ""


def ended_unfinished(run_dir: Path, on_slurm: bool) -> tuple[str, str]:
    """A point whose last attempt ended well but whose folder holds no finished run: a SLURM task
    that requeued itself after a stop signal, or a folder removed or emptied since."""
    if not run_dir.is_dir():
        return "missing", f"{run_dir} is gone: run the sweep command again to train it"
    marker = RunDir(run_dir).interrupted_checkpoint()
    if on_slurm:
        return "requeued", f"resumes from {marker}" if marker else "waits in the queue"
    if marker:
        return "interrupted", "run the sweep again to resume it"
    return "incomplete", "final/ or its evaluation is gone: run the sweep command again to redo it"


def own_recipe(run: RunDir) -> Recipe | None:
    """The point's resolved recipe (None before it is rendered or when it cannot be read)."""
    if not run.has_recipe():
        return None
    try:
        return read_run_recipe(run.path)
    except UserError:
        return None


def read_point(sweep: Sweep, point: Point) -> Row:
    run_dir = sweep.run_dir(point)
    run = RunDir(run_dir)
    done = run.is_finished(own_recipe(run), eval_scores_problem)  # the sweep's own rule for a point it keeps
    unreadable = None if done else unreadable_scores(run)
    status, detail = point_state(
        run_dir, read_status(sweep.dir, point.index), done, bool(sweep.jobs), unreadable
    )
    rows = read_rows(run.metrics)
    train = [row for row in rows if "loss" in row]
    final = [row for row in rows if row.get("final")]
    row = Row(point, status, detail)
    row.scores = read_scores(run.eval_finetuned.rouge) if done else None
    row.original = read_scores(run.eval_original.rouge)
    row.val_loss = final[-1].get("val_loss") if final else None
    row.losses = [(r["step"], r["loss"]) for r in train]
    row.step = train[-1]["step"] if train else None
    if train and all("elapsed_s" in r for r in train):
        row.seconds = sum(r["elapsed_s"] for r in train)
    if status == "running":
        row.detail = f"step {row.step}" if row.step else "starting"
    return row


# ---------------------------------------------------------------- the table


def sorted_rows(rows: list[Row], metric: str) -> list[Row]:
    """Rows with the metric best first (ROUGE: highest; val_loss: lowest), then the others in order."""
    scored = [row for row in rows if row.value(metric) is not None]
    sign = 1 if metric == "val_loss" else -1
    scored.sort(key=lambda row: sign * row.value(metric))
    return scored + [row for row in rows if row.value(metric) is None]


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"


def gain(row: Row, metric: str) -> str:
    if metric == "val_loss" or row.scores is None or not row.original or metric not in row.original:
        return "-"
    return f"{100 * (row.scores[metric] - row.original[metric]):+.2f} pp"


def status_cell(row: Row) -> str:
    text = f"{row.status}: {row.detail}" if row.detail else row.status
    return text.replace("|", "\\|")


def sweep_table(sweep: Sweep, rows: list[Row], metric: str) -> str:
    short = short_keys(sweep.keys)
    delta_of = DEFAULT_METRIC if metric == "val_loss" else metric
    header = ["#", "run", *[short[key] for key in sweep.keys], *ROUGE_TYPES, f"Δ {delta_of}", "val loss",
              "train time", "steps", "status"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for rank, row in enumerate(rows, start=1):
        rouge = [f"{100 * row.scores[key]:.2f}" if row.scores else "-" for key in ROUGE_TYPES]
        cells = [
            str(rank) if row.value(metric) is not None else "",
            row.point.name,
            *[row.point.values.get(key, "(recipe)") for key in sweep.keys],
            *rouge,
            gain(row, delta_of),
            f"{row.val_loss:.4f}" if row.val_loss is not None else "-",
            duration(row.seconds),
            str(row.step or "-"),
            status_cell(row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_line(rows: list[Row], metric: str, sweep_dir: Path) -> str:
    best = next((row for row in rows if row.value(metric) is not None), None)
    if best is None:
        return f"Best: none yet (no point has finished with {metric})."
    value = best.value(metric)
    shown = f"{value:.4f}" if metric == "val_loss" else f"{100 * value:.2f}"
    extra = "" if metric == "val_loss" else f" ({gain(best, metric)} vs the original model)"
    return f"Best: {best.point.name} with {metric} {shown}{extra}: {sweep_dir / best.point.name}"


def counts_line(rows: list[Row]) -> str:
    states: dict[str, int] = {}
    for row in rows:
        states[row.status] = states.get(row.status, 0) + 1
    return ", ".join(f"{count} {state}" for state, count in states.items())


# ---------------------------------------------------------------- plots


def axis_values(texts: list[str]) -> list[float] | None:
    """The key's values as numbers, when they all are (then the axis is numeric)."""
    try:
        return [float(text) for text in texts]
    except ValueError:
        return None


def plot_metric(sweep: Sweep, rows: list[Row], metric: str, path: Path) -> None:
    """The metric of every finished point against each varied key (one panel per key)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    short = short_keys(sweep.keys)
    scored = [row for row in rows if row.value(metric) is not None]
    scale = 1 if metric == "val_loss" else 100
    fig, axes = plt.subplots(1, len(sweep.keys), figsize=(4.5 * len(sweep.keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], sweep.keys):
        points = [
            (row.point.values[key], scale * row.value(metric)) for row in scored if key in row.point.values
        ]
        texts = list(dict.fromkeys(row.point.values[key] for row in rows if key in row.point.values))
        numbers = axis_values(texts)
        if numbers is not None:
            position = dict(zip(texts, numbers))
            if min(numbers) > 0 and max(numbers) / min(numbers) >= 10:
                ax.set_xscale("log")
        else:
            position = {text: float(i) for i, text in enumerate(texts)}
            ax.set_xticks(list(position.values()), texts, rotation=30, ha="right")
        if points:
            ax.scatter([position[text] for text, _ in points], [value for _, value in points])
        ax.set_xlabel(key)
        ax.set_ylabel(metric if metric == "val_loss" else f"{metric} (%)")
        ax.set_title(f"{metric} vs {short[key]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        if row.losses:
            ax.plot(*zip(*row.losses), marker=".", label=row.point.name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss of every point")
    if any(row.losses for row in rows):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the report


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise UserError(
            f"--metric {metric} is not a column of the sweep report; use one of {', '.join(METRICS)}"
        )


def write_sweep_report(sweep_dir: Path, out_dir: Path | None = None, metric: str = DEFAULT_METRIC) -> str:
    """SWEEP/report/: report.md (returned), results.json, <metric>.png, loss.png."""
    check_metric(metric)
    sweep = read_sweep(sweep_dir)
    rows = sorted_rows([read_point(sweep, point) for point in sweep.points], metric)
    own = SweepDir(sweep_dir).report.path
    out_dir = out_dir or own
    check_report_output(out_dir, own)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_metric(sweep, rows, metric, out_dir / f"{metric}.png")
    plot_losses(rows, out_dir / "loss.png")
    order = "lowest" if metric == "val_loss" else "highest"
    text = "\n".join(
        [
            f"# ftlaunch sweep: {sweep_dir.name} ({sweep.method}, {len(rows)} points: {counts_line(rows)})",
            "",
            f"Sorted by {metric} ({order} first); ROUGE F-measure in %, Δ in percentage points vs each "
            "run's original model; train time: the logged training steps.",
            "",
            sweep_table(sweep, rows, metric),
            "",
            best_line(rows, metric, sweep_dir),
            "",
            f"![{metric}]({metric}.png)",
            "",
            "![loss](loss.png)",
        ]
    )
    ResultDir(out_dir).report_md.write_text(text + "\n")
    results = [
        {
            "name": row.point.name,
            "index": row.point.index,
            "values": row.point.values,
            "status": row.status,
            "detail": row.detail,
            "rouge": {key: row.scores[key] for key in ROUGE_TYPES} if row.scores else None,
            "original": {key: row.original[key] for key in ROUGE_TYPES if key in row.original}
            if row.original
            else None,
            "val_loss": row.val_loss,
            "train_seconds": row.seconds,
            "step": row.step,
        }
        for row in rows
    ]
    (out_dir / "results.json").write_text(json.dumps({"metric": metric, "runs": results}, indent=2) + "\n")
    return text
