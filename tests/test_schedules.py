"""Learning-rate schedules beyond linear/cosine/constant (train.scheduler, train.scheduler_options:
Seq2SeqTrainer's lr_scheduler_type and lr_scheduler_kwargs).

The reference for each schedule is its formula written out here (as transformers documents it),
not the schedule object the code builds; one real run checks the options reach the ranks.
"""

from __future__ import annotations

import inspect
import math

import pytest
from conftest import read_jsonl, run_cli_harness, set_refused
from test_update_once import scheduled_lrs

from launcher.core.recipe import SCHEDULE_OPTIONS, TrainSection
from launcher.core.recipe_loading import build_recipe

TOTAL, WARMUP = 12, 2


def recipe_with(scheduler: str, peak: float = 1.0, **options):
    train = {"scheduler": scheduler, "scheduler_options": options, "warmup_steps": WARMUP, "lr": peak}
    return build_recipe({"model": {"name": "tiny-t5"}, "train": train}, "test")


def after_warmup(formula):
    """Warm-up t/WARMUP, then ``formula(progress)`` with progress 0..1 over the remaining steps."""
    return [t / WARMUP if t < WARMUP else formula((t - WARMUP) / (TOTAL - WARMUP)) for t in range(TOTAL)]


def half_cosine(progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize(
    ("scheduler", "options", "expected"),
    [
        ("cosine", {"num_cycles": 1.0}, after_warmup(lambda p: 0.5 * (1 + math.cos(2 * math.pi * p)))),
        (
            "cosine_with_restarts",
            {"num_cycles": 2},
            after_warmup(lambda p: half_cosine((2 * p) % 1.0)),
        ),
        ("polynomial", {"lr_end": 0.1, "power": 2.0}, after_warmup(lambda p: 0.9 * (1 - p) ** 2 + 0.1)),
        # decay 1/sqrt((t + shift) / timescale), shift = timescale - warm-up: 1 at the warm-up's end
        (
            "inverse_sqrt",
            {"timescale": 4},
            [t / WARMUP if t < WARMUP else 1 / math.sqrt((t + 2) / 4) for t in range(TOTAL)],
        ),
        ("cosine_with_min_lr", {"min_lr_rate": 0.2}, after_warmup(lambda p: 0.2 + 0.8 * half_cosine(p))),
        ("cosine_with_min_lr", {"min_lr": 0.3}, after_warmup(lambda p: 0.3 + 0.7 * half_cosine(p))),
    ],
)
def test_each_schedule_follows_its_formula_with_its_options(scheduler, options, expected):
    assert scheduled_lrs(recipe_with(scheduler, **options), TOTAL) == pytest.approx(expected, abs=1e-12)


def test_the_default_cosine_is_one_half_wave_down():
    assert scheduled_lrs(recipe_with("cosine"), TOTAL) == pytest.approx(after_warmup(half_cosine), abs=1e-12)


def test_every_schedule_option_is_a_parameter_of_transformers_schedule_function():
    """SCHEDULE_OPTIONS names what the library's functions take (a renamed parameter would fail
    every run at its first step otherwise)."""
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    schedulers = TrainSection.model_fields["scheduler"].annotation.__args__
    assert set(schedulers) == set(SCHEDULE_OPTIONS)
    for name, options in SCHEDULE_OPTIONS.items():
        function = TYPE_TO_SCHEDULER_FUNCTION[
            SchedulerType("constant_with_warmup" if name == "constant" else name)
        ]
        assert set(options) <= set(inspect.signature(function).parameters), name


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (
            ["train.scheduler=linear", "train.scheduler_options.power=2"],
            [
                "train.scheduler_options.power=2",
                "is not an option of train.scheduler=linear",
                "it takes none",
            ],
        ),
        (
            ["train.scheduler=polynomial", "train.scheduler_options.cycles=2"],
            ["train.scheduler_options.cycles=2", "it takes lr_end, power"],
        ),
        (
            ["train.scheduler=polynomial", "train.scheduler_options.lr_end=1e-3"],
            ["lr_end=0.001", "up to train.lr=1e-05"],
        ),
        (
            ["train.scheduler=cosine_with_restarts", "train.scheduler_options.num_cycles=1.5"],
            ["num_cycles=1.5", "a whole number above 0"],
        ),
        (
            ["train.scheduler=cosine_with_min_lr"],
            ["cosine_with_min_lr needs its floor", "min_lr", "min_lr_rate"],
        ),
        (
            [
                "train.scheduler=cosine_with_min_lr",
                "train.scheduler_options.min_lr_rate=0.1",
                "train.scheduler_options.min_lr=1e-6",
            ],
            ["needs its floor"],
        ),
        (
            ["train.scheduler=inverse_sqrt", "train.scheduler_options.timescale=soon"],
            ["train.scheduler_options.timescale='soon'", "valid number"],
        ),
        (["train.scheduler=cyclic"], ["train.scheduler='cyclic'", "polynomial"]),
    ],
)
def test_a_schedule_option_it_does_not_take_or_a_meaningless_value_is_refused(tmp_path, overrides, words):
    set_refused(tmp_path, overrides, words)


def test_schedule_options_set_one_by_one_reach_the_ranks_learning_rate(tmp_path):
    """A real run with --set train.scheduler_options.KEY=VALUE: every logged step's learning rate
    is the polynomial formula's with the recipe's peak rate."""
    out = tmp_path / "run"
    peak, lr_end = 1e-3, 1e-4
    result = run_cli_harness(
        "full",
        *("--cpu", "--gpus", "1", "--model", "tiny-t5", "--data", "sample", "--output", str(out)),
        *("--set", "model.precision=fp32", "--set", f"train.max_steps={TOTAL}", "--set", "train.log_every=1"),
        *("--set", "train.micro_batch_size=4"),  # 16 steps in an epoch of the sample data
        *("--set", f"train.lr={peak}", "--set", f"train.warmup_steps={WARMUP}"),
        *("--set", "train.scheduler=polynomial"),
        *("--set", f"train.scheduler_options.lr_end={lr_end}", "--set", "train.scheduler_options.power=3"),
        *("--set", "train.eval_every=null", "--set", "eval.after_training=false"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    logged = {row["step"]: row["lr"] for row in read_jsonl(out / "metrics.jsonl") if "lr" in row}
    # the row of step s logs the rate after s scheduler steps: the rate step s + 1 trains with
    expected = after_warmup(lambda p: (peak - lr_end) * (1 - p) ** 3 + lr_end)
    expected = [peak * e if t < WARMUP else e for t, e in enumerate(expected)] + [lr_end]
    assert [logged[step] for step in range(1, TOTAL + 1)] == pytest.approx(expected[1:], rel=1e-6)
    # the model card's learning-rate line (written with the final evaluation, off here)
    from launcher.core.recipe_loading import read_run_recipe
    from launcher.results.card import schedule_label

    assert schedule_label(read_run_recipe(out)) == "polynomial, lr_end 0.0001, power 3"
