"""Recipes: the seed YAML files and `--set` overrides (parsing, typing, one-line errors).

Everything here runs in-process on `launcher.recipe` (no subprocess, no torch): milliseconds.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from launcher.errors import UserError
from launcher.recipe import Recipe, default_recipe_path, dump_recipe, load_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
SEED_PROMPT = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "


def recipe_with(*overrides: str, method: str = "full") -> Recipe:
    return load_recipe(default_recipe_path(method), list(overrides))


def refusal(*overrides: str, method: str = "full") -> str:
    """The one-line message `--set OVERRIDES...` is refused with."""
    with pytest.raises(UserError) as info:
        recipe_with(*overrides, method=method)
    message = str(info.value)
    assert "\n" not in message, f"error is not one line: {message!r}"
    return message


def header_comment(path: Path) -> list[str]:
    """The comment lines before the first YAML key."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


# ---------------------------------------------------------------- the recipe files


def test_seed_recipes_exist():
    assert {path.name for path in RECIPES} >= {"full.yaml", "lora.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.name)
def test_every_recipe_parses(path: Path):
    recipe = load_recipe(path)
    assert recipe.train.method in {"full", "lora"}
    assert "{dialogue}" in recipe.data.prompt


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.name)
def test_every_recipe_header_shows_an_ftlaunch_command(path: Path):
    method = load_recipe(path).train.method
    header = header_comment(path)
    assert header, f"{path.name} has no header comment"
    assert any(re.search(rf"\bftlaunch {method}\b", line) for line in header), (
        f"the header of {path.name} shows no `ftlaunch {method} ...` command:\n" + "\n".join(header)
    )


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.name)
def test_every_recipe_round_trips_through_the_resolved_dump(path: Path):
    recipe = load_recipe(path)
    assert Recipe.model_validate(yaml.safe_load(dump_recipe(recipe))) == recipe


@pytest.mark.parametrize("method", ["full", "lora"])
def test_seed_values_shared_by_both_recipes(method: str):
    recipe = recipe_with(method=method)
    assert recipe.train.method == method
    assert recipe.model.name == "google/flan-t5-base"
    assert recipe.data.dataset == "knkarthick/dialogsum"
    assert recipe.data.prompt == SEED_PROMPT
    assert recipe.train.weight_decay == 0.01
    assert recipe.train.epochs == 1


def test_full_recipe_seed_values():
    assert recipe_with(method="full").train.lr == 1e-5


def test_lora_recipe_seed_values():
    recipe = recipe_with(method="lora")
    assert recipe.train.lr == 1e-3
    lora = recipe.lora
    assert (lora.r, lora.alpha, lora.target_modules, lora.dropout, lora.bias) == (32, 32, None, 0.05, "none")
    # null: the attention query and value projections, which for the seed's T5 are q and v
    from launcher.families import T5_MODULE_NAMES, resolve_lora_targets

    assert resolve_lora_targets(T5_MODULE_NAMES, lora.target_modules, "t5") == ["q", "v"]


# ---------------------------------------------------------------- --set: keys and types


@pytest.mark.parametrize(
    ("override", "section", "key", "expected"),
    [
        ("train.lr=3e-4", "train", "lr", 3e-4),  # YAML 1.1 reads 3e-4 as text: the schema makes it a float
        ("train.lr=0.0002", "train", "lr", 2e-4),
        ("launch.gpus=4", "launch", "gpus", 4),
        ("train.grad_accum=16", "train", "grad_accum", 16),
        ("data.group_by_length=false", "data", "group_by_length", False),
        ("lora.save_merged=true", "lora", "save_merged", True),
        ("lora.target_modules=[q,k,v]", "lora", "target_modules", ["q", "k", "v"]),
        ("lora.target_modules=[q, k, v, o]", "lora", "target_modules", ["q", "k", "v", "o"]),
        ("train.max_grad_norm=null", "train", "max_grad_norm", None),
        ("train.checkpoint_every=~", "train", "checkpoint_every", None),
        ("eval.limit=", "eval", "limit", None),
        ("model.name=t5-small", "model", "name", "t5-small"),
        ("data.prompt=Q=A? {dialogue}", "data", "prompt", "Q=A? {dialogue}"),  # split on the first '=' only
        ("data.prompt=Dialogue: {dialogue} Summary:", "data", "prompt", "Dialogue: {dialogue} Summary:"),
    ],
)
def test_set_dotted_key_and_type(override: str, section: str, key: str, expected):
    value = getattr(getattr(recipe_with(override, method="lora"), section), key)
    assert value == expected
    assert type(value) is type(expected)


def test_set_applies_in_order_and_keeps_other_keys():
    recipe = recipe_with("train.lr=1e-4", "train.lr=2e-4", "launch.zero=2")
    assert recipe.train.lr == 2e-4
    assert recipe.launch.zero == 2
    assert recipe.train.micro_batch_size == 8  # untouched keys keep the recipe's value


@pytest.mark.parametrize(
    ("override", "section", "key", "expected"),
    [
        ("data.prompt={dialogue}", "data", "prompt", "{dialogue}"),  # YAML: a flow mapping
        ("model.name=2024", "model", "name", "2024"),  # YAML: an int
        ("data.train_split=on", "data", "train_split", "on"),  # YAML 1.1: a bool
    ],
)
def test_set_text_key_takes_the_value_as_written(override: str, section: str, key: str, expected: str):
    assert getattr(getattr(recipe_with(override), section), key) == expected


# ---------------------------------------------------------------- --set: one-line refusals


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("train.lrr=1e-4", "did you mean train.lr?"),
        ("trian.lr=1e-4", "did you mean train?"),
        ("lora.alfa=8", "did you mean lora.alpha?"),
    ],
)
def test_set_unknown_key_suggests_the_closest(override: str, suggestion: str):
    message = refusal(override, method="lora")
    assert "unknown key" in message
    assert suggestion in message


def test_set_unknown_key_without_close_match_lists_valid_keys():
    message = refusal("launch.zzzzzz=1")
    assert "valid keys here" in message and "gpus" in message and "zero" in message


def test_set_below_a_value_is_refused():
    assert "not a section" in refusal("train.lr.x=1")


@pytest.mark.parametrize(
    ("override", "key", "bad"),
    [
        ("train.lr=abc", "train.lr", "abc"),
        ("launch.gpus=four", "launch.gpus", "four"),
        ("train.epochs=1.5", "train.epochs", "1.5"),
        ("lora.target_modules=q", "lora.target_modules", "q"),
        ("launch.gpus=0", "launch.gpus", "0"),
    ],
)
def test_set_wrong_type_names_key_and_value(override: str, key: str, bad: str):
    message = refusal(override, method="lora")
    assert message.startswith("--set"), message
    assert key in message and bad in message


@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("launch.zero=5", ["0", "1", "2", "3"]),
        ("model.precision=fp8", ["'bf16'", "'fp32'", "'fp16'"]),
        ("launch.offload=gpu", ["'none'", "'optimizer'", "'full'"]),
        ("lora.bias=some", ["'none'", "'all'", "'lora_only'"]),
        ("train.scheduler=step", ["'linear'", "'cosine'", "'constant'"]),
    ],
)
def test_set_literal_lists_allowed_values(override: str, allowed: list[str]):
    message = refusal(override, method="lora")
    assert override.split("=")[0] in message and "not allowed" in message
    for value in allowed:
        assert value in message


@pytest.mark.parametrize("name", ["google/flan-t5-base", "tiny-t5", "t5-small", "google/t5-v1_1-xl"])
def test_fp16_refused_for_t5(name: str):
    message = refusal("model.precision=fp16", f"model.name={name}")
    assert "fp16" in message and "T5" in message and "bf16" in message


def test_fp16_allowed_for_a_model_that_is_not_t5():
    assert recipe_with("model.precision=fp16", "model.name=facebook/bart-base").model.precision == "fp16"


@pytest.mark.parametrize("offload", ["optimizer", "full"])
def test_offload_without_zero_refused(offload: str):
    message = refusal(f"launch.offload={offload}")
    assert "launch.offload" in message and "--zero" in message


@pytest.mark.parametrize("zero", [1, 2])
def test_offload_full_needs_zero3(zero: int):
    message = refusal("launch.offload=full", f"launch.zero={zero}")
    assert "--zero 3" in message and "optimizer" in message


@pytest.mark.parametrize(
    ("zero", "offload"), [(1, "optimizer"), (2, "optimizer"), (3, "optimizer"), (3, "full")]
)
def test_valid_offload_combinations(zero: int, offload: str):
    launch = recipe_with(f"launch.zero={zero}", f"launch.offload={offload}").launch
    assert (launch.zero, launch.offload) == (zero, offload)
