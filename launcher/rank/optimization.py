"""The optimizer and the learning-rate schedule of a run, built from its recipe before
``accelerator.prepare`` wraps them: AdamW (fused where the device has the kernel) or Adafactor,
weight decay on matrices only, warmup then one of transformers' schedules, and the number of optimizer
steps the schedule spans.
"""

from __future__ import annotations

import functools
import math

import torch

from launcher.core.recipe import SCHEDULE_OPTIONS, WHOLE, Recipe


def true_shape(param: torch.nn.Parameter) -> torch.Size:
    """A parameter's real shape, also under ZeRO-3, whose ``zero.Init`` leaves an empty 1-D
    placeholder in ``param`` and the shape in ``ds_shape``."""
    return getattr(param, "ds_shape", param.shape)


def decays(name: str, param: torch.nn.Parameter) -> bool:
    """Weight decay on matrices only: not on biases and layer norms (as in HF's Trainer)."""
    return len(true_shape(param)) >= 2 and "norm" not in name.lower()


def build_optimizer(
    model: torch.nn.Module, recipe: Recipe, device: torch.device | None = None
) -> torch.optim.Optimizer:
    """The recipe's optimizer with two groups: decayed matrices, and undecayed biases and norms.
    ``device`` is where the parameters will live once prepared (they are still on the CPU here)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": recipe.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if recipe.train.optimizer == "adafactor":
        return adafactor(groups, recipe.train.lr, flat_partitions=bool(recipe.launch.zero))
    train = recipe.train
    return torch.optim.AdamW(
        groups,
        lr=train.lr,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_epsilon,
        **adamw_options(recipe, device),
    )


def adafactor(groups: list[dict], lr: float, flat_partitions: bool = False) -> torch.optim.Optimizer:
    """transformers' Adafactor with the recipe's learning rate and schedule (what Seq2SeqTrainer's
    ``optim="adafactor"`` builds): no relative step or parameter scaling of its own, no first
    moment, update clipping at RMS 1.

    ``flat_partitions`` (ZeRO-1/2/3): DeepSpeed steps the client optimizer on each rank's flat 1-D
    fp32 partition of every group, so Adafactor cannot factor (it factors >= 2-D tensors only) and
    its update clipping would take the RMS over whatever slice of the model a rank holds, which
    changes with the world size and the stage. There the clipping is off (threshold inf): each
    element gets lr x g / sqrt(v) with Adafactor's decay schedule for v, the same on any number
    of ranks and stages (tests/test_adafactor_zero.py checks it against a plain loop)."""
    from transformers.optimization import Adafactor

    clip = float("inf") if flat_partitions else 1.0
    return Adafactor(
        groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False, clip_threshold=clip
    )


def adamw_options(recipe: Recipe, device: torch.device | None = None) -> dict:
    """torch's fused AdamW kernel where the optimizer steps on a device that has one.

    torch's defaults step AdamW per tensor on the CPU (about ten ATen ops and a host read of the
    step count per parameter tensor) and with its multi-tensor ``foreach`` path on CUDA (a dozen
    kernel launches per group of tensors); the fused kernel does the whole update in one op per
    group, with the same arithmetic up to fp32 rounding (tests/test_host_syncs.py compares it
    with the per-tensor loop). Used:

    - ZeRO-Offload, which steps AdamW on flat fp32 partitions on the CPU (DeepSpeed warns that
      the per-tensor loop "will yield poor performance");
    - CUDA ranks (torch has had a fused CUDA AdamW since 2.0);
    - CPU ranks (torch >= 2.4) under every strategy alike: DDP's per-tensor parameters, ZeRO's
      flat partitions, FSDP2's DTensor shards (DTensor has a sharding rule for the fused op). The
      kernel is elementwise, so it updates a value the same way in any layout: strategies that
      trained identically before still do (tests/test_real_model.py, tests/test_fsdp.py).
    """
    if recipe.launch.zero and recipe.launch.offload != "none":
        return {"fused": True} if cpu_fused_adamw_available() else {}
    if device is None:
        return {}
    if device.type == "cuda" or (device.type == "cpu" and cpu_fused_adamw_available()):
        return {"fused": True}
    return {}


@functools.cache
def cpu_fused_adamw_available() -> bool:
    """torch >= 2.4 has a fused AdamW for CPU tensors; older builds raise on its first step."""
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.ones(2)
    try:
        torch.optim.AdamW([param], lr=1e-3, fused=True).step()
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    """One line per run: which tensors decay (a wrong grouping is otherwise invisible)."""
    parts = []
    for group in optimizer.param_groups:
        numel = sum(getattr(p, "ds_numel", p.numel()) for p in group["params"])
        parts.append(
            f"weight_decay {group['weight_decay']:g} on {len(group['params'])} tensors ({numel:,} values)"
        )
    name = type(optimizer).__name__
    return f"optimizer: {name} lr {optimizer.param_groups[0]['lr']:g}, " + "; ".join(parts)


def warmup_steps(recipe: Recipe, total_steps: int) -> int:
    """train.warmup_steps as given, else the share train.warmup_ratio of the run's steps (rounded up)."""
    if recipe.train.warmup_steps is not None:
        return recipe.train.warmup_steps
    return math.ceil(recipe.train.warmup_ratio * total_steps)


def build_scheduler(optimizer, recipe: Recipe, total_steps: int):
    """transformers' schedule of the recipe's name (``constant`` after a warm-up: its
    ``constant_with_warmup``), with train.scheduler_options as its own settings: the ones it counts
    with (cycles, a timescale in steps) as whole numbers."""
    from transformers import get_scheduler

    train = recipe.train
    name = "constant_with_warmup" if train.scheduler == "constant" else train.scheduler
    rules = SCHEDULE_OPTIONS[train.scheduler]
    options = {key: int(v) if rules[key] is WHOLE else v for key, v in train.scheduler_options.items()}
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps(recipe, total_steps),
        num_training_steps=total_steps,
        scheduler_specific_kwargs=options,
    )


def schedule_summary(recipe: Recipe, total_steps: int) -> str:
    """What sets each step's learning rate, in words (a resume that changes it says so):
    ``linear, warm-up 0 of 40 steps`` or ``polynomial (lr_end 1e-06, power 2), warm-up 5 of 80 steps``."""
    options = ", ".join(f"{key} {value:g}" for key, value in recipe.train.scheduler_options.items())
    name = f"{recipe.train.scheduler} ({options})" if options else recipe.train.scheduler
    return f"{name}, warm-up {warmup_steps(recipe, total_steps)} of {total_steps} steps"


def total_optimizer_steps(recipe: Recipe, batches_per_rank: list[int]) -> int:
    """Optimizer steps of the whole run: every epoch's, until train.max_steps."""
    total = sum(math.ceil(count / recipe.train.grad_accum) for count in batches_per_rank)
    return min(total, recipe.train.max_steps) if recipe.train.max_steps else total


# What a resumed run takes from its recipe, not from the checkpoint: the keys of each optimizer
# group the recipe sets, as recipe keys (for the line that says what changed).
RECIPE_GROUP_KEYS = {
    "initial_lr": "train.lr",
    "weight_decay": "train.weight_decay",
    "betas": "train.adam_beta1/adam_beta2",
    "eps": "train.adam_epsilon",
}


def recipe_group_settings(optimizer) -> list[dict]:
    """Each optimizer group's settings as the recipe built them: taken before a checkpoint is
    loaded, because loading replaces them with the ones the checkpoint was trained with."""
    return [
        {key: group[key] for key in RECIPE_GROUP_KEYS if key in group} for group in optimizer.param_groups
    ]


def reapply_recipe_settings(optimizer, scheduler, built: list[dict]) -> list[str]:
    """Give the restored optimizer and schedule the recipe's learning rate, weight decay and AdamW
    settings again (a resume with ``--set train.lr=...`` trains with it), keeping the checkpoint's
    position in the schedule: the learning rate of the step is the new peak rate times the same
    schedule factor. Returns the changes, as ``train.lr 1e-05 -> 0.001``."""
    inner = getattr(scheduler, "scheduler", scheduler)  # Accelerate's wrapper holds torch's scheduler
    changes: dict[str, str] = {}
    for index, (group, wanted) in enumerate(zip(optimizer.param_groups, built)):
        for key, value in wanted.items():
            # the peak rate in force is the schedule's (a converted resume restores only the schedule)
            old = inner.base_lrs[index] if key == "initial_lr" else group.get(key)
            if old is None or as_tuple(old) == as_tuple(value):  # a checkpoint may hold betas as a list
                continue
            if key == "initial_lr":  # the peak rate: scale the step's rate, set the schedule's base
                group["lr"] = group["lr"] * value / old
                inner.base_lrs[index] = value
            group[key] = value
            name = RECIPE_GROUP_KEYS[key]
            changes.setdefault(name, f"{name} {shown(old)} -> {shown(value)}")
    if hasattr(inner, "_last_lr"):
        inner._last_lr = [group["lr"] for group in optimizer.param_groups]
    return list(changes.values())


def as_tuple(value):
    return tuple(value) if isinstance(value, (tuple, list)) else value


def shown(value) -> str:
    return "/".join(f"{v:g}" for v in value) if isinstance(value, (tuple, list)) else f"{value:g}"
