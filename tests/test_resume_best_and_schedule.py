"""A resume of a run that tracks its best step: what the best-so-far record, early stopping and
the schedule become when the resume changes something, or when the run had already stopped.

One early-stopped run (validation loss every 4 steps, patience 2, every checkpoint kept) is the
reference; each test resumes a copy of it. The references are the reference run's own files:
its final/ weights, its logged evaluations and the linear schedule it announced.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_FAST, assert_same_final_weights, read_jsonl, run_cli_harness

pytestmark = pytest.mark.slow  # ranks from the rank harness

RUN = (
    *("full", "--cpu", "--gpus", "2", "--model", "tiny-t5", "--data", "sample", "--report-to", "none"),
    *TINY_FAST,
    *("--set", "train.lr=2e-3", "--set", "model.dropout=0.0", "--set", "train.epochs=5"),
    *(
        "--set",
        "train.checkpoint_every=4",
        "--set",
        "train.keep_checkpoints=20",
        "--set",
        "train.eval_every=4",
    ),
)
BEST = ("--set", "train.best_metric=val_loss", "--set", "train.early_stopping_patience=2")
DELTA = ("--set", "train.early_stopping_delta=0.1")


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("best") / "run"
    result = run_cli_harness(*RUN, *BEST, *DELTA, "--output", str(run))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    rows = read_jsonl(run / "metrics.jsonl")
    assert any("early_stop" in row for row in rows), "the construction needs a run that stops early"
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    return copy


def marker(run: Path) -> dict:
    return [row for row in read_jsonl(run / "metrics.jsonl") if "best_step" in row][-1]


def test_resuming_an_early_stopped_run_does_not_train_past_the_stop(stopped, tmp_path):
    """--resume auto (what a crash in the final save or evaluation advises) finds the checkpoint
    of the step that stopped: it finishes from there, with the same final/ as the run itself."""
    run = copy_of(stopped, tmp_path)
    stop = marker(stopped)["step"]
    result = run_cli_harness(*RUN, *BEST, *DELTA, "--output", str(run), "--resume", "auto")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert f"training had already stopped: early stopping at step {stop}" in output
    rows = read_jsonl(run / "metrics.jsonl")
    assert max(row["step"] for row in rows if "loss" in row) == stop
    assert marker(run)["best_step"] == marker(stopped)["best_step"]
    assert_same_final_weights(run, stopped)


def test_another_best_metric_on_resume_starts_the_record_again(stopped, tmp_path):
    """The checkpoint's best value is a validation loss: compared as a ROUGE score it could
    never be beaten (and was reported as one)."""
    run = copy_of(stopped, tmp_path)
    best = marker(stopped)
    result = run_cli_harness(
        *RUN, "--set", "train.best_metric=rougeL", "--set", "eval.rouge_every=4", "--set", "eval.rouge_limit=4",
        "--set", "eval.max_new_tokens=8", "--output", str(run), "--resume", str(run / "checkpoints" / "step_8"),
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "note: train.best_metric changed val_loss -> rougeL: the best-so-far record (step" in output
    assert "starts again from step 8" in output
    rouge = {
        row["step"]: row["val_rougeL"] for row in read_jsonl(run / "metrics.jsonl") if "val_rougeL" in row
    }
    now = marker(run)
    assert now["best_metric"] == "val_rougeL" and now["best_step"] > 8
    assert now["best_value"] == max(rouge.values()) and now["best_value"] != best["best_value"]


def test_a_best_checkpoint_that_is_gone_restarts_the_record_before_training(stopped, tmp_path):
    run = copy_of(stopped, tmp_path)
    best_step = marker(stopped)["best_step"]
    later = best_step + 4
    assert (run / "checkpoints" / f"step_{later}").is_dir(), (
        "the construction needs a checkpoint after the best"
    )
    shutil.rmtree(run / "checkpoints" / f"step_{best_step}")
    result = run_cli_harness(
        *RUN, *BEST, *DELTA, "--output", str(run), "--resume", str(run / "checkpoints" / f"step_{later}")
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert f"note: the best step's checkpoint {run / 'checkpoints' / f'step_{best_step}'} is gone" in output
    assert marker(run)["best_step"] > later  # the record began again at the resume


def test_a_changed_schedule_precision_and_label_smoothing_are_said_on_resume(stopped, tmp_path):
    from launcher.core.checkpoint import STATE_FILE, read_state
    from launcher.core.history import history_lines
    from launcher.rank.resume import resumed_changes

    run = copy_of(stopped, tmp_path)
    steps = 5 * 8  # 5 epochs of 8 steps (64 dialogues, 2 ranks x micro batch 4)
    result = run_cli_harness(
        *RUN, "--set", "train.scheduler=cosine", "--set", "train.warmup_steps=2", "--set", "model.precision=bf16",
        "--set", "train.label_smoothing=0.1", "--set", "train.max_steps=12", "--output", str(run),
        "--resume", str(run / "checkpoints" / "step_8"),
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert (
        f"note: the learning-rate schedule changed: linear, warm-up 0 of {steps} steps -> "
        "cosine, warm-up 2 of 12 steps; from step 9 the rate follows the new one"
    ) in output
    assert "note: model.precision changed fp32 -> bf16: steps 1-8 trained in fp32, the rest in bf16" in output
    assert (
        "note: train.label_smoothing changed 0.0 -> 0.1: steps 1-8 trained with 0.0, the rest with 0.1"
    ) in output
    metrics = read_jsonl(run / "metrics.jsonl")
    segments = [row for row in metrics if "segment" in row]
    assert [row["precision"] for row in segments] == ["fp32", "bf16"]
    assert [row["label_smoothing"] for row in segments] == [0.0, 0.1]
    assert history_lines(metrics)[1].startswith(
        "steps 8-12: DDP on 2 ranks (micro batch 4 x accumulation 1, bf16, label smoothing 0.1), resumed"
    )
    # a checkpoint of a version that did not record train.label_smoothing: no note (and no error)
    saved = json.loads((run / "checkpoints" / "step_8" / STATE_FILE).read_text())
    assert saved.pop("label_smoothing") == 0.0
    older = tmp_path / "older"
    older.mkdir()
    (older / STATE_FILE).write_text(json.dumps(saved))
    changes = resumed_changes(read_state(older), read_state(run / "checkpoints" / "step_12"))
    assert len(changes) == 2 and not any("label_smoothing" in change for change in changes), changes


def test_a_forced_resume_with_another_micro_batch_keeps_its_place_in_the_epoch(tmp_path):
    """--force-resume with micro batch 4 -> 2: the 32 examples of the first 4 steps (2 ranks x 4)
    are half of the epoch's 64, so training goes on at step 8 of the epoch's 16 new steps (not at
    step 4: the epoch went backwards), and the run says where it ends: 4 + 8 + 16 = 28 steps, short
    of the 32 its new schedule counts."""
    run = tmp_path / "run"
    shape = (*RUN[:10], *TINY_FAST, "--set", "train.epochs=2", "--set", "train.checkpoint_every=4")
    first = run_cli_harness(*shape, "--set", "train.max_steps=4", "--output", str(run))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]
    result = run_cli_harness(
        *shape,
        "--set",
        "train.micro_batch_size=2",
        "--output",
        str(run),
        "--resume",
        "auto",
        "--force-resume",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "the schedule was sized for 32 steps of this shape, but train.epochs=2 ends at step 28" in output
    rows = [row for row in read_jsonl(run / "metrics.jsonl") if "loss" in row]
    epochs = [row["epoch"] for row in rows]
    assert epochs == sorted(epochs) and epochs[4] == pytest.approx(9 / 16)
    assert rows[-1]["step"] == 28 and rows[-1]["epoch"] == 2.0


def test_a_run_begun_from_another_runs_checkpoint_names_it(stopped, tmp_path):
    from launcher.core.history import history_lines

    checkpoint = stopped / "checkpoints" / "step_8"
    run = tmp_path / "new"
    result = run_cli_harness(
        *RUN, "--set", "train.max_steps=12", "--output", str(run), "--resume", str(checkpoint)
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [row["checkpoint"] for row in metrics if "segment" in row] == [str(checkpoint)]
    assert history_lines(metrics) == [
        f"steps 8-12: DDP on 2 ranks (micro batch 4 x accumulation 1, fp32), resumed from {checkpoint}"
    ]
