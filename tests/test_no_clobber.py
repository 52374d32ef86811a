# ruff: noqa: F811 - no_launch is test_bad_input's fixture, imported to be used here
"""Outputs never land on what another command made, and inputs of the wrong kind are named.

A training run's folder is what ``--resume``, SLURM requeues, ``export`` and ``report`` read; a
model folder is what ``summarize`` and users load; a report folder is what a model card quotes.
Each command that writes (``eval``, ``report``, ``full``/``lora``) refuses an ``--output`` that
holds another command's work, and ``report`` refuses a folder that is not an evaluation (a report
folder, a malformed rouge.json) with one line naming it: exit 2, no traceback, nothing changed
(``refused`` from test_bad_input). Real CLI, in-process, no launch: the fast tier runs them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli_in_process
from test_bad_input import no_launch, refused, tree  # noqa: F401 - no_launch is a fixture

TINY = ("--cpu", "--model", "tiny-t5", "--data", "sample")
SCORES = {"rouge1": 0.31, "rouge2": 0.12, "rougeL": 0.27, "rougeLsum": 0.28, "n": 1, "scoring": "best_of_n"}


def rendered_training_run(path: Path) -> Path:
    """A training run as `ftlaunch full --dry-run` renders it (recipe.yaml, command.sh, ...)."""
    result = run_cli_in_process("full", *TINY, "--dry-run", "--output", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    return path


def finished_run(path: Path) -> Path:
    """A rendered run with what training leaves: a model folder and both evaluations."""
    rendered_training_run(path)
    (path / "final").mkdir()
    (path / "final" / "config.json").write_text('{"model_type": "t5"}\n')
    for name, shift in (("original", 0.0), ("finetuned", 0.1)):
        folder = path / "eval" / name
        folder.mkdir(parents=True)
        scores = {
            **SCORES,
            **{key: SCORES[key] + shift for key in ("rouge1", "rouge2", "rougeL", "rougeLsum")},
        }
        (folder / "rouge.json").write_text(json.dumps(scores))
        row = {"id": "d1", "prediction": "Tom calls Ann.", "references": ["Tom phones Ann."]}
        (folder / "predictions.jsonl").write_text(json.dumps(row) + "\n")
    return path


# ---------------------------------------------------------------- eval and training outputs


def test_eval_output_on_a_training_run_is_refused(tmp_path, no_launch):
    """Its recipe.yaml and command.sh are what --resume continues from: an evaluation must not replace them."""
    run = rendered_training_run(tmp_path / "run")
    for dry_run in ((), ("--dry-run",)):
        refused(
            no_launch,
            "eval",
            *TINY,
            *dry_run,
            "--output",
            str(run),
            output=run,
            fragments=(f"--output {run} holds a training run", "recipe.yaml", "--output run-eval"),
        )


def test_eval_output_in_a_run_s_model_or_eval_folder_is_refused(tmp_path, no_launch):
    """A run's final/ never; its eval/finetuned only for its own final/ (tests/test_stop_after_the_end.py),
    so tiny-t5 there would show as the run's fine-tuned scores."""
    run = finished_run(tmp_path / "run")
    for folder, said in (
        (run / "final", f"--output {run / 'final'} is not empty"),
        (run / "eval" / "finetuned", f"is the evaluation of its final/ (--model {run / 'final'}"),
    ):
        refused(
            no_launch,
            "eval",
            *TINY,
            "--output",
            str(folder),
            output=run,
            fragments=(said, "pick a new directory"),
        )


def test_eval_again_into_its_own_output_replaces_it(tmp_path, no_launch):
    """An evaluation's folder may be evaluated into again (a changed --limit, a fixed model)."""
    out = tmp_path / "eval-out"
    first = run_cli_in_process("eval", *TINY, "--limit", "2", "--dry-run", "--output", str(out))
    assert first.returncode == 0, first.stdout + first.stderr
    again = run_cli_in_process("eval", *TINY, "--limit", "3", "--dry-run", "--output", str(out))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "limit: 3" in (out / "recipe.yaml").read_text()


def test_training_output_on_an_eval_folder_names_it(tmp_path, no_launch):
    """Not "a different run; pass --resume auto": there is no training run there to resume."""
    out = tmp_path / "eval-out"
    assert run_cli_in_process("eval", *TINY, "--dry-run", "--output", str(out)).returncode == 0
    for extra in ((), ("--resume", "auto")):
        refused(
            no_launch,
            "lora",
            *TINY,
            *extra,
            "--output",
            str(out),
            output=out,
            fragments=(f"--output {out} holds an `ftlaunch eval` output", "--overwrite"),
        )


# ---------------------------------------------------------------- report outputs


@pytest.mark.parametrize("where", ["run", "final", "eval-folder", "other-files"])
def test_report_output_among_other_files_is_refused(tmp_path, no_launch, where):
    run = finished_run(tmp_path / "run")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "rouge.json").write_text("my own numbers\n")
    out = {
        "run": run,
        "final": run / "final",
        "eval-folder": run / "eval" / "finetuned",
        "other-files": other,
    }[where]
    for runs in ((run,), (run, run)):  # a run's report, a comparison
        refused(
            no_launch,
            "report",
            *map(str, runs),
            "--output",
            str(out),
            output=out,
            watch=(run, other),
            fragments=(f"--output {out} is not empty and holds no report", "pick a new directory"),
        )


def test_a_comparison_never_replaces_a_run_s_own_report(tmp_path, no_launch):
    """RUN/report/rouge.json is what the run's model card and trackers quote."""
    run = finished_run(tmp_path / "run")
    assert run_cli_in_process("report", str(run)).returncode == 0
    other = finished_run(tmp_path / "other")
    refused(
        no_launch,
        "report",
        str(run),
        str(other),
        "--output",
        str(run / "report"),
        output=run,
        fragments=(f"--output {run / 'report'} is the report folder of {run}",),
    )


def test_reports_may_be_written_again_where_a_report_is(tmp_path, no_launch):
    run = finished_run(tmp_path / "run")
    other = shutil.copytree(run, tmp_path / "other")
    out = tmp_path / "comparison"
    for _ in range(2):
        result = run_cli_in_process("report", str(run), str(other), "--output", str(out))
        assert result.returncode == 0, result.stdout + result.stderr
    labels = {"run/original", "run/finetuned", "other/original", "other/finetuned"}
    assert set(json.loads((out / "rouge.json").read_text())) == labels
    again = run_cli_in_process("report", str(run), "--output", str(run / "report"))  # its own folder
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads((run / "report" / "rouge.json").read_text())["finetuned"]["rouge1"] == pytest.approx(
        0.41
    )


# ---------------------------------------------------------------- report inputs


def test_a_comparison_says_what_data_each_row_was_scored_on(tmp_path, no_launch):
    """Rows over another dataset, split or limit do not compare: the report says which is which."""
    run = finished_run(tmp_path / "run")
    for name in ("original", "finetuned"):
        scored = run / "eval" / name / "rouge.json"
        scored.write_text(
            json.dumps({**json.loads(scored.read_text()), "dataset": "sample", "split": "test", "n": 13})
        )
    same = shutil.copytree(run, tmp_path / "same")
    result = run_cli_in_process("report", str(run), str(same))
    assert result.returncode == 0, result.stderr
    assert "Data: sample[test], 13 examples" in result.stdout
    limited = shutil.copytree(run, tmp_path / "limited")
    scored = limited / "eval" / "finetuned" / "rouge.json"
    scored.write_text(json.dumps({**json.loads(scored.read_text()), "n": 5}))
    result = run_cli_in_process("report", str(run), str(limited))
    assert result.returncode == 0, result.stderr
    assert (
        "Data differs between rows (their numbers do not compare): sample[test], 13 examples: "
        "run/original, run/finetuned, limited/original; sample[test], 5 examples: limited/finetuned"
    ) in result.stdout


def test_a_run_given_twice_is_refused(tmp_path, no_launch):
    run = finished_run(tmp_path / "run")
    refused(
        no_launch,
        "report",
        str(run),
        f"{run}/",
        output=None,
        watch=(run,),
        fragments=(f"{run} is given twice; pass each run once",),
    )


def test_report_on_a_report_folder_names_the_run_to_pass(tmp_path, no_launch):
    run = finished_run(tmp_path / "run")
    assert run_cli_in_process("report", str(run)).returncode == 0
    for runs in ((run / "report",), (run / "report", run)):
        refused(
            no_launch,
            "report",
            *map(str, runs),
            output=None,
            watch=(run,),
            fragments=(f"{run / 'report'} is a report folder", f"(here: {run})"),
        )


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("[0.3, 0.1]", "is not an evaluation's ROUGE record (a JSON object)"),
        (
            '{"rouge1": "0.3", "rouge2": 0.1, "rougeL": 0.2, "rougeLsum": 0.2}',
            "rouge1 is '0.3', not a number",
        ),
        ('{"rouge1": 0.3, "rouge2": 0.1, "rougeL": 0.2}', "rougeLsum is missing"),
        ('{"rouge1": true, "rouge2": 0.1, "rougeL": 0.2, "rougeLsum": 0.2}', "rouge1 is True, not a number"),
        ('{"rouge1": 0.3, ', "is not valid JSON"),
        (b"\xff\xfe\x00garbage", "is not valid JSON (not UTF-8 text)"),
    ],
    ids=["list", "string-score", "missing-key", "bool-score", "truncated", "binary"],
)
def test_report_on_a_malformed_rouge_json(tmp_path, no_launch, content, fragment):
    folder = tmp_path / "eval-out"
    folder.mkdir()
    rouge = folder / "rouge.json"
    rouge.write_bytes(content if isinstance(content, bytes) else content.encode())
    good = finished_run(tmp_path / "run")
    for runs in ((folder,), (good, folder)):
        refused(
            no_launch,
            "report",
            *map(str, runs),
            output=None,
            watch=(folder, good),
            fragments=(str(rouge), fragment),
        )


def test_report_of_a_run_with_a_malformed_evaluation(tmp_path, no_launch):
    run = finished_run(tmp_path / "run")
    rouge = run / "eval" / "finetuned" / "rouge.json"
    rouge.write_text(json.dumps({**SCORES, "rougeL": [0.2]}))
    shutil.rmtree(run / "final")
    refused(
        no_launch,
        "report",
        str(run),
        output=None,
        watch=(run,),
        fragments=(str(rouge), "rougeL is [0.2], not a number", "ftlaunch score"),
    )


def test_report_after_rescoring_in_place_without_data(tmp_path):
    """`ftlaunch score RUN/eval/original/predictions.jsonl --output RUN/eval/original` (references
    from the file: rouge.json then names no dataset) and the run's report still builds, without
    dialogue excerpts."""
    run = finished_run(tmp_path / "run")
    original = run / "eval" / "original"
    rescored = run_cli_in_process(
        "score", str(original / "predictions.jsonl"), "--no-stemmer", "--output", str(original)
    )
    assert rescored.returncode == 0, rescored.stdout + rescored.stderr
    assert json.loads((original / "rouge.json").read_text())["dataset"] is None
    report = run_cli_in_process("report", str(run))
    assert report.returncode == 0, report.stdout + report.stderr
    assert "**Dialogue** (excerpt): \n" in (run / "report" / "report.md").read_text()


@pytest.mark.parametrize(
    "line, fragment",
    [
        ('{"step": 4, "loss": null}', "line 2: loss is None, not a number"),
        ('{"step": 4, "loss": "high"}', "line 2: loss is 'high', not a number"),
        ('{"loss": 1.0}', "line 2: step is None, not a whole number"),
        ('{"step": "4", "loss": 1.0}', "line 2: step is '4', not a whole number"),
        ('{"step": 4, "restart": 1}', "line 2: a row with restart has no cause"),
        ('{"step": 4, "best_step": 2, "best_value": 0.3}', "line 2: a row with best_step has no best_metric"),
        ('{"step": 4, "val_rouge1": 0.1}', "line 2: a row with val_rouge1 has no val_rougeLsum"),
        ('{"step": 4, "final": true}', "line 2: a row with final has no val_loss"),
    ],
)
def test_report_names_a_metrics_line_it_cannot_read(tmp_path, no_launch, line, fragment):
    run = finished_run(tmp_path / "run")
    metrics = run / "metrics.jsonl"
    metrics.write_text('{"step": 2, "loss": 7.5}\n' + line + "\n")
    refused(no_launch, "report", str(run), output=None, watch=(run,), fragments=(str(metrics), fragment))


@pytest.mark.parametrize("marker", [True, False], ids=["interrupted", "crashed"])
def test_report_of_an_unfinished_run_says_training_has_not_finished(tmp_path, marker):
    """No final validation row yet: stopped by a signal (RUN/INTERRUPTED names its checkpoint) or a
    crash. The report must not read like a finished run's; once the final row is there, no note."""
    run = finished_run(tmp_path / "run")
    rows = [{"step": 5, "loss": 7.5}, {"step": 10, "loss": 7.2}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if marker:
        (run / "INTERRUPTED").write_text("step_10\n")
    assert run_cli_in_process("report", str(run)).returncode == 0
    text = (run / "report" / "report.md").read_text()
    why = "interrupted, checkpoint step_10 written" if marker else "stopped after step 10 (the last logged)"
    assert (
        f"**Training has not finished**: {why}; continue it with the same command and `--resume auto`" in text
    )
    rows.append({"step": 10, "val_loss": 7.1, "final": True})
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert run_cli_in_process("report", str(run)).returncode == 0
    assert "Training has not finished" not in (run / "report" / "report.md").read_text()


def test_report_prints_a_null_validation_value_as_not_available(tmp_path):
    """metrics.json_safe logs a non-finite validation value as null: the report says n/a."""
    run = finished_run(tmp_path / "run")
    rows = [
        {"step": 2, "loss": 7.5},
        {
            "step": 2,
            "val_loss": None,
            "val_rouge1": None,
            "val_rouge2": None,
            "val_rougeL": None,
            "val_rougeLsum": None,
        },
        {"step": 2, "best_step": 2, "best_metric": "val_rougeLsum", "best_value": None},
        {"step": 2, "val_loss": None, "final": True},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run_cli_in_process("report", str(run))
    assert result.returncode == 0, result.stdout + result.stderr
    text = (run / "report" / "report.md").read_text()
    assert (
        "final validation loss n/a" in text and "step 2: n/a" in text and "(n/a; train.best_metric)" in text
    )


@pytest.mark.parametrize(
    "row, fragment",
    [
        ({"id": "d1", "prediction": "hi"}, "has no 'references' list of strings"),
        ({"id": "d1", "prediction": "hi", "references": []}, "has no 'references' list of strings"),
        (
            {"id": "d1", "prediction": "hi", "references": "Tom phones Ann."},
            "has no 'references' list of strings",
        ),
        ({"prediction": "hi", "references": ["x"]}, "has no 'id'"),
        ({"id": "d1", "prediction": 5, "references": ["x"]}, "has no 'prediction' string"),
        ({"id": "d1", "references": ["x"]}, "has no 'prediction' string"),
    ],
    ids=[
        "no-references",
        "empty-references",
        "string-references",
        "no-id",
        "number-prediction",
        "no-prediction",
    ],
)
def test_report_names_a_predictions_line_it_cannot_read(tmp_path, no_launch, row, fragment):
    """Checked before anything is written: the report folder keeps its plots and text."""
    run = finished_run(tmp_path / "run")
    assert run_cli_in_process("report", str(run)).returncode == 0
    predictions = run / "eval" / "finetuned" / "predictions.jsonl"
    predictions.write_text(json.dumps(row) + "\n")
    refused(
        no_launch,
        "report",
        str(run),
        output=None,
        watch=(run,),
        fragments=(f"{predictions} line 1 {fragment}", "ftlaunch eval"),
    )


@pytest.mark.parametrize("override", ["train.lr=1", "lora.r=8"])
def test_eval_refuses_training_keys_it_would_ignore(tmp_path, no_launch, override):
    """`ftlaunch eval --set` takes eval.*, data.* and model.* keys: a training key changes nothing."""
    out = tmp_path / "eval-out"
    refused(
        no_launch,
        "eval",
        *TINY,
        "--set",
        override,
        "--output",
        str(out),
        output=out,
        fragments=(f"--set {override}: ftlaunch eval trains nothing", "eval.*, data.* or model.*"),
    )
