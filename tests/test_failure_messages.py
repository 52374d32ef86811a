"""Failure summaries and signal notices that fit the command and its phase (issue 24, class 7).

Only a training run checkpoints and resumes with ``--resume auto``: a failed ``ftlaunch summarize``
or ``eval`` must advise running the command again, and name a log that still exists (summarize's
work folder is temporary); a stop signal during a training run's final evaluation stops the ranks
at once (nothing polls for it any more), so the notice must not promise a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
from conftest import run_cli, save_tiny_t5

from launcher.core.recipe_loading import default_recipe_path, load_recipe
from launcher.host.supervise import Job, decide

SAMPLE = Path(__file__).resolve().parents[1] / "launcher" / "assets" / "sample"


def fake_job_dir(tmp_path: Path, module: str) -> Path:
    run_dir = tmp_path / module.replace(".", "-")
    run_dir.mkdir()
    (run_dir / "command.sh").write_text(f"accelerate launch -m {module} --run-dir {run_dir}\n")
    return run_dir


def test_advice_and_notice_depend_on_the_command_and_phase(tmp_path):
    recipe = load_recipe(default_recipe_path("lora"), [])
    started = time.time()
    for module, kind in (("launcher.rank.evaluation", "eval"), ("launcher.host.summarize", "summarize")):
        job = Job.of(fake_job_dir(tmp_path, module), started, recipe)
        assert job.kind == kind
        for code in (1, 3):
            assert "--resume" not in job.advice(
                code
            ) and f"run the same `ftlaunch {kind}` again" in job.advice(code)
        assert "checkpoint" not in job.signal_notice("SIGTERM")

    run_dir = fake_job_dir(tmp_path, "launcher.rank.train")
    training = Job.of(run_dir, started, recipe)
    assert "next optimizer step" in training.signal_notice("SIGTERM")
    assert "--resume auto" in training.advice(1) and "--resume auto" in training.advice(3)
    (run_dir / "final").mkdir()  # train.finish saved final/ during this launch: the final evaluation runs
    evaluating = Job.of(run_dir, started, recipe)
    notice, advice = evaluating.signal_notice("SIGTERM"), evaluating.advice(3)
    assert "final evaluation" in notice and "next optimizer step" not in notice
    assert "--resume" not in advice
    assert f"--model {recipe.model.name} --adapter {run_dir / 'final'}" in advice  # a LoRA run: its adapter
    assert f"--output {run_dir / 'eval' / 'finetuned'}" in advice


def test_a_failed_summarize_summary_advises_running_it_again(tmp_path):
    """decide() with a rank's failure record, as the supervisor reads it after a summarize."""
    from launcher.core.ranklog import Failure, failure_path

    run_dir = fake_job_dir(tmp_path, "launcher.host.summarize")
    recipe = load_recipe(default_recipe_path("full"), ["launch.cpu=true"])
    started = time.time()
    record = Failure(
        0, 0, 0, "host", 1, started, 1, "RuntimeError: boom", str(run_dir / "logs" / "rank0.log")
    )
    failure_path(run_dir, 0).parent.mkdir(parents=True, exist_ok=True)
    failure_path(run_dir, 0).write_text(json.dumps(record.__dict__))
    outcome = decide(run_dir, recipe, 0, 1, started, [], [], run_dir / "logs" / "launcher.log")
    text = "\n".join(outcome.lines)
    assert outcome.code == 1 and "RuntimeError: boom" in text, text
    assert "--resume" not in text and "run the same `ftlaunch summarize` again" in text, text


@pytest.mark.parametrize("nodes", [1, 2])
def test_a_rank_that_lost_its_peer_on_another_node_is_not_blamed(tmp_path, nodes):
    """Node 1's rank killed: node 0's rank reports gloo's "Connection closed by peer" and is the
    only record there. With 2 nodes the summary says it lost a rank of another node."""
    from launcher.core.ranklog import Failure, failure_path

    run_dir = fake_job_dir(tmp_path, "launcher.rank.train")
    overrides = ["launch.cpu=true", f"launch.nodes={nodes}", "launch.main_address=127.0.0.1"]
    recipe = load_recipe(default_recipe_path("full"), overrides)
    started = time.time()
    error = "RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]:60633"
    record = Failure(0, 0, 0, "host", 1, started, 1, error, str(run_dir / "logs" / "rank0.log"))
    failure_path(run_dir, 0).parent.mkdir(parents=True, exist_ok=True)
    failure_path(run_dir, 0).write_text(json.dumps(record.__dict__))
    text = "\n".join(decide(run_dir, recipe, 0, 1, started, [], [], run_dir / "logs" / "launcher.log").lines)
    lost = "rank 0 (node 0, host host) lost its connection to a rank of another node, which ended without"
    assert (lost in text) == (nodes == 2) and error in text, text
    assert ("failed first" in text) == (nodes == 1), text


# The launcher's last stderr line of every CPU launch: Accelerate's warning about its defaults.
ACCELERATE_WARNING = [
    b"The following values were not passed to `accelerate launch` and had defaults used instead:",
    b"To avoid this warning pass in values for each of the problematic parameters or run `accelerate config`.",
]


@pytest.mark.parametrize("phase", ["training", "final evaluation", "completed"])
def test_a_launcher_killed_by_a_signal_is_named_and_a_run_its_rank_completed_is_done(tmp_path, phase):
    """`accelerate launch` SIGKILLed (the out-of-memory killer takes the largest process, kill -9)
    while its rank goes on, no rank record: decide() as the supervisor calls it then. A run the
    rank completed (final/ and its card, the last file, written in this launch) is done, exit 0,
    with a note; else the summary names the signal, not the launcher's last (unrelated) line."""
    run_dir = fake_job_dir(tmp_path, "launcher.rank.train")
    recipe = load_recipe(default_recipe_path("full"), ["launch.cpu=true"])
    started = time.time() - 60
    if phase != "training":
        (run_dir / "final").mkdir()  # train.finish saved final/ in this launch
    if phase == "completed":
        (run_dir / "final" / "README.md").write_text("card\n")  # the run's last file
    log = run_dir / "logs" / "launcher.log"
    outcome = decide(run_dir, recipe, 0, -signal.SIGKILL, started, [], ACCELERATE_WARNING, log)
    text = "\n".join(outcome.lines)
    if phase == "completed":
        assert outcome.code == 0, text
        assert outcome.lines == [
            "ftlaunch: the launcher process was killed by SIGKILL (the out-of-memory killer, or kill -9), "
            "but its ranks ran to the end: final/, the evaluation and the report are complete; see "
            f"{run_dir / 'report'}"
        ]
        return
    assert outcome.code == 1 and outcome.restart_cause is None, text
    assert outcome.lines[:2] == [
        "error: the launcher process was killed by SIGKILL (the out-of-memory killer, or kill -9) "
        "before any rank reported an error",
        f"  log: {log}",
    ], text
    assert "accelerate config" not in text, text
    assert ("--resume auto" in text) == (phase == "training"), text
    assert ("ftlaunch eval --model" in text) == (phase == "final evaluation"), text
    # Exited with a code of its own (not a signal): its last line is its error, as before.
    failed = decide(run_dir, recipe, 0, 1, started, [], [b"ValueError: bad --config_file"], log)
    assert failed.lines[0] == (
        "error: the launcher failed (exit 1) before any rank reported an error: ValueError: bad --config_file"
    )


# ---------------------------------------------------------------- real 2-rank jobs


@pytest.fixture(scope="module")
def mismatched_model(tmp_path_factory) -> Path:
    """A model folder whose files are intact but whose config.json belongs to another shape
    (d_ff doubled): the launcher's checks pass, the ranks fail loading the weights."""
    path = save_tiny_t5(tmp_path_factory.mktemp("mismatched") / "model")
    config = json.loads((path / "config.json").read_text())
    config["d_ff"] *= 2
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.slow
def test_a_failed_two_rank_summarize_names_a_log_that_exists(mismatched_model, tmp_path):
    out = tmp_path / "summaries.jsonl"
    args = ("summarize", str(mismatched_model), "--input", str(SAMPLE / "test.jsonl"), "--cpu", "--gpus", "2")
    result = run_cli(*args, "--output", str(out))
    text = result.stdout + result.stderr
    assert result.returncode == 1, text[-6000:]
    logs = re.findall(r"^  log: (\S+)", result.stderr, re.M)
    assert logs and Path(logs[0]).is_file(), text[-6000:]
    assert "size mismatch" in Path(logs[0]).read_text(errors="replace") or "mismatch" in text
    assert "--resume" not in text and "run the same `ftlaunch summarize` again" in text, text[-3000:]
    assert not out.exists()
    shutil.rmtree(Path(logs[0]).parents[1])  # the kept work folder


@pytest.mark.slow
def test_sigterm_during_the_final_evaluation_says_what_happens(tmp_path):
    """SIGTERM to ftlaunch alone (kill PID). This real launch is also the suite's check that
    ftlaunch handles a SIGTERM of its own and passes it on (supervise.SignalForwarder, the same
    handler as Ctrl-C's in test_faults.test_ctrl_c_on_the_launcher_checkpoints): no traceback,
    the job ends within seconds, no rank left."""
    from test_faults import EXIT_BOUND, JOB_TIMEOUT, assert_no_rank_left
    from test_faults import Job as BackgroundJob

    run_dir = tmp_path / "run"
    args = [
        "full",
        *("--cpu", "--gpus", "2", "--model", "tiny-t5", "--data", "sample"),
        *("--set", "model.precision=fp32", "--set", "train.max_steps=2"),
        *("--set", "eval.compare_original=false", "--set", "eval.batch_size=1"),
        *("--set", "eval.max_new_tokens=256"),  # 7 batches per rank of ~2 s each: time to signal
        *("--output", str(run_dir)),
    ]
    with BackgroundJob(run_dir, args) as job:
        job.wait_until(lambda: (run_dir / "final" / "model.safetensors").is_file(), JOB_TIMEOUT, "final/")
        code, ended, output = job.stop_by(lambda: os.kill(job.process.pid, signal.SIGTERM))
    assert code == 3, output[-6000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-6000:]
    assert ended < EXIT_BOUND, f"the job took {ended:.0f} s to stop after SIGTERM"
    assert_no_rank_left(run_dir)
    assert not (run_dir / "eval" / "finetuned" / "rouge.json").exists(), (
        "the evaluation ended before the signal"
    )
    assert "got SIGTERM during the final evaluation" in output, output[-3000:]
    assert "next optimizer step" not in output and "--resume auto" not in output, output[-3000:]
    assert f"ftlaunch eval --model {run_dir / 'final'} --data sample --split test --cpu --gpus 2" in output


@pytest.mark.slow
def test_a_run_whose_launcher_is_killed_while_its_rank_completes_it_is_done(tmp_path):
    """One real launch: `accelerate launch` SIGKILLed once step_5's checkpoint is written (as the
    out-of-memory killer would); its rank trains on to step 30, saves final/, evaluates and writes
    the report. ftlaunch says the launcher was killed and exits 0: the run is complete."""
    from test_faults import JOB_TIMEOUT, assert_no_rank_left, parse_metrics
    from test_faults import Job as BackgroundJob

    from launcher.host.supervise import child_processes

    run_dir = tmp_path / "run"
    args = [
        "full",
        *("--cpu", "--gpus", "1", "--model", "tiny-t5", "--data", "sample", "--report-to", "none"),
        *("--set", "train.epochs=4", "--set", "train.max_steps=30", "--set", "train.checkpoint_every=5"),
        *("--set", "train.log_every=1"),
        *("--set", "eval.compare_original=false", "--set", "eval.limit=2", "--set", "eval.max_new_tokens=8"),
        *("--output", str(run_dir)),
    ]
    with BackgroundJob(run_dir, args) as job:
        job.wait_until(lambda: (run_dir / "checkpoints" / "step_5").is_dir(), JOB_TIMEOUT, "step_5")
        (launcher,) = child_processes(job.process.pid)  # command.sh, exec'd into `accelerate launch`
        assert b"accelerate" in Path(f"/proc/{launcher}/cmdline").read_bytes()
        os.kill(launcher, signal.SIGKILL)
        steps = [row["step"] for row in parse_metrics(run_dir / "metrics.jsonl") if "loss" in row]
        code = job.wait()
        output = job.output()
    assert steps[-1] < 30, "the run finished before the launcher was killed: make it longer"
    assert code == 0, output[-6000:]
    assert_no_rank_left(run_dir)
    assert (
        "ftlaunch: the launcher process was killed by SIGKILL (the out-of-memory killer, or kill -9), but "
        f"its ranks ran to the end: final/, the evaluation and the report are complete; see {run_dir / 'report'}"
    ) in output, output[-3000:]
    assert "error:" not in output and "exit code" not in output, output[-3000:]
    assert (run_dir / "report" / "report.md").is_file() and (run_dir / "final" / "README.md").is_file()
    assert [row["step"] for row in parse_metrics(run_dir / "metrics.jsonl") if "loss" in row][-1] == 30
