"""A resume trains with the recipe's learning rate, not the checkpoint's.

Loading a checkpoint restores the optimizer's and the schedule's state, and with it the peak
learning rate and weight decay the run that wrote it had: a ``--resume auto --set train.lr=...``
used to be written to recipe.yaml and shown on the console, yet train at the old rate. Now the
recipe's settings are put back after loading (rank/optimization.reapply_recipe_settings), at the
checkpoint's position in the schedule. Reference: the linear schedule's formula, the rate of step t
of 6 being lr x (6 - t) / 6, for each strategy's way of loading an optimizer (torch's, DeepSpeed's
ZeRO, FSDP2's sharded state).
"""

from __future__ import annotations

import pytest
from conftest import TINY_FAST, read_jsonl, run_cli_harness

pytestmark = pytest.mark.slow  # two tiny trainings per strategy (ranks from the rank harness)

STEPS = 6
RUN = (
    *("--cpu", "--model", "tiny-t5", "--data", "sample", "--report-to", "none", *TINY_FAST),
    *(
        "--set",
        f"train.max_steps={STEPS}",
        "--set",
        "train.checkpoint_every=2",
        "--set",
        "train.keep_checkpoints=3",
    ),
)


DDP = ("--gpus", "1")
ZERO2, ZERO3, FSDP = (("--gpus", "2", *flags) for flags in (("--zero", "2"), ("--zero", "3"), ("--fsdp",)))


@pytest.mark.parametrize(
    ("strategy", "resumed_under"),
    [(DDP, DDP), (ZERO2, ZERO2), (ZERO3, ZERO3), (FSDP, FSDP), (ZERO2, FSDP)],
    ids=["ddp", "zero2", "zero3", "fsdp", "zero2-to-fsdp"],
)
def test_resume_with_another_lr_trains_with_it_from_the_checkpoints_step(tmp_path, strategy, resumed_under):
    """The last case resumes a ZeRO-2 checkpoint under FSDP2 (the converted resume of
    rank/portable.py), whose optimizer state arrives another way."""
    run = tmp_path / "run"
    first = run_cli_harness("full", *RUN, *strategy, "--set", "train.lr=1e-3", "--output", str(run))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]
    resumed = run_cli_harness(
        "full", *RUN, *resumed_under, "--set", "train.lr=1e-2", "--set", "train.weight_decay=0.1",
        "--resume", str(run / "checkpoints" / "step_2"), "--output", str(run),
    )  # fmt: skip
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-6000:]
    # exactly these changes: the unchanged AdamW settings (betas, epsilon) are not named. A converted
    # resume loads moments, not the groups' settings: the recipe's weight decay is simply kept there.
    changes = "train.lr 0.001 -> 0.01" + (
        "" if resumed_under != strategy else ", train.weight_decay 0.01 -> 0.1"
    )
    assert f"resumed with the recipe's {changes} (the checkpoint's" in output, output[-3000:]
    rows = read_jsonl(run / "metrics.jsonl")
    rates = {row["step"]: row["lr"] for row in rows if "lr" in row}
    assert sorted(rates) == [1, 2, 3, 4, 5, 6], rates  # steps 1-2 from the first start, then the resume's
    expected = [(1e-3 if t <= 2 else 1e-2) * (STEPS - t) / STEPS for t in range(1, STEPS)]
    assert [rates[t] for t in range(1, STEPS)] == pytest.approx(expected, rel=1e-9)


def test_a_resume_past_the_recipes_end_says_what_final_holds(tmp_path):
    """train.max_steps lowered below the checkpoint's step: nothing to train, and the line says that
    final/ is the checkpoint's model (and how to get an earlier one) instead of "training: 4 steps"
    alone."""
    run = tmp_path / "run"
    first = run_cli_harness("full", *RUN, "--gpus", "1", "--output", str(run))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]
    lowered = run_cli_harness(
        "full", *RUN, "--gpus", "1", "--set", "train.max_steps=4", "--resume", "auto", "--output", str(run)
    )
    output = lowered.stdout + lowered.stderr
    assert lowered.returncode == 0, output[-6000:]
    assert (
        "note: the checkpoint is at step 6, past this recipe's 4 optimizer steps: no step is trained and "
        f"final/ is the step-6 model; for an earlier one, pass --resume {run / 'checkpoints'}/step_N"
        in output
    ), output[-3000:]
