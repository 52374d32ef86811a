"""eval.gather_weights: generation from ZeRO-3 / FSDP2 weights gathered whole once per generation
instead of each module's weights once per generated token (launcher/rank/gathered.py).

References: the same run with ``eval.gather_weights=false`` (the per-module path every earlier
version took, itself checked against one process and DDP in test_evaluation.py/test_fsdp.py),
and the arithmetic of the memory rule. The collective counts are in tests/test_bench.py
(bench/generation_gather.py --quick).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import read_jsonl, run_cli_harness
from safetensors.torch import load_file

from launcher.rank import gathered

# ---------------------------------------------------------------- the memory rule


class Ranks(SimpleNamespace):
    """An accelerator whose other ranks answer ``others`` to the all-rank 'any' question."""

    def reduce(self, tensor, reduction="sum"):
        return tensor + self.others


def accelerator(others: float = 0.0, processes: int = 2) -> Ranks:
    return Ranks(num_processes=processes, device=torch.device("cpu"), is_main_process=True, others=others)


def tiny_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))  # 54 fp32 numbers


MODEL_BYTES = (8 * 4 + 4 + 4 * 2 + 2) * 4


def test_whole_model_bytes_counts_every_weight_at_full_size_zero3_partitions_included():
    model = tiny_model()
    assert gathered.whole_model_bytes(model) == MODEL_BYTES
    # a ZeRO-3 rank holds an empty placeholder and records the full size beside it (ds_numel)
    partitioned = torch.nn.Parameter(torch.empty(0))
    partitioned.ds_numel = 1000
    model.register_parameter("partitioned", partitioned)
    assert gathered.whole_model_bytes(model) == MODEL_BYTES + 1000 * 4


@pytest.mark.parametrize(("free", "expected"), [(2 * MODEL_BYTES, True), (2 * MODEL_BYTES - 1, False)])
def test_auto_gathers_when_the_model_takes_at_most_half_the_free_memory(monkeypatch, capsys, free, expected):
    monkeypatch.setattr(gathered, "free_memory_bytes", lambda device: free)
    assert gathered.gathers_whole(accelerator(), tiny_model(), "auto") is expected
    said = capsys.readouterr().out
    assert ("each module's weights are gathered per token instead" in said) is not expected


def test_a_rank_without_room_keeps_every_rank_per_module(monkeypatch, capsys):
    """The answer is collective: ranks that gathered and ranks that did not would wait on each
    other's collectives forever."""
    monkeypatch.setattr(gathered, "free_memory_bytes", lambda device: 100 * MODEL_BYTES)
    assert gathered.gathers_whole(accelerator(others=0.0), tiny_model(), "auto") is True
    assert gathered.gathers_whole(accelerator(others=1.0), tiny_model(), "auto") is False
    assert "more than half the free memory of a rank" in capsys.readouterr().out


def test_cpu_ranks_of_one_node_share_its_available_memory(monkeypatch):
    """Every rank of a node gathers at once into the same host memory: each counts its share."""
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=8 * 2**30))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert gathered.free_memory_bytes(torch.device("cpu")) == 2 * 2**30


def test_true_and_false_decide_without_looking_at_memory(monkeypatch):
    def unused(device):
        raise AssertionError("memory is only measured for auto")

    monkeypatch.setattr(gathered, "free_memory_bytes", unused)
    assert gathered.gathers_whole(accelerator(), tiny_model(), True) is True
    assert gathered.gathers_whole(accelerator(), tiny_model(), False) is False


def test_a_recipe_value_other_than_auto_true_false_is_refused(tmp_path):
    from conftest import set_refused

    set_refused(tmp_path, ["eval.gather_weights=sometimes"], ["eval.gather_weights", "sometimes"])


# ---------------------------------------------------------------- training with generation in it


def run(out, strategy: tuple[str, ...], gather: str):
    """2 CPU ranks, fp32, ROUGE on 5 validation dialogues at steps 2 and 4 and the report on 5 test
    dialogues, 2 per generate call: 3 batches, so one rank has a batch fewer (it generates alone
    or waits in lockstep), with training going on after the first generations."""
    result = run_cli_harness(
        "full",
        *("--cpu", "--gpus", "2", *strategy, "--model", "tiny-t5", "--data", "sample", "--output", str(out)),
        *("--set", "model.precision=fp32", "--set", "model.dropout=0.0", "--set", "train.lr=2e-3"),
        *("--set", "train.max_steps=4", "--set", "train.log_every=1"),
        *("--set", "eval.rouge_every=2", "--set", "eval.rouge_limit=5"),
        *("--set", "eval.limit=5", "--set", "eval.batch_size=2", "--set", "eval.max_new_tokens=8"),
        *("--set", f"eval.gather_weights={gather}"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [("--zero", "3"), ("--fsdp",)], ids=["zero3", "fsdp"])
def test_training_with_generation_in_it_is_the_same_gathered_or_per_module(tmp_path, strategy):
    """Gathering the model for generation and handing the shards back leaves training exactly as it
    was (the same losses, final weights: ZeRO-3's hooks and FSDP2's reshard settings restored), and
    generates exactly what per-module gathering generates, at every evaluation."""
    per_module, whole = tmp_path / "per_module", tmp_path / "whole"
    run(per_module, strategy, "false")
    output = run(whole, strategy, "auto")
    assert "gathered per token instead" not in output  # auto did gather (a tiny model fits)

    def losses(run_dir):
        return [(row["step"], row["loss"]) for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row]

    assert losses(whole) == losses(per_module) and len(losses(whole)) == 4
    ours, theirs = (load_file(str(d / "final" / "model.safetensors")) for d in (whole, per_module))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)
    for name in ("step_2", "step_4", "original", "finetuned"):
        predictions = [read_jsonl(d / "eval" / name / "predictions.jsonl") for d in (whole, per_module)]
        assert predictions[0] == predictions[1] and len(predictions[0]) == 5, name


FSDP_RESTORE_SCRIPT = """
import os, sys, tempfile
import torch, torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from launcher.rank.fsdp import all_units_unsharded, unit_reshard_setting

dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
fully_shard(model[0])  # a block as Accelerate wraps it (reshard after forward)
fully_shard(model[1], reshard_after_forward=False)  # a unit that keeps its weights after forward
fully_shard(model)  # the root
units = [m for m in model.modules() if isinstance(m, FSDPModule)]
model(torch.ones(1, 4))  # lazy init: the root's own setting is decided here
before = [unit_reshard_setting(u) for u in units]
with all_units_unsharded(model):
    assert not any(isinstance(p, DTensor) for p in model.parameters())  # whole, registered as such
    model(torch.ones(1, 4))
    assert not any(isinstance(p, DTensor) for p in model.parameters())  # and kept after a forward
after = [unit_reshard_setting(u) for u in units]
assert after == before, (before, after)
assert all(isinstance(p, DTensor) for p in model.parameters())  # sharded again
assert before[0][1] != before[1][1]  # the construction: units with different settings
print("restored")
"""


def test_fsdp_units_stay_whole_through_generation_and_get_their_own_settings_back(tmp_path):
    """torch's set_reshard_after_forward would leave every unit 'keep after forward' (the root's
    own special setting lost); the private state all_units_unsharded reads back is what a torch
    upgrade may move, so it is pinned here on one gloo rank (a subprocess: no process group in
    the test process)."""
    import subprocess
    import sys

    from conftest import REPO, cli_env

    result = subprocess.run(
        [sys.executable, "-c", FSDP_RESTORE_SCRIPT, str(tmp_path / "store")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env(),
    )
    assert result.returncode == 0 and "restored" in result.stdout, result.stderr[-4000:]
