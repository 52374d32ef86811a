"""`--zero auto` and `ftlaunch estimate` through the real CLI."""

from __future__ import annotations

import json

from conftest import run_cli_in_process

from launcher.estimate import RunShape, estimate_model, recommend


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
