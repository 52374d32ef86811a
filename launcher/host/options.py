"""Recipe resolution from command-line options: the recipe file, its ``--set`` overrides, then the
flags of ``ftlaunch full|lora``, then ``--zero auto``. The CLI and sweeps both resolve here, so a
sweep point is exactly the run ``ftlaunch full|lora`` would make with the same options.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from launcher.core.errors import UserError

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


def flag_name(option: str) -> str:
    """The command-line spelling of an option (``report_to`` -> ``--report-to``)."""
    return "--" + option.replace("_", "-")


class Offload(str, Enum):
    none = "none"
    optimizer = "optimizer"
    full = "full"


@dataclass(frozen=True)
class TrainOptions:
    """The options of `ftlaunch full|lora` that make its recipe (named as the command's parameters):
    the recipe file, its --set overrides, the flags that set a recipe key (FLAG_KEYS) and
    --gpu-mem for --zero auto. A sweep builds one per point from the flags it shares."""

    recipe_path: Path | None = None
    overrides: tuple[str, ...] | list[str] = ()
    model: str | None = None
    data: str | None = None
    gpus: int | None = None
    nodes: int | None = None
    zero: str | None = None  # 0-3, or auto
    gpu_mem: float | None = None
    offload: Offload | None = None
    fsdp: bool = False
    cpu: bool = False
    report_to: str | None = None
    main_address: str | None = None
    main_port: int | None = None
    max_restarts: int | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrainOptions:
        """These options among all of a command's parameters (--output, --resume... make no recipe)."""
        return cls(
            **{item.name: params[item.name] for item in dataclasses.fields(cls) if item.name in params}
        )

    def with_overrides(self, more: list[str]) -> TrainOptions:
        """The same options with ``more`` --set overrides after the given ones (a sweep point's values)."""
        return dataclasses.replace(self, overrides=[*self.overrides, *more])


def parse_zero(value: str) -> int:
    if value not in {"0", "1", "2", "3"}:
        raise UserError(f"--zero {value} is not a ZeRO stage; use 0 (DDP), 1, 2, 3 or auto")
    return int(value)


def pick_zero_stage(recipe, gpu_mem: float | None, keep_offload: bool) -> tuple[dict[str, object], str]:
    """--zero auto: the smallest ZeRO stage (then least offload) whose estimate fits the GPUs.

    Returns the launch keys to change and a note; the validated recipe is not changed in place
    (the caller validates the changed recipe again)."""
    from launcher.core.families import estimate_targets
    from launcher.host.estimate import RunShape, budget_micro_batch, detect_gpu_mem_gib, zero_auto

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
        lora_dora=recipe.lora.use_dora,
        micro_batch_tokens=budget,
        gradient_checkpointing=recipe.train.gradient_checkpointing,
        optimizer=recipe.train.optimizer,
    )
    kept = recipe.launch.offload if keep_offload else None
    row, note = zero_auto(recipe.model.name, memory or 80.0, shape, recipe.launch.fsdp, kept)
    changes: dict[str, object] = {"zero": row.stage}
    if not keep_offload:
        changes["offload"] = row.offload
    return changes, note + assumed


def train_recipe(method: str, options: TrainOptions):
    """The validated recipe `ftlaunch full|lora` runs with these options: the recipe file, its --set
    overrides, then the flags; and the --zero auto note (or None). `ftlaunch sweep` builds each of
    its points here too."""
    from launcher.core.recipe_loading import (
        absolute_local_paths,
        build_recipe,
        default_recipe_path,
        load_recipe_data,
    )

    path = options.recipe_path or default_recipe_path(method)
    raw, overridden = load_recipe_data(path, list(options.overrides))
    train = raw.get("train")
    recipe_method = train.get("method", "full") if isinstance(train, dict) else "full"
    if recipe_method in ("full", "lora") and recipe_method != method:
        raise UserError(
            f"recipe {path} is a {recipe_method} recipe (train.method); "
            f"use `ftlaunch {recipe_method}` or a {method} recipe"
        )
    zero, offload = options.zero, options.offload
    values = {flag: getattr(options, flag) for flag in FLAG_KEYS}
    # --zero auto with an --offload of the user's: a sharded stage to validate with (the offload
    # needs one); pick_zero_stage then chooses the stage among those with that offload
    auto_with_offload = (
        zero == "auto" and offload is not None and offload.value != "none" and not options.fsdp
    )
    values.update(
        zero=parse_zero(zero) if zero not in (None, "auto") else 3 if auto_with_offload else None,
        offload=offload.value if offload else None,
        fsdp=True if options.fsdp else None,
        cpu=True if options.cpu else None,
    )
    flagged = {}
    for flag, value in values.items():
        if value is not None:
            section, name = FLAG_KEYS[flag].split(".")
            if not isinstance(raw.setdefault(section, {}), dict):
                break  # the recipe's own section is malformed: validation below names it
            raw[section][name] = value
            flagged[FLAG_KEYS[flag]] = flag_name(flag)
    recipe = absolute_local_paths(build_recipe(raw, f"recipe {path}", overridden, flagged))
    zero_note = None
    if zero == "auto":
        changes, zero_note = pick_zero_stage(recipe, options.gpu_mem, keep_offload=offload is not None)
        resolved = recipe.model_dump(mode="json")
        resolved["launch"].update(changes)
        recipe = build_recipe(resolved, "command line")
    return recipe, zero_note


@dataclass(frozen=True)
class EvalOptions:
    """The options of `ftlaunch eval` that make its recipe (named as the command's parameters)."""

    model: str
    adapter: Path | None
    data: str
    split: str
    limit: int | None
    gpus: int
    zero: str  # 0 or 3
    cpu: bool
    overrides: tuple[str, ...] | list[str]


TRAINING_SECTIONS = ("train", "lora")  # what `ftlaunch eval --set` refuses: it would change nothing


def eval_recipe(options: EvalOptions):
    """The validated recipe `ftlaunch eval` runs with: the full recipe's eval/data settings, those
    saved with the model (``ftlaunch.json`` of --adapter, else of a --model folder: a run's final/
    is prompted and decoded as its own evaluation was, and its own dataset is read through its
    columns), its --set overrides, then the flags (one model on one split)."""
    from launcher.core.model_settings import SETTINGS_FILE, apply_inference_settings
    from launcher.core.recipe_loading import (
        absolute_local_paths,
        apply_overrides,
        build_recipe,
        default_recipe_path,
        load_recipe,
        parse_override,
    )

    for item in options.overrides:  # all refused first: none changes the recipe an eval runs
        section = parse_override(item)[0][0]
        if section in TRAINING_SECTIONS:
            raise UserError(
                f"--set {item}: ftlaunch eval trains nothing, so {section}.* keys have no effect; "
                "set eval.*, data.* or model.* keys"
            )
    raw = load_recipe(default_recipe_path("full")).model_dump(mode="json")
    folder, settings = saved_settings(options)
    if settings:
        apply_inference_settings(raw, settings)
        apply_saved_columns(raw, options.data, *saved_columns(folder, settings))
    overridden = apply_overrides(raw, options.overrides)
    adapter = options.adapter
    raw["model"].update(name=options.model, adapter=str(adapter.resolve()) if adapter else None)
    raw["data"]["dataset"] = options.data
    raw["eval"].update(
        split=options.split, limit=options.limit if options.limit is not None else raw["eval"]["limit"]
    )
    if options.zero not in {"0", "3"}:
        raise UserError(
            f"--zero {options.zero}: evaluation either replicates the model (0) or shards it (3); use 0 or 3"
        )
    raw["launch"].update(gpus=options.gpus, zero=int(options.zero), cpu=options.cpu)
    flags = {
        "model.name": "--model",
        "data.dataset": "--data",
        "eval.split": "--split",
        "launch.gpus": "--gpus",
    }
    source = str(folder / SETTINGS_FILE) if settings else "command line"
    if options.limit is not None:
        flags["eval.limit"] = "--limit"
    return absolute_local_paths(build_recipe(raw, source, overridden, flagged=flags))


def saved_settings(options: EvalOptions) -> tuple[Path | None, dict | None]:
    """The folder whose ftlaunch.json `ftlaunch eval` follows, and those settings: the adapter's
    (a LoRA run's final/), else the model folder's (a full run's final/ or an export); none for a
    hub id or a model saved without ftlaunch."""
    from launcher.core.model_settings import checked_settings
    from launcher.core.paths import is_local_reference

    if options.adapter is not None:
        folder = options.adapter.expanduser().resolve()
    elif is_local_reference(options.model) and Path(options.model).expanduser().is_dir():
        folder = Path(options.model).expanduser().resolve()
    else:
        return None, None
    return folder, checked_settings(folder)


def saved_columns(folder: Path, settings: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The dataset the saved model was evaluated on and the columns it read there: those its
    ftlaunch.json records, else (a final/ written before they were recorded) those of the recipe
    of the run whose final/ it is; (None, {}) where neither says."""
    from launcher.core.model_settings import recorded_columns

    dataset, columns = recorded_columns(settings)
    return (dataset, columns) if columns else run_recipe_columns(folder)


def run_recipe_columns(folder: Path) -> tuple[str | None, dict[str, Any]]:
    """data.dataset and the column keys of the recipe of the run whose final/ is ``folder``
    ((None, {}) for any other folder, or a recipe that cannot be read: only a hint here)."""
    from launcher.core.model_settings import COLUMN_KEYS
    from launcher.core.recipe_loading import read_yaml_mapping
    from launcher.core.rundir import RunDir

    run = RunDir(folder.parent)
    if run.final != folder or not run.has_recipe():
        return None, {}
    try:
        data = read_yaml_mapping(run.recipe_yaml).get("data")
    except UserError:
        return None, {}
    if not isinstance(data, dict):
        return None, {}
    return data.get("dataset"), {key: data[key] for key in COLUMN_KEYS if key in data}


def apply_saved_columns(raw: dict[str, Any], data: str, dataset: Any, columns: dict[str, Any]) -> None:
    """--data that names the dataset the model was trained and evaluated on (the same folder or
    hub id) is read through the same columns (data.source_field/target_field); another dataset
    keeps the defaults. --set, applied after, still names other columns."""
    from launcher.core.dialogues import same_dataset

    if columns and isinstance(dataset, str) and same_dataset(data, dataset):
        raw.setdefault("data", {}).update(columns)


def ignored_overrides(method: str, overrides: list[str]) -> list[str]:
    """``--set lora.*`` on a full fine-tune changes nothing (it trains no adapters): said, not
    refused, since a recipe may carry a lora section for both methods."""
    keys = [text.split("=", 1)[0].strip() for text in overrides]
    return [
        f"--set {key} has no effect: ftlaunch full trains every weight and no LoRA adapters (ftlaunch lora does)"
        for key in keys
        if method == "full" and key.startswith("lora.")
    ]
