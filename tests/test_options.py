"""Recipe resolution outside the CLI (launcher/host/options.py): typed options -> a validated recipe,
for `ftlaunch full|lora`, `ftlaunch eval` and each sweep point alike; an error about a recipe key
carries the key and where its value came from as fields (launcher.core.errors.UserError), so a sweep
names its point without taking the message text apart. In process, nothing launched.
"""

from __future__ import annotations

import json

import pytest

from launcher.core.errors import UserError
from launcher.core.recipe_loading import build_recipe, default_recipe_path, load_recipe
from launcher.host.options import EvalOptions, Offload, TrainOptions, eval_recipe, train_recipe
from launcher.host.sweep import point_recipe
from launcher.host.sweep_manifest import Point

TINY = ("model.name=tiny-t5", "data.dataset=sample")


def test_a_recipe_error_carries_its_key_source_and_reason_as_fields():
    raw = load_recipe(default_recipe_path("full")).model_dump(mode="json")
    raw["train"]["lr"] = "abc"
    for overridden, flagged, source, shown in (
        ([["train", "lr"]], {}, "--set", "--set"),
        ([], {"train.lr": "--lr"}, "command line", "--lr"),
        ([], {"train.epochs": "--epochs"}, "recipe r.yaml", "recipe r.yaml"),
    ):
        with pytest.raises(UserError) as caught:
            build_recipe(raw, "recipe r.yaml", overridden, flagged)
        error = caught.value
        assert (error.key, error.source) == ("train.lr", source)
        assert error.reason.startswith("train.lr='abc': input should be a valid number")
        assert str(error) == f"{shown}: {error.reason}"  # a flag's error names the flag


def test_a_plain_user_error_has_no_key_and_its_message_as_reason():
    error = UserError("--output x is a file")
    assert (error.key, error.source, error.reason) == (None, None, "--output x is a file")


def test_typed_train_options_make_the_commands_recipe():
    options = TrainOptions(overrides=[*TINY, "train.lr=3e-4"], gpus=2, cpu=True, offload=Offload.none)
    recipe, note = train_recipe("lora", options)
    assert (recipe.model.name, recipe.train.lr, recipe.launch.gpus, recipe.launch.cpu) == (
        "tiny-t5",
        3e-4,
        2,
        True,
    )
    assert recipe.train.method == "lora" and note is None
    # A flag wins over --set, and a bad flag value is blamed on the command line, as a field too.
    with pytest.raises(UserError) as caught:
        train_recipe("lora", TrainOptions(overrides=[*TINY, "launch.gpus=2"], gpus=0))
    assert (caught.value.key, caught.value.source) == ("launch.gpus", "command line")
    assert str(caught.value).startswith("--gpus: launch.gpus=0: ")


@pytest.mark.parametrize(
    ("flag", "value", "key"),
    [("--limit", "0", "eval.limit"), ("--gpus", "0", "launch.gpus"), ("--model", "", "model.name")],
)
def test_a_bad_eval_flag_is_named_in_the_error(flag, value, key):
    """``ftlaunch eval --limit 0`` names --limit (the user never wrote eval.limit)."""
    params = {"model": "tiny-t5", "adapter": None, "data": "sample", "split": "test", "limit": None}
    params.update(gpus=1, zero="0", cpu=True, overrides=[])
    params[flag[2:]] = int(value) if value.isdigit() else value
    with pytest.raises(UserError) as caught:
        eval_recipe(EvalOptions(**params))
    assert str(caught.value).startswith(f"{flag}: {key}=")
    assert caught.value.source == "command line"


def test_train_options_are_picked_from_a_commands_parameters():
    params = {"recipe_path": None, "overrides": list(TINY), "gpus": 2, "output": "x", "resume": "auto"}
    options = TrainOptions.from_params(params)
    assert (options.gpus, options.overrides, options.zero) == (2, list(TINY), None)
    assert options.with_overrides(["lora.r=4"]).overrides == [*TINY, "lora.r=4"]
    assert options.overrides == list(TINY)  # the options themselves are not changed


def test_eval_options_make_the_eval_recipe():
    options = EvalOptions(
        model="tiny-t5", adapter=None, data="sample", split="validation", limit=5, gpus=2, zero="3", cpu=True,
        overrides=["eval.num_beams=2"],
    )  # fmt: skip
    recipe = eval_recipe(options)
    assert (recipe.eval.split, recipe.eval.limit, recipe.eval.num_beams) == ("validation", 5, 2)
    assert (recipe.launch.gpus, recipe.launch.zero, recipe.launch.cpu) == (2, 3, True)
    with pytest.raises(UserError, match="--zero 2: evaluation either replicates"):
        eval_recipe(EvalOptions(**{**options.__dict__, "zero": "2"}))


@pytest.mark.parametrize(
    ("values", "line"),
    [
        # The point's own bad value: its name replaces the --set blame, whatever the message's form.
        ({"train.lr": "abc"}, "sweep point p: train.lr='abc': input should be a valid number"),
        ({"train.lrr": "1"}, "sweep point p: unknown key train.lrr; did you mean train.lr?"),
        # A bad value the point does not vary keeps its own source.
        (
            {"lora.r": "4"},
            "sweep point p: --set: train.warmup_ratio=2.0: input should be less than 1",
        ),
    ],
)
def test_a_sweep_point_error_is_blamed_on_the_point_by_its_fields(values, line):
    options = TrainOptions(overrides=[*TINY, "train.warmup_ratio=2.0"] if "lora.r" in values else list(TINY))
    with pytest.raises(UserError) as caught:
        point_recipe("lora", options.__dict__, Point(0, "p", values), fixed={})
    assert str(caught.value).startswith(line), str(caught.value)
    assert caught.value.source == "sweep point p"
    assert str(caught.value) == f"sweep point p: {caught.value.reason}"


def eval_options(**changes) -> EvalOptions:
    params = {"model": "tiny-t5", "adapter": None, "data": "sample", "split": "test", "limit": None}
    params.update(gpus=1, zero="0", cpu=True, overrides=[])
    return EvalOptions(**{**params, **changes})


def saved_model_folder(path, **settings):
    """A model folder as ftlaunch's final/ leaves it (only ftlaunch.json matters here)."""
    path.mkdir()
    written = {"prompt": "Chat:\n{dialogue}\nGist:", "max_source_length": 256, "precision": "fp32"}
    (path / "ftlaunch.json").write_text(
        json.dumps({**written, "num_beams": 3, "max_new_tokens": 40, **settings})
    )
    return path


def test_eval_follows_the_settings_saved_with_the_model_and_set_wins(tmp_path):
    """A run's final/ (or an adapter folder) is evaluated with the prompt, truncation, generation
    settings and precision it was evaluated with in its run; --set overrides one of them."""
    folder = saved_model_folder(tmp_path / "final")
    for options in (eval_options(model=str(folder)), eval_options(adapter=folder)):
        recipe = eval_recipe(options)
        assert (recipe.data.prompt, recipe.data.max_source_length) == ("Chat:\n{dialogue}\nGist:", 256)
        assert (recipe.eval.num_beams, recipe.eval.max_new_tokens, recipe.model.precision) == (3, 40, "fp32")
    recipe = eval_recipe(
        eval_options(model=str(folder), overrides=["eval.num_beams=1", "data.max_source_length=64"])
    )
    assert (recipe.eval.num_beams, recipe.data.max_source_length, recipe.eval.max_new_tokens) == (1, 64, 40)


def test_eval_of_a_model_without_saved_settings_uses_the_recipe_defaults(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    default = load_recipe(default_recipe_path("full"))
    for model in ("tiny-t5", "google/flan-t5-base", str(plain)):
        recipe = eval_recipe(eval_options(model=model))
        assert (recipe.data.prompt, recipe.eval.num_beams) == (default.data.prompt, default.eval.num_beams)


def test_a_bad_value_in_the_saved_settings_names_the_file(tmp_path):
    folder = saved_model_folder(tmp_path / "final", num_beams="x")
    with pytest.raises(UserError) as caught:
        eval_recipe(eval_options(model=str(folder)))
    assert str(caught.value).startswith(f"{folder / 'ftlaunch.json'}: eval.num_beams='x'")


def test_lora_settings_on_a_full_fine_tune_are_said_to_change_nothing(tmp_path):
    from conftest import run_cli_in_process

    common = ("--cpu", "--model", "tiny-t5", "--data", "sample", "--set", "lora.use_dora=true", "--dry-run")
    full = run_cli_in_process("full", *common, "--set", "lora.r=8", "--output", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    assert "warning: --set lora.use_dora has no effect: ftlaunch full trains every weight" in full.stderr
    assert "warning: --set lora.r has no effect" in full.stderr
    lora = run_cli_in_process("lora", *common, "--output", str(tmp_path / "lora"))
    assert lora.returncode == 0 and "has no effect" not in lora.stderr, lora.stderr
