"""The settings that travel with a saved model (``final/ftlaunch.json``, generation_config.json,
the tokenizer's ``model_max_length``): how to prompt, truncate and generate as the run's own
evaluation did. Written by export.py, read by summarize, ``ftlaunch eval``, the model card and users.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launcher.core.errors import UserError
from launcher.core.recipe import GENERATION_KEYS, Recipe

SETTINGS_FILE = "ftlaunch.json"
# The dataset's columns the model was trained and evaluated through (with ``dataset``: which data).
COLUMN_KEYS = ("source_field", "target_field")
# ftlaunch.json's keys that summarize and eval read, with their types (the others go through the schema)
REQUIRED_SETTINGS = {"prompt": str, "max_source_length": int, "precision": str}


def inference_settings(recipe: Recipe, method: str | None = None) -> dict[str, Any]:
    """What a user of ``final/`` needs to generate as the run's evaluation did: the prompt, the
    truncation lengths and the generation settings (and, for an adapter, its base model); the
    dataset and the columns it was read through, so that an evaluation on the same data reads the
    same columns."""
    return {
        "method": method or recipe.train.method,
        "base_model": recipe.model.name,
        "dataset": recipe.data.dataset,
        **{key: getattr(recipe.data, key) for key in COLUMN_KEYS},
        "prompt": recipe.data.prompt,
        "max_source_length": recipe.data.max_source_length,
        "max_target_length": recipe.data.max_target_length,
        **{key: getattr(recipe.eval, key) for key in GENERATION_KEYS},
        "batch_size": recipe.eval.batch_size,
        "precision": recipe.model.precision,
    }


def write_inference_settings(model_dir: Path, recipe: Recipe, method: str | None = None) -> None:
    """``ftlaunch.json`` (read by ``ftlaunch summarize``), plus the same settings where plain
    transformers looks for them: generation_config.json (beams, new tokens, greedy) and the
    tokenizer's ``model_max_length`` (so ``truncation=True`` cuts where training did)."""
    from transformers import GenerationConfig

    settings = inference_settings(recipe, method)
    (model_dir / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    if (model_dir / "generation_config.json").is_file():  # a model (an adapter folder has none)
        generation = GenerationConfig.from_pretrained(str(model_dir))
        generation.update(**recipe.eval.generation())
        generation.save_pretrained(str(model_dir))
    tokenizer_config = model_dir / "tokenizer_config.json"
    if tokenizer_config.is_file():
        data = json.loads(tokenizer_config.read_text())
        data["model_max_length"] = recipe.data.max_source_length
        tokenizer_config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_inference_settings(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def checked_settings(folder: Path) -> dict[str, Any] | None:
    """ftlaunch.json, with the keys summarize and eval read present and of their type: a
    hand-edited or truncated file is named with its key, not a KeyError. None where the folder
    has none."""
    settings = read_inference_settings(folder)
    if not settings:  # none, or an empty object: the run's recipe (or the defaults) apply
        return None
    path = folder / SETTINGS_FILE
    fix = f"re-export the run (ftlaunch export) or delete {path.name}"
    if not isinstance(settings, dict):
        raise UserError(f"{path} is not a JSON object of settings; {fix}")
    for key, kind in REQUIRED_SETTINGS.items():
        if key not in settings:
            raise UserError(f"{path} has no {key!r}; {fix}")
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise UserError(f"{path}: {key} is {value!r}, not {kind_name(kind)}; {fix}")
    base = settings.get("base_model")
    if base is not None and not isinstance(base, str):
        raise UserError(f"{path}: base_model is {base!r}, not a model name; {fix}")
    return settings


def kind_name(kind: type) -> str:
    return {str: "a string", int: "an integer"}[kind]


def apply_inference_settings(raw: dict[str, Any], settings: dict[str, Any]) -> None:
    """Put a saved model's prompt, truncation, generation settings and precision into a raw
    recipe (validated later with it): the model is then prompted and decoded as its run's own
    evaluation did. Settings written before a key existed lack it: the recipe's value stays."""
    raw.setdefault("data", {}).update(
        prompt=settings["prompt"], max_source_length=settings["max_source_length"]
    )
    raw.setdefault("eval", {}).update(
        {key: settings[key] for key in (*GENERATION_KEYS, "batch_size") if key in settings}
    )
    raw.setdefault("model", {})["precision"] = settings["precision"]


def recorded_columns(settings: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The dataset a saved model was evaluated on and the columns it read there, as ``ftlaunch.json``
    records them; (dataset, {}) for settings written before the columns were recorded."""
    return settings.get("dataset"), {key: settings[key] for key in COLUMN_KEYS if key in settings}
