"""What the loop does on GPU ranks, checked on CPU (issue 12): no host wait for the GPU in steps
that log nothing, pinned batches copied without blocking, and a ZeRO-Offload optimizer that is
fused and has this node's cores.

Each test fails without its fix: the old loop all-reduced the stop flag every step, converted
DeepSpeed's grad norm with ``float()`` every step, left ``pin_memory``/``non_blocking`` off, built
an unfused AdamW for offload and launched offload ranks with Accelerate's OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, cli_env, run_cli_in_process

from launcher.core.recipe_loading import build_recipe, default_recipe_path, load_recipe
from launcher.rank import distributed, loaders, optimization, stopping, train


def recipe_for(method: str = "full", **launch) -> object:
    raw = load_recipe(default_recipe_path(method)).model_dump(mode="json")
    raw["model"]["name"] = "tiny-t5"
    raw["data"]["dataset"] = "sample"
    raw["launch"].update(launch)
    return build_recipe(raw, "test")


# ---------------------------------------------------------------- the stop flag


class CountingAccelerator:
    """Two ranks whose all-reduce is counted (and sums a flag nobody set)."""

    num_processes = 2
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.reductions = 0

    def reduce(self, tensor, reduction="sum"):
        self.reductions += 1
        return tensor


def test_stop_flag_is_all_reduced_every_n_steps_and_at_the_last():
    accelerator = CountingAccelerator()
    stop = stopping.StopRequest()
    asked = []
    for step in range(1, 26):
        before = accelerator.reductions
        assert stopping.stop_requested(accelerator, stop, step, 25) is False
        if accelerator.reductions > before:
            asked.append(step)
    assert asked == [10, 20, 25]  # STOP_CHECK_EVERY = 10, 25 steps in all


def test_stop_flag_is_also_asked_at_a_step_that_evaluated():
    """An evaluation (a generation may take minutes) is followed by the question at once: every
    rank evaluates at the same steps, so the all-reduce stays collective."""
    accelerator = CountingAccelerator()
    stop = stopping.StopRequest()
    assert stopping.stop_requested(accelerator, stop, 7, 25, evaluated=True) is False
    assert accelerator.reductions == 1
    assert stopping.stop_requested(accelerator, stop, 7, 25) is False and accelerator.reductions == 1
    stop.signal = 15
    assert stopping.stop_requested(accelerator, stop, 30, 100) is True
    assert stopping.stop_requested(accelerator, stop, 31, 100) is False  # between checks: not even asked


@pytest.fixture
def tiny_run(tmp_path):
    """A rendered one-process CPU run of tiny-t5 (12 steps over 2 epochs), set up in this process."""
    run_dir = tmp_path / "run"
    result = run_cli_in_process(
        "full",
        "--cpu",
        "--gpus",
        "1",
        "--model",
        "tiny-t5",
        "--data",
        "sample",
        "--dry-run",
        "--output",
        str(run_dir),
        "--set",
        "train.epochs=2",
        "--set",
        "train.max_steps=12",
        "--set",
        "data.max_source_length=64",
        "--set",
        "data.max_target_length=32",
        "--set",
        "eval.after_training=false",
        "--set",
        "model.precision=fp32",
        "--set",
        "train.checkpoint_every=null",
    )
    assert result.returncode == 0, result.stderr
    from accelerate.state import AcceleratorState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: one thread is faster for a model this small
    try:
        yield train.set_up(run_dir)
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(True)


def test_train_loop_asks_for_the_stop_flag_every_n_steps(tiny_run, monkeypatch):
    from launcher.core.metrics import MetricsLogger

    steps_asked = []
    monkeypatch.setattr(
        stopping, "any_rank", lambda accelerator, flag: steps_asked.append(tiny_run.state.step) or flag
    )
    logger = MetricsLogger(tiny_run.accelerator, tiny_run.run_dir, tiny_run.recipe, 0)
    try:
        assert train.train_loop(tiny_run, logger, stopping.StopRequest(), resumed=False)
    finally:
        logger.close()
    assert tiny_run.total_steps == 12  # max_steps (64 examples / micro batch 8 = 8 steps per epoch)
    assert steps_asked == [10, 12]  # was: every one of the 12 steps


# ---------------------------------------------------------------- DeepSpeed's gradient norm


class HostReadForbidden(torch.Tensor):
    """A device-side value: reading it on the host (float, bool, item) fails the test."""

    def __float__(self):
        raise AssertionError("grad norm read on the host")

    def __bool__(self):
        raise AssertionError("grad norm tested on the host")

    def item(self):
        raise AssertionError("grad norm read on the host")


def test_deepspeed_grad_norm_stays_on_the_device_until_a_logged_step():
    from accelerate.utils import DistributedType

    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)
    norm = torch.tensor(2.5).as_subclass(HostReadForbidden)
    model = SimpleNamespace(get_global_grad_norm=lambda: norm)
    assert train.deepspeed_grad_norm(accelerator, model) is norm
    model_without = SimpleNamespace(get_global_grad_norm=lambda: None)
    assert train.deepspeed_grad_norm(accelerator, model_without) is None
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_GPU)
    assert train.deepspeed_grad_norm(ddp, model) is None


# ---------------------------------------------------------------- pinned, non-blocking copies


def test_training_loader_pins_memory_only_on_cuda_ranks(tmp_path):
    from contextlib import nullcontext

    from launcher.rank.model import load_tokenizer

    recipe = recipe_for()
    tokenizer = load_tokenizer(recipe)
    for device, pinned in (("cuda", True), ("cpu", False)):
        accelerator = SimpleNamespace(
            device=torch.device(device), main_process_first=nullcontext, num_processes=1
        )
        data = loaders.prepare_data(recipe, tokenizer, accelerator, tmp_path / device)
        assert data.loader.pin_memory is pinned, device


class RecordingAccelerator:
    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs


@pytest.mark.parametrize("zero", [0, 3])
def test_gpu_ranks_copy_batches_non_blocking(monkeypatch, zero):
    monkeypatch.setattr(distributed, "Accelerator", RecordingAccelerator)
    for on_cpu, non_blocking in ((False, True), (True, False)):
        monkeypatch.setattr(distributed, "runs_on_cpu", lambda recipe, on_cpu=on_cpu: on_cpu)
        built = distributed.build_accelerator(recipe_for(zero=zero))
        assert built.kwargs["dataloader_config"].non_blocking is non_blocking, (zero, on_cpu)


# ---------------------------------------------------------------- ZeRO-Offload's CPU optimizer


def test_offload_optimizer_is_torchs_fused_cpu_adamw():
    from launcher.rank.model import build_tiny_t5

    model = build_tiny_t5(1000)
    for launch, fused in (
        ({"zero": 3, "offload": "optimizer"}, True),
        ({"zero": 2, "offload": "optimizer"}, True),
        ({"zero": 3, "offload": "full"}, True),
        ({"zero": 3}, None),
        ({"zero": 0}, None),
    ):
        optimizer = optimization.build_optimizer(model, recipe_for(**launch))
        assert optimizer.defaults["fused"] is fused, launch


def test_fused_cpu_adamw_takes_the_same_steps_as_the_loop_version():
    """The switch changes speed, not the update: three steps agree with torch's reference loop."""
    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    results = []
    for fused in (True, False):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        kind = {"fused": True} if fused else {"foreach": False}  # the fused kernel vs the per-tensor loop
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, **kind)
        for step in grads:
            for param, grad in zip(params, step):
                param.grad = grad.clone()
            optimizer.step()
        results.append(params)
    for fused_param, loop_param in zip(*results):
        torch.testing.assert_close(fused_param, loop_param, rtol=1e-6, atol=1e-7)


def fake_accelerate(bin_dir: Path) -> Path:
    """`accelerate` that prints the OMP_NUM_THREADS it was started with."""
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / "accelerate"
    tool.write_text(f"#!{sys.executable}\nimport os\nprint(os.environ.get('OMP_NUM_THREADS', 'unset'))\n")
    tool.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_offload_ranks_get_their_share_of_the_cores(tmp_path, gpus):
    run_dir = tmp_path / "run"
    result = run_cli_in_process(
        "full",
        "--gpus",
        str(gpus),
        "--zero",
        "3",
        "--offload",
        "optimizer",
        "--dry-run",
        "--output",
        str(run_dir),
    )
    assert result.returncode == 0, result.stderr
    env = {key: value for key, value in cli_env().items() if key != "OMP_NUM_THREADS"}
    env["PATH"] = f"{fake_accelerate(tmp_path / 'bin')}{os.pathsep}{env['PATH']}"
    launched = subprocess.run(
        ["bash", str(run_dir / "command.sh")], capture_output=True, text=True, env=env, timeout=60
    )
    assert launched.returncode == 0, launched.stderr
    cores = len(os.sched_getaffinity(0))  # what nproc counts
    assert launched.stdout.strip() == str(max(1, cores // gpus))
    kept = subprocess.run(
        ["bash", str(run_dir / "command.sh")],
        capture_output=True,
        text=True,
        env={**env, "OMP_NUM_THREADS": "5"},
        timeout=60,
    )
    assert kept.stdout.strip() == "5"


def test_accelerate_hands_the_exported_thread_count_to_the_ranks(monkeypatch):
    """Accelerate's own launch validation: OMP_NUM_THREADS from the environment, else 1."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    config = REPO / "accelerate_configs" / "zero3.yaml"
    for exported, expected in (("6", 6), (None, 1)):
        if exported is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", exported)
        args = launch_command_parser().parse_args(["--config_file", str(config), "train.py"])
        args, _, _ = _validate_launch_command(args)
        assert args.num_cpu_threads_per_process == expected


def test_runs_without_offload_leave_threads_to_accelerate(tmp_path):
    run_dir = tmp_path / "run"
    assert (
        run_cli_in_process(
            "full", "--gpus", "2", "--zero", "3", "--dry-run", "--output", str(run_dir)
        ).returncode
        == 0
    )
    assert "OMP_NUM_THREADS" not in (run_dir / "command.sh").read_text()
