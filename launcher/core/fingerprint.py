"""What a run trains on, as short strings saved with every checkpoint: the model, the tokenizer,
the training and validation data and the LoRA shape.

A resume compares them with the run being launched, so that ``--resume`` cannot silently continue
a checkpoint with another model or other data (a different run shape is checked beside them, in
checkpoint.py). Hub ids and the embedded names stand for themselves; local files are identified by
their content (a moved or copied directory is still the same model), hashed cheaply: config and
tokenizer files are read, model weights only by size.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from launcher.core.dialogues import dataset_dir, split_file
from launcher.core.errors import UserError
from launcher.core.paths import TINY_TOKENIZER_DIR
from launcher.core.recipe import EMBEDDED_MODEL, Recipe

# Files that define a tokenizer (whichever of them a directory has).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def _digest(parts: list) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    return file_sha256(path)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, read in chunks (hashlib.file_digest needs Python 3.11)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _local_dir(name: str) -> Path | None:
    if name == EMBEDDED_MODEL:
        return None
    path = Path(name).expanduser()
    return path if path.is_dir() else None


def model_fingerprint(name: str) -> str:
    """A hub id or tiny-t5 as is; a local directory by its config and the sizes of its weight files."""
    directory = _local_dir(name)
    if directory is None:
        return name
    config = directory / "config.json"
    weights = sorted(
        (p.name, p.stat().st_size) for p in directory.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES
    )
    return _digest([_file_digest(config) if config.is_file() else None, weights])


def tokenizer_fingerprint(recipe: Recipe) -> str:
    """The tokenizer's files (its own directory, or the model's when model.tokenizer is unset;
    tiny-t5's is shipped in the package, so a copy of it is the same tokenizer)."""
    name = recipe.model.tokenizer or recipe.model.name
    directory = TINY_TOKENIZER_DIR if name == EMBEDDED_MODEL else _local_dir(name)
    if directory is None:
        return name
    files = sorted((p.name, _file_digest(p)) for p in (directory / f for f in TOKENIZER_FILES) if p.is_file())
    return _digest(files)


def _split_source(dataset: str, split: str) -> str:
    """A local split file by its content; a hub dataset by its id."""
    directory = dataset_dir(dataset)
    if directory is None:
        return f"hub:{dataset}"
    try:
        return _file_digest(split_file(directory, split))
    except UserError:
        return f"missing:{split}"


def data_fingerprint(recipe: Recipe) -> str:
    """The training split's content and every setting that changes the training examples."""
    data = recipe.data
    return _digest(
        [
            _split_source(data.dataset, data.train_split),
            data.train_split,
            data.train_limit,
            data.prompt,
            data.source_field,
            data.target_field,
            data.max_source_length,
            data.max_target_length,
        ]
    )


def validation_fingerprint(recipe: Recipe) -> str:
    """The validation split's content, name and limit: what the validation loss (and
    train.best_metric, early stopping) is measured on. The settings that shape its examples
    (prompt, fields, lengths) are in data_fingerprint already."""
    data = recipe.data
    return _digest(
        [_split_source(data.dataset, data.validation_split), data.validation_split, data.validation_limit]
    )


def lora_fingerprint(recipe: Recipe) -> str:
    """The adapter's shape (empty for full fine-tuning): another r or target list cannot load."""
    if recipe.train.method != "lora":
        return ""
    lora = recipe.lora
    targets = ",".join(lora.target_modules) if lora.target_modules else "query+value"
    variants = "".join(
        f" {name}" for name, on in (("dora", lora.use_dora), ("rslora", lora.use_rslora)) if on
    )
    return f"r={lora.r} alpha={lora.alpha} targets={targets}{variants}"


def examples_fingerprint(rows: list[dict]) -> str:
    """The examples an evaluation scored (ids, dialogues, references), recorded in its rouge.json:
    two evaluations compare only when they scored the same ones."""
    return _digest([[row["id"], row["dialogue"], row["references"]] for row in rows])
