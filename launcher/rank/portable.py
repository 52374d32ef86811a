"""Resuming a checkpoint under another strategy or world size: one per-parameter layout between
the libraries' own formats.

A checkpoint is read into a ``Portable``: for every trainable parameter, by the model's own name
(no ``module.``/``_orig_mod.``/``_fsdp_wrapped_module.`` prefixes), its fp32 value and its
optimizer state (AdamW: exp_avg, exp_avg_sq; the step count is shared). Readers use the
libraries' conversions: DeepSpeed's universal checkpoint conversion (``ds_to_universal``, ZeRO-1/2/3,
which already writes one folder per parameter) and torch's ``dcp_to_torch_save`` (FSDP2's sharded
DCP folders); a DDP checkpoint holds whole weights and a torch optimizer state already. Loaders
write the layout into the live, prepared run: DDP through the torch optimizer's ``load_state_dict``,
ZeRO through DeepSpeed's per-parameter setters (``safe_set_full_fp32_param``,
``safe_set_full_optimizer_state``), FSDP2 through ``set_model_state_dict`` /
``set_optimizer_state_dict`` with full state dicts. Scheduler and RNG states are Accelerate's own
files, loaded by its own function. Frozen parameters (LoRA's base model) are not in the layout:
the run built them from the same model (the checkpoint's fingerprint says so).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from launcher.core import checkpoint as ckpt

WRAPPER_PARTS = frozenset({"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
FSDP_FOLDERS = ("pytorch_model_fsdp_0", "optimizer_0")  # Accelerate's names for model 0, optimizer 0


@dataclass
class Portable:
    """A checkpoint's trainable state, per parameter, whatever wrote it."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> fp32, full shape
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> {exp_avg: ...}
    step: float = 0.0  # the optimizer's step count (AdamW's bias correction)


def clean_name(name: str) -> str:
    """A parameter's name in the model itself, without the wrappers' parts (DDP's and DeepSpeed's
    ``module``, torch.compile's ``_orig_mod``, FSDP's and activation checkpointing's wrappers)."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_PARTS)


# ---------------------------------------------------------------- the live model's names


def trainable(model: torch.nn.Module) -> list[tuple[list[str], torch.nn.Parameter]]:
    """Each trainable parameter once, with every name it is tied under (T5's shared embedding is
    also ``encoder.embed_tokens``, ``decoder.embed_tokens``, maybe ``lm_head``): a checkpoint may
    keep any one of them."""
    by_id: dict[int, tuple[list[str], torch.nn.Parameter]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.requires_grad:
            by_id.setdefault(id(param), ([], param))[0].append(clean_name(name))
    return list(by_id.values())


def lookup(table: dict, names: list[str]):
    for name in names:
        if name in table:
            return table[name]
    raise KeyError(f"the checkpoint has no parameter {names[0]} (nor its tied names {names[1:]})")


def optimizer_order(model: torch.nn.Module) -> list[str]:
    """Trainable parameter names in the order ``build_optimizer`` gave them to the optimizer
    (``optimization.decays``: decayed matrices, then biases and norms): a torch optimizer state's indices."""
    from launcher.rank.optimization import decays

    named = [(clean_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, p in named if decays(n, p)] + [n for n, p in named if not decays(n, p)]


# ---------------------------------------------------------------- readers (checkpoint -> layout)


def convert(checkpoint: Path, saved: ckpt.TrainState, workdir: Path) -> None:
    """The libraries' own conversions into ``workdir`` (once, on the main rank): DeepSpeed's
    universal checkpoint, torch's DCP-to-file; a DDP checkpoint needs none."""
    if saved.strategy == "fsdp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        for kind in FSDP_FOLDERS:
            dcp_to_torch_save(checkpoint / kind, workdir / f"{kind}.pt")
    elif saved.strategy.startswith("zero"):
        convert_zero(checkpoint / "pytorch_model", workdir / "universal")


def read_checkpoint(checkpoint: Path, saved: ckpt.TrainState, model, workdir: Path) -> Portable:
    """The checkpoint's trainable state, after ``convert``. ``model`` (the unwrapped model of this
    run) and build_optimizer's grouping rule give a DDP optimizer state's order."""
    if saved.strategy == "ddp":
        return read_ddp(checkpoint, optimizer_order(model))
    if saved.strategy == "fsdp":
        return read_fsdp(workdir)
    return read_zero(checkpoint, workdir)


def read_ddp(checkpoint: Path, order: list[str]) -> Portable:
    """Accelerate's DDP files: the unwrapped model's weights, and the torch optimizer's
    state_dict, whose integer indices follow the optimizer's parameter order."""
    from safetensors.torch import load_file

    weights = {clean_name(k): v.float() for k, v in load_file(str(checkpoint / "model.safetensors")).items()}
    optim = torch.load(checkpoint / "optimizer.bin", map_location="cpu", weights_only=False)
    indices = [i for group in optim["param_groups"] for i in group["params"]]
    if len(indices) != len(order):
        raise ValueError(
            f"{checkpoint}: the optimizer holds {len(indices)} tensors, the model trains {len(order)}"
        )
    portable = Portable(weights=weights)
    for index, name in zip(indices, order):
        state = dict(optim["state"].get(index, {}))
        step = state.pop("step", None)
        if step is not None:
            portable.step = float(step)
        portable.moments[name] = {k: v.float() for k, v in state.items() if torch.is_tensor(v)}
    return portable


def read_zero(checkpoint: Path, workdir: Path) -> Portable:
    """DeepSpeed's universal checkpoint conversion writes ``zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt``:
    the per-parameter layout already (ZeRO-3's values flat: the loader gives them their shape)."""
    universal = workdir / "universal"
    portable = Portable()
    for folder in sorted((universal / "zero").iterdir()):
        if not (folder / "fp32.pt").is_file():
            continue
        name = clean_name(folder.name)
        portable.weights[name] = load_tensor(folder / "fp32.pt")
        portable.moments[name] = {
            f.stem: load_tensor(f) for f in folder.glob("*.pt") if f.stem not in ("fp32", "step")
        }
    portable.step = zero_step(checkpoint / "pytorch_model")
    return portable


def convert_zero(source: Path, target: Path) -> None:
    """``ds_to_universal`` in this process (its command line's arguments; one worker: the ranks
    already use the cores)."""
    import contextlib
    import io
    from types import SimpleNamespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    shutil.rmtree(target, ignore_errors=True)
    args = SimpleNamespace(
        input_folder=str(source),
        output_folder=str(target),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # Accelerate's ZeRO-1/2 saves lack the universal-checkpoint info
    )
    with (
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):  # progress bars
        ds_to_universal(args)


def load_tensor(path: Path) -> torch.Tensor:
    value = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(value, dict):  # some DeepSpeed versions wrap it: {"param": tensor, ...}
        value = value["param"]
    return value.float()


def zero_step(folder: Path) -> float:
    """The optimizer's step count, from the first ZeRO optimizer partition (every group shares it)."""
    files = sorted(folder.glob("*optim_states.pt"))
    state = torch.load(files[0], map_location="cpu", weights_only=False)["optimizer_state_dict"]
    found = first_step(state)
    return 0.0 if found is None else found


def first_step(obj) -> float | None:
    """The first ``step`` entry of a (nested) optimizer state."""
    if isinstance(obj, dict):
        if "step" in obj and not isinstance(obj["step"], dict):
            return float(obj["step"])
        for value in obj.values():
            found = first_step(value)
            if found is not None:
                return found
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            found = first_step(value)
            if found is not None:
                return found
    return None


def read_fsdp(workdir: Path) -> Portable:
    """Accelerate's FSDP2 sharded state (DCP folders keyed by parameter name), made whole by
    ``convert``."""
    whole = {
        kind: torch.load(workdir / f"{kind}.pt", map_location="cpu", weights_only=False)
        for kind in FSDP_FOLDERS
    }
    model = whole["pytorch_model_fsdp_0"]
    model = model.get("model", model)
    optim = whole["optimizer_0"]
    optim = optim.get("optimizer", optim)
    portable = Portable(weights={clean_name(k): v.float() for k, v in model.items() if torch.is_tensor(v)})
    for name, state in optim["state"].items():
        state = dict(state)
        step = state.pop("step", None)
        if step is not None:
            portable.step = float(step)
        portable.moments[clean_name(name)] = {k: v.float() for k, v in state.items() if torch.is_tensor(v)}
    return portable


# ---------------------------------------------------------------- loaders (layout -> live run)


def load_into(run, portable: Portable) -> None:
    """Write the layout into this rank's prepared model and optimizer (every rank calls it)."""
    from launcher.rank.distributed import uses_deepspeed

    accelerator = run.accelerator
    model = accelerator.unwrap_model(run.model)
    if uses_deepspeed(accelerator):
        load_zero(run.model, model, portable)
    elif run.recipe.launch.fsdp:
        load_fsdp(run.model, run.optimizer, portable)
    else:
        load_plain(model, run.optimizer, portable)


def load_plain(model, optimizer, portable: Portable) -> None:
    """DDP or one process: whole tensors; the optimizer state through torch's own loader (which
    puts each value on its parameter's device and dtype, and the step where fused AdamW wants it)."""
    torch_optimizer = getattr(optimizer, "optimizer", optimizer)
    params = trainable(model)
    with torch.no_grad():
        for names, param in params:
            param.copy_(lookup(portable.weights, names).view_as(param))
    names_by_id = {id(param): names for names, param in params}
    state_dict = torch_optimizer.state_dict()
    index = 0
    for group in torch_optimizer.param_groups:
        for param in group["params"]:
            moments = lookup(portable.moments, names_by_id[id(param)])
            state_dict["state"][index] = {
                "step": torch.tensor(portable.step),
                **{k: v.view_as(param) for k, v in moments.items()},
            }
            index += 1
    torch_optimizer.load_state_dict(state_dict)


def load_zero(engine, model, portable: Portable) -> None:
    """DeepSpeed ZeRO-1/2/3: the fp32 master and moments through DeepSpeed's per-parameter setters;
    the model's own (working) copy written under ``GatheredParameters`` (ZeRO-3 partitions it;
    rank 0's value, the same on every rank, is kept); the step count on every flat partition."""
    import contextlib

    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero3 = engine.zero_optimization_stage() == 3
    params = trainable(model)
    create_zero_states(engine.optimizer, next(iter(portable.moments.values()), {}).keys(), portable.step)
    for names, param in params:
        value = lookup(portable.weights, names).view(true_shape(param))
        gathered = (
            deepspeed.zero.GatheredParameters([param], modifier_rank=0) if zero3 else contextlib.nullcontext()
        )
        with gathered, torch.no_grad():
            param.data.copy_(value.to(param.dtype))
        safe_set_full_fp32_param(param, value.to(param.device))
        for key, moment in lookup(portable.moments, names).items():
            safe_set_full_optimizer_state(param, moment.view(true_shape(param)).to(param.device), key)


def create_zero_states(zero_optimizer, keys, step: float) -> None:
    """DeepSpeed's torch optimizer creates its state (one entry per flat fp32 partition) at the first
    step; before it, DeepSpeed's setters have nothing to write into. Make it as torch would (zeros,
    the step count where AdamW keeps it), then let ZeRO-1/2 link its per-parameter views to it as it
    does after its first step."""
    base = zero_optimizer.optimizer
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3: sub-groups of the groups
        flats = [
            (flat, base.param_groups[zero_optimizer.sub_group_to_group_id[i]])
            for i, flat in enumerate(zero_optimizer.fp32_partitioned_groups_flat)
        ]
    else:
        flats = list(zip(zero_optimizer.single_partition_of_fp32_groups, base.param_groups))
    for flat, group in flats:
        state = base.state[flat]
        for key in keys:
            state.setdefault(key, torch.zeros_like(flat))
        on_device = group.get("fused") or group.get("capturable")
        state["step"] = torch.tensor(step, dtype=torch.float32, device=flat.device if on_device else "cpu")
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def true_shape(param) -> torch.Size:
    """ZeRO-3 leaves an empty placeholder in the parameter and its shape in ``ds_shape``."""
    return getattr(param, "ds_shape", param.shape)


def load_fsdp(model, optimizer, portable: Portable) -> None:
    """FSDP2: torch's distributed state-dict API shards the whole tensors every rank gives it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    torch_optimizer = getattr(optimizer, "optimizer", optimizer)
    options = StateDictOptions(full_state_dict=True)
    params = trainable(model)
    by_name = {name: (names, param) for names, param in params for name in names}
    # A DTensor's shape is the whole parameter's (ZeRO-3's universal values are flat).
    weights = {names[0]: lookup(portable.weights, names).view(param.shape) for names, param in params}
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    current = get_optimizer_state_dict(model, torch_optimizer, options=options)
    state = {}
    for group in current["param_groups"]:
        for name in group["params"]:
            names, param = by_name[clean_name(name)]
            moments = lookup(portable.moments, names)
            state[name] = {
                "step": torch.tensor(portable.step),
                **{k: v.view(param.shape) for k, v in moments.items()},
            }
    set_optimizer_state_dict(
        model, torch_optimizer, {"state": state, "param_groups": current["param_groups"]}, options=options
    )


# ---------------------------------------------------------------- the whole resume


def restore_converted(run, checkpoint: Path, saved: ckpt.TrainState) -> None:
    """Every rank: read the checkpoint into the layout (the main rank converts, once, into a
    folder beside the checkpoints), load it, then Accelerate's scheduler and RNG files."""
    from accelerate.checkpointing import load_accelerator_state

    accelerator = run.accelerator
    workdir = ckpt.checkpoints_dir(run.run_dir) / f".portable-{checkpoint.name}"
    model = accelerator.unwrap_model(run.model)
    if accelerator.is_main_process:
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        convert(checkpoint, saved, workdir)
    accelerator.wait_for_everyone()
    portable = read_checkpoint(checkpoint, saved, model, workdir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(workdir, ignore_errors=True)
    load_into(run, portable)
    load_accelerator_state(str(checkpoint), [], [], [run.scheduler], [], accelerator.process_index)
    set_scheduled_lr(run.scheduler)


def set_scheduled_lr(scheduler) -> None:
    """The optimizer's learning rates as the restored schedule has them at this step (a native
    load takes them from the optimizer's saved groups; the layout keeps only the schedule)."""
    inner = getattr(scheduler, "scheduler", scheduler)
    for group, lr in zip(inner.optimizer.param_groups, inner.get_last_lr()):
        group["lr"] = lr
