"""--fsdp (PyTorch FSDP2) on 2 CPU ranks (gloo), through the real CLI, on the embedded tiny model.

References are independent of the FSDP path: a DDP run of the same recipe (final weights), plain
transformers / PEFT reloading ``final/`` (validation loss recomputed one example at a time), and
an uninterrupted FSDP run for resume.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_same_final_weights, read_jsonl, run_cli_harness
from safetensors.torch import load_file
from test_training import (
    SAMPLE,
    final_val_loss,
    interrupt_after,
    losses,
    reference_val_loss,
    reload_final,
    tiny_tokenizer,
    train,
    train_args,
)

pytestmark = pytest.mark.slow

# Two fp32 fine-tunes that agree up to summation order (test_real_model.py: DDP vs ZeRO-2/3).
SAME = 1e-4


def update_error(ours: dict, theirs: dict, initial: dict) -> float:
    """|ours - theirs| relative to how far training moved the weights (as test_real_model.py)."""
    gap = sum(((ours[k] - theirs[k]).double() ** 2).sum() for k in theirs)
    moved = sum(((theirs[k] - initial[k]).double() ** 2).sum() for k in theirs)
    return float((gap / moved).sqrt())


def tiny_initial_weights() -> dict[str, torch.Tensor]:
    from launcher.rank.model import build_tiny_t5

    return {k: v.detach().clone() for k, v in build_tiny_t5(len(tiny_tokenizer())).state_dict().items()}


def validation_rows() -> list[dict]:
    return [json.loads(line) for line in (SAMPLE / "validation.jsonl").read_text().splitlines()]


def test_fsdp_full_matches_ddp_reloads_and_reports(tmp_path):
    """One FSDP run: DDP's weights, a final/ that plain transformers reloads, and the report."""
    common = ("--set", "train.lr=2e-3", "--set", "train.max_steps=4")
    ddp = train("full", tmp_path / "ddp", *common)
    report = ("--set", "eval.after_training=true", "--set", "eval.limit=4", "--set", "eval.max_new_tokens=8")
    fsdp = train("full", tmp_path / "fsdp", *common, *report, "--fsdp")

    run_dir = tmp_path / "fsdp"
    assert "distributed_type: FSDP" in (run_dir / "accelerate.yaml").read_text()
    checkpoint = run_dir / "checkpoints" / "step_4"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()  # sharded (DCP), not one gathered file
    assert not (checkpoint / "model.safetensors").exists()

    ours = load_file(str(run_dir / "final" / "model.safetensors"))
    theirs = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert {t.dtype for t in ours.values()} == {torch.float32}
    assert update_error(ours, theirs, tiny_initial_weights()) < SAME
    assert losses(fsdp) == pytest.approx(losses(ddp), rel=1e-4, abs=1e-5)

    model = reload_final(run_dir, "full")
    expected = reference_val_loss(model, tiny_tokenizer(), validation_rows())
    assert final_val_loss(fsdp) == pytest.approx(expected, rel=1e-4)

    scores = json.loads((run_dir / "report" / "rouge.json").read_text())
    assert (run_dir / "report" / "report.md").is_file()
    for name in ("original", "finetuned"):
        assert len(read_jsonl(run_dir / "eval" / name / "predictions.jsonl")) == 4
    assert scores, scores


def test_fsdp_lora_resume_equals_uninterrupted_run_and_reloads_in_peft(tmp_path):
    """All three runs (the reference, the interrupted one and its resume) have their ranks from the
    rank harness: the subject is what FSDP2 checkpoints and resumes; the interruption is SIGUSR1
    to the ranks, which stop by themselves (test_training.interrupt_after)."""
    common = (
        "--set",
        "train.epochs=4",
        "--set",
        "train.lr=1e-2",
        "--set",
        "train.checkpoint_every=1000",
        "--fsdp",
    )
    reference = train("lora", tmp_path / "reference", *common)

    run_dir = tmp_path / "interrupted"
    args = train_args("lora", run_dir, *common)
    stopped = interrupt_after(run_dir, args, step=3)
    assert stopped.returncode != 0, stopped.stdout[-3000:]
    assert (run_dir / "INTERRUPTED").is_file(), stopped.stdout[-3000:]
    saved_step = int((run_dir / "INTERRUPTED").read_text().strip().split("_")[1])
    assert 3 <= saved_step < 32, "the run finished before the signal: make it longer"

    resumed = run_cli_harness(*args, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [row["step"] for row in metrics if "loss" in row] == list(range(1, 33))
    assert losses(metrics) == pytest.approx(losses(reference), rel=1e-5, abs=1e-6)

    ours = assert_same_final_weights(run_dir, tmp_path / "reference", "adapter_model.safetensors")
    assert any("lora_B" in key for key in ours)
    assert any(t.abs().sum() > 0 for key, t in ours.items() if "lora_B" in key)

    model = reload_final(run_dir, "lora")
    expected = reference_val_loss(model, tiny_tokenizer(), validation_rows())
    assert final_val_loss(metrics) == pytest.approx(expected, rel=1e-4)
