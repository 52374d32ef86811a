"""Recipes: the seed YAML files and `--set` overrides (parsing, typing, one-line errors).

Everything here runs in-process on `launcher.core.recipe` (no subprocess, no torch): milliseconds.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from launcher.core.errors import UserError
from launcher.core.recipe import Recipe
from launcher.core.recipe_loading import default_recipe_path, dump_recipe, load_recipe

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


def test_the_recipes_users_pass_are_the_packaged_defaults():
    """`ftlaunch full|lora` without --recipe read recipes/full.yaml and recipes/lora.yaml, and those
    are full and LoRA recipes (not only present: loaded, and of the right method)."""
    for method in ("full", "lora"):
        path = default_recipe_path(method)
        assert path.resolve() == (REPO / "recipes" / f"{method}.yaml").resolve()
        assert load_recipe(path).train.method == method


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


def seed_table() -> dict[str, dict[str, str]]:
    """docs/ARCHITECTURE.md's seed recipe table: {method: {key: value as written}}."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("## The seed recipe", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    table: dict[str, dict[str, str]] = {"full": {}, "lora": {}}
    for row in rows:
        keys, full, lora = (cell.strip() for cell in row.strip("|").split("|"))
        for method, cell in (("full", full), ("lora", lora)):
            if cell != "-":
                table[method][keys] = full if cell == "the same" else cell
    return table


def seed_values(keys: str, cell: str) -> dict[str, object]:
    """One table row as {dotted key: typed value}: "`lora.r`, `lora.alpha`" | "`32`, `32`"."""
    names = re.findall(r"`([a-z_.]+)`", keys)
    cell = cell.split(" (")[0]  # "`0.01` (AdamW)"
    values = re.findall(r"`([^`]*)`", cell)
    if names == ["lora.target_modules"]:
        return {names[0]: values}
    assert len(names) == len(values), (keys, cell)
    return {
        name: yaml.safe_load(value.replace("\\n", "\n"))
        if name != "data.prompt"
        else value.replace("\\n", "\n")
        for name, value in zip(names, values)
    }


@pytest.mark.parametrize("method", ["full", "lora"])
def test_recipes_hold_the_seed_values_of_the_architecture_note(method: str):
    """Every value of the seed recipe table (docs/ARCHITECTURE.md, from the seed notebook) is what
    `ftlaunch full|lora` resolves: model, data, prompt, optimizer settings and the LoRA shape."""
    recipe = recipe_with(method=method).model_dump(mode="json")
    expected = {}
    for keys, cell in seed_table()[method].items():
        expected.update(seed_values(keys, cell))
    assert len(expected) >= (6 if method == "full" else 11), expected
    for key, value in expected.items():
        section, name = key.split(".")
        got = recipe[section][name]
        if key == "lora.target_modules":  # null: the attention query and value projections (T5: q, v)
            from launcher.core.families import T5_MODULE_NAMES, resolve_lora_targets

            got = resolve_lora_targets(T5_MODULE_NAMES, got, "t5")
        assert got == (float(value) if isinstance(got, float) else value), (
            f"{method}: {key} is {got!r}, the seed's is {value!r}"
        )
    assert recipe["data"]["prompt"] == SEED_PROMPT
    assert recipe["train"]["method"] == method


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
    ("override", "reason"),
    [
        ("data.prompt=hi", "data.prompt must contain the placeholder {dialogue}"),  # a section's rule
        ("model.precision=fp16", "model.precision=fp16 overflows T5"),  # rules of the whole recipe
        ("train.micro_batch_tokens=10", "train.micro_batch_tokens=10 is smaller than the longest example"),
        ("train.best_metric=rouge1", "train.best_metric=rouge1 needs ROUGE during training"),
        ("bogus.x=1", "unknown key bogus"),
        ("train.compile=maybe", "train.compile='maybe': input should be a valid boolean"),
    ],
)
def test_a_rule_broken_by_a_set_blames_the_set(override: str, reason: str):
    """Not the recipe file: the --set broke the rule (and a union key is named, not its branch)."""
    message = refusal(override, method="lora")
    assert message.startswith("--set: ") and reason in message, message
    assert "recipes/" not in message and "compile.bool" not in message, message


def test_a_rule_the_recipe_file_breaks_still_blames_the_file(tmp_path):
    recipe = tmp_path / "fp16.yaml"
    recipe.write_text("model:\n  precision: fp16\n")
    with pytest.raises(UserError, match=rf"^recipe {re.escape(str(recipe))}: model.precision=fp16 overflows"):
        load_recipe(recipe, ["train.lr=1e-4"])


@pytest.mark.parametrize("override", [".lr=1", "train..lr=1", "train.=1"])
def test_set_key_with_an_empty_part_is_refused(override: str):
    assert "has an empty part" in refusal(override)


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


# ---------------------------------------------------------------- the schema describes itself


def test_every_recipe_key_has_a_description():
    from launcher.core.recipe_loading import recipe_keys

    keys = recipe_keys()
    assert len(keys) == sum(len(field.annotation.model_fields) for field in Recipe.model_fields.values())
    missing = [info.key for info in keys if len(info.description) < 8]
    assert not missing, f"recipe keys without a description in launcher/core/recipe.py: {missing}"


def test_readme_key_table_is_the_schemas():
    from launcher.core.recipe_loading import keys_markdown

    text = (REPO / "README.md").read_text()
    begin, end = "<!-- recipe-keys:begin -->\n", "<!-- recipe-keys:end -->"
    assert begin in text and end in text, "README.md lost its recipe-keys markers"
    table = text.split(begin, 1)[1].split(end, 1)[0]
    assert table == keys_markdown(), (
        "README.md's recipe key table differs from the schema (launcher/core/recipe.py): regenerate it with "
        "`ftlaunch recipe keys --markdown` and paste it between the recipe-keys markers"
    )


def test_recipe_keys_command_lists_every_key_with_its_default():
    from conftest import run_cli_in_process

    from launcher.core.recipe_loading import recipe_keys

    result = run_cli_in_process("recipe", "keys")
    assert result.returncode == 0, result.stderr
    lines = {
        line.split()[0]: line for line in result.stdout.splitlines()[1:] if line[:1].strip()
    }  # not wrapped text
    for info in recipe_keys():
        assert info.key in lines, f"{info.key} missing from `ftlaunch recipe keys`"
        assert info.description[:20] in lines[info.key], lines[info.key]
    # the defaults shown are the ones a recipe without the key resolves to
    assert '"google/flan-t5-base"' in lines["model.name"] and "1e-05" in lines["train.lr"]
    assert Recipe().train.lr == 1e-05 and Recipe().model.name == "google/flan-t5-base"


def test_recipe_validate_accepts_a_good_recipe_and_refuses_a_bad_one(tmp_path):
    from conftest import run_cli_in_process

    ok = run_cli_in_process("recipe", "validate", str(REPO / "recipes" / "lora.yaml"), "--set", "lora.r=8")
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    assert ok.stdout.strip() == f"OK: {REPO / 'recipes' / 'lora.yaml'} is a valid lora recipe"
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lrr: 1e-4\n")
    before = bad.read_bytes()
    result = run_cli_in_process("recipe", "validate", str(bad))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"error: recipe {bad}: unknown key train.lrr; did you mean train.lr?"
    assert bad.read_bytes() == before
    wrong = run_cli_in_process(
        "recipe", "validate", str(REPO / "recipes" / "full.yaml"), "--set", "train.lr=abc"
    )
    assert wrong.returncode == 2 and wrong.stderr.startswith("error: --set: train.lr='abc'"), wrong.stderr


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (("eval.min_new_tokens=200",), ["eval.min_new_tokens=200", "eval.max_new_tokens=128"]),
        (("eval.length_penalty=2.0",), ["eval.length_penalty=2.0", "eval.num_beams"]),
        (("eval.no_repeat_ngram_size=-1",), ["eval.no_repeat_ngram_size", "-1"]),
        (("eval.repetition_penalty=0",), ["eval.repetition_penalty", "0"]),
    ],
)
def test_generation_settings_that_cannot_act_are_refused(overrides: tuple[str, ...], words: list[str]):
    message = refusal(*overrides)
    for word in words:
        assert word in message, message


def test_generation_settings_are_what_generate_receives():
    recipe = recipe_with(
        "eval.num_beams=4", "eval.length_penalty=0.8", "eval.no_repeat_ngram_size=3", "eval.min_new_tokens=5"
    )
    assert recipe.eval.generation() == {
        "max_new_tokens": 128,
        "min_new_tokens": 5,
        "num_beams": 4,
        "length_penalty": 0.8,
        "no_repeat_ngram_size": 3,
        "repetition_penalty": 1.0,
        "do_sample": False,
    }


def test_adafactor_is_refused_under_fsdp2_only():
    """FSDP2 would hand Adafactor row shards to factor; ZeRO's flat partitions are accepted
    (unfactored, tests/test_adafactor_zero.py)."""
    message = refusal("train.optimizer=adafactor", "launch.fsdp=true")
    assert (
        "train.optimizer=adafactor" in message and "--fsdp" in message and "train.optimizer=adamw" in message
    )
    from launcher.host.render import render_deepspeed_config

    for stage in (1, 2, 3):
        recipe = recipe_with("train.optimizer=adafactor", f"launch.zero={stage}")
        # DeepSpeed takes a client optimizer outside its tested list only when told to, and the
        # default recipes' deepspeed.json stays as it was (tests/snapshots).
        assert render_deepspeed_config(recipe)["zero_allow_untested_optimizer"] is True
        assert "zero_allow_untested_optimizer" not in render_deepspeed_config(
            recipe_with(f"launch.zero={stage}")
        )


def test_adafactor_is_transformers_with_the_recipes_groups():
    from transformers.optimization import Adafactor

    from launcher.rank.model import build_model
    from launcher.rank.optimization import build_optimizer

    recipe = recipe_with("model.name=tiny-t5", "train.optimizer=adafactor", "train.lr=1e-3")
    optimizer = build_optimizer(build_model(recipe, 1000), recipe)
    assert isinstance(optimizer, Adafactor)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    assert all(
        g["lr"] == 1e-3 and not g["relative_step"] and not g["scale_parameter"]
        for g in optimizer.param_groups
    )


def test_a_key_given_twice_in_a_recipe_is_refused(tmp_path):
    """Plain YAML keeps the last of two equal keys: a recipe would silently train with it."""
    recipe = tmp_path / "twice.yaml"
    recipe.write_text("train:\n  lr: 1e-3\n  epochs: 2\n  lr: 5e-4\n")
    with pytest.raises(
        UserError,
        match=r"line 4 is not valid YAML: key 'lr' appears twice in one mapping \(first on line 2\)",
    ):
        load_recipe(recipe)


def test_a_key_given_twice_in_a_variants_file_is_refused(tmp_path):
    from launcher.host.sweep_grid import read_variants

    variants = tmp_path / "variants.yaml"
    variants.write_text("- {lora.r: 4}\n- {lora.r: 8, lora.r: 16}\n")
    with pytest.raises(
        UserError, match=r"--variants .* line 2 is not valid YAML: key 'lora.r' appears twice"
    ):
        read_variants(variants)


@pytest.mark.parametrize("key", ["model.name", "data.dataset"])
def test_an_empty_model_or_dataset_is_the_recipe_s_error(tmp_path, key):
    """Not a later "--model : no config.json there" for a flag the user never passed."""
    section, name = key.split(".")
    recipe = tmp_path / "empty.yaml"
    recipe.write_text(f'{section}:\n  {name}: ""\n')
    with pytest.raises(
        UserError, match=rf"^recipe {re.escape(str(recipe))}: {key}='': string should have at least 1"
    ):
        load_recipe(recipe)


@pytest.mark.parametrize(
    ("key", "value"),
    [("train.epochs", "true"), ("train.lr", "false"), ("eval.limit", "true"), ("launch.gpus", "true")],
)
def test_a_boolean_for_a_number_is_refused(key: str, value: str):
    """YAML's true/false would otherwise count as 1/0 (pydantic's lax mode) and train silently."""
    message = refusal(f"{key}={value}")
    assert message == f"--set: {key}={value.capitalize()} is not a number", message


def test_a_boolean_key_still_takes_booleans():
    recipe = recipe_with("train.compile=true", "eval.after_training=false")
    assert recipe.train.compile is True and recipe.eval.after_training is False
