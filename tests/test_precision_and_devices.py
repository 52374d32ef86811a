"""Precision does what the recipe says under every strategy, and a GPU run never falls back to
CPU ranks without being asked (--cpu)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import cli_env, run_cli_in_process


def gpu_recipe():
    from launcher.core.recipe import Recipe

    return Recipe.model_validate({"model": {"name": "tiny-t5"}, "launch": {"cpu": False}})


def test_a_gpu_run_without_usable_cuda_is_an_error_naming_what_was_found(monkeypatch):
    from launcher.core.errors import UserError
    from launcher.rank.distributed import runs_on_cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.4")

    def broken_driver():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040).\nmore")

    monkeypatch.setattr(torch.cuda, "init", broken_driver)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(UserError) as error:
        runs_on_cpu(gpu_recipe())
    message = str(error.value)
    assert "no usable GPU" in message and "driver on your system is too old" in message
    assert "CUDA_VISIBLE_DEVICES='0,1'" in message and "--cpu" in message
    assert "\n" not in message


def test_a_cpu_only_torch_is_named_as_such(monkeypatch):
    from launcher.core.recipe import Recipe
    from launcher.rank.distributed import cuda_problem, runs_on_cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in cuda_problem()
    assert runs_on_cpu(Recipe.model_validate({"launch": {"cpu": True}})) is True  # asked for: fine


@pytest.mark.slow
def test_ranks_of_a_gpu_job_on_a_node_without_gpus_stop_with_the_reason(tmp_path):
    """An srun step without GPUs: the rendered (GPU) command runs on a CPU-only node.

    The check and its message are the rank's (distributed.runs_on_cpu): the rank comes from the
    rank harness, which runs command.sh in the srun step's environment (no supervisor) up to its
    ``accelerate launch``, and Accelerate's own launch code, then forks the rank it would start."""
    import contextlib
    import io

    import rankharness

    run_dir = tmp_path / "run"
    rendered = run_cli_in_process(
        "full", "--model", "tiny-t5", "--data", "sample", "--output", str(run_dir), "--dry-run"
    )
    assert rendered.returncode == 0, rendered.stderr
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        code = rankharness.run_ranks(run_dir, env=cli_env(CUDA_VISIBLE_DEVICES="0"), timeout=120)
    output = console.getvalue()
    assert code != 0
    assert "no usable GPU" in output and "pass --cpu" in output
    assert "training:" not in output and not (run_dir / "metrics.jsonl").exists()


@pytest.fixture
def bart_dir(tmp_path):
    """A non-T5 seq2seq model directory (fp16 is allowed for it)."""
    from transformers import BartConfig

    directory = tmp_path / "tiny-bart"
    BartConfig(
        vocab_size=100,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
    ).save_pretrained(directory)
    return directory


def test_fp16_for_a_non_t5_model_is_fp16_under_ddp_and_deepspeed(tmp_path, bart_dir):
    ddp = run_cli_in_process(
        "full",
        "--gpus",
        "2",
        "--model",
        str(bart_dir),
        "--data",
        "sample",
        "--set",
        "model.precision=fp16",
        "--output",
        str(tmp_path / "ddp"),
        "--dry-run",
    )
    assert ddp.returncode == 0, ddp.stderr
    assert yaml.safe_load((tmp_path / "ddp" / "accelerate.yaml").read_text())["mixed_precision"] == "fp16"
    zero = run_cli_in_process(
        "full",
        "--gpus",
        "2",
        "--zero",
        "2",
        "--model",
        str(bart_dir),
        "--data",
        "sample",
        "--set",
        "model.precision=fp16",
        "--output",
        str(tmp_path / "zero"),
        "--dry-run",
    )
    assert zero.returncode == 0, zero.stderr
    config = json.loads((tmp_path / "zero" / "deepspeed.json").read_text())
    assert config["torch_autocast"] == {
        "enabled": True,
        "dtype": "float16",
        "lower_precision_safe_modules": [],
    }
    assert config["communication_data_type"] == "fp32"


def test_fp16_is_refused_on_cpu_ranks_and_for_t5(tmp_path, bart_dir):
    on_cpu = run_cli_in_process(
        "full",
        "--cpu",
        "--model",
        str(bart_dir),
        "--data",
        "sample",
        "--set",
        "model.precision=fp16",
        "--output",
        str(tmp_path / "cpu"),
        "--dry-run",
    )
    assert on_cpu.returncode == 2 and "fp16 needs GPU ranks" in on_cpu.stderr
    t5 = run_cli_in_process(
        "full",
        "--model",
        "tiny-t5",
        "--data",
        "sample",
        "--set",
        "model.precision=fp16",
        "--output",
        str(tmp_path / "t5"),
        "--dry-run",
    )
    assert t5.returncode == 2 and "overflows T5" in t5.stderr


def test_fp32_recipes_render_no_autocast(tmp_path):
    result = run_cli_in_process(
        "full",
        "--gpus",
        "2",
        "--zero",
        "3",
        "--model",
        "tiny-t5",
        "--data",
        "sample",
        "--set",
        "model.precision=fp32",
        "--output",
        str(tmp_path / "run"),
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "run" / "deepspeed.json").read_text())
    assert "torch_autocast" not in config and not config["bf16"]["enabled"] and not config["fp16"]["enabled"]
