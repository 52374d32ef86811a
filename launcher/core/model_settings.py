"""The settings that travel with a saved model (``final/ftlaunch.json``, generation_config.json,
the tokenizer's ``model_max_length``): how to prompt, truncate and generate as the run's own
evaluation did. Written by export.py, read by summarize, the model card and users.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launcher.core.recipe import GENERATION_KEYS, Recipe

SETTINGS_FILE = "ftlaunch.json"


def inference_settings(recipe: Recipe, method: str | None = None) -> dict[str, Any]:
    """What a user of ``final/`` needs to generate as the run's evaluation did: the prompt, the
    truncation lengths and the generation settings (and, for an adapter, its base model)."""
    return {
        "method": method or recipe.train.method,
        "base_model": recipe.model.name,
        "dataset": recipe.data.dataset,
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
