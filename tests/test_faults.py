"""Faults on CPU ranks (gloo), through the real CLI: nothing lost, no hangs.

* a crash in the middle of a checkpoint save leaves the previous checkpoint usable, and resuming
  from it gives the uninterrupted run's numbers;
* a rank killed with SIGKILL ends the whole job (non-zero) within seconds, with no rank left over;
* SIGTERM on one rank, or Ctrl-C on the launcher, checkpoints, writes RUN/INTERRUPTED and ends the
  job; `--resume auto` continues to the uninterrupted run's numbers;
* a checkpoint of another accumulation is refused on resume (nothing touched) unless --force-resume;
* a damaged newest checkpoint is skipped by --resume auto (one line), none intact starts over;
* a rank that raises ends the job with a summary (rank, error, log, exit code), no launcher traceback;
* a disk that fills up during a save ends the run with one line; the previous checkpoint stays;
* a clean run's console holds no library noise (it is in RUN/logs/) and progress as plain lines.

Every wait is bounded; on a timeout the job's processes (launcher and ranks, which torchrun starts
in sessions of their own) are killed and the test fails with the captured output.

Real launches (``Job``, ``run_job``) are kept for what the supervisor and torchrun do: a dead
rank ends the job, signals, failure summaries, restarts, the console. What a fault leaves on disk
and what a resume continues from are the ranks' own work: those runs take their ranks from the
rank harness (``harness_job``), and where a test checks what the supervisor would print for them,
``supervisor_summary`` applies the supervisor's own ``decide`` to the ranks' failure records.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, assert_same_final_weights, cli_env, read_jsonl, run_cli_harness

from launcher.core.history import segments
from launcher.core.ranklog import read_failures
from launcher.core.recipe_loading import read_run_recipe
from launcher.results.card import training_facts
from launcher.results.report import history_notes

pytestmark = pytest.mark.slow

BASE = (
    "--cpu",
    "--gpus",
    "2",
    "--model",
    "tiny-t5",
    "--data",
    "sample",
    "--set",
    "model.precision=fp32",
    "--set",
    "eval.after_training=false",
    "--set",
    "train.micro_batch_size=4",
    "--set",
    "train.log_every=1",
)
# 64 examples / (4 per rank x 2 ranks) = 8 optimizer steps per epoch: 32 steps, checkpoints every 4.
SHAPE = ("--set", "train.epochs=4", "--set", "train.lr=2e-3", "--set", "train.checkpoint_every=4")
TOTAL_STEPS = 32
LONG = ("--set", "train.epochs=20", "--set", "train.lr=2e-3")  # 160 steps: still running when signalled
JOB_TIMEOUT = 180  # one launch takes 10-30 s on two shared cores; this only bounds a hang
EXIT_BOUND = 30  # a dead rank / a stop request must end the job within this many seconds


def train_args(run_dir: Path, zero: int, *extra: str) -> list[str]:
    return ["full", *BASE, "--zero", str(zero), "--output", str(run_dir), *extra]


# ---------------------------------------------------------------- processes


def job_pids(run_dir: Path) -> list[int]:
    """The launcher (accelerate/torchrun) and rank processes of one run directory."""
    out = subprocess.run(
        ["pgrep", "-f", f"launcher.rank.train --run-dir {run_dir}"], capture_output=True, text=True
    )
    return [int(pid) for pid in out.stdout.split()]


def rank_pids(run_dir: Path) -> dict[int, int]:
    """{global rank: pid} of the rank processes (torchrun sets RANK and LOCAL_RANK in their environment)."""
    ranks = {}
    for pid in job_pids(run_dir):
        try:
            entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        env = dict(entry.split(b"=", 1) for entry in entries if b"=" in entry)
        if b"RANK" in env and b"LOCAL_RANK" in env:
            ranks[int(env[b"RANK"])] = pid
    return ranks


class Job:
    """`ftlaunch ARGS` in the background, in its own session (so a Ctrl-C can go to its process group)."""

    def __init__(self, run_dir: Path, args: list[str], **env: str) -> None:
        self.run_dir = run_dir
        self.log = run_dir.parent / f"{run_dir.name}-{time.monotonic_ns()}.log"
        self.handle = self.log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "launcher.host.cli", *args],
            env=cli_env(**env),
            cwd=REPO,
            stdout=self.handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started = time.monotonic()

    def output(self) -> str:
        return self.log.read_text(errors="replace")  # the job writes to the file directly

    def fail(self, why: str) -> None:
        self.kill()
        pytest.fail(f"{why}\n--- output (tail) ---\n{self.output()[-6000:]}")

    def wait_until(self, condition, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            if self.process.poll() is not None:
                self.fail(f"the job ended (exit {self.process.returncode}) before {what}")
            time.sleep(0.02)
        self.fail(f"timed out after {timeout} s waiting for {what}")

    def wait(self, timeout: float = JOB_TIMEOUT) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"the job did not end within {timeout} s")

    def stop_by(self, send) -> tuple[int, float, str]:
        """``send()`` a stop signal, then wait for the job: (exit code, seconds it took to end
        after the signal, its output)."""
        send()
        signalled = time.monotonic()
        code = self.wait(timeout=EXIT_BOUND + 30)
        return code, time.monotonic() - signalled, self.output()

    def wait_for_step(self, step: int = 1) -> None:
        """Until metrics.jsonl holds a training loss for `step` (both ranks are then in the loop)."""
        metrics = self.run_dir / "metrics.jsonl"

        def reached() -> bool:
            return metrics.is_file() and any(
                row.get("step", 0) >= step and "loss" in row for row in parse_metrics(metrics)
            )

        self.wait_until(reached, JOB_TIMEOUT, f"training step {step}")

    def signal_rank(self, index: int, sig: int) -> float:
        """Send `sig` to one rank process (by RANK) once both run; returns when it was sent."""
        ranks = self.wait_until(
            lambda: (found := rank_pids(self.run_dir)) and len(found) == 2 and found, 30, "two rank processes"
        )
        os.kill(ranks[index], sig)
        return time.monotonic()

    def kill(self) -> None:
        """Kill whatever is left: the launcher's process group and the ranks (their own sessions)."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in job_pids(self.run_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self.handle.close()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def parse_metrics(path: Path) -> list[dict]:
    """metrics.jsonl while it is being written (a torn last line is skipped)."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def run_job(run_dir: Path, args: list[str], **env: str) -> tuple[int, str]:
    with Job(run_dir, args, **env) as job:
        code = job.wait()
        return code, job.output()


def harness_job(args: list[str], **env: str) -> tuple[int, str]:
    """`ftlaunch ARGS` with its ranks from the rank harness (tests/rankharness.py): for a run whose
    numbers a test checks after the fault (a resume, a reference), not for the fault itself."""
    result = run_cli_harness(*args, env=cli_env(**env))
    return result.returncode, result.stdout + result.stderr


def supervisor_summary(run_dir: Path, code: int, started: float) -> list[str]:
    """The lines the supervisor prints after a run whose ranks ended with ``code``: its ``decide``
    on the ranks' failure records (the rank harness replaces the supervisor, not the ranks'
    records; torchrun's report only matters for a rank killed by a signal, which leaves none)."""
    from launcher.host.supervise import decide, launcher_log_path

    recipe = read_run_recipe(run_dir)
    return decide(run_dir, recipe, 0, code, started, [], [], launcher_log_path(run_dir, recipe, 0)).lines


def assert_no_rank_left(run_dir: Path, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while job_pids(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = job_pids(run_dir)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of {run_dir} still running {within} s after the job ended: {left}"


# ---------------------------------------------------------------- metrics and checkpoints


def losses(metrics: list[dict]) -> list[float]:
    return [row["loss"] for row in metrics if "loss" in row]


def loss_steps(metrics: list[dict]) -> list[int]:
    return [row["step"] for row in metrics if "loss" in row]


def final_val_loss(metrics: list[dict]) -> float:
    return [row for row in metrics if row.get("final")][-1]["val_loss"]


def assert_same_run(metrics: list[dict], reference: list[dict]) -> None:
    assert loss_steps(metrics) == list(range(1, TOTAL_STEPS + 1))
    assert losses(metrics) == pytest.approx(losses(reference), rel=1e-5, abs=1e-6)
    assert final_val_loss(metrics) == pytest.approx(final_val_loss(reference), rel=1e-5)


def latest_name(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def assert_complete_checkpoint(run_dir: Path, step: int) -> None:
    from launcher.core.checkpoint import STATE_FILE, find_latest_checkpoint

    checkpoint = run_dir / "checkpoints" / f"step_{step}"
    assert latest_name(run_dir) == f"step_{step}"
    state = json.loads((checkpoint / STATE_FILE).read_text())
    assert state["step"] == step and state["world_size"] == 2 and state["grad_accum"] == 1
    assert find_latest_checkpoint(run_dir) == checkpoint
    weights = [
        p for p in checkpoint.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt")
    ]
    assert weights and all(p.stat().st_size > 0 for p in weights), sorted(checkpoint.rglob("*"))


def tree(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes() if path.is_file() else b"<dir>"
        for path in sorted(directory.rglob("*"))
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of SHAPE per ZeRO stage, made once (through the rank harness: what
    training computes): zero -> (run dir, metrics)."""
    runs: dict[int, tuple[Path, list[dict]]] = {}

    def get(zero: int) -> tuple[Path, list[dict]]:
        if zero not in runs:
            run_dir = tmp_path_factory.mktemp(f"reference-zero{zero}") / "run"
            code, output = harness_job(train_args(run_dir, zero, *SHAPE))
            assert code == 0, output[-6000:]
            metrics = read_jsonl(run_dir / "metrics.jsonl")
            assert loss_steps(metrics) == list(range(1, TOTAL_STEPS + 1))
            runs[zero] = (run_dir, metrics)
        return runs[zero]

    return get


# ---------------------------------------------------------------- crash during a checkpoint save


@pytest.mark.parametrize("zero", [0, 2], ids=["ddp", "zero2"])
def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, reference, zero):
    """What a crash mid-save leaves on disk and what the resume continues from are the ranks'
    work (checkpoint.py writes, then renames): the crashed run and the resume take their ranks
    from the rank harness. That a dead rank ends a real job within seconds with no rank left is
    the supervisor's and torchrun's part, the same whichever rank dies and why:
    test_killed_rank_ends_the_job_within_seconds (SIGKILL) and
    test_rank_that_raises_ends_with_a_summary check it on real launches."""
    reference_dir, expected = reference(zero)
    run_dir = tmp_path / "run"
    args = train_args(run_dir, zero, *SHAPE)
    checkpoints = run_dir / "checkpoints"
    started = time.time()
    code, output = harness_job(args, FTLAUNCH_FAULT_CRASH_IN_SAVE_AT_STEP="8")
    assert code != 0, output[-6000:]
    # The ranks' side of a dead peer: rank 1, left waiting for the main rank, ends by itself with
    # an error it records (the harness would kill it, leaving no record, only after 30 s).
    assert [failure.rank for failure in read_failures(run_dir, since=started)] == [1], output[-6000:]

    # The half-written step_8 stays a temporary folder that nothing takes for a checkpoint.
    assert (checkpoints / ".tmp-step_8").is_dir() and not (checkpoints / "step_8").exists()
    assert not (checkpoints / ".tmp-step_8" / "ftlaunch_state.json").exists()
    assert_complete_checkpoint(run_dir, 4)
    assert not (run_dir / "INTERRUPTED").exists()

    code, output = harness_job([*args, "--resume", "auto"])
    assert code == 0, output[-6000:]
    assert f"resumed from {checkpoints / 'step_4'} at step 4" in output
    assert not list(checkpoints.glob(".tmp-*")), sorted(p.name for p in checkpoints.iterdir())
    assert latest_name(run_dir) == f"step_{TOTAL_STEPS}"
    assert_same_run(read_jsonl(run_dir / "metrics.jsonl"), expected)
    assert_same_final_weights(run_dir, reference_dir)


def test_crash_during_the_first_save_restarts_from_scratch(tmp_path, reference):
    """The rank harness for both runs, as in test_crash_during_save_keeps_the_previous_checkpoint:
    the subject is what the ranks leave and start from, not how the job ends."""
    _, expected = reference(0)
    run_dir = tmp_path / "run"
    args = train_args(run_dir, 0, *SHAPE)
    code, output = harness_job(args, FTLAUNCH_FAULT_CRASH_IN_SAVE_AT_STEP="4")
    assert code != 0, output[-6000:]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / ".tmp-step_4").is_dir() and not (checkpoints / "latest").exists()
    assert not list(checkpoints.glob("step_*"))

    code, output = harness_job([*args, "--resume", "auto"])  # nothing to resume: starts again
    assert code == 0, output[-6000:]
    assert "resumed from" not in output
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert final_val_loss(metrics) == pytest.approx(final_val_loss(expected), rel=1e-5)
    assert losses(metrics)[-TOTAL_STEPS:] == pytest.approx(losses(expected), rel=1e-5, abs=1e-6)
    assert_same_run(metrics, expected)  # metrics.jsonl reads as one run: no steps from the crashed attempt


# ---------------------------------------------------------------- a rank dies


def test_killed_rank_ends_the_job_within_seconds(tmp_path):
    """One real launch, under ZeRO-3. What ends the job is torchrun's agent, which stops every
    worker once one has died, and the supervisor, which waits for them: neither looks at the
    strategy, and DDP and ZeRO-3 ranks talk through the same gloo process group. ZeRO-3 is the
    launch with more to stop (DeepSpeed's engine, its parameter gathers in every forward), so it
    is the one kept; a DDP job whose main rank dies mid-save is
    test_crash_during_save_keeps_the_previous_checkpoint[ddp]'s (its ranks' side)."""
    run_dir = tmp_path / "run"
    with Job(run_dir, train_args(run_dir, 3, *LONG)) as job:
        job.wait_for_step(1)
        killed = job.signal_rank(1, signal.SIGKILL)
        code = job.wait(timeout=EXIT_BOUND + 30)
        ended = time.monotonic() - killed
        output = job.output()
    assert code != 0, output[-6000:]
    assert ended < EXIT_BOUND, f"the job took {ended:.0f} s to end after rank 1 was killed"
    assert_no_rank_left(run_dir)
    steps = loss_steps(parse_metrics(run_dir / "metrics.jsonl"))
    assert steps and steps[-1] < 160, "the run finished before the kill: make it longer"


# ---------------------------------------------------------------- stop requests


def test_sigterm_on_one_rank_checkpoints_and_resumes(tmp_path, reference):
    """DDP: a stop request checkpoints, and the resumed run is the uninterrupted one, step by step
    and in its final weights (ZeRO-2's resume: test_training's SIGUSR1 test)."""
    reference_dir, expected = reference(0)
    run_dir = tmp_path / "run"
    args = train_args(run_dir, 0, *SHAPE)
    with Job(run_dir, args) as job:
        job.wait_for_step(1)
        signalled = job.signal_rank(1, signal.SIGTERM)  # one rank only: the others learn it at the next step
        code = job.wait(timeout=EXIT_BOUND + 30)
        ended = time.monotonic() - signalled
        output = job.output()
    assert code == 3, output[-6000:]
    assert ended < EXIT_BOUND, f"the job took {ended:.0f} s to stop after SIGTERM"
    assert_no_rank_left(run_dir)
    launcher_log = (run_dir / "logs" / "launcher.log").read_text()
    assert re.search(r"exitcode\s*:\s*3\b", launcher_log), (
        "the ranks should exit with code 3:\n" + launcher_log[-4000:]
    )
    assert_interrupted_cleanly(output)
    assert (run_dir / "INTERRUPTED").is_file(), output[-6000:]
    step = int((run_dir / "INTERRUPTED").read_text().strip().removeprefix("step_"))
    assert 1 <= step < TOTAL_STEPS, "the run finished before the signal: make it longer"
    assert f"stop requested by signal: checkpoint step_{step} written" in output
    assert_complete_checkpoint(run_dir, step)
    assert loss_steps(read_jsonl(run_dir / "metrics.jsonl")) == list(range(1, step + 1))

    code, output = harness_job([*args, "--resume", "auto"])
    assert code == 0, output[-6000:]
    assert f"at step {step}" in output and "resumed from" in output
    assert not (run_dir / "INTERRUPTED").exists()
    assert_same_run(read_jsonl(run_dir / "metrics.jsonl"), expected)
    assert_same_final_weights(run_dir, reference_dir)


def assert_interrupted_cleanly(output: str) -> None:
    """ftlaunch's console after a stop by signal: no traceback, and the line that says what was
    saved and how to continue."""
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-6000:]
    assert re.search(
        r"^interrupted: checkpoint step_\d+ written; exit code 3 \(interrupted: continue with "
        r"--resume auto\)",
        output,
        re.M,
    ), output[-3000:]


@pytest.mark.parametrize("how", ["ctrl-c", "hangup"])
def test_ctrl_c_on_the_launcher_checkpoints(tmp_path, how):
    """SIGINT to the launcher's process group, as a terminal's Ctrl-C sends it: the ranks
    checkpoint, ftlaunch itself exits 3 without a traceback.

    SIGTERM to ftlaunch alone (kill PID) takes the same path with another signal number: the same
    handler (supervise.SignalForwarder) passes it on to the ranks, which stop as on a SIGTERM of
    their own, and the same ``decide`` says so. Its parts are checked on real launches elsewhere:
    ftlaunch's SIGTERM handled and passed on, no traceback, the job ended within seconds with no
    rank left (test_failure_messages' SIGTERM during the final evaluation); ranks that get SIGTERM
    during training checkpoint, exit 3, the same ``interrupted: checkpoint ... written`` line
    (test_sigterm_on_one_rank_checkpoints_and_resumes).

    SIGHUP (the terminal closed, an ssh session dropped) to ftlaunch alone: it used to end ftlaunch
    silently while the ranks, in their own session, trained on unwatched; it is passed on as
    SIGTERM, so the run checkpoints and stops the same way."""
    run_dir = tmp_path / "run"
    with Job(run_dir, train_args(run_dir, 0, *LONG)) as job:
        job.wait_for_step(1)
        if how == "ctrl-c":
            code, ended, output = job.stop_by(lambda: os.killpg(job.process.pid, signal.SIGINT))
        else:
            code, ended, output = job.stop_by(lambda: os.kill(job.process.pid, signal.SIGHUP))
    assert code == 3, output[-6000:]
    assert_interrupted_cleanly(output)
    assert ended < EXIT_BOUND, f"the job took {ended:.0f} s to stop after {how}"
    assert_no_rank_left(run_dir)
    assert (run_dir / "INTERRUPTED").is_file(), output[-6000:]
    step = int((run_dir / "INTERRUPTED").read_text().strip().removeprefix("step_"))
    assert 1 <= step < 160
    assert_complete_checkpoint(run_dir, step)


def test_a_stop_signal_during_the_original_models_evaluation_stops_at_once(tmp_path):
    """Before training nothing is trained that a checkpoint would keep, and the original model's
    evaluation may take long (here: 13 dialogues one at a time, 8 beams, 2,048 tokens each,
    minutes on these cores): SIGTERM to ftlaunch (a scheduler's preemption) stops it within
    seconds with exit 3, not after the evaluation and ten optimizer steps."""
    run_dir = tmp_path / "run"
    long_original = (
        "--set", "eval.after_training=true", "--set", "eval.batch_size=1", "--set", "eval.num_beams=8",
        "--set", "eval.max_new_tokens=2048", "--set", "eval.min_new_tokens=2048",
    )  # fmt: skip
    with Job(run_dir, train_args(run_dir, 0, *SHAPE, *long_original)) as job:
        rank_log = run_dir / "logs" / "rank0.log"
        job.wait_until(
            lambda: rank_log.is_file() and "generating" in rank_log.read_text(errors="replace"),
            JOB_TIMEOUT,
            "the original model's generation",
        )
        code, ended, output = job.stop_by(lambda: os.kill(job.process.pid, signal.SIGTERM))
    assert code == 3, output[-6000:]
    assert ended < EXIT_BOUND, f"the job took {ended:.0f} s to stop after SIGTERM"
    assert "interrupted before a new checkpoint was written" in output, output[-3000:]
    assert "Traceback" not in output, output[-6000:]
    assert_no_rank_left(run_dir)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "eval" / "original").exists()


# ---------------------------------------------------------------- resume with another accumulation


def test_resume_with_another_accumulation_needs_force(tmp_path, reference):
    source, _ = reference(0)
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    checkpoint = run_dir / "checkpoints" / "step_28"
    assert (checkpoint / "ftlaunch_state.json").is_file()
    # 2 micro-batches per step from step 28 (epoch 3, 4 of its 8 micro-batches done): 4 more steps to 32.
    args = train_args(run_dir, 0, *SHAPE, "--set", "train.grad_accum=2", "--set", "train.epochs=8")

    before = tree(run_dir)
    for resume in ("auto", str(checkpoint)):
        started = time.monotonic()
        code, output = run_job(run_dir, [*args, "--resume", resume])
        assert code == 2, output[-6000:]
        assert time.monotonic() - started < EXIT_BOUND
        assert "Traceback" not in output, output
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, output
        assert "grad_accum 1 -> 2" in errors[0] and "--force-resume" in errors[0], errors[0]
        assert "world_size" not in errors[0] and "micro_batch_size" not in errors[0], errors[0]
        assert tree(run_dir) == before, f"a refused --resume {resume} changed the run directory"

    code, output = harness_job([*args, "--resume", str(checkpoint), "--force-resume"])
    assert code == 0, output[-6000:]
    assert f"resumed from {checkpoint} at step 28" in output
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert loss_steps(metrics) == list(range(1, 33))
    assert [row for row in metrics if row.get("final")], metrics[-3:]
    state = json.loads((run_dir / "checkpoints" / "step_32" / "ftlaunch_state.json").read_text())
    assert state["grad_accum"] == 2 and state["step"] == 32


# ---------------------------------------------------------------- damaged checkpoints


# What libraries print that a person does not need: it belongs in RUN/logs/, never on the console.
NOISE = (
    "Setting accelerator to CPU",
    "OMP_NUM_THREADS",
    "FutureWarning",
    "Removed shared tensor",
    "tied weights",
    "ChildFailedError",
    "CalledProcessError",
    "Traceback",
)


def assert_quiet_console(output: str) -> None:
    for noise in NOISE:
        assert noise not in output, f"{noise!r} on the console:\n{output[-6000:]}"
    assert "\r" not in output, "progress redraws (carriage returns) in a non-interactive console"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_damaged_newest_checkpoint_is_skipped(tmp_path, reference):
    """Which checkpoint a resume takes, and the line that says why, are the ranks' (checkpoint.py):
    the resume takes its ranks from the rank harness. Its console is then the ranks' console
    lines; what torchrun and the launcher print (their banners, ChildFailedError) is kept off a
    real launch's console in test_a_crashed_rank_restarts_the_run_from_its_newest_checkpoint and
    test_rank_that_raises_ends_with_a_summary."""
    source, expected = reference(0)
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    checkpoints = run_dir / "checkpoints"
    assert latest_name(run_dir) == "step_32" and (checkpoints / "step_28").is_dir()
    truncate(checkpoints / "step_32" / "optimizer.bin")

    code, output = harness_job([*train_args(run_dir, 0, *SHAPE), "--resume", "auto"])
    assert code == 0, output[-6000:]
    skipped = [line for line in output.splitlines() if "step_32" in line and "damaged" in line]
    assert len(skipped) == 1 and "optimizer.bin" in skipped[0], output[-6000:]
    assert f"resumed from {checkpoints / 'step_28'} at step 28" in output
    assert_complete_checkpoint(run_dir, 32)  # saved again, whole
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert_same_run(metrics, expected)
    assert_quiet_console(output)
    assert "Removed shared tensor" in (run_dir / "logs" / "rank0.log").read_text()  # where the noise went


def test_no_intact_checkpoint_starts_over(tmp_path, reference):
    source, expected = reference(0)
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    checkpoints = run_dir / "checkpoints"
    truncate(checkpoints / "step_32" / "model.safetensors")
    (checkpoints / "step_28" / "manifest.json").unlink()  # as a save cut short before its last file

    code, output = harness_job([*train_args(run_dir, 0, *SHAPE), "--resume", "auto"])
    assert code == 0, output[-6000:]
    assert len([line for line in output.splitlines() if "damaged" in line]) == 2, output[-6000:]
    assert f"no intact checkpoint in {checkpoints}: starting from step 0" in output
    assert "resumed from" not in output
    assert_same_run(read_jsonl(run_dir / "metrics.jsonl"), expected)


# ---------------------------------------------------------------- a rank raises


def test_rank_that_raises_ends_with_a_summary(tmp_path):
    """Also launch.max_restarts 0 (the default): the crash is not restarted (the restart itself:
    test_a_crashed_rank_restarts_the_run_from_its_newest_checkpoint)."""
    run_dir = tmp_path / "run"
    code, output = run_job(run_dir, train_args(run_dir, 0, *SHAPE), FTLAUNCH_FAULT_RAISE_IN_SAVE="1:4")
    assert code == 1, output[-6000:]
    assert "restart 1" not in output and "injected fault: rank 1" in output
    assert_quiet_console(output)
    summary = output[output.index("error: rank ") :].splitlines()
    assert summary[0] == (
        "error: rank 1 (node 0, host " + os.uname().nodename + ") failed first: RuntimeError: "
        "injected fault: rank 1 raises while saving step 4 (FTLAUNCH_FAULT_RAISE_IN_SAVE)"
    ), summary
    log = run_dir / "logs" / "rank1.log"
    assert summary[1].strip().startswith(f"log: {log} "), summary
    assert "exit code 1 (crashed" in summary[2] and "2 bad input, 3 interrupted" in summary[2], summary
    assert "Traceback" in log.read_text() and "injected fault" in log.read_text()
    assert (
        "ChildFailedError" in (run_dir / "logs" / "launcher.log").read_text()
    )  # the launcher's report: its log
    assert_no_rank_left(run_dir)


# ---------------------------------------------------------------- a disk that fills up


def test_disk_full_during_a_save(tmp_path, small_disk):
    """Another writer fills the disk after step_4: the save of step_8 fails; one line says so.

    The failure and its message are the main rank's (checkpoint.disk_full_explained): the ranks
    come from the rank harness, and the line a person reads is the supervisor's summary of the
    ranks' failure records (``supervisor_summary``), which a real launch prints after the ranks'
    console lines (test_rank_that_raises_ends_with_a_summary)."""
    from launcher.core.checkpoint import checkpoint_problem

    disk = small_disk("64M")
    run_dir = disk / "run"
    first_latest: list[str] = []
    done = threading.Event()

    def fill_after_the_first_checkpoint() -> None:
        while not (run_dir / "checkpoints" / "latest").is_file():
            if done.wait(0.02):
                return
        first_latest.append(latest_name(run_dir))
        with (disk / "ballast").open("wb") as handle:  # leave 1 MiB: less than one checkpoint (~3.9 MiB)
            handle.write(b"\0" * (shutil.disk_usage(disk).free - 2**20))

    filler = threading.Thread(target=fill_after_the_first_checkpoint, daemon=True)
    filler.start()
    started = time.time()
    try:
        code, output = harness_job(train_args(run_dir, 0, *SHAPE))
    finally:
        done.set()
        filler.join(timeout=30)
    assert first_latest == ["step_4"], (first_latest, output[-6000:])
    assert code == 1, output[-6000:]
    assert_quiet_console(output)
    summary = supervisor_summary(run_dir, code, started)
    lines = [line for line in [*output.splitlines(), *summary] if "disk full" in line]
    assert len(lines) == 1, (summary, output[-6000:])
    assert f"checkpoint step_8 could not be written to {run_dir / 'checkpoints'}" in lines[0], lines[0]
    assert re.search(r"it needs about \d+\.\d MiB; \d+\.\d MiB free", lines[0]), lines[0]
    assert "step_4 is intact and latest still names it" in lines[0] and "--resume auto" in lines[0], lines[0]
    assert latest_name(run_dir) == "step_4"
    assert checkpoint_problem(run_dir / "checkpoints" / "step_4") is None
    assert not (run_dir / "checkpoints" / "step_8").exists()


# ---------------------------------------------------------------- restarts (launch.max_restarts)


def test_a_crashed_rank_restarts_the_run_from_its_newest_checkpoint(tmp_path, reference):
    """--max-restarts 1: rank 1 crashes while saving step 8; ftlaunch starts the job again, which
    continues from step_4 (the newest intact checkpoint) and ends like the uninterrupted run: exit
    0, every step once, the same losses and final weights, the restart in metrics.jsonl.
    (--max-restarts 0, the default: the same crash ends the job with exit 1, in
    test_rank_that_raises_ends_with_a_summary.)

    The same real launch is the suite's check of what a run's console shows (it was a clean
    3-step run of its own): ZeRO-2 on two ranks, without OMP_NUM_THREADS (torchrun's banner),
    the console holds the run summary, progress as plain lines and the results, the noise is in
    the per-rank logs and the launcher's. A restart adds torchrun's failure report and a rank's
    traceback, which must stay off the console too."""
    reference_dir, expected = reference(2)
    run_dir = tmp_path / "run"
    env = cli_env(FTLAUNCH_FAULT_RAISE_IN_SAVE="1:8")
    env.pop("OMP_NUM_THREADS")
    args = train_args(run_dir, 2, *SHAPE, "--max-restarts", "1")
    result = subprocess.run(
        [sys.executable, "-m", "launcher.host.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=2 * JOB_TIMEOUT,
    )
    code, output = result.returncode, result.stdout + result.stderr
    assert_no_rank_left(run_dir)
    assert code == 0, output[-6000:]
    assert "ftlaunch: restart 1 of 1 (launch.max_restarts): rank 1" in output, output[-6000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_4'} at step 4" in output
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    (restart,) = [row for row in metrics if "restart" in row]
    assert restart["restart"] == 1 and restart["step"] == 4 and "injected fault" in restart["cause"]
    assert [(row["segment"], row["start"], row["step"], row["checkpoint"]) for row in segments(metrics)] == [
        (1, "fresh", 0, None),
        (2, "restarted", 4, "step_4"),
    ]
    assert_same_run(metrics, expected)
    assert_same_final_weights(run_dir, reference_dir)

    # the console
    assert_quiet_console(output)
    progress = rf"^training: step {TOTAL_STEPS}/{TOTAL_STEPS} \(100%\), loss \d+\.\d+, \d+\.\d+ s/step$"
    assert re.search(progress, result.stdout, re.M), output
    assert "saved model to" in result.stdout
    logs = run_dir / "logs"
    ranks = (logs / "rank0.log").read_text() + (logs / "rank1.log").read_text()
    assert "FutureWarning" in ranks, "the noise this run makes should be in the rank logs"
    assert "OMP_NUM_THREADS" in (logs / "launcher.log").read_text()


# ---------------------------------------------------------------- resuming on other ranks


def test_a_ddp_checkpoint_continues_on_another_number_of_ranks(tmp_path):
    """A 2-rank DDP run that crashed after step_4 continues on 1 rank: the launcher doubles the
    accumulation (the same 2 micro-batches, the same examples, form every step), says so, and the
    run ends as the uninterrupted 2-rank run did. 3 ranks cannot keep 2 micro-batches per step:
    refused with one line before anything is written."""
    from conftest import run_cli_in_process

    # Dropout off: 1 rank x accumulation 2 then computes what 2 ranks compute (with dropout, the
    # second micro-batch's masks would come from rank 0's random stream instead of rank 1's).
    no_dropout = ("--set", "model.dropout=0.0")
    reference_dir = tmp_path / "reference"
    code, output = harness_job(train_args(reference_dir, 0, *SHAPE, *no_dropout))
    assert code == 0, output[-6000:]
    expected = read_jsonl(reference_dir / "metrics.jsonl")
    run_dir = tmp_path / "run"
    two_ranks = train_args(run_dir, 0, *SHAPE, *no_dropout)
    # The crash and the resume both from the rank harness: what the 1-rank resume continues from
    # is the subject (a rank that raises ends a real job: test_rank_that_raises_ends_with_a_summary).
    code, output = harness_job(two_ranks, FTLAUNCH_FAULT_RAISE_IN_SAVE="1:8")
    assert code == 1, output[-6000:]

    def on(gpus: int) -> list[str]:
        args = list(two_ranks)
        args[args.index("--gpus") + 1] = str(gpus)
        return [*args, "--resume", "auto"]

    before = tree(run_dir)
    refused = run_cli_in_process(*on(3))
    assert refused.returncode == 2 and "3 rank(s) cannot keep that" in refused.stderr, refused.stderr
    assert tree(run_dir) == before

    code, output = harness_job(on(1))
    assert code == 0, output[-6000:]
    assert "train.grad_accum 1 -> 2 keeps its 2 micro-batches per optimizer step" in output
    assert f"resumed from {run_dir / 'checkpoints' / 'step_4'} at step 4" in output
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert_same_run(metrics, expected)
    assert_same_final_weights(run_dir, reference_dir)
    # the run's history: where each part trained, in metrics.jsonl, the report and the model card
    shapes = [
        (row["start"], row["world_size"], row["grad_accum"], row["strategy"]) for row in segments(metrics)
    ]
    assert shapes == [("fresh", 2, 1, "DDP"), ("resumed", 1, 2, "DDP")]
    micro = segments(metrics)[0]["micro_batch_size"]  # the recipe's, in both segments
    history = [
        f"steps 0-4: DDP on 2 ranks (micro batch {micro} x accumulation 1, fp32), from scratch",
        f"steps 4-{TOTAL_STEPS}: DDP on 1 rank (micro batch {micro} x accumulation 2, fp32), resumed from step_4",
    ]
    # (evaluation is off in these runs: the report's and the card's parts, from the run's files)
    assert history_notes(metrics)[2:4] == [f"- {line}" for line in history]
    facts = dict(training_facts(run_dir, read_run_recipe(run_dir)))
    assert [facts["segment 1"], facts["segment 2"]] == history
