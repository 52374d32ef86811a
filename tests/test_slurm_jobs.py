"""slurm/full.sh and slurm/lora.sh on a real two-node SLURM cluster (slurm/test-cluster).

Each job runs with ``--cpu --gpus 1``: one CPU rank on each emulated node, world size 2, the
job scripts' GPU-cluster headers unchanged (--gres=gpu:8, --cpus-per-task=16).

- lora: both nodes take part, the run ends with an adapter and a ROUGE report; the job is
  submitted from a directory outside the repository and is also the preempted job below (one
  job, 4 launches, for the three tests: see ``lora_job``);
- full --zero 3: DeepSpeed ZeRO-3 across the nodes, a full model and a report;
- full --fsdp: PyTorch FSDP2 across the nodes, sharded checkpoints, a full model and a report;
- preemption: USR1 to the batch shell (as ``--signal=B:USR1@N`` does) -> the ranks checkpoint
  -> the job requeues itself -> resumes -> ends with the same losses as the uninterrupted run;
- a crash (with a stale INTERRUPTED marker in the run dir) fails the job and is not requeued.

Skipped unless root (the cluster fixture starts munged/slurmctld/slurmd).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

try:  # tests/ as a package or as a plain directory on sys.path
    from .conftest import REPO, cli_env, read_jsonl
    from .slurm_fixtures import slurm_cluster
except ImportError:
    from conftest import REPO, cli_env, read_jsonl
    from slurm_fixtures import slurm_cluster  # noqa: F401  (pytest fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

JOB_TIMEOUT_S = 240  # one job, submit to end (render ~10 s, ranks ~15 s to start, training, report)
PREEMPT_TIMEOUT_S = 300
# A requeued job is PENDING/RUNNING again, never in one of these.
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}  # interrupted job: first run + requeue delay (~12 s) + second run
TINY = ["--model", "tiny-t5", "--data", "sample", "--cpu", "--gpus", "1"]
# 4 optimizer steps per epoch on the sample (64 rows, micro batch 8, world size 2): 16 steps.
# fp32 so that an interrupted-and-resumed run can be compared tightly with an uninterrupted one.
EXACT = [
    "--set",
    "train.epochs=4",
    "--set",
    "train.checkpoint_every=1000",
    "--set",
    "train.log_every=1",
    "--set",
    "eval.limit=2",
    "--set",
    "model.precision=fp32",
]


# ---------------------------------------------------------------- helpers


def job_env(cluster, run_dir: Path, **extra: str) -> dict[str, str]:
    """Offline, one thread per rank (cli_env), the cluster's client settings, this venv's ftlaunch on PATH."""
    env = cli_env(**{key: cluster.env[key] for key in ("SLURM_CONF", "FTLAUNCH_SLURM_STATE", "PATH")})
    for key in list(env):  # nothing of an enclosing job or of the user's own ftlaunch settings
        if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "FTLAUNCH_")) and key not in (
            "SLURM_CONF",
            "FTLAUNCH_SLURM_STATE",
        ):
            del env[key]
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["FTLAUNCH_OUTPUT"] = str(run_dir)
    env.update(extra)
    return env


class Job:
    def __init__(
        self, cluster, tmp_path: Path, script: str, args: list[str], cwd: Path = REPO, **env: str
    ) -> None:
        self.cluster = cluster
        self.name = f"ftl-test-{uuid.uuid4().hex[:8]}"
        self.run_dir = tmp_path / "run"
        self.logs = tmp_path / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = job_env(cluster, self.run_dir, **env)
        self.cwd = cwd  # the submit directory
        script_path = f"slurm/{script}" if cwd == REPO else str(REPO / "slurm" / script)
        self.command = [
            "sbatch",
            f"--job-name={self.name}",
            f"--output={self.logs}/slurm-%j.out",
            script_path,
            *args,
        ]
        self.id: str | None = None
        # A preempted job (lora_job): was it running mid-training when the test sent USR1, after
        # how many steps, and the state it ended in.
        self.mid_training = False
        self.signalled_at: int | None = None
        self.final_state: str | None = None

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("slurm-*.out")))

    def diagnostics(self) -> str:
        parts = [f"$ {' '.join(self.command)}"]
        try:
            if self.id:
                parts.append(
                    self.cluster.run("scontrol", "show", "job", self.id, check=False, timeout=20).stdout
                )
            parts.append(self.cluster.run("sinfo", "-N", "-o", "%N %t %E", check=False, timeout=20).stdout)
        except (OSError, subprocess.SubprocessError) as exc:
            parts.append(f"(scontrol/sinfo failed: {exc})")
        parts.append("----- job log\n" + self.log()[-20000:])
        return "\n".join(parts)

    def submit_and_wait(self, timeout: float = JOB_TIMEOUT_S) -> str:
        """Submit, then poll the job state (sbatch --wait polls with growing sleeps: up to ~30 s late)."""
        self.submit()
        state = self.cluster.wait_job_state(self.id, FINAL_STATES, timeout)
        if state not in FINAL_STATES:
            self.cancel()
            pytest.fail(f"job did not finish within {timeout}s (JobState={state})\n{self.diagnostics()}")
        return state

    def submit(self) -> str:
        res = subprocess.run(
            [self.command[0], "--parsable", *self.command[1:]],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, f"sbatch failed: {res.stdout}\n{res.stderr}"
        self.id = res.stdout.strip().split(";")[0]
        return self.id

    def state(self) -> str | None:
        return self.cluster.job_field(self.id, "JobState")

    def cancel(self) -> None:
        self.cluster.cancel(name=self.name)


def assert_two_nodes(job: Job) -> None:
    """Both emulated nodes ran a launcher, node rank = SLURM_NODEID, and formed one world of 2."""
    log = job.log()
    assert "node node1 SLURM_NODEID 0 of 2" in log, job.diagnostics()
    assert "node node2 SLURM_NODEID 1 of 2" in log, job.diagnostics()
    assert "world size       2 = 1 per node x 2 node(s)" in log, job.diagnostics()
    accelerate_yaml = (job.run_dir / "accelerate.yaml").read_text()
    assert re.search(r"^num_processes: 2\b", accelerate_yaml, re.M), accelerate_yaml
    assert re.search(r"^num_machines: 2\b", accelerate_yaml, re.M), accelerate_yaml
    # The rendered files are printed into the job log.
    assert f"----- {job.run_dir}/command.sh" in log and f"----- {job.run_dir}/accelerate.yaml" in log


def assert_report(run_dir: Path) -> None:
    for name in ("report.md", "rouge.json"):
        path = run_dir / "report" / name
        assert path.is_file() and path.stat().st_size > 0, f"missing {path}"
    assert not (run_dir / "INTERRUPTED").exists()


def final_losses(run_dir: Path) -> tuple[dict, dict]:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    final = [row for row in rows if row.get("final")]
    steps = [row for row in rows if "loss" in row]
    assert final and steps, rows
    return steps[-1], final[-1]


def wait_for(predicate, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# ---------------------------------------------------------------- jobs


@pytest.fixture(scope="module")
def uninterrupted_lora(trained_run):
    """The reference of the preemption test: the same LoRA run, uninterrupted, on 2 ranks.

    What it is compared on (losses of an fp32 run at world size 2) is what training computes, not
    SLURM: the run's two ranks come from the rank harness (no `accelerate launch`), the same
    training code and world size as the job's one rank on each of two nodes."""
    return trained_run("lora", "--model", "tiny-t5", "--data", "sample", "--cpu", "--gpus", "2", *EXACT)


@pytest.fixture(scope="module")
def lora_job(slurm_cluster, tmp_path_factory):
    """ONE two-node LoRA job shared by three tests (4 launches instead of 8): it is submitted from a
    project directory outside the repository (`sbatch /path/to/ftlaunch/slurm/lora.sh`, default run
    directory), preempted mid-training (USR1 to the batch shell), requeued, resumed, and it ends.

    A preempted-and-resumed job still is a two-node LoRA job that ends with an adapter and a report,
    and still is a job submitted from outside the repository: the assertions of each test hold
    for it unchanged, and the preemption is the one of a two-node job (both nodes' ranks checkpoint
    together), which no other SLURM test preempts. The fixture asserts nothing about the preemption
    itself (test_preempted_job_checkpoints_requeues_and_resumes does), so a job that could not be
    signalled mid-training still lets the other two tests judge it."""
    tmp_path = tmp_path_factory.mktemp("lora")
    project = tmp_path / "project"
    project.mkdir()
    job = Job(slurm_cluster, tmp_path, "lora.sh", [*TINY, *EXACT], cwd=project)
    del job.env["FTLAUNCH_OUTPUT"]
    t0 = time.monotonic()
    job.submit()
    job.run_dir = project / "runs" / f"lora-slurm-{job.id}"  # the job scripts' default run dir
    metrics = job.run_dir / "metrics.jsonl"

    def steps_logged() -> int:
        try:
            return sum(1 for row in read_jsonl(metrics) if "loss" in row)
        except (OSError, ValueError):
            return 0

    try:
        wait_for(
            lambda: steps_logged() >= 5 or job.state() not in ("PENDING", "RUNNING", None), JOB_TIMEOUT_S
        )
        job.mid_training = job.state() == "RUNNING" and steps_logged() < 16
        if job.mid_training:
            # What `#SBATCH --signal=B:USR1@300` does before the time limit: signal the batch shell only.
            slurm_cluster.run("scancel", "--signal=USR1", "--batch", job.id, timeout=30)
            job.signalled_at = steps_logged()
        job.final_state = slurm_cluster.wait_job_state(
            job.id, FINAL_STATES, JOB_TIMEOUT_S + PREEMPT_TIMEOUT_S
        )
    finally:
        job.cancel()
    print(f"lora job {job.id}: {time.monotonic() - t0:.0f}s (signal after {job.signalled_at} steps)")
    return job


def test_lora_job_runs_on_both_nodes(lora_job):
    job = lora_job
    assert job.state() == "COMPLETED", job.diagnostics()
    assert_two_nodes(job)
    final = job.run_dir / "final"
    assert (final / "adapter_config.json").is_file(), job.diagnostics()
    adapter = final / "adapter_model.safetensors"
    assert adapter.is_file() and adapter.stat().st_size > 0, job.diagnostics()
    assert_report(job.run_dir)
    step, _ = final_losses(job.run_dir)
    assert step["step"] == 16, step
    assert "SLURM_RESTART_COUNT=0" in job.log()  # its first run (the requeued one says 1)


def test_full_zero3_job_runs_on_both_nodes(slurm_cluster, tmp_path):
    job = Job(slurm_cluster, tmp_path, "full.sh", [*TINY, "--zero", "3", "--set", "eval.limit=2"])
    t0 = time.monotonic()
    state = job.submit_and_wait()
    print(f"full ZeRO-3 job {job.id}: {time.monotonic() - t0:.0f}s")
    assert state == "COMPLETED", job.diagnostics()
    assert_two_nodes(job)
    log = job.log()
    assert f"----- {job.run_dir}/deepspeed.json" in log and '"stage": 3' in log, job.diagnostics()
    model = job.run_dir / "final" / "model.safetensors"
    assert model.is_file() and model.stat().st_size > 0, job.diagnostics()
    assert_report(job.run_dir)


def test_full_fsdp_job_runs_on_both_nodes(slurm_cluster, tmp_path):
    """--fsdp passes through slurm/full.sh unchanged: FSDP2 shards across the two nodes, the
    checkpoint is sharded (DCP), final/ is a whole model and the report is written."""
    job = Job(slurm_cluster, tmp_path, "full.sh", [*TINY, "--fsdp", "--set", "eval.limit=2"])
    t0 = time.monotonic()
    state = job.submit_and_wait()
    print(f"full FSDP job {job.id}: {time.monotonic() - t0:.0f}s")
    assert state == "COMPLETED", job.diagnostics()
    assert_two_nodes(job)
    assert "distributed_type: FSDP" in job.log(), job.diagnostics()
    checkpoints = list((job.run_dir / "checkpoints").glob("step_*/pytorch_model_fsdp_0"))
    assert checkpoints, job.diagnostics()
    model = job.run_dir / "final" / "model.safetensors"
    assert model.is_file() and model.stat().st_size > 0, job.diagnostics()
    assert_report(job.run_dir)


def test_preempted_job_checkpoints_requeues_and_resumes(lora_job, uninterrupted_lora):
    """The shared two-node LoRA job (lora_job) got USR1 mid-training: it checkpointed, requeued
    itself, resumed and ended with the same losses as the uninterrupted run."""
    job = lora_job
    assert job.mid_training, (
        f"job not running mid-training (no 5 training steps logged, or it ended first)\n{job.diagnostics()}"
    )
    assert job.final_state in FINAL_STATES, (
        f"job did not requeue and finish (JobState={job.final_state})\n{job.diagnostics()}"
    )
    log = job.log()
    assert job.state() == "COMPLETED", job.diagnostics()
    assert job.cluster.job_field(job.id, "Restarts") == "1", job.diagnostics()
    stopped = re.search(r"checkpoint step_(\d+) written", log)
    assert "got SIGUSR1: forwarding USR1 to the ranks" in log and stopped, job.diagnostics()
    assert "requeueing job" in log and "SLURM_RESTART_COUNT=1" in log, job.diagnostics()
    resumed = re.search(r"resumed from \S+/checkpoints/step_(\d+) at step (\d+)", log)
    assert resumed and resumed.group(1) == stopped.group(1), job.diagnostics()
    print(f"stopped and resumed at step {stopped.group(1)} (4 steps per epoch)")
    assert_two_nodes(job)
    assert (job.run_dir / "final" / "adapter_model.safetensors").stat().st_size > 0
    assert_report(job.run_dir)

    # Same losses as the uninterrupted run (same command, same world size, fp32).
    step, final = final_losses(job.run_dir)
    ref_step, ref_final = final_losses(uninterrupted_lora)
    assert step["step"] == ref_step["step"] == 16
    assert math.isclose(step["loss"], ref_step["loss"], rel_tol=1e-5), (step, ref_step)
    assert math.isclose(final["val_loss"], ref_final["val_loss"], rel_tol=1e-5), (final, ref_final)
    steps = [row["step"] for row in read_jsonl(job.run_dir / "metrics.jsonl") if "loss" in row]
    assert steps == list(range(1, 17)), (
        steps
    )  # one row per step: the resumed run dropped nothing, doubled nothing


def use_fake_accelerate(job: Job, tmp_path: Path, body: str) -> None:
    """The job finds an `accelerate` that runs ``body`` (shell) first on its PATH."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake = fake_bin / "accelerate"
    fake.write_text(f"#!/bin/sh\n{body}\n")
    fake.chmod(0o755)
    job.env["PATH"] = f"{fake_bin}{os.pathsep}{job.env['PATH']}"


def test_crash_is_not_requeued(slurm_cluster, tmp_path):
    """A launcher that fails (here: a broken `accelerate` on PATH) fails the job, even with a stale
    INTERRUPTED marker from an earlier run in the run directory: no requeue loop."""
    job = Job(slurm_cluster, tmp_path, "lora.sh", TINY)
    use_fake_accelerate(job, tmp_path, "echo 'fake accelerate: crashing' >&2\nexit 1")
    job.run_dir.mkdir()
    (job.run_dir / "recipe.yaml").write_text("# an earlier run of this directory\n")
    (job.run_dir / "command.sh").write_text(  # what makes it a run (a recipe.yaml alone may be a user's)
        f"accelerate launch --config_file {job.run_dir}/accelerate.yaml -m launcher.rank.train --run-dir {job.run_dir}\n"
    )
    (job.run_dir / "INTERRUPTED").write_text("step_2\n")
    assert job.submit_and_wait() == "FAILED", job.diagnostics()
    assert job.cluster.job_field(job.id, "Restarts") == "0", job.diagnostics()
    log = job.log()
    assert "fake accelerate: crashing" in log and "not requeued" in log, job.diagnostics()


def test_a_job_step_that_ended_well_without_a_finished_run_is_not_done(slurm_cluster, tmp_path):
    """srun can exit 0 although the run did not finish (SLURM killed the step of a held, cancelled
    job); here `accelerate` exits 0 at once. The job fails naming the resume line, never "done"."""
    job = Job(slurm_cluster, tmp_path, "full.sh", TINY)
    use_fake_accelerate(job, tmp_path, "exit 0")
    assert job.submit_and_wait() == "FAILED", job.diagnostics()
    log = job.log()
    assert f"but {job.run_dir} is not finished (no final/ or report" in log, job.diagnostics()
    assert f"FTLAUNCH_OUTPUT={job.run_dir} sbatch" in log and "done:" not in log, job.diagnostics()


def training_job(slurm_cluster, tmp_path: Path) -> Job:
    """A one-node full job of 100 epochs, returned once it trains (a loss line logged)."""
    long = ["--set", "train.epochs=100", "--set", "train.log_every=1", "--set", "eval.limit=2"]
    job = Job(slurm_cluster, tmp_path, "full.sh", [*TINY, *long])
    job.submit()
    metrics = job.run_dir / "metrics.jsonl"
    started = wait_for(lambda: metrics.is_file() and '"loss"' in metrics.read_text(), JOB_TIMEOUT_S)
    if not (started and job.state() == "RUNNING"):
        job.cancel()
        pytest.fail(f"the job did not start training\n{job.diagnostics()}")
    return job


def test_a_plain_scancel_ends_the_job_without_a_requeue(slurm_cluster, tmp_path):
    """`scancel JOB` is SIGTERM to the batch shell, as preemption and the time limit are; only
    those requeue (Reason=Preempted/TimeLimit). A user's cancel (Reason=None) ends the job."""
    job = training_job(slurm_cluster, tmp_path)
    try:
        slurm_cluster.run("scancel", job.id, timeout=30)
        assert slurm_cluster.wait_job_state(job.id, FINAL_STATES, 60) == "CANCELLED", job.diagnostics()
        time.sleep(15)  # a requeued job would be PENDING/RUNNING again within ~11 s
        assert job.state() == "CANCELLED" and slurm_cluster.job_field(job.id, "Restarts") == "0", (
            job.diagnostics()
        )
    finally:
        job.cancel()
    log = job.log()
    assert "cancelled (scancel): it ends without a requeue" in log and "requeueing" not in log, (
        job.diagnostics()
    )
    assert "done:" not in log and not (job.run_dir / "final").exists()


def test_an_outside_scontrol_requeue_is_not_taken_for_a_cancel(slurm_cluster, tmp_path):
    """`scontrol requeue JOB` also ends the job with SIGTERM and Reason=None, but its restart count
    is already up: SLURM requeues it, and the log says so instead of "submit it again"."""
    job = training_job(slurm_cluster, tmp_path)
    try:
        slurm_cluster.run("scontrol", "requeue", job.id, timeout=30)
        assert wait_for(lambda: "SLURM_RESTART_COUNT=1" in job.log(), 90), job.diagnostics()
    finally:
        job.cancel()
    log = job.log()
    assert "requeued by scontrol requeue: it resumes from the newest checkpoint" in log, job.diagnostics()
    assert "cancelled (scancel)" not in log and "Continue it later" not in log, job.diagnostics()


def test_job_submitted_from_outside_the_repository(lora_job):
    """`sbatch /path/to/ftlaunch/slurm/lora.sh` from a project directory: the job finds slurm/common.sh
    without FTLAUNCH_REPO, and its default run directory is under the submit directory (the shared
    lora_job is that job; its requeued run kept the same job id, so the same run directory)."""
    job = lora_job
    project = job.cwd  # the submit directory
    assert "FTLAUNCH_OUTPUT" not in job.env and "FTLAUNCH_REPO" not in job.env
    assert job.state() == "COMPLETED", job.diagnostics()
    run_dirs = list((project / "runs").glob("lora-slurm-*"))
    assert [p.name for p in run_dirs] == [f"lora-slurm-{job.id}"], job.diagnostics()
    run_dir = run_dirs[0]
    assert (run_dir / "final" / "adapter_model.safetensors").is_file(), job.diagnostics()
    assert_report(run_dir)
    log = job.log()
    assert f"cwd {project}" in log, job.diagnostics()
    assert "Traceback" not in log, job.diagnostics()
    assert re.search(r"^training: step 16/16 \(100%\)", log, re.M), (
        job.diagnostics()
    )  # plain lines, no redraws
    assert "\r" not in log, job.diagnostics()
    logs = run_dir / "logs"
    assert {p.name for p in logs.glob("*.log")} >= {
        "rank0.log",
        "rank1.log",
        "launcher-node0.log",
        "launcher-node1.log",
    }, job.diagnostics()
