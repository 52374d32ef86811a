"""`--zero auto` and `ftlaunch estimate` through the real CLI."""

from __future__ import annotations

import json

from conftest import run_cli_in_process

from launcher.host.estimate import RunShape, estimate_model, recommend


def test_zero_auto_picks_the_recommended_stage_and_says_so(tmp_path):
    expected = recommend(estimate_model("google/flan-t5-xxl", RunShape(gpus=8, micro_batch=8)), 80.0)
    assert expected.stage > 0  # xxl does not fit one 80 GiB GPU with plain DDP
    out = tmp_path / "xxl"
    result = run_cli_in_process(
        "full",
        "--zero",
        "auto",
        "--gpu-mem",
        "80",
        "--model",
        "google/flan-t5-xxl",
        "--gpus",
        "8",
        "--dry-run",
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "zero auto" in result.stdout and expected.label in result.stdout
    config = json.loads((out / "deepspeed.json").read_text())
    assert config["zero_optimization"]["stage"] == expected.stage
    offloaded = config["zero_optimization"].get("offload_optimizer", {}).get("device", "none") == "cpu"
    assert offloaded == (expected.offload != "none")


def test_zero_auto_keeps_ddp_for_a_model_that_fits(tmp_path):
    out = tmp_path / "base"
    result = run_cli_in_process(
        "lora",
        "--zero",
        "auto",
        "--gpu-mem",
        "80",
        "--model",
        "google/flan-t5-base",
        "--gpus",
        "4",
        "--dry-run",
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "DDP" in result.stdout and not (out / "deepspeed.json").exists()


def test_estimate_command_prints_every_stage_and_a_recommendation():
    result = run_cli_in_process("estimate", "--model", "flan-t5-xl", "--gpus", "8", "--gpu-mem", "40")
    assert result.returncode == 0, result.stderr
    for label in ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3", "offload full"):
        assert label in result.stdout
    assert "recommended" in result.stdout
    table = run_cli_in_process("estimate", "--model", "flan-t5-all")
    assert table.returncode == 0 and "flan-t5-xxl" in table.stdout and "flan-t5-small" in table.stdout


def test_fsdp_zero_auto_picks_fsdp_offload_that_fits_and_estimate_lists_fsdp(tmp_path):
    """xxl full fine-tuning on 2 x 40 GiB: FSDP2's fp32 shards (16 bytes x 11.1e9 / 2) do not
    fit, so --zero auto keeps --fsdp and adds --offload full; the estimate table shows both rows."""
    rows = estimate_model("google/flan-t5-xxl", RunShape(gpus=2, micro_batch=1), fsdp=True)
    fsdp = {row.offload: row for row in rows if row.fsdp}
    assert fsdp["none"].model_states_gib * 2**30 > 16 * 11_135_332_352 / 2
    assert fsdp["full"].model_states_gib < fsdp["none"].model_states_gib / 10
    assert recommend(rows, 40.0).fsdp is False  # the DeepSpeed recommendation never picks FSDP rows
    out = tmp_path / "xxl"
    args = ["--model", "google/flan-t5-xxl", "--gpus", "2", "--set", "train.micro_batch_size=1"]
    result = run_cli_in_process(
        "full", "--fsdp", "--zero", "auto", "--gpu-mem", "40", *args, "--dry-run", "--output", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert "FSDP2 + offload full" in result.stdout and not (out / "deepspeed.json").exists()
    assert "fsdp_offload_params: true" in (out / "accelerate.yaml").read_text()
    table = run_cli_in_process("estimate", "--model", "flan-t5-xl", "--gpus", "8", "--gpu-mem", "40")
    assert "| FSDP2 | `--fsdp` |" in table.stdout and "`--fsdp --offload full`" in table.stdout


def test_zero_auto_sizes_activations_by_the_token_budget(tmp_path):
    """A token budget bounds a micro-batch's activations: --zero auto sizes them as the budget
    filled with the longest examples (32768 / (512 + 128) -> 52 of them), not as
    train.micro_batch_size; flan-t5-base on 4 x 40 GiB then needs ZeRO-1 where 8 examples fit DDP."""
    shape = RunShape(gpus=4, micro_batch=52, micro_batch_tokens=32768)
    expected = recommend(estimate_model("google/flan-t5-base", shape), 40.0)
    assert expected.stage == 1
    assert recommend(estimate_model("google/flan-t5-base", RunShape(gpus=4)), 40.0).stage == 0
    out = tmp_path / "budget"
    result = run_cli_in_process(
        *("full", "--zero", "auto", "--gpu-mem", "40", "--model", "google/flan-t5-base", "--gpus", "4"),
        *("--set", "train.micro_batch_tokens=32768", "--dry-run", "--output", str(out)),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 1


def test_estimate_command_takes_a_token_budget():
    budget = run_cli_in_process("estimate", "--micro-batch-tokens", "32768", "--gpu-mem", "80")
    assert budget.returncode == 0, budget.stderr
    assert "micro batch 52 (token budget 32768), 512/128 tokens" in budget.stdout
    fixed = run_cli_in_process("estimate", "--micro-batch", "52", "--gpu-mem", "80")
    assert budget.stdout.split("\n", 1)[1] == fixed.stdout.split("\n", 1)[1]  # same rows
    small = run_cli_in_process("estimate", "--micro-batch-tokens", "600")
    assert small.returncode == 2
    assert "--micro-batch-tokens 600" in small.stderr and "at least 640" in small.stderr


def test_nothing_fits_advice_is_for_this_run(tmp_path):
    """A DoRA run that fits 6 GiB only with gradient checkpointing, a smaller micro batch or FSDP2:
    those are named with what would then fit, LoRA is not (it is one already); the smallest
    candidate is named as a ZeRO/DDP choice (FSDP2's rows are not candidates without --fsdp)."""
    args = ["--zero", "auto", "--gpu-mem", "6", "--model", "google/flan-t5-base", "--dry-run"]
    result = run_cli_in_process(
        "lora", *args, "--set", "lora.use_dora=true", "--output", str(tmp_path / "dora")
    )
    assert result.returncode == 2
    error = result.stderr.strip()
    assert error.count("\n") == 0 and error.startswith("error: nothing fits in 6 GiB per GPU")
    assert "the smallest ZeRO/DDP choice is DDP" in error
    assert "would fit: --set train.gradient_checkpointing=true (DDP at 1.7 GiB)" in error
    assert "--fsdp (FSDP2 + offload full" in error and "train.micro_batch_size=" in error
    assert "LoRA" not in error and "more GPUs" not in error  # DDP's per-GPU memory does not shrink
    checkpointed = run_cli_in_process(
        "lora", *args, "--set", "lora.use_dora=true", "--set", "train.gradient_checkpointing=true",
        "--output", str(tmp_path / "checkpointed"),
    )  # fmt: skip
    assert checkpointed.returncode == 0, checkpointed.stderr


def test_nothing_fits_advice_for_full_fine_tuning_names_lora(tmp_path):
    result = run_cli_in_process(
        "full", "--zero", "auto", "--gpu-mem", "16", "--model", "google/flan-t5-xxl", "--dry-run",
        "--output", str(tmp_path / "xxl"),
    )  # fmt: skip
    assert result.returncode == 2
    assert "LoRA (ftlaunch lora)" in result.stderr and "gradient_checkpointing=true" in result.stderr
