"""train.best_metric, in-training ROUGE and early stopping (launcher/rank/best.py).

One 2-rank run trains with a learning rate that ramps up to where validation ROUGE stops
improving, evaluates ROUGE-Lsum on the validation split every 4 steps and stops after the first
evaluation without a better one. Its checkpoints are the independent reference: final/ must hold
exactly the weights of the best step's checkpoint, not those of the step where training stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl, run_cli_harness, save_tiny_t5, set_refused
from safetensors.torch import load_file

from launcher.core.checkpoint import TrainState
from launcher.core.recipe_loading import build_recipe
from launcher.rank import best

SAMPLE = Path(__file__).resolve().parents[1] / "launcher" / "assets" / "sample"
EVERY, MAX_STEPS = 4, 32  # sample data: 8 steps per epoch of 8 examples, 4 epochs


@pytest.fixture(scope="module")
def early_stopped(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("best") / "run"
    # ranks from the rank harness (tests/rankharness.py): the subject is what the run logs and keeps
    result = run_cli_harness(
        "full",
        *("--cpu", "--gpus", "2", "--model", "tiny-t5", "--data", "sample", "--output", str(out)),
        *("--set", "model.precision=fp32", "--set", "model.dropout=0.0"),
        # lr ramps to 0.03: the summaries improve, then the validation ROUGE wanders
        *("--set", "train.lr=0.03", "--set", "train.warmup_ratio=0.9", "--set", "train.scheduler=linear"),
        *("--set", "train.epochs=4", "--set", "train.micro_batch_size=4", "--set", "train.log_every=4"),
        *("--set", f"train.eval_every={EVERY}", "--set", f"eval.rouge_every={EVERY}"),
        *("--set", "eval.rouge_limit=16", "--set", "eval.max_new_tokens=16"),
        *("--set", "train.best_metric=rougeLsum", "--set", "train.early_stopping_patience=1"),
        *("--set", "train.checkpoint_every=null", "--set", "train.keep_checkpoints=1"),
        *("--set", "eval.compare_original=false", "--set", "eval.limit=8"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out, result.stdout + result.stderr


@pytest.mark.slow
def test_rouge_is_logged_at_every_evaluation_and_training_stops_at_the_first_without_a_better_one(
    early_stopped,
):
    run_dir, output = early_stopped
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    evaluations = [row for row in metrics if "val_rougeLsum" in row]
    assert [row["step"] for row in evaluations] == list(range(EVERY, evaluations[-1]["step"] + 1, EVERY))
    values = [row["val_rougeLsum"] for row in evaluations]
    # patience 1: every evaluation but the last improved on all before it, the last did not
    assert all(later > max(values[:i]) for i, later in enumerate(values[1:-1], start=1)), values
    assert values[-1] <= max(values[:-1]), values
    stopped = evaluations[-1]["step"]
    assert stopped < MAX_STEPS, "the construction needs a run that stops before its last step"
    assert max(row["step"] for row in metrics if "loss" in row) == stopped
    assert f"early stopping at step {stopped}" in output
    report = (run_dir / "report" / "report.md").read_text()
    assert f"Stopped early: early stopping at step {stopped}" in report
    assert (run_dir / "eval" / "finetuned" / "rouge.json").is_file()  # evaluated and reported as usual
    for row in evaluations:  # each in-training evaluation kept its predictions
        assert len(read_jsonl(run_dir / "eval" / f"step_{row['step']}" / "predictions.jsonl")) == 16


@pytest.mark.slow
def test_final_holds_the_best_steps_weights_not_the_last_ones(early_stopped):
    run_dir, output = early_stopped
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    marker = next(row for row in metrics if "best_step" in row)
    evaluations = {row["step"]: row["val_rougeLsum"] for row in metrics if "val_rougeLsum" in row}
    best_step = max(evaluations, key=evaluations.get)
    assert marker["best_step"] == best_step and marker["best_value"] == evaluations[best_step]
    stopped = marker["step"]
    assert best_step < stopped
    # keep_checkpoints=1 keeps the newest, and the best step's whatever its age
    checkpoints = run_dir / "checkpoints"
    assert {p.name for p in checkpoints.glob("step_*")} == {f"step_{best_step}", f"step_{stopped}"}
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    best_weights = load_file(str(checkpoints / f"step_{best_step}" / "model.safetensors"))
    last_weights = load_file(str(checkpoints / f"step_{stopped}" / "model.safetensors"))
    for key, value in best_weights.items():
        assert torch.equal(final[key], value), key
    assert any(not torch.equal(final[key], last_weights[key]) for key in best_weights)
    assert f"final/ holds the best step {best_step} of {stopped}" in output
    assert f"best step {best_step} of {stopped}" in (run_dir / "report" / "report.md").read_text()


# 40 examples on 2 ranks, micro batch 4, accumulation 2: 5 micro-batches per rank and epoch, so
# optimizer steps of 2 + 2 + 1 micro-batches: every epoch ends at a multiple of 3 steps.
EPOCH_STEPS, EPOCHS = 3, 3


@pytest.mark.slow
def test_epoch_intervals_evaluate_and_checkpoint_at_the_step_that_ends_each_epoch(tmp_path):
    """Seq2SeqTrainer's eval_strategy/save_strategy="epoch": train.eval_every, eval.rouge_every
    and train.checkpoint_every set to epoch act at the step holding an epoch's last (short)
    window, whatever the step count per epoch is."""
    out = tmp_path / "run"
    result = run_cli_harness(
        "full",
        *("--cpu", "--gpus", "2", "--model", "tiny-t5", "--data", "sample", "--output", str(out)),
        *("--set", "model.precision=fp32", "--set", "data.train_limit=40", "--set", f"train.epochs={EPOCHS}"),
        *("--set", "train.micro_batch_size=4", "--set", "train.grad_accum=2", "--set", "train.log_every=1"),
        *("--set", "train.eval_every=epoch", "--set", "eval.rouge_every=epoch"),
        *("--set", "train.checkpoint_every=epoch", "--set", "train.keep_checkpoints=5"),
        *(
            "--set",
            "train.best_metric=rougeL",
            "--set",
            "eval.rouge_limit=4",
            "--set",
            "eval.max_new_tokens=8",
        ),
        *("--set", "eval.after_training=false"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    metrics = read_jsonl(out / "metrics.jsonl")
    ends = [EPOCH_STEPS * epoch for epoch in range(1, EPOCHS + 1)]
    assert max(row["step"] for row in metrics if "loss" in row) == ends[-1]
    assert [row["step"] for row in metrics if "val_rougeL" in row] == ends
    # with a best metric the last epoch's validation loss is measured at its step too (final/ may
    # hold an earlier step, whose loss the final row gives)
    assert [row["step"] for row in metrics if "val_loss" in row and not row.get("final")] == ends
    assert {p.name for p in (out / "checkpoints").glob("step_*")} == {f"step_{step}" for step in ends}
    assert [row["epoch"] for row in metrics if row.get("step") in ends and "loss" in row] == [1.0, 2.0, 3.0]


@pytest.mark.slow
def test_eval_on_start_logs_the_original_models_scores_as_a_baseline_never_as_the_best(tmp_path):
    """Seq2SeqTrainer's eval_on_start: step 0's validation loss is the original model's (an
    independent one-example-at-a-time loss of the saved model) and its ROUGE is logged, but step 0
    is no candidate for final/ and no evaluation without improvement: with patience 1 and a
    learning rate that makes every step worse than the original, the first training evaluation
    is still the best so far, so the run cannot stop before the second one."""
    from test_training import reference_val_loss
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model_dir = save_tiny_t5(tmp_path / "tiny-t5")
    out = tmp_path / "run"
    result = run_cli_harness(
        "full",
        *("--cpu", "--gpus", "2", "--model", str(model_dir), "--data", "sample", "--output", str(out)),
        *("--set", "model.precision=fp32", "--set", "train.eval_on_start=true", "--set", "train.epochs=2"),
        *("--set", "train.lr=1.0", "--set", "train.scheduler=constant", "--set", "train.max_grad_norm=null"),
        *("--set", "train.eval_every=2", "--set", "eval.rouge_every=2", "--set", "eval.rouge_limit=4"),
        *("--set", "eval.max_new_tokens=8", "--set", "train.best_metric=val_loss"),
        *("--set", "train.early_stopping_patience=1", "--set", "eval.after_training=false"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    metrics = read_jsonl(out / "metrics.jsonl")
    start = next(row for row in metrics if row["step"] == 0 and "val_loss" in row)
    original = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir))
    rows = read_jsonl(SAMPLE / "validation.jsonl")
    expected = reference_val_loss(original, AutoTokenizer.from_pretrained(str(model_dir)), rows)
    assert start["val_loss"] == pytest.approx(expected, rel=1e-4)
    assert "val_rougeL" in start and len(read_jsonl(out / "eval" / "step_0" / "predictions.jsonl")) == 4
    trained = {row["step"]: row["val_loss"] for row in metrics if "val_loss" in row and row["step"] > 0}
    assert min(trained.values()) > start["val_loss"], "the construction needs steps worse than the original"
    marker = next(row for row in metrics if "best_step" in row)
    assert marker["best_step"] > 0 and marker["best_value"] == min(
        value for step, value in trained.items() if step <= marker["step"]
    )
    stopped = next((row["step"] for row in metrics if "early_stop" in row), max(trained))
    assert stopped >= 4  # not at step 2, as it would if step 0 were the best so far


@pytest.mark.slow
def test_the_last_steps_validation_loss_is_its_own_and_the_final_one_names_the_best_step(tmp_path):
    """With train.best_metric the last step's scheduled validation loss is measured before the
    best step's weights are loaded back; the final row, measured after, is the best step's model
    and says so (``model_step``). Neither the loss plot nor TensorBoard puts it at the last step."""
    from test_trackers import tensorboard_scalars

    from launcher.core.trackers import FINAL_MODEL_VAL_LOSS
    from launcher.results.report import loss_series

    out, last = tmp_path / "run", 8
    result = run_cli_harness(
        "lora",
        *("--cpu", "--gpus", "2", "--model", "tiny-t5", "--data", "sample", "--output", str(out)),
        *("--set", f"train.max_steps={last}", "--set", "train.epochs=3", "--set", "eval.limit=8"),
        *("--set", "model.precision=fp32", "--set", "train.log_every=1", "--set", "train.lr=2e-2"),
        *("--set", "train.eval_on_start=true", "--set", "eval.rouge_every=2", "--set", "train.eval_every=2"),
        *("--set", "train.best_metric=rougeL", "--set", "eval.rouge_limit=4"),
        *("--report-to", "tensorboard"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    metrics = read_jsonl(out / "metrics.jsonl")
    own = {row["step"]: row["val_loss"] for row in metrics if "val_loss" in row and not row.get("final")}
    assert sorted(own) == [0, 2, 4, 6, last]  # the last step's own, measured at its step
    marker = next(row for row in metrics if "best_step" in row)
    best_step = marker["best_step"]
    assert best_step < last, "the construction needs a best step before the last"
    final = next(row for row in metrics if row.get("final"))
    assert final["step"] == last and final["model_step"] == best_step
    assert final["val_loss"] == pytest.approx(own[best_step], rel=1e-5)  # final/ is the best step
    assert final["val_loss"] != own[last]
    # the plot: one validation point per step, the last step's own value at the last step
    train, val = loss_series(metrics)
    assert val == sorted(own.items()) and [step for step, _ in train] == list(range(1, last + 1))
    # TensorBoard: val_loss at the last step is that step's; the best model's under its own tag
    scalars = dict(tensorboard_scalars(out / "trackers" / "ftlaunch", "val_loss"))
    assert scalars == pytest.approx(own, rel=1e-6)
    assert tensorboard_scalars(out / "trackers" / "ftlaunch", FINAL_MODEL_VAL_LOSS) == [
        (last, pytest.approx(final["val_loss"], rel=1e-6))
    ]
    report = (out / "report" / "report.md").read_text()
    assert f"final validation loss {final['val_loss']:.4f} (final/'s model, step {best_step})" in report


def test_a_final_row_of_an_earlier_best_step_is_no_point_of_the_last_steps_validation_curve():
    """The loss plot and the trackers read the final row by the step whose model it measures:
    ``model_step``, or for a run logged before rows named it, the best_step marker before it."""
    from launcher.core.trackers import scalars
    from launcher.results.report import final_loss_words, loss_series

    rows = [
        *({"step": step, "loss": 3.0 - step / 10} for step in range(1, 9)),
        *({"step": step, "val_loss": 2.0 - step / 100} for step in (2, 4, 6, 8)),
        {"step": 8, "best_step": 4, "best_metric": "val_rougeL", "best_value": 0.2},
    ]
    final = {"step": 8, "val_loss": 1.96, "final": True, "model_step": 4}
    for metrics in (rows + [final], rows + [{key: final[key] for key in ("step", "val_loss", "final")}]):
        _, val = loss_series(metrics)
        assert val == [(2, 1.98), (4, 1.96), (6, 1.94), (8, 1.92)]
        assert (
            final_loss_words(metrics, metrics[-1]) == "final validation loss 1.9600 (final/'s model, step 4)"
        )
    assert scalars(final) == {"final_model/val_loss": 1.96}
    # final/ is the last step (no best metric, or the best is the last): the row is that step's point
    last = {"step": 8, "val_loss": 1.92, "final": True}
    assert loss_series(rows[:-1] + [last])[1][-1] == (8, 1.92)
    assert final_loss_words(rows[:-1] + [last], last) == "final validation loss 1.9200"
    assert scalars(last) == {"val_loss": 1.92}


# ---------------------------------------------------------------- the rules, without ranks


def test_an_epoch_interval_is_due_at_the_step_that_ends_the_epoch_however_long_each_epoch_is():
    """A token budget packs each epoch into its own number of micro-batches (here 5, then 3)."""
    from types import SimpleNamespace

    from launcher.rank.train import epoch_ended

    run = SimpleNamespace(state=TrainState(), batches_by_epoch=[5, 3])
    due = []
    for epoch, batches in enumerate([5, 3]):
        run.state.epoch = epoch
        for done in range(1, batches + 1):
            run.state.batches_in_epoch = done
            due.append(best.interval_due("epoch", len(due) + 1, epoch_ended(run)))
    assert [step for step, hit in enumerate(due, start=1) if hit] == [5, 8]
    assert [best.interval_due(3, step, False) for step in (3, 4, 6)] == [True, False, True]
    assert not best.interval_due(None, 3, True)


def recipe(**train) -> object:
    return build_recipe({"model": {"name": "tiny-t5"}, "train": train, "eval": {"rouge_every": 4}}, "test")


@pytest.mark.parametrize(
    ("metric", "values", "improved"),
    [
        ("rougeLsum", [0.1, 0.2, 0.15, 0.3], [True, True, False, True]),
        ("val_loss", [3.0, 2.5, 2.6, 2.4], [True, True, False, True]),
    ],
)
def test_the_best_is_the_highest_rouge_or_the_lowest_loss(metric, values, improved):
    settings = recipe(best_metric=metric, eval_every=4)
    state = TrainState()
    seen = []
    for step, value in enumerate(values, start=1):
        state.step = step
        seen.append(best.record(state, settings, value))
    assert seen == improved
    assert state.best_step == 4 and state.best_value == values[3]


def test_early_stopping_counts_evaluations_without_a_better_value_beyond_the_delta():
    settings = recipe(best_metric="rougeLsum", early_stopping_patience=2, early_stopping_delta=0.05)
    state = TrainState()
    for step, value in enumerate([0.2, 0.22, 0.24], start=1):  # +0.02, +0.04: not better by > 0.05
        state.step = step
        best.record(state, settings, value)
    assert state.best_step == 1 and state.evaluations_without_improvement == 2
    assert "did not improve by more than 0.05 in 2 evaluation(s) since step 1" in best.early_stop_reason(
        state, settings
    )


def test_a_checkpoints_state_carries_the_best_so_far_record(tmp_path):
    """What --resume reads back (ftlaunch_state.json): the best step, its value and the count."""
    from dataclasses import asdict

    from launcher.core.checkpoint import read_state

    state = TrainState(step=12, best_step=8, best_value=0.25, evaluations_without_improvement=1)
    (tmp_path / "ftlaunch_state.json").write_text(json.dumps(asdict(state)))
    saved = read_state(tmp_path)
    assert (saved.best_step, saved.best_value, saved.evaluations_without_improvement) == (8, 0.25, 1)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["train.best_metric=rougeLsum"], ["train.best_metric=rougeLsum", "eval.rouge_every"]),
        (["train.best_metric=val_loss", "train.eval_every=null"], ["train.eval_every"]),
        (["train.early_stopping_patience=2"], ["train.best_metric"]),
        (["train.best_metric=bleu"], ["train.best_metric", "bleu"]),
    ],
)
def test_a_best_metric_that_is_never_measured_is_refused(tmp_path, overrides, words):
    set_refused(tmp_path, overrides, words)


def test_the_report_says_which_step_final_holds_why_training_stopped_and_what_restarted():
    from launcher.results.report import best_model_notes, restart_notes

    metrics = [
        {
            "step": 4,
            "val_loss": 3.0,
            "val_rouge1": 0.1,
            "val_rouge2": 0.0,
            "val_rougeL": 0.1,
            "val_rougeLsum": 0.125,
        },
        {"step": 6, "restart": 1, "cause": "rank 1 (node 0, host h) failed first: boom"},
        {
            "step": 8,
            "val_loss": 2.9,
            "val_rouge1": 0.1,
            "val_rouge2": 0.0,
            "val_rougeL": 0.1,
            "val_rougeLsum": 0.1,
        },
        {
            "step": 8,
            "early_stop": "early stopping at step 8: val_rougeLsum did not improve in 1 evaluation(s)",
        },
        {"step": 8, "best_step": 4, "best_metric": "val_rougeLsum", "best_value": 0.125},
    ]
    text = "\n".join(best_model_notes(metrics) + restart_notes(metrics))
    assert "Validation ROUGE-Lsum during training (%): step 4: 12.50, step 8: 10.00." in text
    assert "Stopped early: early stopping at step 8" in text
    assert "the best step 4 of 8 by val_rougeLsum (0.1250" in text
    assert (
        "Restarts (launch.max_restarts): 1: from step 6 after rank 1 (node 0, host h) failed first: boom."
        in text
    )
    assert best_model_notes([{"step": 1, "loss": 2.0}]) == restart_notes([]) == []


def test_the_model_card_says_which_step_final_holds_and_why_training_stopped_early(tmp_path):
    """The card's training facts name what the report names (metrics.jsonl's best_step and
    early_stop markers), not only the step training ended at."""
    from launcher.core.model_settings import inference_settings
    from launcher.core.recipe_loading import dump_recipe
    from launcher.results.card import render_card

    run_dir = tmp_path / "run"
    (run_dir / "final").mkdir(parents=True)
    run_recipe = recipe(best_metric="val_loss", early_stopping_patience=2, early_stopping_delta=0.1)
    (run_dir / "recipe.yaml").write_text(dump_recipe(run_recipe))
    stop = "early stopping at step 28: val_loss did not improve by more than 0.1 in 2 evaluation(s) since step 20"
    rows = [
        *({"step": step, "loss": 6.0 - step / 10} for step in range(4, 29, 4)),
        *({"step": step, "val_loss": value} for step, value in ((20, 5.315), (24, 5.30), (28, 5.29))),
        {"step": 28, "early_stop": stop},
        {"step": 28, "best_step": 20, "best_metric": "val_loss", "best_value": 5.315},
        {"step": 28, "val_loss": 5.315, "final": True},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    card = render_card(run_dir, settings=inference_settings(run_recipe, method="full"))
    assert "| optimizer steps | 28 |" in card
    assert "| weights | best step 20 of 28 by val_loss (5.3150; train.best_metric) |" in card
    assert f"| stopped early | {stop} |" in card
    # a run without the markers: no such rows
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:7]))
    card = render_card(run_dir, settings=inference_settings(run_recipe, method="full"))
    assert "| weights |" not in card and "| stopped early |" not in card


def test_a_resume_that_measures_validation_rouge_otherwise_starts_the_best_record_again(tmp_path):
    """A ROUGE on 4 dialogues greedy and one on 8 with beams are not comparable: the checkpoint's
    best value would be beaten (or not) by a change of measurement, not of the model. A
    validation loss has no such settings: its record is kept whatever eval.* says."""

    def measured(metric: str, **eval_settings) -> object:
        return build_recipe(
            {
                "model": {"name": "tiny-t5"},
                "train": {"best_metric": metric},
                "eval": {"rouge_every": 4, **eval_settings},
            },
            "test",
        )

    before = measured("rougeL", rouge_limit=4)
    saved = TrainState(step=12, best_step=12, best_value=0.25, best_metric="rougeL")
    saved.best_measured = best.measurement(before)
    kept, note = best.continued_record(saved, before, tmp_path)
    assert note is None and (kept.best_step, kept.best_value) == (12, 0.25)
    record, note = best.continued_record(saved, measured("rougeL", rouge_limit=8, num_beams=2), tmp_path)
    assert record.best_step is None and record.evaluations_without_improvement == 0
    assert note == (
        "validation ROUGE is measured otherwise now (eval.rouge_limit 4 -> 8, eval.num_beams 1 -> 2): "
        "the best-so-far record (step 12, val_rougeL 0.2500) starts again from step 12"
    )
    saved.best_measured = "a hand-edited state"  # still a note, not a traceback
    _, note = best.continued_record(saved, before, tmp_path)
    assert note.startswith("validation ROUGE is measured otherwise now (a hand-edited state ")
    loss = TrainState(step=12, best_step=12, best_value=3.0, best_metric="val_loss")
    loss.best_measured = best.measurement(measured("val_loss", rouge_limit=4))
    assert loss.best_measured == ""
    kept, note = best.continued_record(loss, measured("val_loss", rouge_limit=8, num_beams=2), tmp_path)
    assert note is None and kept.best_value == 3.0
