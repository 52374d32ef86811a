"""train.auto_find_batch_size through the real CLI on CPU ranks: a training step that runs out of
memory (FTLAUNCH_FAULT_OOM_ABOVE_MICRO_BATCH, rank/out_of_memory.py: torch.OutOfMemoryError as a GPU
raises it) continues with a smaller micro batch and a larger accumulation, from the newest intact
checkpoint, and ends as a run that used that batch from the start; without the key, or with nothing
left to halve, the run ends with one error line that says what to change.

Supervision and restarts are the subject, so the runs are real `ftlaunch` subprocesses (the
reference run, whose ranks' arithmetic is the comparison, comes from the rank harness).
"""

from __future__ import annotations

import pytest
from conftest import assert_same_final_weights, read_jsonl, run_cli, run_cli_harness, run_cli_in_process

from launcher.core.history import segments
from launcher.core.recipe_loading import read_run_recipe

FAULT = "FTLAUNCH_FAULT_OOM_ABOVE_MICRO_BATCH"
# 64 sample examples / 16 per step (2 ranks) = 4 steps per epoch: 8 steps, a checkpoint every 2.
# Dropout off: its masks depend on how a step is cut into micro-batches, the examples do not.
TINY = (
    "--cpu", "--gpus", "2", "--zero", "0", "--model", "tiny-t5", "--data", "sample",
    "--set", "model.precision=fp32", "--set", "model.dropout=0.0", "--set", "eval.after_training=false",
    "--set", "train.log_every=1", "--set", "train.lr=2e-3", "--set", "train.epochs=2",
    "--set", "train.checkpoint_every=2",
)  # fmt: skip
STEPS = 8


def batch(micro: int, accumulation: int = 1) -> tuple[str, ...]:
    return ("--set", f"train.micro_batch_size={micro}", "--set", f"train.grad_accum={accumulation}")


def env_with(**extra: str) -> dict[str, str]:
    from conftest import cli_env

    return cli_env(**extra)


def losses(metrics: list[dict]) -> list[float]:
    return [row["loss"] for row in metrics if "loss" in row]


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_out_of_memory_continues_with_smaller_micro_batches(tmp_path):
    """Micro batch 8 runs out of memory from step 4 on at anything above 2: ftlaunch continues with
    4 x accumulation 2 from step_2 (which runs out again at step 4), then 2 x accumulation 4 from
    step_2, and ends with exit 0, step for step and in its final weights the run that trained with
    micro batch 2 x accumulation 4 from the start: the same examples form every step.

    Tolerance: test_training's for runs that form every step from the same examples in other
    micro-batches (2 ranks against 1 rank x accumulation 2 under a token budget): float32 round-off
    of sums added in another order, rel 1e-5 / abs 1e-6, on the losses of all 8 steps. The final
    weights are compared to that bound with the run that took the same path by hand (micro batch 8
    to step_2, then `--resume auto --force-resume` with 2 x accumulation 4): against the run of
    micro batch 2 from the start, steps 1-2 were padded to other lengths (micro-batches of 8 against
    2 dialogues), and AdamW's m / (sqrt(v) + 1e-8) turns that round-off on the few weights whose
    gradient is ~0 into updates of up to lr (measured: 9 of ~100k elements off by up to 3.3e-5)."""
    reference_dir, by_hand = tmp_path / "reference", tmp_path / "by-hand"
    reference = run_cli_harness("full", *TINY, *batch(2, 4), "--output", str(reference_dir))
    assert reference.returncode == 0, reference.stderr[-6000:]
    crashed = run_cli_harness(
        "full", *TINY, *batch(8), "--output", str(by_hand), env=env_with(FTLAUNCH_FAULT_RAISE_IN_SAVE="0:4")
    )
    assert crashed.returncode == 1, crashed.stderr[-6000:]
    resumed = run_cli_harness(
        "full", *TINY, *batch(2, 4), "--output", str(by_hand), "--resume", "auto", "--force-resume"
    )
    assert resumed.returncode == 0 and "at step 2" in resumed.stdout + resumed.stderr, resumed.stderr[-6000:]
    run_dir = tmp_path / "run"
    args = ("full", *TINY, *batch(8), "--set", "train.auto_find_batch_size=true", "--output", str(run_dir))
    result = run_cli(*args, env=env_with(**{FAULT: "2:3"}), timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    halvings = [line for line in output.splitlines() if line.startswith("ftlaunch: out of memory at")]
    assert halvings == [
        "ftlaunch: out of memory at micro batch 8 (accumulation 1): continuing with micro batch 4 and "
        "accumulation 2, the same 8 examples per optimizer step per rank (16 over 2 ranks), from the newest "
        "intact checkpoint (train.auto_find_batch_size)",
        "ftlaunch: out of memory at micro batch 4 (accumulation 2): continuing with micro batch 2 and "
        "accumulation 4, the same 8 examples per optimizer step per rank (16 over 2 ranks), from the newest "
        "intact checkpoint (train.auto_find_batch_size)",
    ], output[-6000:]
    assert output.count(f"resumed from {run_dir / 'checkpoints' / 'step_2'} at step 2") == 2, output[-6000:]
    assert "restart 1 of" not in output  # launch.max_restarts (0) was not spent
    # the run's files say micro batch 2 x accumulation 4 now: recipe.yaml and its history
    train = read_run_recipe(run_dir).train
    assert (train.micro_batch_size, train.grad_accum) == (2, 4)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    shapes = [
        (row["start"], row["step"], row["micro_batch_size"], row["grad_accum"]) for row in segments(metrics)
    ]
    assert shapes == [("fresh", 0, 8, 1), ("restarted", 2, 4, 2), ("restarted", 2, 2, 4)]
    expected = read_jsonl(reference_dir / "metrics.jsonl")
    assert len(losses(metrics)) == len(losses(expected)) == STEPS
    assert losses(metrics) == pytest.approx(losses(expected), rel=1e-5, abs=1e-6)
    assert_same_final_weights(run_dir, by_hand)
    # the job's own command again (an sbatch requeue, a user's --resume auto): it takes over the
    # micro batch the run found instead of rendering 8 again, which would run out of memory again
    again = run_cli_in_process(*args, "--resume", "auto", "--dry-run")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        "train.auto_find_batch_size: continuing with the micro batch 2 x accumulation 4 this run found "
        "(checkpoint step_8)" in again.stdout + again.stderr
    ), again.stdout + again.stderr
    train = read_run_recipe(run_dir).train
    assert (train.micro_batch_size, train.grad_accum) == (2, 4)


@pytest.mark.slow
def test_out_of_memory_without_the_key_says_what_to_change(tmp_path):
    """The same fault without train.auto_find_batch_size: exit 1 and one error line naming the out of
    memory, its micro batch and both fixes; not restarted by launch.max_restarts (the same micro
    batch would run out again)."""
    run_dir = tmp_path / "run"
    args = ("full", *TINY, *batch(8), "--max-restarts", "1", "--output", str(run_dir))
    result = run_cli(*args, env=env_with(**{FAULT: "2"}), timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-6000:]
    (line,) = error_lines(output)
    assert line.startswith("error: rank ") and "ran out of memory in a training step at micro batch 8" in line
    assert "--set train.auto_find_batch_size=true" in line and "lower train.micro_batch_size" in line, line
    assert "restart 1 of 1" not in output and "continuing with" not in output, output[-6000:]
    assert (run_dir / "logs" / "rank0.log").read_text().count("===== ftlaunch rank 0") == 1


@pytest.mark.slow
def test_out_of_memory_at_micro_batch_1_stops_with_one_line(tmp_path):
    """Micro batch 1 runs out of memory with the key on: nothing left to halve, one error line, one start."""
    run_dir = tmp_path / "run"
    args = ("full", *TINY, *batch(1), "--set", "train.auto_find_batch_size=true", "--output", str(run_dir))
    result = run_cli(*args, env=env_with(**{FAULT: "0"}), timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-6000:]
    (line,) = error_lines(output)
    assert "ran out of memory in a training step at micro batch 1 (accumulation 1)" in line, line
    assert "train.micro_batch_size is already 1: nothing left to halve" in line, line
    assert "continuing with" not in output, output[-6000:]
    assert (run_dir / "logs" / "rank0.log").read_text().count("===== ftlaunch rank 0") == 1


def test_auto_find_batch_size_is_refused_on_several_nodes(tmp_path):
    result = run_cli_in_process(
        "full", "--cpu", "--model", "tiny-t5", "--data", "sample", "--nodes", "2", "--main-address", "127.0.0.1",
        "--set", "train.auto_find_batch_size=true", "--output", str(tmp_path / "r"), "--dry-run",
    )  # fmt: skip
    assert result.returncode == 2 and not (tmp_path / "r").exists(), result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "train.auto_find_batch_size=true" in line and "--nodes 2" in line, line
