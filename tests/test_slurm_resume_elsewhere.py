"""A SLURM run continues on another number of nodes (issue 27): a two-node LoRA job whose rank
crashes after its step_4 checkpoint is submitted again with `sbatch --nodes=1` on the same
FTLAUNCH_OUTPUT. The job script renders with `--resume auto` as always; the launcher keeps the
effective batch by doubling the accumulation, says so, and the run ends with every step once, a
report, and its history (2 ranks on 2 nodes, then 1 rank on 1 node) in metrics.jsonl.

That the weights equal an uninterrupted run's after such a move is proven without SLURM in
tests/test_faults.py::test_a_ddp_checkpoint_continues_on_another_number_of_ranks (dropout off);
this job keeps the recipe's dropout, so it checks the resume itself, not the numbers.
"""

from __future__ import annotations

import pytest

try:  # tests/ as a package or as a plain directory on sys.path
    from .conftest import read_jsonl
    from .slurm_fixtures import slurm_cluster
    from .test_slurm_jobs import EXACT, TINY, Job, assert_report
except ImportError:
    from conftest import read_jsonl
    from slurm_fixtures import slurm_cluster  # noqa: F401  (pytest fixture)
    from test_slurm_jobs import EXACT, TINY, Job, assert_report

from launcher.core.history import segments

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# 16 optimizer steps on two ranks (test_slurm_jobs.EXACT), a checkpoint every 4.
ARGS = [*TINY, *EXACT, "--set", "train.checkpoint_every=4"]


def test_a_two_node_job_continues_on_one_node(slurm_cluster, tmp_path):
    crashed = Job(slurm_cluster, tmp_path, "lora.sh", ARGS, FTLAUNCH_FAULT_RAISE_IN_SAVE="1:8")
    assert crashed.submit_and_wait() == "FAILED", crashed.diagnostics()
    assert (crashed.run_dir / "checkpoints" / "step_4").is_dir(), crashed.diagnostics()

    moved = Job(slurm_cluster, tmp_path, "lora.sh", ARGS)
    moved.command.insert(1, "--nodes=1")  # sbatch's own option, before the script
    assert moved.submit_and_wait() == "COMPLETED", moved.diagnostics()
    log = (moved.logs / f"slurm-{moved.id}.out").read_text(errors="replace")
    assert "world size       1 = 1 per node x 1 node(s)" in log, moved.diagnostics()
    assert "train.grad_accum 1 -> 2 keeps its 2 micro-batches per optimizer step" in log, moved.diagnostics()
    assert f"resumed from {moved.run_dir / 'checkpoints' / 'step_4'} at step 4" in log, moved.diagnostics()

    metrics = read_jsonl(moved.run_dir / "metrics.jsonl")
    assert [row["step"] for row in metrics if "loss" in row] == list(range(1, 17))
    shape = [(row["start"], row["world_size"], row["nodes"], row["grad_accum"]) for row in segments(metrics)]
    assert shape == [("fresh", 2, 2, 1), ("resumed", 1, 1, 2)], metrics
    assert (moved.run_dir / "final" / "adapter_model.safetensors").stat().st_size > 0
    assert_report(moved.run_dir)
    assert "Run history" in (moved.run_dir / "report" / "report.md").read_text()
