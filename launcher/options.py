"""Recipe resolution from command-line options: the recipe file, its ``--set`` overrides, then the
flags of ``ftlaunch full|lora``, then ``--zero auto``. The CLI and sweeps both resolve here, so a
sweep point is exactly the run ``ftlaunch full|lora`` would make with the same options.
"""

from __future__ import annotations

from typing import Any

from launcher.errors import UserError

# The flags of `ftlaunch full|lora` that set a recipe key; their help is the key's schema description.
FLAG_KEYS = {
    "model": "model.name",
    "data": "data.dataset",
    "gpus": "launch.gpus",
    "nodes": "launch.nodes",
    "zero": "launch.zero",
    "offload": "launch.offload",
    "fsdp": "launch.fsdp",
    "cpu": "launch.cpu",
    "report_to": "train.report_to",
    "main_address": "launch.main_address",
    "main_port": "launch.main_port",
    "max_restarts": "launch.max_restarts",
}


def parse_zero(value: str) -> int:
    if value not in {"0", "1", "2", "3"}:
        raise UserError(f"--zero {value} is not a ZeRO stage; use 0 (DDP), 1, 2, 3 or auto")
    return int(value)


def pick_zero_stage(recipe, gpu_mem: float | None, keep_offload: bool) -> tuple[dict[str, object], str]:
    """--zero auto: the smallest ZeRO stage (then least offload) whose estimate fits the GPUs.

    Returns the launch keys to change and a note; the validated recipe is not changed in place
    (the caller validates the changed recipe again)."""
    from launcher.estimate import RunShape, budget_micro_batch, detect_gpu_mem_gib, zero_auto
    from launcher.families import estimate_targets

    memory = gpu_mem or detect_gpu_mem_gib()
    assumed = "" if memory else " (no GPU visible: assumed 80 GiB, pass --gpu-mem)"
    data, budget = recipe.data, recipe.train.micro_batch_tokens
    shape = RunShape(
        gpus=recipe.launch.gpus,
        nodes=recipe.launch.nodes,
        lora=recipe.train.method == "lora",
        micro_batch=budget_micro_batch(budget, data.max_source_length, data.max_target_length)
        if budget
        else recipe.train.micro_batch_size,
        source_len=recipe.data.max_source_length,
        target_len=recipe.data.max_target_length,
        lora_r=recipe.lora.r,
        lora_targets=estimate_targets(recipe.lora.target_modules),
        micro_batch_tokens=budget,
        gradient_checkpointing=recipe.train.gradient_checkpointing,
        optimizer=recipe.train.optimizer,
    )
    row, note = zero_auto(recipe.model.name, memory or 80.0, shape, recipe.launch.fsdp)
    changes: dict[str, object] = {"zero": row.stage}
    if not keep_offload:
        changes["offload"] = row.offload
    return changes, note + assumed


def train_recipe(method: str, options: dict[str, Any]):
    """The validated recipe `ftlaunch full|lora` runs with these options (the command's parameters by
    name): the recipe file, its --set overrides, then the flags; and the --zero auto note (or None).
    `ftlaunch sweep` builds each of its points here too."""
    from launcher.recipe import build_recipe, default_recipe_path, load_recipe_data

    path = options["recipe_path"] or default_recipe_path(method)
    raw, overridden = load_recipe_data(path, options["overrides"])
    train = raw.get("train")
    recipe_method = train.get("method", "full") if isinstance(train, dict) else "full"
    if recipe_method in ("full", "lora") and recipe_method != method:
        raise UserError(
            f"recipe {path} is a {recipe_method} recipe (train.method); "
            f"use `ftlaunch {recipe_method}` or a {method} recipe"
        )
    zero, offload = options["zero"], options["offload"]
    values = {flag: options[flag] for flag in FLAG_KEYS}
    values.update(
        zero=parse_zero(zero) if zero not in (None, "auto") else None,
        offload=offload.value if offload else None,
        fsdp=True if options["fsdp"] else None,
        cpu=True if options["cpu"] else None,
    )
    flags = {FLAG_KEYS[flag]: value for flag, value in values.items()}
    flagged = []
    for key, value in flags.items():
        if value is not None:
            section, name = key.split(".")
            if not isinstance(raw.setdefault(section, {}), dict):
                break  # the recipe's own section is malformed: validation below names it
            raw[section][name] = value
            flagged.append([section, name])
    recipe = build_recipe(raw, f"recipe {path}", overridden, flagged)
    zero_note = None
    if zero == "auto":
        changes, zero_note = pick_zero_stage(recipe, options["gpu_mem"], keep_offload=offload is not None)
        resolved = recipe.model_dump(mode="json")
        resolved["launch"].update(changes)
        recipe = build_recipe(resolved, "command line")
    return recipe, zero_note
