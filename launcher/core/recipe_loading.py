"""Reading recipes: YAML files (a key given twice refused), ``--set KEY=VALUE`` overrides,
one-line validation errors naming the key, the value and the fix, the run's own recipe.yaml, and
the key table (``ftlaunch recipe keys``). What a recipe is, its sections and rules, is
``core/recipe.py``.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from launcher.core.errors import UserError
from launcher.core.paths import project_dir
from launcher.core.recipe import EMBEDDED_DATA, EMBEDDED_MODEL, Recipe
from launcher.core.rundir import RunDir


def default_recipe_path(method: str) -> Path:
    return project_dir("recipes") / f"{method}.yaml"


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: plain YAML
    keeps the last one, so a recipe with ``lr:`` twice would silently train with the second."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # A merge key (``<<: *base``) brings a mapping's entries in, and an explicit key may
        # override one of them (YAML's merge rule): only the mapping's own keys can repeat.
        own = [(key, value) for key, value in node.value if key.tag != "tag:yaml.org,2002:merge"]
        self.flatten_mapping(node)
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in own:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) and key in first:
                raise yaml.constructor.ConstructorError(
                    problem=f"key {key!r} appears twice in one mapping (first on line "
                    f"{first[key].start_mark.line + 1}); keep one",
                    problem_mark=key_node.start_mark,
                )
            if isinstance(key, str | int | float | bool):
                first[key] = key_node
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """YAML text as data, refusing a key given twice in one mapping (UniqueKeyLoader)."""
    return yaml.load(text, Loader=UniqueKeyLoader)


def yaml_error_line(exc: Exception) -> str:
    """`` line N`` of a YAML error that knows where it is (else nothing), for a one-line message."""
    mark = getattr(exc, "problem_mark", None)
    return f" line {mark.line + 1}" if mark else ""


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; every failure is a UserError naming the file."""
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"recipe {path} {state}; pass --recipe with a path to a YAML file (see recipes/)")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        where = yaml_error_line(exc)
        raise UserError(f"recipe {path}{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    except UnicodeDecodeError:
        raise UserError(f"recipe {path} is not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of sections (model:, data:, train:, ...)")
    return data


def section_at(path: list[str]) -> type[BaseModel] | None:
    """The schema class reached by walking ``path`` from Recipe (None where a part is no section)."""
    model: type[BaseModel] = Recipe
    for part in path:
        field = model.model_fields.get(part)
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return None
        model = field.annotation
    return model


def is_text_field(path: list[str]) -> bool:
    """True when the schema types this key as text, so ``--set`` keeps the value verbatim."""
    section = section_at(path[:-1])
    field = section.model_fields.get(path[-1]) if section else None
    return field is not None and field.annotation in (str, str | None)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``train.lr=3e-4`` into a key path and a value typed by YAML (text keys stay text)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item!r} must look like KEY=VALUE, e.g. --set train.lr=3e-4")
    path = key.strip().split(".")
    if not all(path):
        raise UserError(f"--set {item!r}: {key.strip()!r} has an empty part; keys look like train.lr")
    if is_text_field(path):
        return path, raw if raw != "null" else None
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and value.strip() != raw.strip():
        value = raw
    return path, value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set a dotted key in a nested dict; the schema later checks the key exists."""
    node = data
    for depth, part in enumerate(path[:-1]):
        parent = section_at(path[:depth])
        field = parent.model_fields.get(part) if parent is not None else None
        # a key holding a value, not a section; a mapping's entries can be set one by one
        is_value_key = (
            field is not None
            and section_at(path[: depth + 1]) is None
            and get_origin(field.annotation) is not dict
        )
        child = node.setdefault(part, {})
        if not isinstance(child, dict) or is_value_key:  # in the file, or a schema default
            raise UserError(f"--set {'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def build_recipe(
    data: dict[str, Any], source: str, overridden: list[list[str]] = (), flagged: dict[str, str] | None = None
) -> Recipe:
    """Validate raw data into a Recipe, turning pydantic's report into one line.

    The line names the flag when the bad key came from one (``flagged``: dotted key -> flag, e.g.
    ``{"launch.gpus": "--gpus"}``), ``--set`` when it came from an override, else ``source``. A
    flag's error carries the source "command line".
    """
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        loc = schema_key(exc.errors()[0]["loc"])
        key = ".".join(loc)
        reason = describe_validation_error(exc)
        flag = (flagged or {}).get(key) or flags_named(reason, flagged or {}, len(loc) <= 1)
        blamed = "command line" if flag else "--set" if caused_by(loc, reason, overridden) else source
        raise UserError(
            f"{flag or blamed}: {reason}", key=key or None, source=blamed, reason=reason
        ) from None


def flags_named(reason: str, flagged: dict[str, str], rule: bool) -> str | None:
    """A rule of a section or of the whole recipe broken by flags (``--zero 0 --offload optimizer``):
    the flags whose keys its message names, to blame instead of the recipe file the user never
    named; None when it names none."""
    if not rule:
        return None
    named = [flag for key, flag in flagged.items() if re.search(rf"\b{re.escape(key)}\b", reason)]
    return ", ".join(dict.fromkeys(named)) or None


def schema_key(loc: tuple) -> list[str]:
    """A pydantic error location as a recipe key: up to the first leaf key, so that a union's
    branch tags (``train.compile`` is bool | 'auto': ``train.compile.bool``) are not shown."""
    parts = [str(part) for part in loc]
    for depth in range(len(parts)):
        if section_at(parts[: depth + 1]) is None:
            field = section_at(parts[:depth]).model_fields.get(parts[depth]) if depth else None
            mapping = field is not None and get_origin(field.annotation) is dict
            return parts[: depth + 2] if mapping else parts[: depth + 1]  # a mapping's entry
    return parts


def caused_by(loc: list[str], reason: str, overridden: Sequence[list[str]]) -> bool:
    """Whether an error at ``loc`` comes from a ``--set``: the key itself, a section rule
    (``data.prompt`` needs {dialogue}: reported at ``data``) or an unknown section a --set wrote
    into; a rule of the whole recipe (loc ``[]``) when its message names a key the --set gave."""
    if not loc:
        return any(re.search(rf"\b{re.escape('.'.join(path))}\b", reason) for path in overridden)
    return any(path[: len(loc)] == loc for path in overridden)


def load_recipe_data(path: Path, overrides: list[str] = ()) -> tuple[dict[str, Any], list[list[str]]]:
    """The recipe file with ``--set`` overrides applied, not yet validated (flags may still
    change it: ``--model bart --set model.precision=fp16`` is valid only once both apply)."""
    data = read_yaml_mapping(path)
    return data, apply_overrides(data, overrides)


def apply_overrides(
    data: dict[str, Any], overrides: list[str], refuse: Callable[[str], None] | None = None
) -> list[list[str]]:
    """Apply ``--set KEY=VALUE`` items to raw recipe data, in order; the key paths they set (so that
    validation blames ``--set`` for them). ``refuse(item)`` may raise for a key the command does
    not take, before that item is applied."""
    overridden = []
    for item in overrides:
        key_path, value = parse_override(item)
        if refuse is not None:
            refuse(item)
        apply_override(data, key_path, value)
        overridden.append(key_path)
    return overridden


def load_recipe(path: Path, overrides: list[str] = ()) -> Recipe:
    data, overridden = load_recipe_data(path, overrides)
    return build_recipe(data, f"recipe {path}", overridden)


def describe_validation_error(exc: ValidationError) -> str:
    """One line for the first problem: the key, the bad value, what is allowed."""
    errors = exc.errors()
    error = errors[0]
    loc = schema_key(error["loc"])
    key = ".".join(loc) or "recipe"
    kind = error["type"]
    value = error.get("input")
    branches = [e["msg"].lower() for e in errors if schema_key(e["loc"]) == loc and e["input"] == value]
    if len(branches) > 1 and len(error["loc"]) > len(loc):  # a union key: what each branch accepts
        return f"{key}={value!r}: " + "; or ".join(branches)
    if kind == "extra_forbidden":
        return f"unknown key {key}{did_you_mean(loc)}"
    if kind == "literal_error":
        allowed = error.get("ctx", {}).get("expected", "")
        return f"{key}={value!r} is not allowed; use one of {allowed}"
    if kind == "value_error":
        return str(error.get("ctx", {}).get("error", error["msg"]))
    return f"{key}={value!r}: {error['msg'].lower()}"


def did_you_mean(loc: list[str]) -> str:
    """Suggest the closest valid key at the same level of the schema."""
    section = section_at(loc[:-1])
    if section is None:
        return ""
    choices = list(section.model_fields)
    close = difflib.get_close_matches(loc[-1], choices, n=1)
    if close:
        return f"; did you mean {'.'.join(loc[:-1] + [close[0]])}?"
    return f"; valid keys here: {', '.join(choices)}"


# ---------------------------------------------------------------- the schema describes itself


class KeyInfo(NamedTuple):
    key: str  # dotted: train.lr
    type: str  # as written in the schema: int | None, Literal['linear', ...]
    default: str  # YAML text of the default
    description: str


def type_name(annotation: Any) -> str:
    """The annotation as a reader writes it (``int | None``, ``'a' | 'b'``), not ``typing.Optional[int]``."""
    if get_origin(annotation) is Literal:
        return " | ".join(repr(arg) if isinstance(arg, str) else str(arg) for arg in get_args(annotation))
    if get_origin(annotation) in (Union, UnionType):
        return " | ".join(type_name(arg) for arg in get_args(annotation))
    if annotation is type(None):
        return "null"
    if get_origin(annotation) is Annotated:  # a constrained type: its base type
        return type_name(get_args(annotation)[0])
    if get_origin(annotation) is list:
        return f"list[{type_name(get_args(annotation)[0])}]"
    return getattr(annotation, "__name__", str(annotation))


def absolute_local_paths(recipe: Recipe) -> Recipe:
    """The recipe with its local model, tokenizer and data folders as absolute paths: a relative
    ``--data ds`` in recipe.yaml would name another folder (or none) for a resume started from
    another directory, a copied run, or a SLURM job's other working directory. Embedded names and
    hub ids stay as written; symbolic links are kept (not resolved)."""

    def absolute(name: str | None, embedded: str) -> str | None:
        if name is None or name == embedded or not Path(name).expanduser().exists():
            return name
        return os.path.abspath(Path(name).expanduser())

    model = recipe.model.model_copy(
        update={
            "name": absolute(recipe.model.name, EMBEDDED_MODEL),
            "tokenizer": absolute(recipe.model.tokenizer, EMBEDDED_MODEL),
        }
    )
    data = recipe.data.model_copy(update={"dataset": absolute(recipe.data.dataset, EMBEDDED_DATA)})
    return recipe.model_copy(update={"model": model, "data": data})


def recipe_keys() -> list[KeyInfo]:
    """Every recipe key in schema order with its type, default and description: the one source of
    ``ftlaunch recipe keys``, README's key table and the flag help of ``ftlaunch full|lora``."""
    keys = []
    for section_name, section in Recipe.model_fields.items():
        for name, field in section.annotation.model_fields.items():
            default = field.get_default(call_default_factory=True)
            text = json.dumps(default)  # JSON is YAML: what a recipe file would say
            keys.append(
                KeyInfo(f"{section_name}.{name}", type_name(field.annotation), text, field.description or "")
            )
    return keys


def key_description(key: str) -> str:
    """The schema's description of a dotted key (``launch.gpus``)."""
    section, name = key.split(".")
    return Recipe.model_fields[section].annotation.model_fields[name].description or ""


def keys_markdown() -> str:
    """README's key table (`ftlaunch recipe keys --markdown`)."""
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for info in recipe_keys():
        cells = (f"`{info.key}`", f"`{info.type}`", f"`{info.default}`", info.description)
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML, sections in schema order."""
    header = "# Fully resolved recipe of this run (written by ftlaunch; each rank reads it).\n"
    body = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=100)
    return header + body


def read_run_recipe(run_dir: Path) -> Recipe:
    path = RunDir(run_dir).recipe_yaml
    return build_recipe(read_yaml_mapping(path), f"recipe {path}")
