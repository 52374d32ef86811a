"""train.gradient_checkpointing under the strategies test_real_model.py does not cover.

test_real_model.py already checks DDP and ZeRO-3 (full, against a plain loop) and LoRA under
DDP with and without checkpointing. This file adds ZeRO-2 (DeepSpeed's stage_1_and_2 engine,
shared by ZeRO-1), FSDP2 (checkpointing wraps each T5 block before ``fully_shard`` does, so the
recomputed forward re-gathers the sharded weights) and LoRA under ZeRO-3 (frozen embeddings,
partitioned base weights): for each, one fp32 run without and one with checkpointing, dropout
off, the same seed and data.

Why the tolerance: recomputation repeats the same operations on the same values, so the two runs
differ at most by the order in which fp32 gradient contributions are summed (the recomputed
graph's backward may reach a shared weight, the tied embedding, in another order). The losses
agree to rel 1e-5. The weights are compared as test_real_model.py compares two fine-tunes that
agree up to summation order: |ours - theirs| / |theirs - initial| below SAME = 1e-4 (measured
there < 1e-5; a defect such as a per-micro-batch mean lands above 1e-2). An elementwise bound
(conftest.assert_same_final_weights, rtol 1e-5, meant for bitwise-equal resumes) flags Adam's
amplification of ~1e-7 rounding gaps in coordinates whose gradient is near zero: seen here, 2
of 4096 elements of one ZeRO-2 matrix 4e-6 apart after 4 steps at lr 1e-2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import read_jsonl, run_cli_harness
from safetensors.torch import load_file
from test_fsdp import SAME, tiny_initial_weights, update_error

pytestmark = pytest.mark.slow

# 4 steps at a large learning rate, no clipping, constant schedule, dropout off: every update
# shows in the weights; fp32 so that only summation order could separate the two runs.
TRAINING = (
    *("--set", "model.precision=fp32", "--set", "model.dropout=0.0", "--set", "lora.dropout=0.0"),
    *("--set", "train.lr=1e-2", "--set", "train.max_steps=4", "--set", "train.scheduler=constant"),
    *("--set", "train.max_grad_norm=null", "--set", "train.micro_batch_size=4"),
    *("--set", "train.log_every=1", "--set", "train.checkpoint_every=null"),
    *("--set", "eval.after_training=false", "--set", "train.seed=42"),
)
# name: (method, strategy flags, saved weights file)
STRATEGIES = {
    "zero2-full": ("full", ("--zero", "2"), "model.safetensors"),
    "fsdp2-full": ("full", ("--fsdp",), "model.safetensors"),
    "zero3-lora": ("lora", ("--zero", "3"), "adapter_model.safetensors"),
}


def fine_tune(out: Path, method: str, flags: tuple[str, ...], checkpointing: bool) -> str:
    result = run_cli_harness(
        method,
        *("--cpu", "--gpus", "2", "--model", "tiny-t5", "--data", "sample", "--output", str(out)),
        *flags,
        *TRAINING,
        *("--set", f"train.gradient_checkpointing={str(checkpointing).lower()}"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module", params=list(STRATEGIES))
def pair(request, tmp_path_factory):
    """(name, run without, run with checkpointing, output with): trained once per strategy."""
    method, flags, _ = STRATEGIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    fine_tune(root / "plain", method, flags, checkpointing=False)
    output = fine_tune(root / "checkpointed", method, flags, checkpointing=True)
    return request.param, root / "plain", root / "checkpointed", output


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row]


def test_checkpointing_is_on_and_trains_to_the_same_weights(pair):
    name, plain, checkpointed, output = pair
    file = STRATEGIES[name][2]
    # The run reports checkpointing read from the model, so the switch reached the layers.
    assert "gradient checkpointing on" in output, output[-3000:]
    assert len(losses(checkpointed)) == 4
    assert losses(checkpointed) == pytest.approx(losses(plain), rel=1e-5)
    ours = load_file(str(checkpointed / "final" / file))
    theirs = load_file(str(plain / "final" / file))
    assert ours.keys() == theirs.keys() and ours
    if STRATEGIES[name][0] == "lora":  # as test_real_model.py's LoRA pair under DDP
        assert any("lora_B" in k and v.abs().max() > 1e-3 for k, v in theirs.items())
        for key, trained in theirs.items():  # B starts at zero: its norm is how far it moved
            assert (ours[key] - trained).double().norm() <= SAME * trained.double().norm(), key
    else:
        assert update_error(ours, theirs, tiny_initial_weights()) < SAME
