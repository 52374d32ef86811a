"""Is a model directory intact? Cheap checks of the files the ranks will load, made on the
launching host before anything is written (``--model``, ``--adapter``, summarize's SOURCE, the
``final/`` of ``ftlaunch export``): a truncated or overwritten file costs one line naming it,
not a rank crash after the run directory was created.

What is read, and why that is enough to be cheap:

* JSON files (config, tokenizer, generation and adapter settings): parsed whole; they are small
  (tokenizer.json a few MB). Some values are checked too, where a wrong one only fails inside a
  rank: config.json's sizes and token ids and generation_config.json's settings must have their
  types, tokenizer.json must load in the tokenizers library (no torch), and a model folder's
  config.json must name an encoder-decoder family (``model_facts.model_type_problem``);
* safetensors weights: the 8-byte little-endian header length and the JSON header, then every
  tensor's byte range must lie inside the file (a truncated download fails here) - no tensor
  data is read;
* ``pytorch_model.bin`` (torch.save): the zip format of torch >= 1.6 is opened (its central
  directory sits at the end of the file, so a truncated file fails); the legacy format is a bare
  pickle with nothing to check short of unpickling, so only its first byte (the pickle PROTO
  opcode) is checked;
* ``spiece.model``: a protobuf only sentencepiece can parse (not installed with ftlaunch), so
  only that it is not empty.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Any

from launcher.core.errors import UserError
from launcher.core.jsonl import is_number, is_whole
from launcher.core.model_facts import config_value_problem, is_token_id, model_type_problem

JSON_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "adapter_config.json",
    "ftlaunch.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


COUNT = ("a whole number of at least 1", lambda v: is_whole(v, 1))
SIZE = ("a whole number of at least 0", lambda v: is_whole(v, 0))
TOKEN = ("a token id", lambda v: is_token_id(v, many=True))
NUMBER = ("a number", is_number)
FLAG = ("true or false", lambda v: isinstance(v, bool))
# generation_config.json values and the type transformers' GenerationConfig gives each.
GENERATION_VALUES: dict[str, tuple[str, Any]] = {
    **dict.fromkeys(("num_beams", "num_beam_groups", "num_return_sequences"), COUNT),
    **dict.fromkeys(
        (
            "max_length",
            "max_new_tokens",
            "min_length",
            "min_new_tokens",
            "top_k",
            "no_repeat_ngram_size",
            "encoder_no_repeat_ngram_size",
        ),
        SIZE,
    ),
    **dict.fromkeys(
        (
            "decoder_start_token_id",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "forced_bos_token_id",
            "forced_eos_token_id",
        ),
        TOKEN,
    ),
    **dict.fromkeys(
        (
            "temperature",
            "top_p",
            "typical_p",
            "repetition_penalty",
            "encoder_repetition_penalty",
            "length_penalty",
            "diversity_penalty",
        ),
        NUMBER,
    ),
    **dict.fromkeys(("do_sample", "use_cache"), FLAG),
    "early_stopping": ('true, false or "never"', lambda v: isinstance(v, bool) or v == "never"),
}
HEADER_LIMIT = 100 * 1024 * 1024  # safetensors refuses larger headers too
PICKLE_PROTO = 0x80


def json_problem(path: Path) -> str | None:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8 text"
    if path.name == "tokenizer.json":  # the library's own parse (a JSON object with its model) is the check
        problem = tokenizer_problem(text)
        return problem and (json_text_problem(text)[0] or problem)
    problem, data = json_text_problem(text)
    if problem:
        return problem
    if path.name == "config.json":
        return config_value_problem(data)
    if path.name == "generation_config.json":
        return generation_problem(data)
    return None


def json_text_problem(text: str) -> tuple[str | None, dict[str, Any]]:
    """Why ``text`` is not a JSON object (None), and the object."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})", {}
    if not isinstance(data, dict):
        return "not a JSON object", {}
    return None, data


def generation_problem(settings: dict[str, Any]) -> str | None:
    """A generation setting of the wrong type: transformers drops such a file when it loads the
    model, and generation then fails on a setting it never read (no decoder start token)."""
    for key, (kind, check) in GENERATION_VALUES.items():
        value = settings.get(key)
        if value is not None and not check(value):
            return f"{key} is {value!r}, not {kind}"
    return None


def tokenizer_problem(text: str) -> str | None:
    """tokenizer.json as the tokenizers library reads it (the library transformers loads it with;
    no torch): a file without its model or added tokens fails here, not in a rank."""
    import tokenizers

    try:
        tokenizers.Tokenizer.from_str(text)
    except Exception as exc:  # noqa: BLE001 - the library raises a bare Exception for a bad file
        return f"not a tokenizers file: {str(exc).splitlines()[0][:160]}"
    return None


def safetensors_problem(path: Path) -> str | None:
    """The header must fit the file and every tensor's bytes must lie inside it."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            return f"{size} bytes: too short for a safetensors header"
        (length,) = struct.unpack("<Q", raw)
        if length > HEADER_LIMIT or 8 + length > size:
            return f"its header claims {length} bytes but the file has {size}: truncated or not safetensors"
        try:
            header = json.loads(handle.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "its header is not JSON: not a safetensors file"
    if not isinstance(header, dict):
        return "its header is not a JSON object: not a safetensors file"
    data_size = size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(x, int) for x in offsets)):
            return f"tensor {name!r} has no data_offsets: not a safetensors file"
        if offsets[1] > data_size:
            return (
                f"tensor {name!r} ends at byte {offsets[1]} of {data_size} data bytes: the file is truncated"
            )
    return None


def torch_bin_problem(path: Path) -> str | None:
    """A torch.save file: a readable zip (new format) or at least a pickle's first byte (legacy)."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
        except (zipfile.BadZipFile, OSError) as exc:
            return f"a damaged zip archive ({exc})"
        return None
    with path.open("rb") as handle:
        head = handle.read(2)
    if head == b"PK":  # a zip's start without its central directory: the end is missing
        return "a truncated zip archive"
    if head[:1] != bytes([PICKLE_PROTO]):
        return (
            f"neither a zip archive nor a pickle (starts with {head or b'(empty)'!r}): not a torch.save file"
        )
    return None


def file_problem(path: Path) -> str | None:
    """What is wrong with one file of a model directory (None: nothing found)."""
    name = path.name
    if name in JSON_FILES:
        return json_problem(path)
    if name.endswith(".safetensors"):
        return safetensors_problem(path)
    if name.endswith(".bin") and ("pytorch_model" in name or name == "adapter_model.bin"):
        return torch_bin_problem(path)
    if name == "spiece.model" and path.stat().st_size == 0:
        return "empty"
    return None


def check_model_files(directory: Path, what: str, *, model: bool = True) -> None:
    """Refuse (one line naming the file, exit 2) when a file the ranks load is damaged, or (a
    ``model`` folder, not only a tokenizer's) when its config.json is no seq2seq model."""
    for path in sorted(directory.iterdir()):
        if not path.is_file():
            continue
        try:
            problem = file_problem(path)
        except OSError as exc:
            problem = f"cannot be read ({exc.strerror})"
        if problem:
            raise UserError(
                f"{what} {directory}: {path} is damaged ({problem}); copy or download the model folder again"
            )
    config = directory / "config.json"
    if model and config.is_file():
        problem = model_type_problem(json.loads(config.read_text(encoding="utf-8")))
        if problem:
            raise UserError(f"{what} {directory}: {config.name} {problem}; pass a seq2seq model folder")
