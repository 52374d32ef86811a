"""The bad-input catalogue: every mistake is refused before any rank starts.

For each case the real CLI (offline, CPU) must exit with code 2 and print exactly one
stderr line, ``error: ...``, that names the file/key (and line where there is one) and says how to fix
it; no traceback; nothing written into --output (absent afterwards, or a pre-existing directory
unchanged byte for byte); and no launch: a fake ``accelerate`` first on PATH records any attempt to
start ranks, so a refusal that came too late fails the test at once (and cheaply).

The CLI runs in-process (``run_cli_in_process``: the same ``main()``, argv and environment, where a
launch attempt fails the test); the hub-without-network cases run it as a subprocess, because
huggingface_hub reads HF_HOME and the offline switch once, when it is imported.

Recipe typos/types, --zero, fp16, --gpus, method mismatch, a different run in --output, a missing data
dir or model path and bad LoRA targets are in test_cli_errors.py; this file covers the rest.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import cli_env, run_cli, run_cli_in_process, save_tiny_t5

SAMPLE = Path(__file__).resolve().parents[1] / "launcher" / "assets" / "sample"
CLI_TIMEOUT = 120  # a refusal takes seconds; this only bounds a hang


# ---------------------------------------------------------------- helpers


def tree(directory: Path) -> dict[str, bytes]:
    """Every file under a directory with its bytes (directories as b'<dir>')."""
    return {
        str(path.relative_to(directory)): path.read_bytes() if path.is_file() else b"<dir>"
        for path in sorted(directory.rglob("*"))
    }


@pytest.fixture
def no_launch(tmp_path) -> dict[str, str]:
    """A CLI environment whose `accelerate` only records that a launch was attempted (exit 99)."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    marker = tmp_path / "LAUNCHED"
    fake = bin_dir / "accelerate"
    fake.write_text(f'#!/bin/sh\necho "$@" >> "{marker}"\nexit 99\n')
    fake.chmod(0o755)
    env = cli_env()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["FTLAUNCH_TEST_LAUNCH_MARKER"] = str(marker)
    return env


def refused(
    env: dict[str, str],
    *args: str,
    output: Path | None,
    fragments: tuple[str, ...] = (),
    patterns: tuple[str, ...] = (),
    watch: tuple[Path, ...] = (),
    run=run_cli_in_process,
) -> str:
    """Run `ftlaunch ARGS`; expect exit 2, one `error:` line with every fragment, nothing written.

    ``output`` (the command's output directory) must be absent afterwards if it was absent, else
    unchanged; every directory in ``watch`` must be unchanged too. Returns the error line.
    """
    watched = [path for path in (output, *watch) if path is not None]
    before = {path: tree(path) if path.exists() else None for path in watched}
    started = time.monotonic()
    result = run(*args, env=env, timeout=CLI_TIMEOUT)
    elapsed = time.monotonic() - started
    output_text = result.stdout + result.stderr
    marker = Path(env["FTLAUNCH_TEST_LAUNCH_MARKER"])
    assert not marker.exists(), f"a launch was attempted ({marker.read_text().strip()}):\n{output_text}"
    assert "accelerate launch" not in result.stdout, (
        f"the command line of a launch was printed:\n{output_text}"
    )
    assert "Traceback" not in output_text, output_text
    assert result.returncode == 2, f"exit code {result.returncode} after {elapsed:.1f} s:\n{output_text}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (
        f"expected one `error:` line, got:\n{result.stderr}"
    )
    line = lines[0]
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    for pattern in patterns:
        assert re.search(pattern, line), f"/{pattern}/ not in {line!r}"
    for path, snapshot in before.items():
        if snapshot is None:
            assert not path.exists(), f"{path} was created by a refused command"
        else:
            assert tree(path) == snapshot, f"{path} was changed by a refused command"
    return line


def data_dir(tmp_path: Path, name: str = "data") -> Path:
    """A copy of the embedded sample (train/validation/test.jsonl) to corrupt."""
    directory = tmp_path / name
    directory.mkdir()
    for path in SAMPLE.glob("*.jsonl"):
        shutil.copyfile(path, directory / path.name)
    return directory


def edit_lines(path: Path, edit) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    edit(lines)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def drop_field(path: Path, line_number: int, field: str) -> None:
    def edit(lines: list[str]) -> None:
        row = json.loads(lines[line_number - 1])
        del row[field]
        lines[line_number - 1] = json.dumps(row)

    edit_lines(path, edit)


def train_args(data: Path | str, output: Path, *extra: str) -> list[str]:
    """A real launch (no --dry-run), one CPU rank, embedded model: refused or it would start a rank."""
    return ["full", "--cpu", "--model", "tiny-t5", "--data", str(data), "--output", str(output), *extra]


# ---------------------------------------------------------------- data files


def test_python_literal_line(tmp_path, no_launch):
    data = data_dir(tmp_path)
    path = data / "validation.jsonl"

    def to_python_literal(lines: list[str]) -> None:
        lines[2] = repr(json.loads(lines[2]))  # {'id': 'validation_2', ...}

    edit_lines(path, to_python_literal)
    refused(
        no_launch,
        *train_args(data, tmp_path / "out"),
        output=tmp_path / "out",
        fragments=(str(path), "line 3 ", "not JSON", "Python literal", "json.dumps", "one JSON object"),
        watch=(data,),
    )


def test_truncated_last_line(tmp_path, no_launch):
    data = data_dir(tmp_path)
    path = data / "train.jsonl"
    text = path.read_text(encoding="utf-8").rstrip("\n")
    path.write_text(text[:-40], encoding="utf-8")  # the last row cut mid-string, as by a full disk
    assert len(path.read_text().splitlines()) == 64
    refused(
        no_launch,
        *train_args(data, tmp_path / "out"),
        output=tmp_path / "out",
        fragments=(str(path), "line 64 ", "not JSON", "one JSON object"),
        watch=(data,),
    )


def test_json_array_instead_of_json_lines(tmp_path, no_launch):
    """A .json export (one array of rows) renamed to .jsonl."""
    data = data_dir(tmp_path)
    path = data / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text(json.dumps(rows) + "\n")
    refused(
        no_launch,
        *train_args(data, tmp_path / "out"),
        output=tmp_path / "out",
        fragments=(str(path), "line 1 ", "not a JSON object", "each line must be one JSON object"),
        watch=(data,),
    )


def write_latin1_byte(path: Path, line_number: int) -> int:
    """Put one Latin-1 byte (é) into a line; returns its byte offset in the file."""
    lines = path.read_bytes().split(b"\n")
    position = lines[line_number - 1].index(b"#Person1#")
    lines[line_number - 1] = (
        lines[line_number - 1][:position] + b"caf\xe9 " + lines[line_number - 1][position:]
    )
    path.write_bytes(b"\n".join(lines))
    return sum(len(line) + 1 for line in lines[: line_number - 1]) + position + 3


def test_non_utf8_bytes(tmp_path, no_launch):
    data = data_dir(tmp_path)
    path = data / "train.jsonl"
    write_latin1_byte(path, 40)
    refused(
        no_launch,
        *train_args(data, tmp_path / "out"),
        output=tmp_path / "out",
        fragments=(str(path), "not UTF-8", "re-encode it as UTF-8"),
        watch=(data,),
    )


def test_non_utf8_bytes_names_the_line(tmp_path, no_launch):
    data = data_dir(tmp_path)
    path = data / "train.jsonl"
    offset = write_latin1_byte(path, 40)
    line = refused(
        no_launch,
        *train_args(data, tmp_path / "out"),
        output=tmp_path / "out",
        fragments=(str(path), "not UTF-8"),
        watch=(data,),
    )
    assert "line 40" in line, line
    byte = re.search(r"byte (\d+)", line)
    assert byte is None or int(byte.group(1)) == offset, f"byte offset {offset} expected: {line}"


def test_row_without_dialogue(tmp_path, no_launch):
    data = data_dir(tmp_path)
    drop_field(data / "train.jsonl", 5, "dialogue")
    refused(
        no_launch,
        *train_args(data, tmp_path / "out"),
        output=tmp_path / "out",
        fragments=(str(data / "train.jsonl"), "'dialogue'", "every row needs dialogue and summary"),
        patterns=(r"\b(row|line) 5\b",),
        watch=(data,),
    )


def test_row_whose_id_is_an_object(tmp_path, no_launch):
    """Predictions and reports name an example by its id: text or a number, never a Python repr."""
    data = data_dir(tmp_path)
    edit_lines(
        data / "train.jsonl",
        lambda lines: lines.__setitem__(2, json.dumps({**json.loads(lines[2]), "id": {"a": 1}})),
    )
    output = tmp_path / "out"
    refused(
        no_launch,
        *train_args(data, output),
        output=output,
        fragments=(f"{data / 'train.jsonl'} line 3: id {{'a': 1}} is not text or a number",),
    )


def test_row_without_summary(tmp_path, no_launch):
    data = data_dir(tmp_path)
    drop_field(data / "validation.jsonl", 7, "summary")
    refused(
        no_launch,
        *train_args(data, tmp_path / "out"),
        output=tmp_path / "out",
        fragments=(str(data / "validation.jsonl"), "'summary'", "every row needs dialogue and summary"),
        patterns=(r"\b(row|line) 7\b",),
        watch=(data,),
    )


def test_missing_field_names_the_file_line_despite_blank_lines(tmp_path, no_launch):
    data = data_dir(tmp_path)
    path = data / "train.jsonl"
    drop_field(path, 5, "dialogue")
    edit_lines(path, lambda lines: lines.insert(1, ""))  # the row without dialogue is now on line 6
    refused(
        no_launch,
        *train_args(data, tmp_path / "out"),
        output=tmp_path / "out",
        fragments=(str(path), "'dialogue'"),
        patterns=(r"\b(row|line) 6\b",),
        watch=(data,),
    )


def test_empty_split(tmp_path, no_launch):
    data = data_dir(tmp_path)
    (data / "validation.jsonl").write_text("\n")
    refused(
        no_launch,
        *train_args(data, tmp_path / "out"),
        output=tmp_path / "out",
        fragments=("'validation'", str(data), "empty", "at least one dialogue"),
        watch=(data,),
    )


def test_missing_test_split_when_evaluating_after_training(tmp_path, no_launch):
    data = data_dir(tmp_path)
    (data / "test.jsonl").unlink()
    refused(
        no_launch,
        *train_args(data, tmp_path / "out"),
        output=tmp_path / "out",
        fragments=("'test'", str(data / "test.jsonl"), "does not exist", "splits there: train, validation"),
        watch=(data,),
    )
    # Without the evaluation the test split is not needed: the check follows the recipe.
    result = run_cli_in_process(
        *train_args(data, tmp_path / "out", "--set", "eval.after_training=false", "--dry-run"),
        env=no_launch,
        timeout=CLI_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_split_name_that_does_not_exist(tmp_path, no_launch):
    refused(
        no_launch,
        *train_args("sample", tmp_path / "out", "--set", "data.train_split=nope"),
        output=tmp_path / "out",
        fragments=(
            "'nope'",
            str(SAMPLE / "nope.jsonl"),
            "does not exist",
            "splits there: test, train, validation",
        ),
    )


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_refusal_leaves_an_existing_run_as_it_was(tmp_path, no_launch, flag):
    """Bad data found on a relaunch: --overwrite must not delete the old run, --resume must not touch it."""
    data = data_dir(tmp_path)
    output = tmp_path / "run"
    result = run_cli_in_process(*train_args(data, output, "--dry-run"), env=no_launch, timeout=CLI_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    (output / "notes.txt").write_text("results of the first run\n")
    drop_field(data / "train.jsonl", 3, "summary")
    extra = ["--overwrite"] if flag == "--overwrite" else ["--resume", "auto"]
    refused(
        no_launch,
        *train_args(data, output, *extra),
        output=output,
        fragments=(str(data / "train.jsonl"), "'summary'"),
        patterns=(r"\b(row|line) 3\b",),
        watch=(data,),
    )
    assert (output / "notes.txt").read_text() == "results of the first run\n"


def existing_run_with_checkpoint(env: dict[str, str], output: Path) -> Path:
    """A rendered run (dry run) plus a checkpoint folder as a crashed save and a finished one leave them."""
    result = run_cli_in_process(*train_args("sample", output, "--dry-run"), env=env, timeout=CLI_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    checkpoints = output / "checkpoints"
    (checkpoints / ".tmp-step_8").mkdir(parents=True)
    (checkpoints / ".tmp-step_8" / "model.safetensors").write_bytes(b"half written")
    (checkpoints / "step_4").mkdir()
    state = {
        "step": 4,
        "epoch": 0,
        "batches_in_epoch": 4,
        "world_size": 1,
        "grad_accum": 1,
        "micro_batch_size": 8,
        "seed": 42,
        "method": "full",
    }
    (checkpoints / "step_4" / "ftlaunch_state.json").write_text(json.dumps(state))
    (checkpoints / "latest").write_text("step_4\n")
    return checkpoints


def test_resume_from_a_half_written_checkpoint(tmp_path, no_launch):
    output = tmp_path / "run"
    checkpoints = existing_run_with_checkpoint(no_launch, output)
    partial = checkpoints / ".tmp-step_8"
    refused(
        no_launch,
        *train_args("sample", output, "--resume", str(partial)),
        output=output,
        fragments=(f"--resume {partial}", "not a complete ftlaunch checkpoint", "ftlaunch_state.json"),
    )


@pytest.mark.parametrize("where", ["missing-step", "the-run-itself"])
def test_resume_path_that_names_no_checkpoint_says_what_to_pass(tmp_path, no_launch, where):
    output = tmp_path / "run"
    checkpoints = existing_run_with_checkpoint(no_launch, output)
    path, fragment = {
        "missing-step": (checkpoints / "step_99", "no such checkpoint folder; pass --resume auto"),
        "the-run-itself": (output, "that is a run directory, not one of its checkpoints; pass --resume auto"),
    }[where]
    refused(
        no_launch,
        *train_args("sample", output, "--resume", str(path)),
        output=output,
        fragments=(f"--resume {path}: {fragment}",),
    )


def test_same_run_with_checkpoints_needs_resume_or_overwrite(tmp_path, no_launch):
    output = tmp_path / "run"
    existing_run_with_checkpoint(no_launch, output)
    refused(
        no_launch,
        *train_args("sample", output),
        output=output,
        fragments=(str(output), "already holds this run with checkpoints", "--resume auto", "--overwrite"),
    )


# ---------------------------------------------------------------- hub ids without network


def unreachable_hub(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """Network allowed (not offline) but the hub refuses connections; an empty cache."""
    env = dict(env)
    for key in (
        "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        env.pop(key, None)
    env.update(
        HF_ENDPOINT="http://127.0.0.1:9",
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_CACHE=str(tmp_path / "hf-home" / "hub"),
        NO_PROXY="127.0.0.1,localhost",
    )
    return env


def offline_empty_cache(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    env = dict(env)
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_CACHE=str(tmp_path / "hf-home" / "hub"))
    return env


@pytest.mark.slow  # a subprocess each (the hub reads its settings at import)
@pytest.mark.parametrize("network", ["offline", "unreachable"])
def test_dataset_hub_id_without_network(tmp_path, no_launch, network):
    env = (
        offline_empty_cache(no_launch, tmp_path)
        if network == "offline"
        else unreachable_hub(no_launch, tmp_path)
    )
    reason = "HF_HUB_OFFLINE=1" if network == "offline" else "the hub cannot be reached"
    refused(
        env,
        *train_args("some/dataset", tmp_path / "out"),
        output=tmp_path / "out",
        run=run_cli,
        fragments=("'some/dataset'", reason, "not in the local cache", "--data DIR"),
    )


@pytest.mark.slow  # a subprocess each (the hub reads its settings at import)
@pytest.mark.parametrize("network", ["offline", "unreachable"])
def test_model_hub_id_without_network(tmp_path, no_launch, network):
    env = (
        offline_empty_cache(no_launch, tmp_path)
        if network == "offline"
        else unreachable_hub(no_launch, tmp_path)
    )
    reason = "HF_HUB_OFFLINE=1" if network == "offline" else "the hub cannot be reached"
    refused(
        env,
        "full",
        "--cpu",
        "--model",
        "google/flan-t5-base",
        "--data",
        "sample",
        "--output",
        str(tmp_path / "out"),
        output=tmp_path / "out",
        run=run_cli,
        fragments=(
            "'google/flan-t5-base'",
            reason,
            "not in the local cache",
            "hf download google/flan-t5-base",
            "--model DIR",
        ),
    )


def test_model_adapter_in_a_training_recipe(tmp_path, no_launch):
    """model.adapter is read by `ftlaunch eval` only: a fine-tune would silently ignore it."""
    refused(
        no_launch,
        "lora",
        "--cpu",
        "--set",
        f"model.adapter={tmp_path}",
        "--output",
        str(tmp_path / "run"),
        output=tmp_path / "run",
        fragments=("model.adapter", "ftlaunch eval", "ftlaunch export RUN --merge"),
    )


def test_token_budget_smaller_than_one_example(tmp_path, no_launch):
    """A micro-batch must hold the longest example: the budget's minimum is named with its parts."""
    refused(
        no_launch,
        *train_args("sample", tmp_path / "run", "--set", "data.max_target_length=64"),
        "--set",
        "train.micro_batch_tokens=500",
        output=tmp_path / "run",
        fragments=(
            "train.micro_batch_tokens=500",
            "data.max_source_length 512 + data.max_target_length 64 = 576 tokens",
            "at least 576",
        ),
    )


# ---------------------------------------------------------------- ftlaunch eval


def test_eval_adapter_dir_missing(tmp_path, no_launch):
    adapter = tmp_path / "no-such-adapter"
    refused(
        no_launch,
        "eval",
        "--cpu",
        "--adapter",
        str(adapter),
        "--output",
        str(tmp_path / "out"),
        output=tmp_path / "out",
        fragments=(f"--adapter {adapter}", "adapter_config.json", "final/"),
    )


def test_eval_adapter_dir_without_adapter_config(tmp_path, no_launch):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"not really")
    refused(
        no_launch,
        "eval",
        "--cpu",
        "--adapter",
        str(adapter),
        "--output",
        str(tmp_path / "out"),
        output=tmp_path / "out",
        watch=(adapter,),
        fragments=(f"--adapter {adapter}", "no adapter_config.json", "final/ folder of a LoRA run"),
    )


def test_eval_model_dir_without_config(tmp_path, no_launch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights without a config")
    refused(
        no_launch,
        "eval",
        "--cpu",
        "--model",
        str(model),
        "--output",
        str(tmp_path / "out"),
        output=tmp_path / "out",
        watch=(model,),
        fragments=(f"--model {model}", "no config.json", "final/ folder", "hub id", "tiny-t5"),
    )


def fake_lora_run(tmp_path: Path) -> Path:
    """A LoRA run's folder as --model/--adapter mix-ups meet it: recipe.yaml, final/ holding an adapter."""
    run = tmp_path / "lora-run"
    (run / "final").mkdir(parents=True)
    (run / "recipe.yaml").write_text((SAMPLE.parents[2] / "recipes" / "lora.yaml").read_text())
    (run / "final" / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "base_model_name_or_path": "tiny-t5"}'
    )
    return run


@pytest.mark.parametrize("kind", ["missing", "run", "adapter", "lora-run", "adapter-run"])
def test_eval_model_or_adapter_of_the_wrong_kind_names_what_to_pass(tmp_path, no_launch, kind):
    """The usual mix-ups between a run, its final/ model and a LoRA adapter name the right flag."""
    lora = fake_lora_run(tmp_path)
    full = tmp_path / "full-run"
    (full / "final").mkdir(parents=True)
    (full / "recipe.yaml").write_text((SAMPLE.parents[2] / "recipes" / "full.yaml").read_text())
    (full / "final" / "config.json").write_text('{"model_type": "t5"}')
    args, fragment = {
        "missing": (["--model", str(tmp_path / "nope")], f"--model {tmp_path / 'nope'} does not exist"),
        "run": (
            ["--model", str(full)],
            f"--model {full} is a run directory, not its model; pass --model {full / 'final'}",
        ),
        "adapter": (
            ["--model", str(lora / "final")],
            "is a LoRA adapter, not a whole model; pass its base model as --model",
        ),
        "lora-run": (
            ["--model", str(lora)],
            f"is a LoRA run directory; pass its base model as --model and --adapter {lora / 'final'}",
        ),
        "adapter-run": (
            ["--adapter", str(lora)],
            f"--adapter {lora} has no adapter_config.json; pass --adapter {lora / 'final'}",
        ),
    }[kind]
    out = tmp_path / "out"
    refused(
        no_launch,
        "eval",
        "--cpu",
        *args,
        "--output",
        str(out),
        output=out,
        watch=(lora, full),
        fragments=(fragment,),
    )


def test_eval_of_an_adapter_on_another_base_model_says_so(tmp_path):
    """The adapter records tiny-t5 as its base (adapter_config.json): on another model it is
    evaluated with a warning (a fine-tuned copy of the base fits its shapes, and may be meant)."""
    from launcher.core.recipe import LoraSection
    from launcher.rank.model import apply_lora, build_tiny_t5

    adapter = tmp_path / "adapter"
    apply_lora(build_tiny_t5(100), LoraSection(r=4)).save_pretrained(str(adapter))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "tiny-t5"}))
    other = save_tiny_t5(tmp_path / "other-model")
    args = ["eval", "--cpu", "--adapter", str(adapter), "--dry-run"]
    result = run_cli_in_process(*args, "--model", str(other), "--output", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == (
        f"warning: --adapter {adapter} was trained on tiny-t5, not on --model {other}: the scores "
        "are those of the adapter on another base model"
    )
    same = run_cli_in_process(*args, "--model", "tiny-t5", "--output", str(tmp_path / "b"))
    assert same.returncode == 0 and "warning" not in same.stderr, same.stderr


def test_eval_split_that_does_not_exist(tmp_path, no_launch):
    refused(
        no_launch,
        "eval",
        "--cpu",
        "--split",
        "nope",
        "--output",
        str(tmp_path / "out"),
        output=tmp_path / "out",
        fragments=("'nope'", "does not exist", "splits there: test, train, validation"),
    )


@pytest.mark.slow  # a subprocess (the hub reads its settings at import)
def test_eval_model_hub_id_without_network(tmp_path, no_launch):
    env = offline_empty_cache(no_launch, tmp_path)
    refused(
        env,
        "eval",
        "--cpu",
        "--model",
        "google/flan-t5-base",
        "--output",
        str(tmp_path / "out"),
        output=tmp_path / "out",
        run=run_cli,
        fragments=("'google/flan-t5-base'", "HF_HUB_OFFLINE=1", "--model DIR"),
    )


# ---------------------------------------------------------------- relative paths that are no hub id


def interrupted_run(folder: Path) -> Path:
    """A training run stopped before its final/ (recipe.yaml and command.sh, no final/)."""
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text((SAMPLE.parents[2] / "recipes" / "full.yaml").read_text())
    (folder / "command.sh").write_text("accelerate launch -m launcher.rank.train --run-dir .\n")
    return folder


TRAIN_FLAGS = ("--cpu", "--gpus", "2", "--data", "sample")
PATH_COMMANDS = {
    "eval": ("eval", "--cpu", "--data", "sample"),
    "full": ("full", *TRAIN_FLAGS),
    "full-dry-run": ("full", *TRAIN_FLAGS, "--dry-run"),
    "lora-dry-run": ("lora", *TRAIN_FLAGS, "--dry-run"),
    "sweep-dry-run": ("sweep", "full", "--grid", "train.lr=1e-4,2e-4", *TRAIN_FLAGS, "--dry-run"),
}


@pytest.mark.parametrize("runs", ["absent", "interrupted"])
@pytest.mark.parametrize("command", sorted(PATH_COMMANDS))
def test_a_relative_model_path_that_does_not_exist_is_refused_as_a_path_not_sent_to_the_hub(
    tmp_path, no_launch, command, runs
):
    """``runs/B0/final`` (two slashes) can be no hub id (NAME or NAMESPACE/NAME): a missing one is
    refused in the same line as the absolute path, dry run or not, never handed to the hub client
    (whose HFValidationError was a traceback). An interrupted run's final/ says what is missing."""
    if runs == "interrupted":
        interrupted_run(tmp_path / "runs" / "B0")
    out = tmp_path / "out"
    expected = {
        "absent": "--model runs/B0/final does not exist; pass a directory written by save_pretrained",
        "interrupted": (
            "--model runs/B0/final does not exist: runs/B0 has no final/ model yet (training has not "
            "finished: continue it with the same command and --resume auto)"
        ),
    }[runs]
    refused(
        no_launch,
        *PATH_COMMANDS[command],
        "--model",
        "runs/B0/final",
        "--output",
        str(out),
        output=out,
        watch=(tmp_path / "runs",) if runs == "interrupted" else (),
        run=functools.partial(run_cli_in_process, cwd=tmp_path),
        fragments=(expected,),
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("estimate", "--model", "runs/B0/final"), "--model runs/B0/final does not exist"),
        (("full", *TRAIN_FLAGS, "--model", "./nope", "--dry-run"), "--model ./nope does not exist"),
        # DIR/NAME beside an existing DIR is a path: no hub repo is looked up
        (("full", *TRAIN_FLAGS, "--model", "runs/B1", "--dry-run"), "--model runs/B1 does not exist"),
        (
            ("eval", "--cpu", "--data", "sample", "--model", "runs/B0"),
            "--model runs/B0 is a run directory, not a model: runs/B0 has no final/ model yet",
        ),
        (
            ("full", *TRAIN_FLAGS, "--model", "my model", "--dry-run"),
            "--model 'my model' is neither an existing local path nor a hub id (",
        ),
        (
            ("full", *TRAIN_FLAGS, "--set", "model.tokenizer=tok/a/b", "--dry-run"),
            "model.tokenizer tok/a/b: no such directory",
        ),
        (
            ("eval", "--cpu", "--data", "sample", "--set", "model.tokenizer=tok/a/b", "--dry-run"),
            "model.tokenizer tok/a/b: no such directory",
        ),
        (
            ("full", *TRAIN_FLAGS, "--model", "org/model", "--set", "model.tokenizer=a--b", "--dry-run"),
            "model.tokenizer 'a--b' is neither an existing local path nor a hub id (",
        ),
        (
            # runs/ exists here, so runs/B1 is a path, though it is a valid hub id too: said, with the way out
            ("full", *TRAIN_FLAGS, "--model", "runs/B1", "--dry-run"),
            "--model runs/B1 does not exist (it is taken as a path because a folder runs/ exists here; "
            "to use the hub model runs/B1, run ftlaunch from another directory)",
        ),
        (("eval", "--cpu", "--data", "x--y"), "data 'x--y' is neither an existing local path nor a hub id ("),
        (("eval", "--cpu", "--data", "x/y/z", "--dry-run"), "data 'x/y/z' is not a directory"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_reference_that_is_no_hub_id_is_refused_in_one_line_naming_its_flag(
    tmp_path, no_launch, args, fragment
):
    interrupted_run(tmp_path / "runs" / "B0")
    out = tmp_path / "out"
    output_args = () if args[0] == "estimate" else ("--output", str(out))
    refused(
        no_launch,
        *args,
        *output_args,
        output=out,
        watch=(tmp_path / "runs",),
        run=functools.partial(run_cli_in_process, cwd=tmp_path),
        fragments=(fragment,),
    )


def test_the_ranks_loaders_refuse_a_reference_that_is_no_hub_id_in_one_line(tmp_path, monkeypatch):
    """What reaches a rank unchecked (a recipe.yaml edited by hand) is one UserError there too,
    never the hub client's HFValidationError."""
    from launcher.core.errors import UserError
    from launcher.rank.model import from_pretrained_or_explain

    def loader(name, **_kwargs):
        raise AssertionError(f"{name} was handed to from_pretrained")

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^tokenizer path runs/B0/final does not exist; pass a directory"):
        from_pretrained_or_explain(loader, "runs/B0/final", "tokenizer")
    (tmp_path / "google").mkdir()
    with pytest.raises(UserError, match=r"because a folder google/ exists here; to use the hub model"):
        from_pretrained_or_explain(loader, "google/flan-t5-base", "model")
    with pytest.raises(UserError, match=r"^model 'a--b' is neither an existing local path nor a hub id \("):
        from_pretrained_or_explain(loader, "a--b", "model")


def test_what_is_a_local_path_and_what_a_hub_id(tmp_path, monkeypatch):
    from launcher.core.paths import is_local_reference

    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    for path in ("runs/B0/final", "a/b/c", "./m", "../m", "~/m", "/abs/m", "runs/B0", "runs", "m/"):
        assert is_local_reference(path), path
    for hub_id in ("google/flan-t5-base", "flan-t5-base", "tiny-t5", "knkarthick/dialogsum"):
        assert not is_local_reference(hub_id), hub_id


# ---------------------------------------------------------------- ftlaunch score / report


def test_score_file_that_is_not_jsonl(tmp_path, no_launch):
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text(
        "{\"id\": \"test_0\", \"prediction\": \"a\"}\n{'id': 'test_1', 'prediction': 'b'}\n"
    )
    refused(
        no_launch,
        "score",
        str(predictions),
        "--output",
        str(tmp_path / "out"),
        output=tmp_path / "out",
        fragments=(str(predictions), "line 2 ", "not JSON", "json.dumps", "one JSON object"),
    )
    assert predictions.read_text().startswith('{"id": "test_0"')


def test_score_with_a_scoring_mode_that_does_not_exist(tmp_path, no_launch):
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text('{"id": "test_0", "prediction": "a", "references": ["a"]}\n')
    refused(
        no_launch,
        "score",
        str(predictions),
        "--scoring",
        "mean",
        "--output",
        str(tmp_path / "out"),
        output=tmp_path / "out",
        fragments=("--scoring mean", "'best_of_n'", "'per_reference'"),
        watch=(tmp_path,),
    )


def test_score_ids_not_in_the_dataset(tmp_path, no_launch):
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text('{"id": "test_0", "prediction": "a"}\n{"id": "nope", "prediction": "b"}\n')
    refused(
        no_launch,
        "score",
        str(predictions),
        "--data",
        "sample",
        "--output",
        str(tmp_path / "out"),
        output=tmp_path / "out",
        fragments=(
            str(predictions),
            "1 prediction ids",
            "'nope'",
            "sample[test]",
            "score against the split the predictions were made for",
        ),
    )


@pytest.mark.parametrize("to_output", [False, True], ids=["into-run-dir", "output"])
def test_report_on_a_dir_without_evaluations(tmp_path, no_launch, to_output):
    run_dir = tmp_path / "run"
    (run_dir / "eval").mkdir(parents=True)  # a run that stopped before its evaluation
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 7.0}\n')
    output = tmp_path / "report" if to_output else None
    refused(
        no_launch,
        "report",
        str(run_dir),
        *(["--output", str(output)] if output else []),
        output=output,
        watch=(run_dir,),
        fragments=(str(run_dir), "no evaluations", "eval/*/rouge.json", "ftlaunch eval"),
    )


# ---------------------------------------------------------------- files from other tools


@pytest.mark.parametrize("form", ["bom", "crlf", "bom-crlf"])
def test_jsonl_with_a_byte_order_mark_or_crlf_loads(tmp_path, no_launch, form):
    """What Windows editors and spreadsheet exports write: a UTF-8 BOM, CRLF line ends."""
    from launcher.core.dialogues import load_split

    data = data_dir(tmp_path)
    for path in data.glob("*.jsonl"):
        raw = path.read_bytes()
        if "crlf" in form:
            raw = raw.replace(b"\n", b"\r\n")
        if "bom" in form:
            raw = b"\xef\xbb\xbf" + raw
        path.write_bytes(raw)
    result = run_cli_in_process(
        *train_args(data, tmp_path / "out", "--dry-run"), env=no_launch, timeout=CLI_TIMEOUT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for split in ("train", "validation", "test"):
        assert load_split(str(data), split) == load_split("sample", split), split


# ---------------------------------------------------------------- checkpoints a resume cannot use


def write_checkpoint(output: Path, step: int) -> Path:
    """An intact checkpoint of the run rendered in ``output``, as save_checkpoint leaves one: the state
    of this recipe, files (placeholder bytes), and the manifest written last; ``latest`` names it."""
    from dataclasses import asdict

    from launcher.core.checkpoint import STATE_FILE, expected_state, write_manifest
    from launcher.core.recipe_loading import read_run_recipe

    recipe = read_run_recipe(output)
    state = expected_state(recipe, recipe.launch.world_size)
    state.step, state.batches_in_epoch = step, step
    checkpoint = output / "checkpoints" / f"step_{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(os.urandom(4096))
    (checkpoint / "optimizer.bin").write_bytes(os.urandom(8192))
    (checkpoint / STATE_FILE).write_text(json.dumps(asdict(state)))
    write_manifest(checkpoint)
    (output / "checkpoints" / "latest").write_text(f"{checkpoint.name}\n")
    return checkpoint


@pytest.mark.parametrize("damage", ["truncated", "bit-flip"])
def test_resume_path_of_a_damaged_checkpoint(tmp_path, no_launch, damage):
    output = tmp_path / "run"
    result = run_cli_in_process(
        *train_args("sample", output, "--dry-run"), env=no_launch, timeout=CLI_TIMEOUT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    checkpoint = write_checkpoint(output, 4)
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        data[:1000] if damage == "truncated" else data[:100] + bytes([data[100] ^ 1]) + data[101:]
    )
    problem = (
        "model.safetensors is 1000 bytes, its manifest says 4096" if damage == "truncated" else "SHA-256"
    )
    refused(
        no_launch,
        *train_args("sample", output, "--resume", str(checkpoint)),
        output=output,
        fragments=(f"--resume {checkpoint}", "damaged", problem, "--resume auto"),
    )


def changed_input(kind: str, tmp_path: Path, data: Path) -> list[str]:
    """Arguments that change one input of the run (and the file changes that go with them)."""
    if kind == "data":
        edit_lines(
            data / "train.jsonl",
            lambda lines: lines.__setitem__(
                0, json.dumps({**json.loads(lines[0]), "summary": "Another summary."})
            ),
        )
        return []
    if kind == "validation":
        edit_lines(
            data / "validation.jsonl",
            lambda lines: lines.__setitem__(
                0, json.dumps({**json.loads(lines[0]), "summary": "Another summary."})
            ),
        )
        return []
    if kind == "validation_limit":
        return ["--set", "data.validation_limit=5"]
    if kind == "model":
        model = tmp_path / "model"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 64, "num_layers": 2}))
        return ["--model", str(model)]
    if kind == "tokenizer":
        tokenizer = tmp_path / "tokenizer"
        shutil.copytree(
            Path(__file__).resolve().parents[1] / "launcher" / "assets" / "tiny_t5_tokenizer", tokenizer
        )
        config = json.loads((tokenizer / "tokenizer_config.json").read_text())
        (tokenizer / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 64}))
        return ["--set", f"model.tokenizer={tokenizer}"]
    return []  # method: `ftlaunch lora` instead of `ftlaunch full`


@pytest.mark.parametrize("kind", ["model", "data", "validation", "validation_limit", "method", "tokenizer"])
def test_resume_with_another_model_data_method_or_tokenizer(tmp_path, no_launch, kind):
    """Each is refused (one line, nothing written) unless --force-resume; a changed validation
    split too, since train.best_metric and early stopping compare validation values across the
    change. Another method is refused even with --force-resume: no rank could load its weights."""
    data = data_dir(tmp_path)
    output = tmp_path / "run"
    result = run_cli_in_process(*train_args(data, output, "--dry-run"), env=no_launch, timeout=CLI_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    checkpoint = write_checkpoint(output, 4)
    # The same tokenizer copied elsewhere is the same tokenizer: only a changed one is refused.
    extra = changed_input(kind, tmp_path, data)
    args = train_args(data, output, *extra, "--resume", "auto")
    if kind == "method":
        args[0] = "lora"
    fragments = {
        "model": ("model: other files",),
        "data": ("data: the training file",),
        "validation": ("validation: the validation file",),
        "validation_limit": ("data.validation_split/validation_limit changed",),
        "method": ("train.method full -> lora", "--force-resume cannot load"),
        "tokenizer": ("tokenizer: other files",),
    }[kind]
    line = refused(
        no_launch,
        *args,
        output=output,
        watch=(data,),
        fragments=(str(checkpoint), "other training inputs", "--force-resume", *fragments),
    )
    if kind != "model":
        assert "model" not in line.split("(")[1].split(")")[0], line  # only what changed is named
    if kind == "method":
        forced = refused(no_launch, *args, "--force-resume", output=output, watch=(data,))
        assert forced == line, (forced, line)
        return
    # --force-resume accepts it: the launch goes ahead (here: the fake launcher is reached).
    result = run_cli_in_process(*args, "--force-resume", env=no_launch, timeout=CLI_TIMEOUT)
    assert Path(no_launch["FTLAUNCH_TEST_LAUNCH_MARKER"]).exists(), result.stdout + result.stderr


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--set", "lora.r=8"], "lora.r 32 -> 8"),
        (["--set", "lora.target_modules=[q,k,v]"], "lora.target_modules query+value -> q,k,v"),
        (["--set", "lora.target_modules=[v,q]"], None),
        (["--set", "lora.use_dora=true"], "lora.use_dora off -> on"),
        (["--set", "lora.alpha=16"], None),
        (["--set", "lora.use_rslora=true"], None),
    ],
    ids=["r", "targets", "same-targets-named", "dora", "alpha", "rslora"],
)
def test_force_resume_cannot_load_another_lora_shape(tmp_path, no_launch, change, named):
    """--force-resume from a LoRA checkpoint into another rank, target list or DoRA was accepted and
    then crashed every rank loading the state dict: refused in one line instead. A changed scaling
    (lora.alpha, rslora) or the default query/value projections named (``[v,q]``) have the same
    tensors: refused without --force-resume (the fingerprint differs), accepted with it."""
    output = tmp_path / "run"
    args = ["lora", *train_args("sample", output)[1:]]
    result = run_cli_in_process(*args, "--dry-run", env=no_launch, timeout=CLI_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    checkpoint = write_checkpoint(output, 4)
    resume = [*args, *change, "--resume", "auto"]
    refused(no_launch, *resume, output=output, fragments=(str(checkpoint), "other training inputs"))
    if named is None:
        result = run_cli_in_process(*resume, "--force-resume", env=no_launch, timeout=CLI_TIMEOUT)
        assert Path(no_launch["FTLAUNCH_TEST_LAUNCH_MARKER"]).exists(), result.stdout + result.stderr
        return
    refused(
        no_launch,
        *resume,
        "--force-resume",
        output=output,
        fragments=(str(checkpoint), named, "--force-resume cannot load"),
    )


def test_a_checkpoint_without_a_validation_fingerprint_still_resumes(tmp_path, no_launch):
    """Checkpoints written before the validation split was recorded (no ``validation`` in
    ftlaunch_state.json) resume as before: the field is compared only when both sides have it."""
    from launcher.core.checkpoint import STATE_FILE, TrainState, check_compatible, read_state, write_manifest
    from launcher.core.errors import UserError

    data = data_dir(tmp_path)
    output = tmp_path / "run"
    result = run_cli_in_process(*train_args(data, output, "--dry-run"), env=no_launch, timeout=CLI_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    checkpoint = write_checkpoint(output, 4)
    state = json.loads((checkpoint / STATE_FILE).read_text())
    assert state.pop("validation").startswith("sha256:")
    (checkpoint / STATE_FILE).write_text(json.dumps(state))
    (checkpoint / "manifest.json").unlink()
    write_manifest(checkpoint)
    assert read_state(checkpoint).validation is None
    changed_input("validation", tmp_path, data)
    result = run_cli_in_process(
        *train_args(data, output, "--resume", "auto"), env=no_launch, timeout=CLI_TIMEOUT
    )
    assert Path(no_launch["FTLAUNCH_TEST_LAUNCH_MARKER"]).exists(), result.stdout + result.stderr
    # the check itself: compared only when both states have it
    check_compatible(TrainState(validation=None), TrainState(validation="sha256:1"), checkpoint)
    with pytest.raises(UserError, match="validation: the validation file"):
        check_compatible(TrainState(validation="sha256:0"), TrainState(validation="sha256:1"), checkpoint)


def test_resume_with_the_same_tokenizer_copied_elsewhere(tmp_path, no_launch):
    output = tmp_path / "run"
    result = run_cli_in_process(
        *train_args("sample", output, "--dry-run"), env=no_launch, timeout=CLI_TIMEOUT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    write_checkpoint(output, 4)
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(
        Path(__file__).resolve().parents[1] / "launcher" / "assets" / "tiny_t5_tokenizer", tokenizer
    )
    result = run_cli_in_process(
        *train_args(
            "sample", output, "--set", f"model.tokenizer={tokenizer}", "--resume", "auto", "--dry-run"
        ),
        env=no_launch,
        timeout=CLI_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- not enough disk


def test_disk_too_small_for_the_run(tmp_path, no_launch, small_disk):
    """tiny-t5: ~3.9 MiB per checkpoint x (2 kept + 1 being written) + final + logs do not fit in 16 MiB."""
    output = small_disk("16M") / "run"
    refused(
        no_launch,
        *train_args("sample", output),
        output=output,
        fragments=(
            f"--output {output}",
            "the run will write about",
            "is free there",
            "train.keep_checkpoints",
            "pick another --output",
        ),
    )
    # The same run fits a larger disk: the check is an estimate, not a refusal of small disks.
    output = small_disk("128M") / "run"
    result = run_cli(*train_args("sample", output), env=no_launch, timeout=CLI_TIMEOUT)  # a launch
    assert Path(no_launch["FTLAUNCH_TEST_LAUNCH_MARKER"]).exists(), result.stdout + result.stderr


@pytest.mark.parametrize(("split", "escape"), [("train", "\\ud800"), ("test", "\\udc80")])
def test_a_lone_surrogate_escape_in_the_data_is_refused_before_launch(tmp_path, no_launch, split, escape):
    """JSON accepts "\\ud800" (half of a UTF-16 pair) and Python keeps it as an invalid character
    that only the tokenizer rejects, in every rank, with an unexplained TypeError: refused here,
    naming the file and line. A whole pair (an emoji written as two escapes) is a character."""
    data = data_dir(tmp_path)

    def edit(lines: list[str]) -> None:
        row = json.loads(lines[1])
        lines[1] = json.dumps(row).replace('"dialogue": "', f'"dialogue": "\\ud83d\\ude00 {escape} ', 1)

    edit_lines(data / f"{split}.jsonl", edit)
    out = tmp_path / "run"
    refused(
        no_launch,
        *train_args(data, out),
        output=out,
        fragments=(f"{data / f'{split}.jsonl'} line 2 holds {escape}, half of a UTF-16 surrogate pair",),
    )


def test_a_whole_surrogate_pair_is_one_character():
    from launcher.core.jsonl import parse_line

    assert parse_line('{"dialogue": "hi \\ud83d\\ude00"}', "f", 1) == {"dialogue": "hi \U0001f600"}


def test_a_hugging_face_cache_that_cannot_be_used_is_named(tmp_path, no_launch):
    """HF_HOME under a file: the cause is the cache folder, not the network ("the hub cannot be
    reached" sent users after their connection). A subprocess: huggingface_hub reads HF_HOME when
    it is imported."""
    (tmp_path / "afile").write_text("x\n")
    env = {key: value for key, value in no_launch.items() if key != "HF_HUB_OFFLINE"}
    env["HF_HOME"] = str(tmp_path / "afile" / "sub")
    out = tmp_path / "run"
    refused(
        env,
        "full", "--cpu", "--model", "google/flan-t5-small", "--data", "sample", "--output", str(out),
        output=out,
        fragments=("model 'google/flan-t5-small': the Hugging Face cache cannot be used (Not a directory",
                   "point HF_HOME (or HF_HUB_CACHE) at a folder you can write"),
        run=run_cli,
    )  # fmt: skip


# ---------------------------------------------------------------- fuzzing round 7


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (
            ("full", *TRAIN_FLAGS, "--set", "data.max_source_length=100000000000000000000"),
            "data.max_source_length=100000000000000000000 is beyond any run (at most 2,147,483,647)",
        ),
        (("full", *TRAIN_FLAGS, "--resume", ""), "--resume '' names no checkpoint: pass auto"),
        (
            ("lora", *TRAIN_FLAGS, "--zero", "auto", "--gpu-mem", "8", "--set", "lora.target_modules=[wq]"),
            "lora.target_modules ['wq'] names 'wq', no projection of tiny-t5",
        ),
    ],
    ids=["int-beyond-any-run", "empty-resume", "lora-target-under-zero-auto"],
)
def test_round_7_inputs_are_refused_in_one_line_naming_the_key(tmp_path, no_launch, args, fragment):
    """A tokenizer's OverflowError in the ranks, a run silently started from scratch, and a
    message naming neither key nor fix, before."""
    out = tmp_path / "out"
    refused(no_launch, *args, "--model", "tiny-t5", "--output", str(out), output=out, fragments=(fragment,))


def test_a_huge_count_in_a_recipe_file_is_refused_too(tmp_path, no_launch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  method: full\neval:\n  max_new_tokens: 100000000000000000000\n")
    out = tmp_path / "out"
    refused(
        no_launch, "full", *TRAIN_FLAGS, "--model", "tiny-t5", "--recipe", str(recipe), "--output", str(out),
        output=out, fragments=("eval.max_new_tokens=100000000000000000000 is beyond any run",),
    )  # fmt: skip


def test_yaml_merge_keys_read_as_yaml_defines_them(tmp_path):
    """``<<: *anchor`` brings a mapping's entries in and an explicit key overrides one of them; a key
    written twice by hand is still refused."""
    from launcher.core.errors import UserError
    from launcher.core.recipe_loading import read_yaml_mapping

    merged = tmp_path / "merged.yaml"
    merged.write_text("eval:\n  <<: {limit: 4, num_beams: 2}\n  num_beams: 3\n")
    assert read_yaml_mapping(merged)["eval"] == {"limit": 4, "num_beams": 3}
    variants = tmp_path / "variants.yaml"
    variants.write_text("- &base {lr: 0.001, epochs: 2}\n- <<: *base\n  lr: 0.01\n")
    from launcher.core.recipe_loading import load_yaml

    assert load_yaml(variants.read_text()) == [{"lr": 0.001, "epochs": 2}, {"lr": 0.01, "epochs": 2}]
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  <<: {lr: 1}\n  epochs: 1\n  epochs: 2\n")
    with pytest.raises(UserError, match="appears twice"):
        read_yaml_mapping(twice)


def test_estimate_prints_no_deepspeed_accelerator_warning():
    """DeepSpeed's estimators need no accelerator; its probe's warning used to precede every
    estimate (and --zero auto's one-line errors)."""
    env = cli_env()
    env.pop("DS_ACCELERATOR", None)
    result = run_cli("estimate", "--model", "tiny-t5", "--gpu-mem", "8", env=env)
    assert result.returncode == 0, result.stderr
    assert "Setting accelerator" not in result.stdout + result.stderr, result.stderr
