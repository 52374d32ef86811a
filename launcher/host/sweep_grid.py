"""The points of a sweep: ``--grid KEY=V1,V2`` products or the variants of a YAML file, each a set of
recipe overrides (``--set KEY=VALUE`` texts), and the directory name each point gets from its values.

Values stay the text the user wrote (``3e-4`` stays ``3e-4``): that text is what ``--set`` parses
into the recipe, what names the run directory, and what the report shows.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any

import yaml

from launcher.core.errors import UserError
from launcher.core.recipe_loading import load_yaml, yaml_error_line

# A point: recipe key (dotted) -> value text, in the order of the keys.
Values = dict[str, str]

UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")
MAX_NAME = 120


def unquoted(value: str) -> str:
    """A value wholly in quotes (``'a, {dialogue}'``: the quotes protect its comma) without them,
    as YAML reads it; anything else as written."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        try:
            text = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        return text if isinstance(text, str) else value
    return value


def split_values(text: str) -> list[str]:
    """``1e-4,3e-4`` -> two values; commas inside [..], {..} or quotes belong to one value (a YAML
    list, or a quoted text, whose quotes are then dropped)."""
    values, depth, quote, start = [], 0, "", 0
    for index, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(unquoted(text[start:index].strip()))
            start = index + 1
    values.append(unquoted(text[start:].strip()))
    return values


def check_key(key: str, source: str) -> None:
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", key):
        raise UserError(f"{source}: {key!r} is not a recipe key; use SECTION.KEY, e.g. train.lr")
    if key == "train.method":
        raise UserError(
            f"{source}: a sweep runs one method (ftlaunch sweep full|lora); sweep the other method "
            "with its own command into another directory"
        )


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``--grid`` options -> {key: [value texts]}, keys in the order given."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not raw.strip():
            raise UserError(f"--grid {item!r} must look like KEY=V1,V2,..., e.g. --grid train.lr=1e-4,3e-4")
        check_key(key, f"--grid {item}")
        if key in grid:
            raise UserError(f"--grid {key} is given twice; list all its values in one --grid {key}=V1,V2")
        values = split_values(raw)
        if "" in values:
            raise UserError(f"--grid {item!r} has an empty value; separate values by single commas")
        repeated = sorted({value for value in values if values.count(value) > 1})
        if repeated:
            raise UserError(f"--grid {key} lists {', '.join(repeated)} twice; give each value once")
        grid[key] = values
    return grid


def grid_points(grid: dict[str, list[str]]) -> list[Values]:
    """The cartesian product, the first key varying slowest."""
    keys = list(grid)
    return [dict(zip(keys, combination)) for combination in itertools.product(*grid.values())]


def value_text(value: Any) -> str:
    """A YAML value as ``--set`` text that parses back to the same value (text stays text)."""
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    return json.dumps(value)


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{train: {lr: 1e-4}}`` and ``{train.lr: 1e-4}`` both -> ``{"train.lr": 1e-4}``."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def read_variants(path: Path) -> list[Values]:
    """A YAML list of variants (or ``variants:`` holding one), each a mapping of recipe keys."""
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"--variants {path} {state}; pass a YAML file with a list of variants")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(
            f"--variants {path}{yaml_error_line(exc)} is not valid YAML: {getattr(exc, 'problem', exc)}"
        ) from None
    if isinstance(data, dict) and set(data) == {"variants"}:
        data = data["variants"]
    if not isinstance(data, list) or not data:
        raise UserError(
            f"--variants {path} must hold a list of variants, e.g. '- {{train.lr: 1e-4, lora.r: 8}}'"
        )
    points = []
    for number, variant in enumerate(data, start=1):
        if not isinstance(variant, dict) or not variant:
            raise UserError(f"--variants {path}: variant {number} is not a mapping of recipe keys to values")
        flat = flatten(variant)
        for key in flat:
            check_key(key, f"--variants {path} variant {number}")
        points.append({key: value_text(value) for key, value in flat.items()})
    return points


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each key's last part (``lr``), or the whole key where two keys share their last part."""
    lasts = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: last if lasts.count(last) == 1 else key for key, last in zip(keys, lasts)}


def readable(text: str) -> str:
    """A value as a name part: a list ``[q,v]`` reads ``q+v``."""
    return re.sub(r"[\[\]{}\"' ]", "", text).replace(",", "+")


def point_name(values: Values, keys: list[str]) -> str:
    """The directory name of a point: ``lr=3e-4_r=8``; filesystem-safe, the same on every run."""
    short = short_keys(keys)
    parts = [f"{short[key]}={readable(values[key])}" for key in keys if key in values]
    name = UNSAFE.sub("-", "_".join(parts)).strip(".") or "default"
    if len(name) > MAX_NAME:
        digest = hashlib.sha1("\n".join(parts).encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME - 9]}-{digest}"
    return name
