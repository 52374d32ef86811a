"""Is a model directory intact? Cheap checks of the files the ranks will load, made on the
launching host before anything is written (``--model``, ``--adapter``, summarize's SOURCE, the
``final/`` of ``ftlaunch export``): a truncated or overwritten file costs one line naming it,
not a rank crash after the run directory was created.

What is read, and why that is enough to be cheap:

* JSON files (config, tokenizer, generation and adapter settings): parsed whole; they are small
  (tokenizer.json a few MB);
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

from launcher.core.errors import UserError

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
HEADER_LIMIT = 100 * 1024 * 1024  # safetensors refuses larger headers too
PICKLE_PROTO = 0x80


def json_problem(path: Path) -> str | None:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except json.JSONDecodeError as exc:
        return f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
    return None if isinstance(data, dict) else "not a JSON object"


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


def check_model_files(directory: Path, what: str) -> None:
    """Refuse (one line naming the file, exit 2) when a file the ranks load is damaged."""
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
