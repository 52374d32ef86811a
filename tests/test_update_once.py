"""One optimizer step per accumulation window (train.train_step), through Accelerate's public API.

In one process, without launching ranks: a window of three micro-batches calls the prepared
optimizer's ``step`` and ``zero_grad`` and the schedule's ``step`` once each (they used to be
called on every micro-batch and skipped by Accelerate), never Accelerate's private
``GradientState._set_sync_gradients``, and the window's gradient is the one a plain loop computes
for the token-weighted loss. The multi-rank equivalences (2 ranks == 1 rank with accumulation,
per strategy) are in test_training.py, test_real_model.py and test_fsdp.py.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from launcher.core.recipe_loading import build_recipe, default_recipe_path, load_recipe
from launcher.rank import train
from launcher.rank.distributed import build_accelerator
from launcher.rank.loaders import build_collator
from launcher.rank.model import build_model, load_tokenizer, set_dropout
from launcher.rank.optimization import build_optimizer, build_scheduler

WINDOW = 3  # micro-batches of one optimizer step


def tiny_recipe():
    raw = load_recipe(default_recipe_path("full")).model_dump(mode="json")
    raw["model"].update(name="tiny-t5", precision="fp32")
    raw["data"]["dataset"] = "sample"
    raw["launch"].update(cpu=True, gpus=1)
    raw["train"].update(grad_accum=WINDOW, max_grad_norm=1.0, lr=1e-3)
    return build_recipe(raw, "test")


def micro_batches(tokenizer, model) -> list[dict]:
    """Three micro-batches of different lengths (so their token counts differ)."""
    generator = torch.Generator().manual_seed(0)
    collator = build_collator(tokenizer, False, model)
    batches = []
    for size, source, target in ((2, 9, 4), (3, 14, 7), (1, 5, 3)):
        examples = [
            {
                "input_ids": torch.randint(3, len(tokenizer), (source - i,), generator=generator).tolist(),
                "labels": torch.randint(3, len(tokenizer), (target + i,), generator=generator).tolist(),
            }
            for i in range(size)
        ]
        batches.append(collator(examples))
    return batches


def counting(target, name: str, calls: Counter) -> None:
    """Count the calls of ``target.name`` (an instance attribute shadows the method)."""
    method = getattr(target, name)

    def counted(*args, **kwargs):
        calls[f"{type(target).__name__}.{name}"] += 1
        return method(*args, **kwargs)

    setattr(target, name, counted)


@pytest.fixture
def prepared():
    recipe = tiny_recipe()
    accelerator = build_accelerator(recipe)
    tokenizer = load_tokenizer(recipe)
    model = build_model(recipe, len(tokenizer))
    set_dropout(model, 0.0)  # the reference below runs the same forward passes again
    optimizer = build_optimizer(model, recipe, accelerator.device)
    scheduler = build_scheduler(optimizer, recipe, total_steps=10)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    try:
        yield SimpleNamespace(
            accelerator=accelerator,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            recipe=recipe,
            batches=micro_batches(tokenizer, model),
        )
    finally:
        AcceleratorState._reset_state(True)


def test_a_window_steps_the_optimizer_zero_grad_and_schedule_once(prepared, monkeypatch):
    def private(self, sync):
        raise AssertionError("train_step used Accelerate's private GradientState._set_sync_gradients")

    monkeypatch.setattr(GradientState, "_set_sync_gradients", private)
    calls = Counter()
    for target, name in (
        (prepared.optimizer, "step"),
        (prepared.optimizer, "zero_grad"),
        (prepared.scheduler, "step"),
    ):
        counting(target, name, calls)
    before = [p.detach().clone() for p in prepared.model.parameters()]

    result = train.train_step(prepared, prepared.batches)

    assert calls == {
        "AcceleratedOptimizer.step": 1,
        "AcceleratedOptimizer.zero_grad": 1,
        "AcceleratedScheduler.step": 1,
    }
    # The update really happened, once: AdamW's step count is 1 and every weight moved.
    inner = prepared.optimizer.optimizer
    assert {int(inner.state[p]["step"]) for p in prepared.model.parameters()} == {1}
    assert all(not torch.equal(p, b) for p, b in zip(prepared.model.parameters(), before, strict=True))
    assert all(p.grad is None for p in prepared.model.parameters())  # zeroed after the update
    assert prepared.accelerator.sync_gradients  # left True for whatever runs after the window
    assert int(result.target_tokens) == sum(int((b["labels"] != -100).sum()) for b in prepared.batches)


def test_the_windows_gradient_is_the_token_weighted_loss_of_a_plain_loop(prepared):
    """The norm train_step clips is the norm of grad(sum of the window's token CEs / its tokens).

    Both sides compute the same fp32 gradients; the product backpropagates each micro-batch with
    the factor (accumulation / tokens) that Accelerate then divides by the accumulation, and adds
    the three micro-batches' gradients up in the parameters' .grad, where the reference
    backpropagates one summed loss. Each gradient element therefore differs by a few fp32
    roundings (2^-24 relative each), and so does their norm: 1e-5 relative is ~100 ulps of room,
    far below what a wrong weighting moves it (the mean of micro-batch means instead of the token
    mean makes it 25% larger with these micro-batches of 9, 24 and 3 target tokens).
    """
    model = prepared.model
    reference = sum(train.summed_cross_entropy(model, batch)[0] for batch in prepared.batches)
    tokens = sum((batch["labels"] != -100).sum() for batch in prepared.batches)
    (reference / tokens).backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    for p in model.parameters():
        p.grad = None

    result = train.train_step(prepared, prepared.batches)

    assert float(result.grad_norm) == pytest.approx(float(expected), rel=1e-5)
    assert float(result.loss_sum) == pytest.approx(float(reference.detach()), rel=1e-6)


def scheduled_lrs(recipe, total_steps: int) -> list[float]:
    """The learning rate of each optimizer step under the recipe's schedule (peak lr 1)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_scheduler(optimizer, recipe, total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_steps_warm_up_for_that_many_steps_like_the_equivalent_ratio():
    """train.warmup_steps=3 of 12 steps: lr t/3 while warming up, then linear decay to 0 at step
    12 (the formula, written out); the same as train.warmup_ratio=0.25."""
    raw = tiny_recipe().model_dump(mode="json")
    raw["train"].update(scheduler="linear", warmup_ratio=0.0, warmup_steps=3)
    by_steps = scheduled_lrs(build_recipe(raw, "test"), 12)
    expected = [t / 3 if t < 3 else (12 - t) / 9 for t in range(12)]
    assert by_steps == pytest.approx(expected, abs=1e-12)
    raw["train"].update(warmup_ratio=0.25, warmup_steps=None)
    assert scheduled_lrs(build_recipe(raw, "test"), 12) == by_steps


def test_warmup_steps_and_a_warmup_ratio_together_are_refused():
    from launcher.core.errors import UserError

    raw = tiny_recipe().model_dump(mode="json")
    raw["train"].update(warmup_ratio=0.1, warmup_steps=5)
    with pytest.raises(
        UserError, match=r"train.warmup_steps=5 and train.warmup_ratio=0.1 both set the warm-up"
    ):
        build_recipe(raw, "test")


def test_adam_settings_reach_the_optimizer_and_its_update():
    """train.adam_beta1/adam_beta2/adam_epsilon: two AdamW steps on one weight without decay follow
    the update rule written out (bias-corrected moments), with the recipe's values, not torch's
    defaults; with a tiny second moment, epsilon dominates the step, so a wrong epsilon shows."""
    raw = tiny_recipe().model_dump(mode="json")
    raw["train"].update(adam_beta1=0.5, adam_beta2=0.75, adam_epsilon=1e-3, weight_decay=0.0, lr=0.1)
    recipe = build_recipe(raw, "test")
    model = torch.nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(1.0)
    optimizer = build_optimizer(model, recipe)
    assert optimizer.param_groups[0]["betas"] == (0.5, 0.75) and optimizer.param_groups[0]["eps"] == 1e-3
    m = v = 0.0
    weight = 1.0
    for step, grad in enumerate((1e-3, -2e-3), start=1):
        model.weight.grad = torch.full_like(model.weight, grad)
        optimizer.step()
        m, v = 0.5 * m + 0.5 * grad, 0.75 * v + 0.25 * grad**2
        m_hat, v_hat = m / (1 - 0.5**step), v / (1 - 0.75**step)
        weight -= 0.1 * m_hat / (v_hat**0.5 + 1e-3)
        # fp32 weight: a few roundings of ~6e-8 each per step, well inside 1e-6 of a weight near 1
        assert model.weight.item() == pytest.approx(weight, rel=1e-6)


def test_adam_settings_with_adafactor_are_refused():
    from launcher.core.errors import UserError

    raw = tiny_recipe().model_dump(mode="json")
    raw["train"].update(optimizer="adafactor", adam_beta2=0.98)
    with pytest.raises(
        UserError, match=r"train.adam_beta2=0.98 applies to train.optimizer=adamw, not adafactor"
    ):
        build_recipe(raw, "test")


def optimizer_and_schedule(**train):
    """tiny-t5's optimizer and linear schedule (10 steps) for a recipe with these train.* values."""
    raw = tiny_recipe().model_dump(mode="json")
    raw["train"].update(scheduler="linear", **train)
    recipe = build_recipe(raw, "test")
    model = build_model(recipe, 100)
    optimizer = build_optimizer(model, recipe)
    return model, optimizer, build_scheduler(optimizer, recipe, total_steps=10)


def test_a_resume_trains_with_the_recipes_lr_and_decay_at_the_checkpoints_schedule_position():
    """Loading a checkpoint restores the optimizer groups' settings and the schedule's base rates of
    the run that wrote it; the recipe's (here: lr 1e-2 instead of 1e-3, weight decay 0.1 instead of
    0.01, AdamW's beta2 and epsilon) are put back, and the step's rate is the new peak times the
    schedule factor of the checkpoint's step (linear decay: (10 - 4) / 10 at step 4)."""
    model, optimizer, scheduler = optimizer_and_schedule(lr=1e-3, weight_decay=0.01)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    saved = optimizer.state_dict(), scheduler.state_dict()
    _, resumed, resumed_schedule = optimizer_and_schedule(
        lr=1e-2, weight_decay=0.1, adam_beta2=0.98, adam_epsilon=1e-6
    )
    from launcher.rank.optimization import reapply_recipe_settings, recipe_group_settings

    built = recipe_group_settings(resumed)
    resumed.load_state_dict(saved[0])
    resumed_schedule.load_state_dict(saved[1])
    assert resumed.param_groups[0]["lr"] == pytest.approx(1e-3 * 6 / 10)  # the checkpoint's, as loaded
    changes = reapply_recipe_settings(resumed, resumed_schedule, built)
    assert changes == [
        "train.lr 0.001 -> 0.01",
        "train.weight_decay 0.01 -> 0.1",
        "train.adam_beta1/adam_beta2 0.9/0.999 -> 0.9/0.98",
        "train.adam_epsilon 1e-08 -> 1e-06",
    ]
    assert [group["lr"] for group in resumed.param_groups] == pytest.approx([1e-2 * 6 / 10] * 2)
    assert [group["weight_decay"] for group in resumed.param_groups] == [0.1, 0.0]
    assert resumed.param_groups[0]["betas"] == (0.9, 0.98) and resumed.param_groups[1]["eps"] == 1e-6
    resumed.step()
    resumed_schedule.step()
    assert resumed.param_groups[0]["lr"] == pytest.approx(1e-2 * 5 / 10)  # the next step follows the new peak
    assert reapply_recipe_settings(resumed, resumed_schedule, recipe_group_settings(resumed)) == []
