"""train.optimizer=adafactor under ZeRO-2 and ZeRO-3 (DeepSpeed's client-optimizer path).

DeepSpeed hands the optimizer each rank's flat 1-D fp32 partition of every parameter group, so
Adafactor there is unfactored, and ftlaunch turns its per-tensor update clipping off (an RMS over
a partition would depend on the world size and stage; launcher/rank/train.py ``adafactor``). The
independent reference is a plain single-process loop (test_real_model.py's) in which every
parameter is a flat 1-D leaf tensor, viewed into the model's shapes with
``torch.func.functional_call``: transformers' Adafactor, with the same arguments, then sees 1-D
tensors, as under ZeRO, and has nothing to factor, on any world size.

Tolerance: the same SAME = 1e-4 (relative to how far training moved the weights) that
test_real_model.py holds every fp32 strategy to against the plain loop: the two differ only in
the order of fp32 sums (gradient all-reduce, micro-batches). The factored DDP Adafactor ends far
outside it (checked below), so the comparison sees which Adafactor ran.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_real_model import (
    DEFECT,
    LR,
    SAME,
    SEED,
    SHAPES,
    STEPS,
    WEIGHT_DECAY,
    final_weights,
    fine_tune,
    initial_weights,
    model_dir,  # noqa: F401 (the module-scoped fixture, shared by import)
    padded,
    reference_training,
    step_losses,
    tokenized_sample,
    update_error,
)

pytestmark = pytest.mark.slow

ADAFACTOR = ("--set", "train.optimizer=adafactor")
REPORT = ("--set", "eval.after_training=true", "--set", "eval.limit=4", "--set", "eval.max_new_tokens=8")


def flat_adafactor_reference(directory: Path) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Plain PyTorch: each step ONE batch of the step's 8 examples (the product's data order),
    token-mean cross-entropy, transformers' Adafactor (lr, no relative step, no parameter
    scaling, clip_threshold inf) over 1-D copies of every parameter, decay on matrices only."""
    from torch.func import functional_call
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.optimization import Adafactor

    from launcher.rank.data import LengthGroupedBatchSampler, batching_keys

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(directory), dtype=torch.float32, dropout_rate=0.0)
    model.train()
    shapes = {name: p.shape for name, p in model.named_parameters()}
    flat = {name: p.detach().reshape(-1).clone().requires_grad_() for name, p in model.named_parameters()}
    decay = [p for n, p in flat.items() if len(shapes[n]) >= 2 and "norm" not in n]
    no_decay = [p for n, p in flat.items() if not (len(shapes[n]) >= 2 and "norm" not in n)]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = Adafactor(
        groups,
        lr=LR,
        scale_parameter=False,
        relative_step=False,
        warmup_init=False,
        clip_threshold=float("inf"),
    )
    examples = tokenized_sample(tokenizer)
    columns = {"input_ids": [e["input_ids"] for e in examples], "labels": [e["labels"] for e in examples]}
    losses = []
    for step in LengthGroupedBatchSampler(batching_keys(columns), 8, SEED, True).steps()[:STEPS]:
        batch = padded([examples[i] for i in step], tokenizer.pad_token_id)
        weights = {name: value.view(shapes[name]) for name, value in flat.items()}
        logits = functional_call(
            model,
            weights,
            args=(),
            kwargs={k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")},
        ).logits
        labels = batch["labels"].view(-1)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), labels, ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    weights = {name: value.detach().view(shapes[name]).clone() for name, value in flat.items()}
    return weights, losses


@pytest.fixture(scope="module")
def reference(model_dir):  # noqa: F811
    return flat_adafactor_reference(model_dir)


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_adafactor_under_zero_is_unfactored_adafactor_of_a_plain_loop(tmp_path, model_dir, reference, name):  # noqa: F811
    """2 ranks under ZeRO-2 / ZeRO-3: the flat-parameter loop's losses and weights, loss
    decreasing, final/ saved and the report written; the factored (DDP) Adafactor is far away."""
    weights, losses = reference
    run_dir = tmp_path / "run"
    output = fine_tune(model_dir, run_dir, SHAPES[name], "fp32", *ADAFACTOR, *REPORT)
    assert "optimizer: Adafactor lr" in output
    assert step_losses(run_dir) == pytest.approx(losses, rel=1e-5)
    assert losses[-1] < losses[0]
    ours, initial = final_weights(run_dir), initial_weights(model_dir)
    assert weights.keys() <= ours.keys()  # named_parameters lists the tied embedding once
    assert update_error({k: ours[k] for k in weights}, weights, initial) < SAME
    factored, _, _, _ = reference_training(model_dir, optimizer="adafactor")
    assert update_error({k: factored[k] for k in weights}, weights, initial) > DEFECT
    assert (run_dir / "report" / "report.md").is_file()
    assert (run_dir / "final" / "model.safetensors").is_file()
