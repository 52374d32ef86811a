"""A run's history (launcher/core/history.py): one marker per training segment in metrics.jsonl, and the
lines the report and the model card show for a resumed or restarted run. The end-to-end checks
(a 2-rank DDP run resumed on 1 rank; a restarted run) are in tests/test_faults.py."""

from __future__ import annotations

import json

import pytest

from launcher.core.history import history_lines, segment_row, segments, strategy_label
from launcher.core.recipe_loading import default_recipe_path, load_recipe
from launcher.results.report import history_notes


def recipe(*overrides: str):
    return load_recipe(default_recipe_path("full"), list(overrides))


@pytest.mark.parametrize(
    ("overrides", "label"),
    [
        ((), "DDP"),
        (("launch.zero=3", "launch.offload=optimizer"), "ZeRO-3 + optimizer offload"),
        (("launch.fsdp=true",), "FSDP2"),
        (("launch.zero=2",), "ZeRO-2"),
    ],
)
def test_the_strategy_is_named_as_people_name_it(overrides, label):
    assert strategy_label(recipe(*overrides)) == label


def test_a_run_trained_in_one_go_has_no_history_lines():
    metrics = [segment_row(recipe(), 0, 1, "fresh", None), {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert history_lines(metrics) == [] == history_notes(metrics)


def test_each_segment_runs_from_its_start_to_the_next_one():
    zero3 = recipe("launch.zero=3", "launch.gpus=2", "train.grad_accum=2")
    ddp = recipe(
        "launch.gpus=4",
        "launch.nodes=2",
        "train.micro_batch_tokens=4096",
        "train.micro_batch_size=1",
        "model.precision=fp32",
        "train.label_smoothing=0.1",
    )
    metrics = [
        segment_row(zero3, 0, 1, "fresh", None),
        *({"step": step, "loss": 1.0} for step in range(1, 7)),
        segment_row(zero3, 4, 2, "restarted", "step_4"),
        *({"step": step, "loss": 1.0} for step in range(5, 9)),
        segment_row(ddp, 8, 3, "resumed", "step_8"),
        *({"step": step, "loss": 1.0} for step in range(9, 13)),
    ]
    micro = zero3.train.micro_batch_size
    assert [row["segment"] for row in segments(metrics)] == [1, 2, 3]
    assert history_lines(metrics) == [
        f"steps 0-4: ZeRO-3 on 2 ranks (micro batch {micro} x accumulation 2, bf16), from scratch",
        f"steps 4-8: ZeRO-3 on 2 ranks (micro batch {micro} x accumulation 2, bf16), restarted from step_4",
        "steps 8-12: DDP on 8 ranks on 2 nodes (token budget 4,096 x accumulation 1, fp32, label smoothing 0.1), "
        "resumed from step_8",
    ]
    assert history_notes(metrics)[0] == "Run history (world size and strategy per segment):"


# ---------------------------------------------------------------- what a start keeps of earlier attempts


def test_a_fresh_start_drops_the_step_0_rows_of_an_earlier_attempt_and_a_resume_keeps_them(tmp_path):
    """train.eval_on_start logs step 0's evaluation; an attempt stopped before its first checkpoint
    leaves that row and its segment row behind. A fresh start (``--resume auto`` that found no
    checkpoint) logs both again: it keeps no row of the earlier attempt, else the file has two
    step-0 segments and evaluations. A resume keeps every row up to its checkpoint, step 0's too."""
    from types import SimpleNamespace

    from launcher.core.metrics import MetricsLogger, read_metrics
    from launcher.core.trackers import init_kwargs

    run = recipe("train.report_to=[]")
    accelerator = SimpleNamespace(is_main_process=True, log=lambda *args, **kwargs: None)
    attempt = [
        segment_row(run, 0, 1, "fresh", None),
        {"step": 0, "val_loss": 7.5},
        *({"step": step, "loss": 7.0 - step / 10} for step in (1, 2, 3)),
        {"step": 2, "val_loss": 6.8},
    ]
    metrics = tmp_path / "metrics.jsonl"

    def start(resume_step):
        metrics.write_text("".join(json.dumps(row) + "\n" for row in attempt))
        return MetricsLogger(accelerator, tmp_path, run, resume_step)

    logger = start(None)  # fresh: nothing of the stopped attempt
    assert read_metrics(tmp_path) == []
    logger.log(segment_row(run, 0, len(segments(read_metrics(tmp_path))) + 1, "fresh", None))
    logger.log({"step": 0, "val_loss": 7.5})
    again = read_metrics(tmp_path)
    assert [row["segment"] for row in segments(again)] == [1]
    assert [row["step"] for row in again if "val_loss" in row] == [0]
    assert history_lines(again) == [] == history_notes(again)  # no "steps 0-0 ... from scratch"

    start(2)  # a resume from step_2: that run's rows up to and including step 2 stay
    assert read_metrics(tmp_path) == [row for row in attempt if row["step"] <= 2]

    # TensorBoard: a fresh start purges every earlier event, step 0's too; a resume those after it
    assert init_kwargs(["tensorboard"], tmp_path, {}, None) == {"tensorboard": {"purge_step": 0}}
    assert init_kwargs(["tensorboard"], tmp_path, {}, 2) == {"tensorboard": {"purge_step": 3}}
