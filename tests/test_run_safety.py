"""Issue 24, classes 4-6: one run per directory (runlock.py), no non-finite number in a recipe or a
run (recipe.py's schema, finite.py), and generation batches that do not depend on the world size.

References: the recipe keys and values typed here; the holder's own pid and host; a strict JSON
parser (``parse_constant`` raising) for metrics.jsonl; safetensors' tensors for checkpoint weights;
the batches of one rank for the batches of several.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, cli_env, run_cli, run_cli_harness, run_cli_in_process

from launcher.core.errors import Diverged
from launcher.host import runlock
from launcher.rank.data import dealt_generation_batches
from launcher.rank.finite import check_weights, weights_finite

DRY = ("full", "--cpu", "--model", "tiny-t5", "--data", "sample", "--dry-run")
NO_TRACEBACK = "Traceback"


def tree(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes() if path.is_file() else b"<dir>"
        for path in sorted(directory.rglob("*"))
    }


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert NO_TRACEBACK not in result.stdout + result.stderr, result.stderr
    assert result.returncode == 2, f"exit {result.returncode}:\n{result.stdout}\n{result.stderr}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ---------------------------------------------------------------- 5a: finite recipe values


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=inf",
        "train.lr=.inf",
        "train.lr=nan",
        "train.lr=-inf",
        "train.lr=1e400",  # text that float() reads as inf
        "train.weight_decay=.nan",
        "train.max_grad_norm=inf",
        "train.warmup_ratio=nan",
        "model.dropout=nan",
        "lora.dropout=-.inf",
    ],
)
def test_non_finite_override_is_refused(tmp_path, override):
    out = tmp_path / "run"
    line = one_error_line(run_cli_in_process(*DRY, "--output", str(out), "--set", override))
    key = override.split("=")[0]
    assert line.startswith("error: --set: ") and key in line and "finite" in line, line
    assert not out.exists()


def test_non_finite_recipe_file_value_is_refused(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  lr: .inf\n")
    out = tmp_path / "run"
    line = one_error_line(run_cli_in_process(*DRY, "--recipe", str(recipe), "--output", str(out)))
    assert str(recipe) in line and "train.lr" in line and "finite" in line, line
    assert not out.exists()


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "0"])
@pytest.mark.parametrize("command", ["estimate", "full"])
def test_gpu_mem_must_be_a_positive_finite_amount(tmp_path, command, value):
    out = tmp_path / "run"
    args = (
        ("estimate", "--model", "tiny-t5")
        if command == "estimate"
        else (*DRY, "--zero", "auto", "--output", str(out))
    )
    line = one_error_line(run_cli_in_process(*args, "--gpu-mem", value))
    assert "--gpu-mem" in line and "positive number of GiB" in line, line
    assert not out.exists()


# ---------------------------------------------------------------- 4: one run per directory

HOLD = """
import sys, time
from pathlib import Path
from launcher.host import runlock
runlock.hold(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


def start_holder(run_dir: Path) -> subprocess.Popen:
    """Another process holding ``run_dir`` with the launcher's own helper (as a running ftlaunch does)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO, env=cli_env()
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_held_directory_is_refused_until_its_holder_dies(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli_in_process(*DRY, "--output", str(run_dir)).returncode == 0
    holder = start_holder(run_dir)
    try:
        before = tree(run_dir)
        record = json.loads((run_dir / runlock.LOCK_FILE).read_text())
        assert record["pid"] == holder.pid and record["host"] == socket.gethostname()
        for args in (
            ("full", "--cpu", "--model", "tiny-t5", "--data", "sample", "--output", str(run_dir)),
            (*DRY, "--output", str(run_dir)),  # a dry run would rewrite the running run's files
            (
                "full",
                "--cpu",
                "--model",
                "tiny-t5",
                "--data",
                "sample",
                "--resume",
                "auto",
                "--output",
                str(run_dir),
            ),
            (*DRY[:-1], "--overwrite", "--output", str(run_dir)),  # would clear the running run
            ("eval", "--cpu", "--output", str(run_dir)),
        ):
            line = one_error_line(run_cli_in_process(*args))
            assert "in use by another ftlaunch run" in line, line
            assert f"pid {holder.pid}" in line and f"host {socket.gethostname()}" in line, line
            assert f"started {record['started']}" in line, line
            assert tree(run_dir) == before, f"`ftlaunch {args[0]}` changed a held directory"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # A killed holder leaves no stale lock: the directory is free at once.
    assert run_cli_in_process(*DRY, "--output", str(run_dir)).returncode == 0


def test_a_filesystem_without_locks_warns_and_runs(tmp_path, monkeypatch, capsys):
    """Lustre without the flock mount option answers ENOSYS: the run goes on, with one warning."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    run_dir = tmp_path / "run"
    runlock.hold(run_dir)
    runlock.check_free(run_dir)
    assert "does not support file locks" in capsys.readouterr().err
    assert runlock.held_fds(run_dir) == ()


def descendants(pid: int) -> list[int]:
    from launcher.host.supervise import child_processes

    found = []
    for child in child_processes(pid):
        found += [child, *descendants(child)]
    return found


def running(pid: int) -> bool:
    """Still running (a zombie holds no file any more)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    rows = (
        [json.loads(line) for line in path.read_text().split("\n") if line.strip()] if path.exists() else []
    )
    return [row["step"] for row in rows if "loss" in row]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


LONG_RUN = (
    "full",
    *("--cpu", "--gpus", "2", "--model", "tiny-t5", "--data", "sample"),
    *("--set", "train.micro_batch_size=1", "--set", "train.epochs=10", "--set", "train.max_steps=60"),
    *("--set", "train.log_every=1", "--set", "train.checkpoint_every=5"),
    *("--set", "eval.after_training=false", "--set", "model.precision=fp32"),
)


@pytest.mark.slow  # a 2-rank launch, a refused one, and a resume (rank harness)
def test_second_run_on_a_running_directory_is_refused_and_a_killed_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "launcher.host.cli", *LONG_RUN, "--output", str(run_dir)]
    first = subprocess.Popen(
        command, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_for(lambda: metrics_steps(run_dir), 240, "the first run's first metrics line")
        second = run_cli(*LONG_RUN, "--output", str(run_dir), timeout=120)
        line = one_error_line(second)
        assert f"pid {first.pid}" in line and "in use by another ftlaunch run" in line, line
        wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), 240, "a checkpoint")
        assert first.poll() is None, "the first run ended before it could be killed: lengthen it"
        # A crash of the whole run (launcher, rank launcher, ranks): SIGKILL, nothing cleans up.
        victims = [first.pid, *descendants(first.pid)]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        first.wait()
        # SIGKILL is delivered asynchronously: until the ranks are gone they still hold the run
        # directory (the lock refuses a resume, rightly); the in-process resume below is quick.
        wait_for(lambda: not any(map(running, victims[1:])), 60, "the killed ranks to end")
        # A killed process's leader shows as a zombie while its other threads still exit and keep
        # its descriptors (the lock among them): the kernel's release of the lock is what counts.
        wait_for(lambda: runlock.current_holder(run_dir) is None, 60, "the killed run's lock to be released")
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    steps = metrics_steps(run_dir)
    assert steps == list(range(1, len(steps) + 1)), f"steps logged twice or out of order: {steps}"
    # the resume's ranks from the rank harness (tests/rankharness.py): what it continues is the subject
    resumed = run_cli_harness(*LONG_RUN, "--resume", "auto", "--output", str(run_dir))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert metrics_steps(run_dir) == list(range(1, 61))  # each step once, across the crash


# ---------------------------------------------------------------- 5b: a diverging run stops


def strict_json(line: str) -> dict:
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


@pytest.mark.slow  # one 2-rank run (rank harness)
def test_a_diverging_run_stops_with_one_line_and_saves_nothing_non_finite(tmp_path):
    """Where the ranks stop, what they write and the error they record are the ranks' (finite.py):
    they come from the rank harness (tests/rankharness.py). The lines a person reads are the
    supervisor's summary of those records, which ``supervisor_summary`` builds with the
    supervisor's own ``decide`` (a real launch prints them after the ranks' console lines, as in
    test_faults.test_rank_that_raises_ends_with_a_summary)."""
    from test_faults import supervisor_summary

    run_dir = tmp_path / "run"
    started = time.time()
    ranks = run_cli_harness(
        "full",
        *("--cpu", "--gpus", "2", "--model", "tiny-t5", "--data", "sample"),
        # A finite but absurd peak lr: AdamW moves every weight by ~1e30 in step 1 (finite), then
        # the activations overflow and the loss or gradients of step 2 are inf/NaN.
        *("--set", "train.lr=1e30", "--set", "train.max_steps=6", "--set", "train.micro_batch_size=2"),
        *("--set", "train.log_every=1", "--set", "train.checkpoint_every=1"),
        *("--set", "eval.after_training=false"),
        "--output",
        str(run_dir),
    )
    summary = supervisor_summary(run_dir, ranks.returncode, started)
    # the console of a real launch: the ranks' lines, then the supervisor's (on stderr)
    result = SimpleNamespace(
        returncode=ranks.returncode,
        stdout=ranks.stdout,
        stderr=ranks.stderr + "".join(f"{line}\n" for line in summary),
    )
    console = result.stdout + result.stderr
    assert result.returncode == 1, console[-4000:]
    assert NO_TRACEBACK not in console, console[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: training diverged at step "), result.stderr
    assert "lower train.lr (now 1e+30)" in errors[0] and "model.precision=fp32" in errors[0], errors[0]
    assert "diverged: resuming with the same settings diverges again" in result.stderr
    assert "--resume auto after the change" in errors[0] or "--overwrite after the change" in errors[0]
    assert not (run_dir / "final").exists()
    rows = [strict_json(line) for line in (run_dir / "metrics.jsonl").read_text().split("\n") if line.strip()]
    stopped_at = int(errors[0].split("at step ")[1].split(":")[0])
    assert all(row["step"] < stopped_at for row in rows), rows  # the bad step's line is not written
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
    if checkpoints:
        from safetensors.torch import load_file

        newest = checkpoints[-1]
        assert int(newest.name[5:]) < stopped_at and str(newest) in errors[0]
        weights = load_file(str(newest / "model.safetensors"))
        assert all(torch.isfinite(tensor).all() for tensor in weights.values())


class OneRank:
    """An accelerator of one CPU rank: any_rank is the flag itself."""

    num_processes = 1
    device = torch.device("cpu")


def test_weights_check_finds_a_nan_in_any_trainable_weight_and_ignores_frozen_ones(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    assert weights_finite(OneRank(), model)
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
    assert not weights_finite(OneRank(), model)
    model[0].weight.requires_grad_(False)  # LoRA's frozen base: the optimizer never changes it
    assert weights_finite(OneRank(), model)
    model[0].weight.requires_grad_(True)
    with pytest.raises(Diverged, match=r"^training diverged at step 7: the weights hold inf or NaN"):
        check_weights(OneRank(), model, tmp_path, 7, 3e-4)


def test_metrics_logger_writes_no_nan(tmp_path):
    from launcher.core.metrics import MetricsLogger

    accelerator = SimpleNamespace(is_main_process=True, log=lambda *a, **k: None)
    logger = MetricsLogger.__new__(MetricsLogger)
    logger.accelerator, logger.path, logger.enabled = accelerator, tmp_path / "metrics.jsonl", True
    logger.log({"step": 1, "loss": 1.5, "samples_per_s": float("inf"), "lr": float("nan")})
    row = strict_json(logger.path.read_text())
    assert row == {"step": 1, "loss": 1.5, "samples_per_s": None, "lr": None}


# ---------------------------------------------------------------- 6: batches independent of the world size


def test_each_dialogue_is_generated_with_the_same_companions_on_1_2_and_3_ranks():
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(37)]  # 8 batches of 5: none divides 2 or 3 ranks
    batch_size = 5
    alone = [tuple(batch.indices) for batch in dealt_generation_batches(lengths, batch_size, 0, 1)]
    assert sorted(i for batch in alone for i in batch) == list(range(37))
    for world in (2, 3):
        shards = [dealt_generation_batches(lengths, batch_size, rank, world) for rank in range(world)]
        assert len({len(shard) for shard in shards}) == 1, "ranks must call generate equally often"
        together = sorted(tuple(batch.indices) for shard in shards for batch in shard if batch.indices)
        assert together == sorted(alone), f"{world} ranks form other batches than one rank"


def test_report_says_predictions_do_not_depend_on_the_number_of_ranks(tmp_path):
    from launcher.results.report import write_run_report

    finetuned = tmp_path / "run" / "eval" / "finetuned"
    finetuned.mkdir(parents=True)
    scores = {"rouge1": 0.1, "rouge2": 0.1, "rougeL": 0.1, "rougeLsum": 0.1, "n": 1, "batch_size": 5}
    (finetuned / "rouge.json").write_text(json.dumps({**scores, "dataset": "none", "split": "test"}))
    (finetuned / "predictions.jsonl").write_text(
        json.dumps({"id": "a", "prediction": "x", "references": ["x"]})
    )
    text = (write_run_report(tmp_path / "run") / "report.md").read_text()
    assert "Predictions do not depend on the number of ranks: generation batches of 5 dialogues" in text
