"""Tests against a real local two-node SLURM cluster (slurm/test-cluster/start.sh).

Skipped unless running as root on a machine where slurm can be installed.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import pytest

try:  # tests/ as a package or as a plain directory on sys.path
    from .slurm_fixtures import slurm_cluster
except ImportError:
    from slurm_fixtures import slurm_cluster  # noqa: F401  (pytest fixture)

pytestmark = pytest.mark.slurm

JOB_TIMEOUT_S = 120
REQUEUE_TIMEOUT_S = 180


def _write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def _wait_for(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.25)
    return path.exists()


def _diag(cluster, job_id, out_dir: Path) -> str:
    parts = []
    try:
        parts.append(cluster.run("scontrol", "show", "job", str(job_id), check=False, timeout=20).stdout)
        parts.append(cluster.run("sinfo", "-N", "-o", "%N %t %E", check=False, timeout=20).stdout)
    except (OSError, subprocess.SubprocessError) as e:
        parts.append(f"(diagnostics failed: {e})")
    for f in sorted(out_dir.glob("*")):
        if f.is_file():
            parts.append(f"--- {f.name}\n{f.read_text(errors='replace')}")
    return "\n".join(parts)


def test_two_node_job_with_gpus(slurm_cluster, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    name = f"ftl-test-{uuid.uuid4().hex[:8]}"
    job = _write_script(
        tmp_path / "job.sh",
        f"export OUT={out}\n"
        "srun bash -c 'echo $SLURM_NODEID $(hostname) $CUDA_VISIBLE_DEVICES $SLURMD_NODENAME "
        '$SLURM_CPUS_PER_TASK > "$OUT/task-$SLURM_PROCID.txt"\'\n',
    )
    try:
        res = slurm_cluster.run(
            "sbatch",
            "--wait",
            f"--job-name={name}",
            "--nodes=2",
            "--gres=gpu:4",
            "--cpus-per-task=8",
            f"--chdir={tmp_path}",
            f"--output={out}/slurm-%j.out",
            str(job),
            timeout=JOB_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        slurm_cluster.cancel(name=name)
        pytest.fail(f"sbatch --wait did not return within {JOB_TIMEOUT_S}s\n{_diag(slurm_cluster, '', out)}")
    assert res.returncode == 0, f"sbatch failed: {res.stdout}\n{res.stderr}\n{_diag(slurm_cluster, '', out)}"

    lines = sorted(p.read_text().split() for p in out.glob("task-*.txt"))
    assert len(lines) == 2, f"expected 2 tasks, got {lines}\n{_diag(slurm_cluster, '', out)}"
    assert [fields[0] for fields in lines] == ["0", "1"]  # SLURM_NODEID
    assert {fields[3] for fields in lines} == {"node1", "node2"}
    for fields in lines:
        assert len(fields) == 5, fields
        assert len(fields[2].split(",")) == 4, f"CUDA_VISIBLE_DEVICES={fields[2]!r}"
        assert fields[4] == "8"


def _requeue_job_body(out: Path, self_requeue: bool) -> str:
    requeue = 'scontrol requeue "$SLURM_JOB_ID"\n' if self_requeue else ""
    return (
        f"OUT={out}\n"
        'echo "${SLURM_RESTART_COUNT:-unset}" >> "$OUT/runs.txt"\n'
        'if [ "${SLURM_RESTART_COUNT:-0}" -eq 0 ]; then\n'
        '  touch "$OUT/first-run"\n'
        f"  {requeue}"
        "  sleep 300  # killed by the requeue\n"
        "  exit 1\n"
        "fi\n"
        'echo "$SLURM_RESTART_COUNT" > "$OUT/marker.tmp" && mv "$OUT/marker.tmp" "$OUT/marker"\n'
    )


def _submit(cluster, tmp_path: Path, out: Path, script: Path, *extra: str) -> str:
    res = cluster.run(
        "sbatch",
        "--parsable",
        *extra,
        f"--chdir={tmp_path}",
        f"--output={out}/slurm-%j.out",
        str(script),
        timeout=60,
    )
    return res.stdout.strip().split(";")[0]


def _check_requeued_once(cluster, job_id: str, out: Path, t0: float) -> None:
    marker = out / "marker"
    assert _wait_for(marker, REQUEUE_TIMEOUT_S), (
        f"requeued job did not rerun within {REQUEUE_TIMEOUT_S}s\n{_diag(cluster, job_id, out)}"
    )
    print(f"job {job_id}: submit -> second run finished in {time.monotonic() - t0:.1f}s")
    assert marker.read_text().strip() == "1"  # SLURM_RESTART_COUNT on the second run
    runs = (out / "runs.txt").read_text().split()
    assert runs[0] in ("unset", "0") and runs[1:] == ["1"], runs
    state = cluster.wait_job_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=30)
    assert state == "COMPLETED", f"JobState={state}\n{_diag(cluster, job_id, out)}"
    assert cluster.job_field(job_id, "Restarts") == "1"


def test_job_requeues_itself(slurm_cluster, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    script = _write_script(tmp_path / "requeue.sh", _requeue_job_body(out, self_requeue=True))
    t0 = time.monotonic()
    job_id = _submit(slurm_cluster, tmp_path, out, script, "--requeue", "--nodes=1")
    try:
        _check_requeued_once(slurm_cluster, job_id, out, t0)
    finally:
        slurm_cluster.cancel(job_id)


def test_running_job_requeued_externally(slurm_cluster, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    script = _write_script(tmp_path / "requeue.sh", _requeue_job_body(out, self_requeue=False))
    t0 = time.monotonic()
    job_id = _submit(slurm_cluster, tmp_path, out, script, "--requeue", "--nodes=2")
    try:
        assert _wait_for(out / "first-run", JOB_TIMEOUT_S), _diag(slurm_cluster, job_id, out)
        assert slurm_cluster.job_field(job_id, "JobState") == "RUNNING"
        slurm_cluster.run("scontrol", "requeue", job_id, timeout=30)
        _check_requeued_once(slurm_cluster, job_id, out, t0)
    finally:
        slurm_cluster.cancel(job_id)
