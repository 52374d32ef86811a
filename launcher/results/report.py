"""Reports people read: a run's original-vs-fine-tuned ROUGE table with examples and plots, and
a side-by-side table of several runs (``ftlaunch report``).

A run's evaluations live in ``RUN/eval/{original,finetuned}/`` (each as ``ftlaunch eval``
writes it: predictions.jsonl + rouge.json); the report goes to ``RUN/report/``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from launcher.core.errors import UserError
from launcher.core.jsonl import read_jsonl
from launcher.core.recipe import GENERATION_KEYS, shown_generation_settings
from launcher.core.rundir import FINETUNED, ORIGINAL, ResultDir, RunDir, SweepDir
from launcher.core.writable import check_writable_dir
from launcher.results.records import read_checked_metrics, read_json_record, scores_problem
from launcher.results.rouge import ROUGE_TYPES

MODEL_ORDER = (ORIGINAL, FINETUNED)


def read_eval_scores(rouge_file: Path) -> dict[str, Any]:
    """One evaluation's rouge.json, checked: the tables print its four ROUGE values as numbers.

    A report folder's rouge.json (one entry per model) is the likely mix-up: it is named as such.
    """
    rewrite = "rewrite it with `ftlaunch score PREDICTIONS --output DIR`"
    scores = read_json_record(rouge_file, rewrite)
    if isinstance(scores, dict) and scores and all(isinstance(v, dict) for v in scores.values()):
        folder = rouge_file.parent
        run = folder.resolve().parent
        source = f" (here: {folder.parent})" if RunDir(run).has_recipe() or SweepDir(run).is_sweep() else ""
        raise UserError(
            f"{folder} is a report folder (its rouge.json holds several models); pass the run "
            f"directories or `ftlaunch eval` output directories it was made from{source}"
        )
    if not isinstance(scores, dict):
        raise UserError(
            f"{rouge_file} is not an evaluation's ROUGE record (a JSON object); pass a run directory "
            "or an `ftlaunch eval` output directory"
        )
    problem = scores_problem(scores)
    if problem:
        raise UserError(f"{rouge_file}: {problem}; {rewrite}")
    return scores


def eval_scores_problem(rouge_file: Path) -> str | None:
    """The one line read_eval_scores refuses ``rouge_file`` with, or None when it reads: a sweep
    counts a run finished only when its report can read the fine-tuned scores."""
    try:
        read_eval_scores(rouge_file)
    except UserError as exc:
        return str(exc)
    return None


def read_eval_dir(path: Path) -> dict[str, Any]:
    """rouge.json + predictions of one evaluation folder."""
    result = ResultDir(path)
    rouge_file = result.rouge
    if not rouge_file.is_file():
        raise UserError(
            f"{path} has no {rouge_file.name}; pass a run directory or an `ftlaunch eval` output directory"
        )
    scores = read_eval_scores(rouge_file)
    predictions_file = result.predictions
    predictions = []
    if predictions_file.is_file():
        predictions = read_jsonl(predictions_file)
        check_predictions(predictions_file, predictions)
    return {"scores": scores, "predictions": predictions, "path": path}


def check_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    """Each line as ``ftlaunch eval`` writes it: the examples section shows its id, its first
    reference and the prediction."""
    for number, row in enumerate(rows, start=1):
        references = row.get("references")
        if "id" not in row:
            problem = "has no 'id'"
        elif not isinstance(row.get("prediction"), str):
            problem = "has no 'prediction' string"
        elif not (
            isinstance(references, list) and references and all(isinstance(r, str) for r in references)
        ):
            problem = "has no 'references' list of strings"
        else:
            continue
        raise UserError(
            f"{path} line {number} {problem}; each line needs id, prediction and references (rerun "
            "`ftlaunch eval`, or `ftlaunch score PREDICTIONS --data D --output DIR` for a file of your own)"
        )


def run_evaluations(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The evaluations of a run (original/finetuned), or of a bare eval folder."""
    run = RunDir(run_dir)
    if run.results.has_rouge():
        return {run_dir.name: read_eval_dir(run_dir)}
    found = {
        name: read_eval_dir(run.eval_result(name).path)
        for name in MODEL_ORDER
        if run.eval_result(name).has_rouge()
    }
    if not found:
        raise UserError(
            f"{run_dir} has no evaluations (eval/*/rouge.json); run `ftlaunch eval` or a training run first"
        )
    return found


def shown_number(value: float | None, scale: float, spec: str) -> str:
    """A logged validation value as the report prints it (``n/a`` where it was not finite)."""
    return "n/a" if value is None else format(scale * value, spec)


def percent(value: float) -> str:
    return f"{100 * value:.2f}"


def rouge_table(rows: list[tuple[str, dict]], baseline: dict | None = None) -> str:
    """Markdown table in percent; with a baseline, absolute gains in percentage points."""
    header = "| model | " + " | ".join(ROUGE_TYPES) + " | n |"
    lines = [header, "|" + " --- |" * (len(ROUGE_TYPES) + 2)]
    for label, scores in rows:
        cells = [percent(scores[key]) for key in ROUGE_TYPES]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {scores.get('n', '')} |")
    if baseline is not None and len(rows) > 1:
        for label, scores in rows[1:]:
            gains = [f"{100 * (scores[key] - baseline[key]):+.2f} pp" for key in ROUGE_TYPES]
            lines.append(f"| {label} vs {rows[0][0]} | " + " | ".join(gains) + " | |")
    return "\n".join(lines)


def one_line(text: str) -> str:
    """Text on one Markdown line: newlines and Unicode line/paragraph separators become spaces."""
    return " ".join(text.split())


def excerpt(text: str, limit: int = 400) -> str:
    text = one_line(text)
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


def qualitative_examples(evals: dict[str, dict], rows: list[dict], count: int) -> str:
    """A few examples: dialogue excerpt, human summary, each model's summary."""
    blocks = []
    for index in range(min(count, len(rows))):
        row = rows[index]
        lines = [
            f"### Example {index + 1}: {row['id']}",
            "",
            f"**Dialogue** (excerpt): {excerpt(row['dialogue'])}",
            "",
            f"**Human summary:** {one_line(row['references'][0])}",
            "",
        ]
        for name, data in evals.items():
            if index < len(data["predictions"]):
                lines.append(f"**{name}:** {one_line(data['predictions'][index]['prediction']) or '(empty)'}")
                lines.append("")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def plot_rouge(evals: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(evals), 1)
    for offset, (name, data) in enumerate(evals.items()):
        values = [100 * data["scores"][key] for key in ROUGE_TYPES]
        xs = [i + offset * width for i in range(len(ROUGE_TYPES))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks([i + width * (len(evals) - 1) / 2 for i in range(len(ROUGE_TYPES))], ROUGE_TYPES)
    ax.set_ylabel("F-measure (%)")
    ax.set_title("ROUGE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def final_model_step(metrics: list[dict], row: dict) -> int:
    """The step whose model a ``final`` row's validation loss measures: its ``model_step`` (the
    best step final/ holds, train.best_metric), else its own step. A run logged before rows named
    it: the ``best_step`` marker logged before the row."""
    if "model_step" in row:
        return row["model_step"]
    markers = [marker for marker in metrics[: metrics.index(row)] if "best_step" in marker]
    return markers[-1]["best_step"] if markers else row["step"]


def loss_series(metrics: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(training, validation) loss points by optimizer step, as the loss plot draws them. The
    validation curve has one point per step; a ``final`` row that measures an earlier step's
    model (final/ is the best step) is not the last step's point and stays out of it (the report
    prints it as the final validation loss, with its step)."""
    train = [(row["step"], row["loss"]) for row in metrics if "loss" in row]
    val: dict[int, float] = {}
    for row in metrics:
        if row.get("val_loss") is None:
            continue
        if row.get("final") and final_model_step(metrics, row) != row["step"]:
            continue
        val[row["step"]] = row["val_loss"]
    return train, sorted(val.items())


def final_loss_words(metrics: list[dict], row: dict) -> str:
    """``final validation loss 2.1234`` and, when final/ is an earlier (best) step, which one."""
    words = f"final validation loss {shown_number(row['val_loss'], 1, '.4f')}"
    step = final_model_step(metrics, row)
    return words + (f" (final/'s model, step {step})" if step != row["step"] else "")


def plot_loss(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = loss_series(metrics)
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="training loss")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.set_title("Loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reference_columns(scores: dict) -> str:
    """Where several references came from, when the recipe mapped several columns."""
    columns = scores.get("target_field")
    return (
        f" · references: columns {', '.join(columns)}"
        if isinstance(columns, list) and len(columns) > 1
        else ""
    )


def restart_notes(metrics: list[dict]) -> list[str]:
    """The restarts of a crashed run (launch.max_restarts, or a smaller micro batch after running out
    of memory: train.auto_find_batch_size): from which step, and why."""
    restarts = [row for row in metrics if "restart" in row]
    if not restarts:
        return []
    shown = "; ".join(f"{row['restart']}: from step {row['step']} after {row['cause']}" for row in restarts)
    keys = "launch.max_restarts"
    if any("train.auto_find_batch_size" in str(row.get("cause")) for row in restarts):
        keys += (
            ", train.auto_find_batch_size"  # continued with a smaller micro batch after running out of memory
        )
    return [f"Restarts ({keys}): {shown}.", ""]


def history_notes(metrics: list[dict]) -> list[str]:
    """Where each part of training ran, for a run that was resumed or restarted (history.py)."""
    from launcher.core.history import history_lines

    lines = history_lines(metrics)
    if not lines:
        return []
    return ["Run history (world size and strategy per segment):", "", *(f"- {line}" for line in lines), ""]


def best_model_notes(metrics: list[dict]) -> list[str]:
    """What train.best_metric and early stopping did: the validation evaluations, which step
    final/ holds, and why training stopped early (from metrics.jsonl's markers)."""
    notes = []
    evaluations = [row for row in metrics if any(key.startswith("val_rouge") for key in row)]
    if evaluations:
        shown = ", ".join(
            f"step {row['step']}: {shown_number(row['val_rougeLsum'], 100, '.2f')}" for row in evaluations
        )
        notes += [f"Validation ROUGE-Lsum during training (%): {shown}.", ""]
    stop = early_stop(metrics)
    if stop:
        notes += [f"Stopped early: {stop}.", ""]
    row = best_step_marker(metrics)
    if row:
        notes += [
            f"Model: final/ and the fine-tuned scores are the {best_step_words(row)} "
            f"({shown_number(row['best_value'], 1, '.4f')}; train.best_metric).",
            "",
        ]
    return notes


def early_stop(metrics: list[dict]) -> str | None:
    """Why early stopping ended training (metrics.jsonl's last ``early_stop`` marker), or None."""
    stops = [row["early_stop"] for row in metrics if "early_stop" in row]
    return stops[-1] if stops else None


def best_step_marker(metrics: list[dict]) -> dict | None:
    """The last ``best_step`` marker (train.best_metric: the step final/ holds, the metric and its
    value, and the step training ended at), or None."""
    chosen = [row for row in metrics if "best_step" in row]
    return chosen[-1] if chosen else None


def best_step_words(row: dict) -> str:
    """``best step 20 of 28 by val_loss`` from a ``best_step`` marker (the report and the card)."""
    return f"best step {row['best_step']} of {row['step']} by {row['best_metric']}"


def generation_note(scores: dict) -> str:
    """``max_new_tokens 128, num_beams 1`` and any repetition/length control the run set (empty
    when the record does not say: a predictions file of one's own, scored by ``ftlaunch score``)."""
    return ", ".join(f"{key} {value}" for key, value in shown_generation_settings(scores).items())


def scoring_note(scores: dict) -> str:
    return scores.get("description") or f"scoring: {scores.get('scoring')}"


def rank_independence(scores: dict) -> list[str]:
    """The line that says the predictions hold on any number of ranks (evaluation.py forms the
    batches once for the whole split); absent for evaluations recorded before it did."""
    size = scores.get("batch_size")
    if not size:
        return []
    return [
        f"Predictions do not depend on the number of ranks: generation batches of {size} dialogues "
        "are formed once over the whole split (by length) and dealt whole to the ranks.",
        "",
    ]


def check_report_output(out_dir: Path, own: Path | None = None) -> None:
    """Where a report may go: its own folder (``RUN/report/``), a new or empty folder, or an earlier
    report's folder (its files replaced). Not a folder that holds something else (a run, a model,
    an evaluation), where report.md and rouge.json would land among its files, and not another
    run's or sweep's own report/, which its model card and trackers read."""
    if own is not None and out_dir.resolve() == own.resolve():
        check_writable_dir(out_dir, "report folder")
        return
    check_writable_dir(out_dir, "--output")
    if not out_dir.is_dir():
        return
    parent = out_dir.resolve().parent
    if out_dir.resolve() == RunDir(parent).report.path and (
        RunDir(parent).has_recipe() or SweepDir(parent).is_sweep()
    ):
        raise UserError(
            f"--output {out_dir} is the report folder of {parent}, which its model card reads; "
            "pick a new directory for this report"
        )
    if any(out_dir.iterdir()) and not ResultDir(out_dir).report_md.is_file():
        raise UserError(
            f"--output {out_dir} is not empty and holds no report; pick a new directory for the report"
        )


def write_run_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """RUN/report/: report.md, rouge.json, per-model predictions, rouge.png, loss.png."""
    own = RunDir(run_dir).report.path
    out_dir = out_dir or own
    check_report_output(out_dir, own)
    evals = run_evaluations(run_dir)
    metrics = read_checked_metrics(run_dir)  # everything read and checked before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    first = next(iter(evals.values()))
    rows = [{"id": p["id"], "dialogue": "", "references": p["references"]} for p in first["predictions"]]
    dialogues = load_dialogues(first["scores"], len(rows))
    for row, dialogue in zip(rows, dialogues):
        row["dialogue"] = dialogue
    ordered = [(name, data["scores"]) for name, data in evals.items()]
    baseline = evals[ORIGINAL]["scores"] if ORIGINAL in evals else None
    if baseline is not None:
        ordered.sort(key=lambda item: item[0] != ORIGINAL)
    sections = [
        f"# ftlaunch report: {run_dir.name}",
        "",
        *unfinished_note(run_dir, metrics),
        f"Data: {first['scores'].get('dataset')} "
        f"[{first['scores'].get('split')}] · {first['scores'].get('n')} examples{reference_columns(first['scores'])}"
        + (f" · generation: {generation}" if (generation := generation_note(first["scores"])) else ""),
        "",
        *rank_independence(first["scores"]),
        "## ROUGE (F-measure, %)",
        "",
        rouge_table(ordered, baseline),
        "",
        f"Scoring: {scoring_note(first['scores'])}",
        "",
    ]
    if metrics:
        final = [row for row in metrics if row.get("final")]
        train_rows = [row for row in metrics if "loss" in row]
        if train_rows:
            sections += [
                f"Training: {train_rows[-1]['step']} optimizer steps, first logged loss "
                f"{train_rows[0]['loss']:.4f}, last {train_rows[-1]['loss']:.4f}"
                + (f", {final_loss_words(metrics, final[-1])}" if final else "")
                + ".",
                "",
            ]
        sections += best_model_notes(metrics) + restart_notes(metrics) + history_notes(metrics)
        if final and "compiled_graphs" in final[-1]:  # train.compile: recompilations, for the record
            sections += [
                f"torch.compile: {final[-1]['compiled_graphs']} graph(s) compiled on rank 0 for "
                f"{final[-1]['batch_shapes']} batch shape(s) (training and validation).",
                "",
            ]
        plot_loss(metrics, out_dir / "loss.png")
        sections += ["![loss](loss.png)", ""]
    plot_rouge(evals, out_dir / "rouge.png")
    sections += [
        "![rouge](rouge.png)",
        "",
        "## Examples",
        "",
        qualitative_examples(evals, rows, int(first["scores"].get("report_examples", 3))),
    ]
    ResultDir(out_dir).report_md.write_text("\n".join(sections).rstrip() + "\n")
    ResultDir(out_dir).rouge.write_text(
        json.dumps({name: data["scores"] for name, data in evals.items()}, indent=2) + "\n"
    )
    for name, data in evals.items():
        source = ResultDir(data["path"]).predictions
        if source.is_file():
            shutil.copyfile(source, out_dir / f"predictions_{name}.jsonl")
    return out_dir


def unfinished_note(run_dir: Path, metrics: list[dict]) -> list[str]:
    """A training run whose training has not ended (no final validation row yet): stopped by a
    signal (RUN/INTERRUPTED names its checkpoint) or by a crash. Its report shows no fine-tuned
    model yet, and says so rather than look like a finished run's."""
    steps = [row["step"] for row in metrics if "loss" in row]
    if not steps or any(row.get("final") for row in metrics):
        return []
    marker = RunDir(run_dir).interrupted_checkpoint()
    why = (
        f"interrupted, checkpoint {marker} written"
        if marker
        else f"stopped after step {steps[-1]} (the last logged)"
    )
    return [
        f"**Training has not finished**: {why}; continue it with the same command and `--resume auto`, "
        "which writes the fine-tuned model's evaluation and this report again.",
        "",
    ]


def load_dialogues(scores: dict, count: int) -> list[str]:
    """Dialogue texts for the examples section (the predictions file keeps only ids)."""
    if not (isinstance(scores.get("dataset"), str) and isinstance(scores.get("split"), str)):
        return [""] * count  # rescored without --data: rouge.json names no dataset to read them from
    try:
        from launcher.core.dialogues import load_split

        fields = {key: scores[key] for key in ("source_field", "target_field") if scores.get(key)}
        rows = load_split(scores["dataset"], scores["split"], count, **fields)
        return [row["dialogue"] for row in rows]
    except (UserError, KeyError, OSError, ValueError):
        return [""] * count


def evaluated_on(scores: dict) -> str:
    """``sample[test], 13 examples``: what a row of scores was measured on."""
    dataset = scores.get("dataset")
    where = f"{dataset}[{scores.get('split')}]" if dataset else "references in the predictions file"
    return f"{where}, {scores.get('n')} examples"


def data_note(rows: list[tuple[str, dict]]) -> str:
    """The data every row was scored on, or, when rows differ (another dataset, split or limit),
    each row's, with the warning that their numbers do not compare."""
    groups: dict[str, list[str]] = {}
    for label, scores in rows:
        groups.setdefault(evaluated_on(scores), []).append(label)
    if len(groups) <= 1:
        return f"Data: {next(iter(groups), 'none')}"
    each = "; ".join(f"{where}: {', '.join(labels)}" for where, labels in groups.items())
    return f"Data differs between rows (their numbers do not compare): {each}"


def generation_differences(rows: list[tuple[str, dict]]) -> str | None:
    """The note for rows generated with other settings (another num_beams, max_new_tokens, ...):
    each differing setting with the rows of each value. A row whose rouge.json does not record a
    setting is not compared on it (unknown, not different). None when none differs."""
    parts = []
    for key in GENERATION_KEYS:
        groups: dict[Any, list[str]] = {}  # 1 and 1.0 are one value
        for label, scores in rows:
            if key in scores:
                value = scores[key]
                groups.setdefault(json.dumps(value) if isinstance(value, list | dict) else value, []).append(
                    label
                )
        if len(groups) > 1:
            parts.append(
                f"{key} " + ", ".join(f"{value} ({', '.join(labels)})" for value, labels in groups.items())
            )
    if not parts:
        return None
    return f"Generation settings differ between rows (their numbers do not compare): {'; '.join(parts)}"


def compare_runs(run_dirs: list[Path], out_dir: Path | None) -> str:
    """One table over several runs/models; written to OUT/report.md when --output is given."""
    if out_dir is not None:
        check_report_output(out_dir)
    rows: list[tuple[str, dict]] = []
    given: dict[Path, Path] = {}
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise UserError(f"{run_dir} is not a directory; pass run directories or eval output directories")
        earlier = given.setdefault(run_dir.resolve(), run_dir)
        if earlier is not run_dir:
            twice = (
                f"{run_dir} is given twice"
                if earlier == run_dir
                else f"{earlier} and {run_dir} are one folder"
            )
            raise UserError(f"{twice}; pass each run once")
        for name, data in run_evaluations(run_dir).items():
            label = f"{run_dir.name}/{name}" if name != run_dir.name else run_dir.name
            rows.append((label, data["scores"]))
    modes = {scores.get("scoring") for _, scores in rows}
    table = rouge_table(rows)
    note = "Scoring: " + ", ".join(sorted(str(m) for m in modes))
    if len(modes) > 1:
        note += " (mixed scoring modes: numbers are not directly comparable)"
    notes = [note, data_note(rows), generation_differences(rows)]
    text = "# ftlaunch comparison\n\n" + table + "\n\n" + "\n\n".join(n for n in notes if n) + "\n"
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        ResultDir(out_dir).report_md.write_text(text)
        ResultDir(out_dir).rouge.write_text(
            json.dumps({label: scores for label, scores in rows}, indent=2) + "\n"
        )
    return text
