# ruff: noqa: F811 - no_launch is test_bad_input's fixture, imported to be used here
"""Inputs that used to pass every check and then crash a rank (or drop examples) are refused first.

A model folder transformers cannot load as a seq2seq model (another family's config, a config
without model_type or with a size that is not a number, a tokenizer.json or generation_config.json
of the wrong shape), a seed numpy cannot take, two rows with one id in a split, and estimate
lengths of zero tokens: each is one `error:` line naming the file or option, exit 2, before a
run directory is made (``refused`` from test_bad_input). Real CLI, in-process, no launch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli_in_process, save_tiny_t5
from test_bad_input import data_dir, edit_lines, no_launch, refused  # noqa: F401 - no_launch is a fixture

from launcher.core.dialogues import load_split
from launcher.core.model_facts import SEQ2SEQ_TYPES
from launcher.core.modelfiles import check_model_files

TRAIN = ("--cpu", "--gpus", "1", "--data", "sample", "--set", "train.max_steps=1")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """tiny-t5 written with save_pretrained: config, weights, tokenizer, generation settings."""
    return save_tiny_t5(tmp_path_factory.mktemp("saved") / "model")


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


# name -> (file, how it is spoiled, what the error line says)
DAMAGES = {
    "bert": (
        "config.json",
        lambda d: {**d, "model_type": "bert"},
        "model_type 'bert', not an encoder-decoder",
    ),
    "no model_type": ("config.json", lambda d: {}, "config.json has no model_type"),
    "size not a number": ("config.json", lambda d: {**d, "d_model": "big"}, "d_model is 'big'"),
    "tokenizer": ("tokenizer.json", lambda d: {}, "tokenizer.json is damaged (not a tokenizers file"),
    "generation": ("generation_config.json", lambda d: {"num_beams": "x"}, "num_beams is 'x'"),
}


def spoiled_model(saved: Path, tmp_path: Path, damage: str) -> Path:
    model = tmp_path / "model"
    shutil.copytree(saved, model)
    name, edit, _ = DAMAGES[damage]
    edit_json(model / name, edit)
    return model


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_model_folder_transformers_cannot_load_as_seq2seq_is_refused_before_a_launch(
    saved_model, tmp_path, no_launch, damage
):
    model = spoiled_model(saved_model, tmp_path, damage)
    expected = (str(model), DAMAGES[damage][2])
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"id": "a", "dialogue": "#Person1#: Lunch?\n#Person2#: Sure."}) + "\n")
    for command in ("full", "lora"):
        run = tmp_path / command
        refused(
            no_launch,
            command,
            *TRAIN,
            "--model",
            str(model),
            "--output",
            str(run),
            output=run,
            fragments=("--model", *expected),
            watch=(model,),
        )
    evaluation = tmp_path / "eval"
    refused(
        no_launch,
        "eval",
        "--cpu",
        "--model",
        str(model),
        "--data",
        "sample",
        "--output",
        str(evaluation),
        output=evaluation,
        fragments=("--model", *expected),
        watch=(model,),
    )
    refused(
        no_launch,
        "summarize",
        str(model),
        "--cpu",
        "--input",
        str(inputs),
        output=None,
        fragments=expected,
        watch=(model, tmp_path / "in.jsonl"),
    )
    if DAMAGES[damage][0] == "config.json":  # estimate reads the config (and weight headers) only
        refused(no_launch, "estimate", "--model", str(model), output=None, fragments=expected, watch=(model,))


def test_a_config_transformers_refuses_in_another_family_is_one_line(tmp_path, no_launch):
    """A BART config with a value only transformers' strict config class checks: the estimate, a
    LoRA run (its targets) and an FSDP run (its layer classes) read it on a meta-device skeleton."""
    from transformers import AutoConfig

    model = tmp_path / "bart"
    shape = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64)
    heads = dict(encoder_attention_heads=2, decoder_attention_heads=2)
    AutoConfig.for_model("bart", vocab_size=128, **shape, **heads).save_pretrained(model)
    edit_json(model / "config.json", lambda d: {**d, "dropout": "x"})
    expected = (f"model {model}: cannot read its config.json", "'dropout'")
    refused(no_launch, "estimate", "--model", str(model), output=None, fragments=expected, watch=(model,))
    for command, *extra in (("lora",), ("full", "--fsdp")):
        run = tmp_path / command
        args = (command, *extra, *TRAIN, "--model", str(model), "--dry-run", "--output", str(run))
        refused(no_launch, *args, output=run, fragments=expected, watch=(model,))


def test_a_tokenizer_folder_may_hold_another_familys_config(saved_model, tmp_path):
    """model.tokenizer is loaded as a tokenizer only: its config.json's model_type is not checked."""
    tokenizer = spoiled_model(saved_model, tmp_path, "bert")
    check_model_files(tokenizer, "model.tokenizer", model=False)
    check_model_files(saved_model, "--model")  # and the healthy model passes


def test_the_seq2seq_types_are_transformers_own():
    """The list written out in model_facts (importing transformers' table costs seconds per launch)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    assert SEQ2SEQ_TYPES.issubset(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    assert SEQ2SEQ_TYPES.issuperset({"t5", "mt5", "umt5", "bart", "mbart", "pegasus"})


@pytest.mark.parametrize(
    ("seed", "says"), [("-1", "greater than or equal to 0"), ("4294967296", "less than")]
)
def test_a_seed_numpy_cannot_take_is_a_recipe_error(tmp_path, no_launch, seed, says):
    run = tmp_path / "run"
    refused(
        no_launch,
        "full",
        *TRAIN,
        "--model",
        "tiny-t5",
        "--set",
        f"train.seed={seed}",
        "--output",
        str(run),
        output=run,
        fragments=(f"train.seed={seed}", says),
    )


def test_the_largest_seed_is_taken(tmp_path, no_launch):
    args = ("full", *TRAIN, "--model", "tiny-t5", "--set", "train.seed=4294967295", "--dry-run")
    result = run_cli_in_process(*args, "--output", str(tmp_path / "run"), env=no_launch)
    assert result.returncode == 0, result.stdout + result.stderr


def repeat_line(path: Path, line: int, change=lambda row: row) -> None:
    """Append a copy of ``line`` (1-based), changed by ``change``."""
    edit_lines(path, lambda lines: lines.append(json.dumps(change(json.loads(lines[line - 1])))))


def test_a_repeated_row_in_the_eval_split_is_refused(tmp_path, no_launch):
    """It used to fold into the first row: 3 rows scored as n=2, exit 0."""
    data = data_dir(tmp_path)
    repeat_line(data / "test.jsonl", 1)
    number = len((data / "test.jsonl").read_text().splitlines())
    test_id = json.loads((data / "test.jsonl").read_text().splitlines()[0])["id"]
    evaluation = tmp_path / "eval"
    refused(
        no_launch,
        "eval",
        "--cpu",
        "--model",
        "tiny-t5",
        "--data",
        str(data),
        "--output",
        str(evaluation),
        output=evaluation,
        watch=(data,),
        fragments=(
            f"{data / 'test.jsonl'}: id {test_id!r} appears on lines 1 and {number}",
            "ids must be unique in a split",
        ),
    )


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_one_id_for_two_dialogues_is_refused_in_every_split(tmp_path, no_launch, split):
    data = data_dir(tmp_path)
    repeat_line(data / f"{split}.jsonl", 2, lambda row: {**row, "dialogue": "#Person1#: Another one."})
    run = tmp_path / "run"
    refused(
        no_launch,
        "full",
        *TRAIN[:3],
        "--model",
        "tiny-t5",
        "--data",
        str(data),
        "--output",
        str(run),
        output=run,
        watch=(data,),
        fragments=(f"{split}.jsonl: id ", "appears on lines 2 and", "ids must be unique"),
    )


def test_one_dialogue_once_per_reference_keeps_its_id(tmp_path):
    """The hub's DialogSum test layout: the rows of one dialogue are one example, and rows without
    an id get one of their own."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {"id": "d1", "dialogue": "#Person1#: Hi.", "summary": "They greet."},
        {"id": "d1", "dialogue": "#Person1#: Hi.", "summary": "A greeting."},
        {"dialogue": "#Person1#: Bye.", "summary": "They part."},
        {"dialogue": "#Person1#: Later.", "summary": "They part again."},
    ]
    (data / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    loaded = load_split(str(data), "test")
    assert [(row["id"], row["references"]) for row in loaded] == [
        ("d1", ["They greet.", "A greeting."]),
        ("row_3", ["They part."]),
        ("row_4", ["They part again."]),
    ]


def test_rows_with_an_empty_or_null_id_are_numbered_not_refused(tmp_path):
    """A CSV export with an empty id column, or JSON Lines with "id": null, holds no ids to repeat."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "test.csv").write_text(
        'id,dialogue,summary\n,"#Person1#: Hi.",They greet.\n,"#Person1#: Bye.",They part.\n'
    )
    rows = [
        {"id": None, "dialogue": "#Person1#: Hi.", "summary": "They greet."},
        {"id": None, "dialogue": "#Person1#: Bye.", "summary": "They part."},
    ]
    (data / "validation.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for split in ("test", "validation"):
        assert [row["id"] for row in load_split(str(data), split)] == ["row_1", "row_2"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--source-len", "0", "--target-len", "0", "--micro-batch-tokens", "1"), "--source-len 0"),
        (("--source-len", "-5"), "--source-len -5"),
        (("--target-len", "-1000"), "--target-len -1000"),
    ],
)
def test_estimate_lengths_of_no_tokens_are_refused(no_launch, args, says):
    refused(no_launch, "estimate", "--model", "tiny-t5", *args, output=None, fragments=(says, "at least 1"))
