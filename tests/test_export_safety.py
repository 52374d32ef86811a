# ruff: noqa: F811 - no_launch and model_dir are fixtures, imported to be used here
"""``ftlaunch export`` reads everything before it writes, and ``--output`` is absent or complete.

The export quotes the run's report/rouge.json and metrics.jsonl in its model card. A damaged one
is refused with one line naming the file, the key and the fix, before a weight is written
(``refused`` from test_bad_input: exit 2, no traceback, ``--output`` not created, the run
unchanged). The folder is built beside ``--output`` and renamed into place, so a failure while
writing (here: a save that raises) leaves nothing, and the same command then succeeds. Real CLI,
in-process, on a finished run made without training (``fake_run``: a saved tiny-t5 as final/).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli_in_process
from test_bad_input import no_launch, refused  # noqa: F401 - no_launch is a fixture
from test_outputs_and_model_files import fake_run, model_dir  # noqa: F401 - model_dir is a fixture

SCORES = {"rouge1": 0.31, "rouge2": 0.12, "rougeL": 0.27, "rougeLsum": 0.28, "n": 1}
METRICS = [
    {"step": 0, "segment": 1, "start": "fresh", "checkpoint": None, "strategy": "DDP", "world_size": 1,
     "nodes": 1, "micro_batch_size": 8, "micro_batch_tokens": None, "grad_accum": 1},
    {"step": 4, "epoch": 0.5, "loss": 7.5, "lr": 0.0},
    {"step": 4, "val_loss": 7.4, "final": True},
]  # fmt: skip


def reported_run(tmp_path: Path, model_dir: Path) -> Path:
    """fake_run plus what training and the report leave for the card: metrics.jsonl, report/rouge.json."""
    run = fake_run(tmp_path, model_dir)
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in METRICS))
    (run / "report").mkdir()
    report = {"original": SCORES, "finetuned": {**SCORES, "rouge1": 0.35}}
    (run / "report" / "rouge.json").write_text(json.dumps(report))
    return run


def siblings(output: Path) -> list[str]:
    """What sits beside --output (a staging folder left behind would show here)."""
    return sorted(path.name for path in output.parent.iterdir()) if output.parent.exists() else []


def exported(env: dict[str, str], run: Path, output: Path) -> None:
    result = run_cli_in_process("export", str(run), "--output", str(output), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    names = {path.name for path in output.iterdir()}
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "ftlaunch.json"} <= names


# ---------------------------------------------------------------- damaged inputs of the card

REPORT_DAMAGE = {
    "not JSON": ("{bad", "is not valid JSON"),
    "a list": ("[1]", "is not a JSON object of evaluations"),
    "an entry that is a list": ('{"finetuned": [1]}', "finetuned is [1], not an evaluation's scores"),
    "a missing metric": ('{"finetuned": {"rouge1": 0.1}}', "finetuned.rouge2 is missing"),
    "a metric as text": (
        json.dumps({"original": {**SCORES, "rougeL": "0.3"}}),
        "original.rougeL is '0.3', not a number",
    ),
}


@pytest.mark.parametrize("damage", REPORT_DAMAGE, ids=list(REPORT_DAMAGE))
def test_a_damaged_report_rouge_json_is_refused_before_anything_is_written(
    damage, tmp_path, model_dir, no_launch
):
    run = reported_run(tmp_path, model_dir)
    text, fragment = REPORT_DAMAGE[damage]
    (run / "report" / "rouge.json").write_text(text)
    out = tmp_path / "exports" / "model"
    refused(
        no_launch,
        "export",
        str(run),
        "--output",
        str(out),
        output=tmp_path / "exports",
        watch=(run,),
        fragments=(str(run / "report" / "rouge.json"), fragment, f"run ftlaunch report {run} to rewrite it"),
    )


METRICS_DAMAGE = {
    "a step as text": ('{"step": "x"}', "line 4: step is 'x', not a whole number"),
    "a step as true": ('{"step": true}', "line 4: step is True, not a whole number"),
    "a segment without its shape": (
        '{"step": 4, "segment": 2}',
        "line 4: segment row's world_size is missing",
    ),
    "a segment with a null strategy": (
        json.dumps({**METRICS[0], "segment": 2, "strategy": None}),
        "line 4: segment row's strategy is None, not text",
    ),
    "not JSON": ("{bad", "line 4 is not JSON"),
}


@pytest.mark.parametrize("damage", METRICS_DAMAGE, ids=list(METRICS_DAMAGE))
def test_a_damaged_metrics_jsonl_is_refused_before_anything_is_written(
    damage, tmp_path, model_dir, no_launch
):
    run = reported_run(tmp_path, model_dir)
    line, fragment = METRICS_DAMAGE[damage]
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write(line + "\n")
    out = tmp_path / "exports" / "model"
    refused(
        no_launch,
        "export",
        str(run),
        "--output",
        str(out),
        output=tmp_path / "exports",
        watch=(run,),
        fragments=(str(run / "metrics.jsonl"), fragment),
    )


def test_an_output_that_is_a_file_is_refused(tmp_path, model_dir, no_launch):
    run = reported_run(tmp_path, model_dir)
    recipe = run / "recipe.yaml"
    refused(
        no_launch,
        "export",
        str(run),
        "--output",
        str(recipe),
        output=None,
        watch=(run,),
        fragments=(f"--output {recipe} is a file; pass a new directory for the export",),
    )


@pytest.mark.parametrize("inner", ["final", "eval/finetuned"])
def test_a_folder_inside_a_run_names_the_run_to_export(tmp_path, model_dir, no_launch, inner):
    run = reported_run(tmp_path, model_dir)
    out = tmp_path / "export"
    refused(
        no_launch,
        "export",
        str(run / inner),
        "--output",
        str(out),
        output=out,
        watch=(run,),
        fragments=(f"{run / inner} is not a finished run", f"it is inside the run {run}: pass that"),
    )


def test_an_interrupted_run_is_refused_as_one_without_a_final_model_yet(tmp_path, model_dir, no_launch):
    """recipe.yaml but no final/ (interrupted, crashed, or still training): the line says what is
    missing and how to finish the run, in the words summarize uses for the same run."""
    run = reported_run(tmp_path, model_dir)
    shutil.rmtree(run / "final")
    out = tmp_path / "export"
    expected = (
        f"{run} has no final/ model yet (training has not finished: continue it with the same command "
        "and --resume auto)"
    )
    line = refused(no_launch, "export", str(run), "--output", str(out), output=out, watch=(run,))
    assert line == f"error: {expected}"
    line = refused(no_launch, "summarize", str(run), "--input", "-", output=None, watch=(run,))
    assert line == f"error: {expected}"


# ---------------------------------------------------------------- absent or complete


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failure_while_writing_leaves_no_output_and_the_rerun_succeeds(
    failure, tmp_path, model_dir, no_launch, monkeypatch
):
    from launcher.rank import export

    run = reported_run(tmp_path, model_dir)
    out = tmp_path / "exports" / "nested" / "model"
    real_save = export.save_exported_model

    def save_then_fail(recipe, final, out_dir, dtype):
        real_save(recipe, final, out_dir, dtype)  # the weights are written, then the disk fills up
        assert (out_dir / "model.safetensors").is_file()
        raise failure

    monkeypatch.setattr(export, "save_exported_model", save_then_fail)
    with pytest.raises(type(failure)):
        export.export_run(run, out, merge=False, dtype="fp32")
    assert not (tmp_path / "exports").exists()  # no half-written --output, no staging folder, no parents
    monkeypatch.setattr(export, "save_exported_model", real_save)
    exported(no_launch, run, out)
    assert siblings(out) == ["model"]


KILLED_EXPORT = """
import os, signal, sys
from pathlib import Path
from launcher.rank import export

real_save = export.save_exported_model


def save_then_die(recipe, final, out_dir, dtype):
    real_save(recipe, final, out_dir, dtype)
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9 once the weights are written


export.save_exported_model = save_then_die
export.export_run(Path(sys.argv[1]), Path(sys.argv[2]), merge=False, dtype="fp32")
"""


def test_a_staging_folder_left_by_a_killed_export_is_removed_by_the_next(tmp_path, model_dir, no_launch):
    """kill -9 skips every cleanup: the staging folder stays beside --output (which is still
    absent). The next export removes it, and an older name without the host, but never another
    host's staging folder or one of a process that still runs."""
    run = reported_run(tmp_path, model_dir)
    out = tmp_path / "exports" / "model"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_EXPORT, str(run), str(out)], capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = siblings(out)
    assert len(left) == 1 and left[0].startswith(f".model.tmp-{socket.gethostname()}-"), left
    assert (out.parent / left[0] / "model.safetensors").is_file()
    dead_pid = left[0].rsplit("-", 1)[1]
    kept = [f".model.tmp-another-host-{dead_pid}", f".model.tmp-{socket.gethostname()}-{os.getppid()}"]
    for name in [f".model.tmp-{dead_pid}", *kept]:
        (out.parent / name).mkdir()
    exported(no_launch, run, out)
    assert siblings(out) == sorted(["model", *kept])


def test_an_export_is_complete_and_quotes_the_run(tmp_path, model_dir, no_launch):
    run = reported_run(tmp_path, model_dir)
    out = tmp_path / "model"
    out.mkdir()  # an empty --output is accepted
    exported(no_launch, run, out)
    card = (out / "README.md").read_text()
    assert "| finetuned | 35.00 | 12.00 | 27.00 | 28.00 |" in card
    assert "| optimizer steps | 4 |" in card
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []


def test_a_run_without_metrics_or_report_still_exports(tmp_path, model_dir, no_launch):
    """Both are optional for the card: no ROUGE rows, and the steps are said to be unrecorded."""
    run = fake_run(tmp_path, model_dir)
    out = tmp_path / "model"
    exported(no_launch, run, out)
    card = (out / "README.md").read_text()
    assert "| optimizer steps | not recorded (no steps in metrics.jsonl) |" in card
    assert "| finetuned |" not in card
