# ruff: noqa: F811 - no_launch is test_bad_input's fixture, imported to be used here
"""Two refusals made before any work starts (issue 24, classes 2 and 3), for every command:

* an output place that cannot be created and written: ``--output`` under a read-only directory
  (a read-only tmpfs: tests run as root, and root ignores permission bits but not a read-only
  filesystem) or under a path whose parent is a regular file (fails for every user);
* a damaged file in a model folder (``--model``, ``--adapter``, summarize's SOURCE, export's
  RUN/final): truncated JSON, a truncated safetensors file, a weights file that is not torch.save.

Each case: exit 2, one ``error:`` line naming the place or file, no traceback, no launch, nothing
written (``refused`` from test_bad_input). In-process CLI: the fast tier runs them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import save_tiny_t5
from test_bad_input import SAMPLE, no_launch, refused  # noqa: F401 - no_launch is a fixture

from launcher.host import (
    summarize as summarize_module,  # ---------------------------------------------------------------- fixtures
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """tiny-t5 written by save_pretrained (config, generation config, safetensors, tokenizer)."""
    return save_tiny_t5(tmp_path_factory.mktemp("model") / "tiny-t5")


@pytest.fixture
def damaged(tmp_path, model_dir):
    """A copy of the saved model with one file damaged: ``damaged(name)`` -> the folder."""

    def make(name: str, content: bytes | None = None) -> Path:
        folder = tmp_path / f"damaged-{name.replace('.', '-')}"
        shutil.copytree(model_dir, folder)
        path = folder / name
        if content is not None:
            path.write_bytes(content)
        else:
            os.truncate(path, path.stat().st_size // 2)  # an interrupted copy or download
        return folder

    return make


@pytest.fixture
def read_only_dir(tmp_path) -> Path:
    """A directory on a read-only tmpfs (root cannot write there either); skips where it cannot mount."""
    if os.geteuid() != 0:
        point = tmp_path / "read-only"
        point.mkdir()
        point.chmod(0o555)  # not root: permission bits stop the writer
        yield point
        point.chmod(0o755)
        return
    point = tmp_path / "read-only"
    point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(point)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs: {result.stderr.strip()}")
    yield point
    subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a directory\n")
    return path


@pytest.fixture
def no_generation(monkeypatch):
    """summarize must refuse before it loads a model or launches ranks."""

    def fail(*_args, **_kwargs):
        raise AssertionError("summarize generated before checking its --output")

    monkeypatch.setattr(summarize_module, "generate_summaries", fail)
    monkeypatch.setattr(summarize_module, "summarize_launched", fail)


def fake_run(tmp_path: Path, model_dir: Path) -> Path:
    """A finished run as export and report read it: recipe.yaml, final/, eval/finetuned/."""
    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "final")
    shutil.copyfile(Path(__file__).resolve().parents[1] / "recipes" / "full.yaml", run / "recipe.yaml")
    evaluated = run / "eval" / "finetuned"
    evaluated.mkdir(parents=True)
    scores = {"rouge1": 0.1, "rouge2": 0.05, "rougeL": 0.1, "rougeLsum": 0.1, "scoring": "best_of_n"}
    (evaluated / "rouge.json").write_text(json.dumps(scores))
    (evaluated / "predictions.jsonl").write_text(
        json.dumps({"id": "a", "prediction": "x", "references": ["x"]}) + "\n"
    )
    return run


# ---------------------------------------------------------------- class 2: unwritable outputs


TINY = ("--cpu", "--model", "tiny-t5", "--data", "sample")


def train_outputs(parent: Path) -> list[tuple[str, ...]]:
    out = str(parent / "out")
    return [
        ("full", *TINY, "--output", out),
        ("full", *TINY, "--output", out, "--dry-run"),
        ("lora", *TINY, "--output", out),
        ("eval", "--cpu", "--data", "sample", "--output", out),
        ("sweep", "lora", "--grid", "lora.r=2,4", *TINY, "--output", out, "--dry-run"),
    ]


@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_training_and_eval_outputs_that_cannot_be_written_are_refused(where, request, no_launch):
    parent = request.getfixturevalue("a_file" if where == "under-a-file" else "read_only_dir")
    for args in train_outputs(parent):
        line = refused(no_launch, *args, output=parent / "out" if parent.is_dir() else None)
        assert f"--output {parent / 'out'}: cannot write there" in line, (args, line)


def test_summarize_output_under_a_file_is_refused_before_generating(
    tmp_path, model_dir, a_file, no_launch, no_generation
):
    for gpus in ("1", "2"):
        line = refused(
            no_launch,
            "summarize",
            str(model_dir),
            "--input",
            str(SAMPLE / "test.jsonl"),
            "--cpu",
            "--gpus",
            gpus,
            "--output",
            str(a_file / "summaries.jsonl"),
            output=None,
            watch=(model_dir,),
        )
        assert f"--output {a_file / 'summaries.jsonl'}: cannot write there ({a_file} is a file" in line


def test_score_report_and_export_outputs_that_cannot_be_written_are_refused(
    tmp_path, model_dir, read_only_dir, a_file, no_launch
):
    run = fake_run(tmp_path, model_dir)
    predictions = run / "eval" / "finetuned" / "predictions.jsonl"
    for parent in (a_file, read_only_dir):
        out = parent / "out"
        for args in (
            ("score", str(predictions), "--output", str(out)),
            ("report", str(run), "--output", str(out)),
            ("report", str(run), str(run), "--output", str(out)),
            ("export", str(run), "--output", str(out)),
        ):
            line = refused(no_launch, *args, output=None, watch=(run,))
            assert f"--output {out}: cannot write there" in line, (args, line)


def test_the_write_check_leaves_nothing_behind(tmp_path, monkeypatch):
    """The probe creates missing folders, writes and removes a file, then removes the folders;
    a probe that fails midway (here: the file cannot be created) removes them too."""
    import tempfile

    from launcher.core.writable import write_problem

    target = tmp_path / "a" / "b" / "c"
    assert write_problem(target) is None
    assert list(tmp_path.iterdir()) == []

    def denied(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", denied)
    assert write_problem(target) == "Permission denied"
    assert list(tmp_path.iterdir()) == []


def test_the_write_check_of_two_nodes_at_once_does_not_refuse(tmp_path, monkeypatch):
    """Two nodes check the same --output at once: the other node created the folder for its own
    check and removes it just as this node probes it (what made node 0 of a two-node run refuse
    while node 1 launched and waited for it). The check runs again and passes, leaving nothing."""
    import tempfile

    from launcher.core.writable import write_problem

    target = tmp_path / "run"
    target.mkdir()  # the other node's check created it
    real = tempfile.NamedTemporaryFile
    calls = []

    def other_node_cleans_up_first(*args, **kwargs):
        calls.append(kwargs["dir"])
        if len(calls) == 1:
            target.rmdir()  # the other node's check ends, removing the folder it created
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", other_node_cleans_up_first)
    assert write_problem(target) is None
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- class 3: damaged model files


DAMAGES = {
    "config.json": None,
    "tokenizer.json": None,
    "tokenizer_config.json": b"",
    "special_tokens_map.json": b'{"eos_token": ',
    "model.safetensors": None,
}


@pytest.mark.parametrize("name", sorted(DAMAGES))
def test_full_refuses_a_damaged_model_file(name, tmp_path, damaged, no_launch):
    folder = damaged(name, DAMAGES[name])
    line = refused(
        no_launch,
        "full",
        *TINY,
        "--model",
        str(folder),
        "--output",
        str(tmp_path / "run"),
        output=tmp_path / "run",
    )
    assert f"{folder / name} is damaged" in line


def test_a_weights_file_that_is_not_torch_save_is_refused(tmp_path, damaged, no_launch):
    folder = damaged("model.safetensors")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    line = refused(
        no_launch,
        "lora",
        *TINY,
        "--model",
        str(folder),
        "--output",
        str(tmp_path / "run"),
        output=tmp_path / "run",
    )
    assert f"{folder / 'pytorch_model.bin'} is damaged" in line and "zip" in line


def test_eval_summarize_and_export_refuse_damaged_files(
    tmp_path, model_dir, damaged, no_launch, no_generation
):
    tokenizer = damaged("tokenizer.json")
    out = tmp_path / "out"
    line = refused(
        no_launch,
        "eval",
        "--cpu",
        "--data",
        "sample",
        "--model",
        str(tokenizer),
        "--output",
        str(out),
        output=out,
    )
    assert f"{tokenizer / 'tokenizer.json'} is damaged" in line

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8, "base_model_name_or_path": ')
    line = refused(
        no_launch,
        "eval",
        "--cpu",
        "--data",
        "sample",
        "--adapter",
        str(adapter),
        "--output",
        str(out),
        output=out,
    )
    assert f"--adapter {adapter}: {adapter / 'adapter_config.json'} is damaged" in line

    for gpus in ("1", "2"):
        line = refused(
            no_launch,
            "summarize",
            str(tokenizer),
            "--input",
            str(SAMPLE / "test.jsonl"),
            "--cpu",
            "--gpus",
            gpus,
            "--output",
            str(out / "s.jsonl"),
            output=out,
        )
        assert f"{tokenizer / 'tokenizer.json'} is damaged" in line

    run = fake_run(tmp_path, model_dir)
    os.truncate(run / "final" / "model.safetensors", 1000)
    line = refused(no_launch, "export", str(run), "--output", str(out), output=out, watch=(run,))
    assert f"{run / 'final' / 'model.safetensors'} is damaged" in line
    line = refused(
        no_launch, "summarize", str(run), "--input", str(SAMPLE / "test.jsonl"), "--cpu", output=None
    )
    assert f"{run / 'final' / 'model.safetensors'} is damaged" in line


def test_intact_model_files_pass(model_dir, tmp_path):
    """The checks accept what save_pretrained and torch.save write (no false alarms)."""
    import torch

    from launcher.core.modelfiles import check_model_files, file_problem

    check_model_files(model_dir, "--model")
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    assert file_problem(tmp_path / "pytorch_model.bin") is None
    torch.save({"w": torch.zeros(2)}, tmp_path / "adapter_model.bin", _use_new_zipfile_serialization=False)
    assert file_problem(tmp_path / "adapter_model.bin") is None  # the legacy pickle format


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (lambda text: text[: len(text) // 2], "(not valid JSON: "),
        (lambda text: "[1]", "(not a JSON object)"),
        (lambda text: '{"version": "1.0"}', "(not a tokenizers file: "),
    ],
    ids=["truncated", "a list", "no model"],
)
def test_a_damaged_tokenizer_json_says_what_is_wrong(content, said, tmp_path, model_dir, damaged, no_launch):
    """tokenizer.json is parsed once, by the tokenizers library; a file it cannot read is then
    explained: broken JSON with its line and column, else what the library reports."""
    text = (model_dir / "tokenizer.json").read_text()
    folder = damaged("tokenizer.json", content(text).encode())
    tokenizer = folder / "tokenizer.json"
    run = tmp_path / "run"
    line = refused(no_launch, "full", *TINY, "--model", str(folder), "--output", str(run), output=run)
    assert f"{tokenizer} is damaged {said}" in line
