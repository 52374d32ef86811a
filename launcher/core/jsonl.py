"""JSON Lines, read and written in one way everywhere: records end at ``\\n`` and nowhere else.

``str.splitlines()`` also splits on U+2028, U+2029, U+0085, \\x1c-\\x1e, \\x0b and \\x0c, which
``json.dumps(..., ensure_ascii=False)`` leaves raw inside strings: a dialogue holding one would be
cut in two and the halves are not JSON. Every reader of a ``.jsonl`` file in the project (the
data, predictions, summaries, metrics) goes through this module; files are UTF-8 whatever the
locale says.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from launcher.core.errors import UserError


def is_number(value: Any) -> bool:
    """A JSON number (``true``/``false`` are not: Python counts bool as int)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_whole(value: Any, least: int | None = None) -> bool:
    """A JSON whole number (not a bool), at least ``least`` when given."""
    return isinstance(value, int) and not isinstance(value, bool) and (least is None or value >= least)


def numbered_lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) split on ``\\n`` only; a CRLF's ``\\r`` is dropped."""
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line[:-1] if line.endswith("\r") else line


def parse_line(line: str, source: str, number: int) -> dict[str, Any]:
    """One line as a JSON object, or a UserError naming the source, the line and the fix."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        hint = (
            " (it looks like a Python literal: convert with json.dumps)"
            if line.lstrip().startswith("{'")
            else ""
        )
        raise UserError(
            f"{source} line {number} is not JSON ({exc.msg}){hint}; each line must be one JSON object"
        ) from None
    if not isinstance(row, dict):
        raise UserError(f"{source} line {number} is not a JSON object; each line must be one JSON object")
    surrogate = SURROGATE_ESCAPE.search(line) and lone_surrogate(row)
    if surrogate:
        raise UserError(
            f"{source} line {number} holds \\u{ord(surrogate):04x}, half of a UTF-16 surrogate pair, which is no "
            "character (the tokenizer cannot encode it); write the character itself, or both halves of its pair"
        )
    return row


# JSON's escape of a UTF-16 surrogate (half of a pair): json.loads joins a valid pair into one
# character, and keeps a lone half as an invalid one that only fails later, in the tokenizer.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def lone_surrogate(value: Any) -> str | None:
    """The first unpaired surrogate in a parsed JSON value's strings (keys included), or None."""
    if isinstance(value, str):
        return next((char for char in value if "\ud800" <= char <= "\udfff"), None)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = lone_surrogate(key) if isinstance(key, str) else None
        found = found or lone_surrogate(item)
        if found:
            return found
    return None


def parse_jsonl_text(text: str, source: str) -> list[tuple[int, dict[str, Any]]]:
    """Strict JSON Lines held in a string (standard input), as (line number, object)."""
    return [
        (number, parse_line(line, source, number)) for number, line in numbered_lines(text) if line.strip()
    ]


def read_jsonl_lines(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Strict JSON Lines, as (line number, object): every failure names the file, line and fix.

    A UTF-8 byte-order mark and CRLF line ends (Windows editors, spreadsheet exports) are accepted.
    Lines are decoded one by one so that bad bytes are reported with their line.
    """
    rows: list[tuple[int, dict[str, Any]]] = []
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):  # binary lines end at b"\n" only
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(
                    f"{path} line {number} is not UTF-8 text (byte {offset + exc.start}); re-encode it as UTF-8"
                ) from None
            offset += len(raw)
            if line.strip():
                rows.append((number, parse_line(line, str(path), number)))
    return rows


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Strict JSON Lines as a list of objects (see read_jsonl_lines)."""
    return [row for _, row in read_jsonl_lines(path)]


def read_jsonl_partial(path: Path) -> list[dict[str, Any]]:
    """A file another process may be appending to right now: what parses, skipping the rest
    (a half-written last line); nothing when the file cannot be read."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return []
    rows = []
    for _, line in numbered_lines(text):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def dumps_line(row: dict[str, Any]) -> str:
    """One record with its ``\\n`` (text kept readable: non-ASCII characters are not escaped)."""
    return json.dumps(row, ensure_ascii=False) + "\n"


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.write_text("".join(dumps_line(row) for row in rows), encoding="utf-8")


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(dumps_line(row))
