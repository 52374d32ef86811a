"""Pytest fixture for a real local two-node SLURM test cluster.

Usage in a test module::

    from slurm_fixtures import slurm_cluster  # noqa: F401  (pytest fixture)

    @pytest.mark.slurm
    def test_something(slurm_cluster, tmp_path):
        subprocess.run(["sbatch", "--wait", "--nodes=2", ...], env=slurm_cluster.env, ...)

The fixture runs ``slurm/test-cluster/start.sh`` (root only; installs the Debian
packages with apt-get if needed) and stops the cluster again at module teardown
unless it was already running before, or ``FTLAUNCH_SLURM_KEEP=1`` is set.
Nodes: node1, node2 (16 CPUs, 8 fake GPUs each), partition ``debug``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO_ROOT / "slurm" / "test-cluster"
START_SH = CLUSTER_DIR / "start.sh"
STOP_SH = CLUSTER_DIR / "stop.sh"
SLURM_CONF = "/etc/slurm/slurm.conf"

# start.sh exit codes
_EXIT_NOT_ROOT = 2
_EXIT_NO_PACKAGES = 3

START_TIMEOUT_S = 900  # includes a possible apt-get install
STOP_TIMEOUT_S = 120


@dataclass
class SlurmCluster:
    state_dir: Path
    nodes: tuple[str, ...] = ("node1", "node2")
    partition: str = "debug"
    gpus_per_node: int = 8
    cpus_per_node: int = 16
    env: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        """Run a SLURM client command (sbatch, squeue, scontrol, ...) against the cluster."""
        return subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=timeout, check=check
        )

    def cancel(self, *job_ids: str | int, name: str | None = None) -> None:
        """Best-effort scancel; never raises."""
        args = ["scancel", *(str(j) for j in job_ids)]
        if name:
            args.append(f"--name={name}")
        if len(args) == 1:
            return
        try:
            subprocess.run(args, env=self.env, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            pass

    def job_field(self, job_id: str | int, key: str) -> str | None:
        """Value of ``key`` in ``scontrol show job -o <id>`` (None if unknown)."""
        res = self.run("scontrol", "show", "job", "-o", str(job_id), check=False, timeout=30)
        for tok in res.stdout.split():
            if tok.startswith(key + "="):
                return tok.split("=", 1)[1]
        return None

    def wait_job_state(self, job_id: str | int, states: set[str], timeout: float) -> str | None:
        """Poll until the job's JobState is in ``states``; return the last state seen."""
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            time.sleep(0.5)
        return state


def _client_env(state_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    # If pytest itself runs inside a SLURM job, don't let that job's settings leak
    # into submissions to the test cluster.
    for k in list(env):
        if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")):
            del env[k]
    env["SLURM_CONF"] = SLURM_CONF
    env["FTLAUNCH_SLURM_STATE"] = str(state_dir)
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    return env


def _stop(env: dict[str, str]) -> None:
    try:
        subprocess.run(["bash", str(STOP_SH)], env=env, capture_output=True, timeout=STOP_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        pass


@pytest.fixture(scope="module")
def slurm_cluster():
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("SLURM test cluster needs root (start.sh starts munged/slurmctld/slurmd)")
    if (
        shutil.which("apt-get") is None
        and shutil.which("slurmctld", path=os.environ.get("PATH", "") + ":/usr/sbin") is None
    ):
        pytest.skip("SLURM test cluster needs apt-get to install slurm (or slurm preinstalled)")

    state_dir = Path(os.environ.get("FTLAUNCH_SLURM_STATE", "/tmp/ftlaunch-slurm"))
    env = _client_env(state_dir)
    try:
        res = subprocess.run(
            ["bash", str(START_SH)], env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        _stop(env)
        pytest.fail(f"start.sh did not finish within {START_TIMEOUT_S}s")
    if res.returncode == _EXIT_NOT_ROOT:
        pytest.skip("SLURM test cluster needs root: " + res.stderr.strip())
    if res.returncode == _EXIT_NO_PACKAGES:
        pytest.skip("SLURM packages not available: " + res.stderr.strip())
    if res.returncode != 0:
        pytest.fail(f"start.sh failed (rc={res.returncode}):\n{res.stdout}\n{res.stderr}")

    was_running = "already running" in res.stdout
    keep = was_running or os.environ.get("FTLAUNCH_SLURM_KEEP") == "1"
    try:
        yield SlurmCluster(state_dir=state_dir, env=env)
    finally:
        if not keep:
            _stop(env)
