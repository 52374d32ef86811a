# ruff: noqa: F811 - no_launch and no_generation are fixtures, imported to be used here
"""``summarize --output`` and ``score --output`` never replace what they were not asked to, and
summarize names a damaged settings file or undecodable standard input instead of a traceback.

* summarize writes one file: a new one, an empty one or an earlier summaries file, never its own
  ``--input`` or another command's file (a recipe, weights, metrics, predictions, ``latest``);
* score writes ``rouge.json`` into a folder: a new or empty one, the folder of the predictions it
  scores (rescoring in place) or its own earlier output, never another evaluation's folder (the
  report would pair those predictions with these scores), a model, run or report folder;
* ftlaunch.json, adapter_config.json and the run's recipe.yaml with a missing key or a value of
  the wrong type, and non-UTF-8 bytes on standard input, are one line naming the file and key.

Each refusal: exit 2, one ``error:`` line, no traceback, nothing generated or launched, the
watched folders byte-for-byte unchanged (``refused`` from test_bad_input). Real CLI, in-process,
no model is loaded: the fast tier runs them.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from conftest import read_jsonl, run_cli_in_process
from test_bad_input import no_launch, refused  # noqa: F401 - a fixture
from test_no_clobber import finished_run
from test_outputs_and_model_files import no_generation  # noqa: F401 - a fixture

from launcher.host import summarize as summarize_module

DIALOGUES = [
    {"id": "a", "dialogue": "A: Lunch at noon?\nB: Sure."},
    {"id": "b", "dialogue": "A: Hi.\nB: Hello."},
]


@pytest.fixture
def run(tmp_path) -> Path:
    """A finished run (recipe, final/ model config, both evaluations) with metrics and a ``latest``."""
    path = finished_run(tmp_path / "run")
    (path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.5}) + "\n")
    (path / "checkpoints").mkdir()
    (path / "checkpoints" / "latest").write_text("step_1\n")
    return path


@pytest.fixture
def inputs(tmp_path) -> Path:
    """A folder holding the dialogues to summarize (dialogues.jsonl)."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "dialogues.jsonl").write_text("".join(json.dumps(row) + "\n" for row in DIALOGUES))
    return folder


@pytest.fixture
def fake_generation(monkeypatch):
    """Generation without a model: one summary per dialogue, so the writing of --output is tested."""

    def generate(_recipe, rows):
        return [f"summary of {row['id']}" for row in rows]

    monkeypatch.setattr(summarize_module, "generate_summaries", generate)


def summarize_refused(env, source: Path, *args: str, watch: tuple[Path, ...], fragments=()) -> str:
    return refused(
        env, "summarize", str(source), "--cpu", *args, output=None, watch=watch, fragments=fragments
    )


def settings_refused(env, source: Path, inputs: Path, *fragments: str) -> str:
    """summarize SOURCE on the usual dialogues, refused for its settings; SOURCE left unchanged."""
    return summarize_refused(
        env, source, "--input", str(inputs / "dialogues.jsonl"), watch=(source,), fragments=fragments
    )


# ---------------------------------------------------------------- summarize --output (A2)


def test_summarize_output_that_is_its_input_is_refused(tmp_path, run, inputs, no_launch, no_generation):
    dialogues = inputs / "dialogues.jsonl"
    for output in (dialogues, inputs / ".." / "inputs" / "dialogues.jsonl"):
        summarize_refused(
            no_launch,
            run,
            "--input",
            str(dialogues),
            "--output",
            str(output),
            watch=(inputs, run),
            fragments=(f"--output {output} is the --input file", "pick another file"),
        )
    link = tmp_path / "link.jsonl"
    link.symlink_to(dialogues)
    summarize_refused(
        no_launch,
        run,
        "--input",
        str(link),
        "--output",
        str(dialogues),
        watch=(inputs, run),
        fragments=("is the --input file",),
    )


@pytest.mark.parametrize(
    "target",
    [
        "recipe.yaml",
        "final/config.json",
        "metrics.jsonl",
        "checkpoints/latest",
        "eval/finetuned/predictions.jsonl",
        "eval/original/rouge.json",
    ],
)
def test_summarize_output_on_another_file_is_refused(run, inputs, no_launch, no_generation, target):
    output = run / target
    summarize_refused(
        no_launch,
        run,
        "--input",
        str(inputs / "dialogues.jsonl"),
        "--output",
        str(output),
        watch=(run, inputs),
        fragments=(f"--output {output} exists and is not a summaries file", "pick a new file"),
    )


def test_summarize_output_on_weights_is_refused(tmp_path, inputs, no_launch, no_generation):
    from conftest import save_tiny_t5

    model = save_tiny_t5(tmp_path / "model")
    output = model / "model.safetensors"
    summarize_refused(
        no_launch,
        model,
        "--input",
        str(inputs / "dialogues.jsonl"),
        "--output",
        str(output),
        watch=(model,),
        fragments=(f"--output {output} exists and is not a summaries file",),
    )


@pytest.mark.parametrize("earlier", ["empty", "summaries"])
def test_summarize_replaces_an_empty_or_earlier_summaries_file(
    tmp_path, run, inputs, fake_generation, earlier
):
    output = tmp_path / "summaries.jsonl"
    output.write_text("" if earlier == "empty" else json.dumps({"id": "old", "summary": "old one"}) + "\n")
    result = run_cli_in_process(
        "summarize", str(run), "--cpu", "--input", str(inputs / "dialogues.jsonl"), "--output", str(output)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert read_jsonl(output) == [
        {"id": "a", "summary": "summary of a"},
        {"id": "b", "summary": "summary of b"},
    ]


# ---------------------------------------------------------------- score --output (A3)


def score_refused(env, predictions: Path, output: Path, watch: tuple[Path, ...], fragments=()) -> str:
    return refused(
        env,
        "score",
        str(predictions),
        "--output",
        str(output),
        output=output,
        watch=watch,
        fragments=fragments,
    )


def test_score_output_in_another_evaluation_is_refused(run, no_launch):
    """The original model's rouge.json must not become the fine-tuned model's scores."""
    predictions = run / "eval" / "finetuned" / "predictions.jsonl"
    output = run / "eval" / "original"
    score_refused(
        no_launch,
        predictions,
        output,
        watch=(run,),
        fragments=(
            f"--output {output} holds the evaluation of other predictions",
            f"--output {predictions.parent} to rescore in place",
        ),
    )


@pytest.mark.parametrize("where", ["final", "run", "report"])
def test_score_output_in_a_model_run_or_report_folder_is_refused(run, no_launch, where):
    (run / "report").mkdir()
    (run / "report" / "report.md").write_text("# report\n")
    output = {"final": run / "final", "run": run, "report": run / "report"}[where]
    what = {"final": "is a model folder", "run": "is a run directory", "report": "is a report folder"}[where]
    score_refused(
        no_launch,
        run / "eval" / "finetuned" / "predictions.jsonl",
        output,
        watch=(run,),
        fragments=(f"--output {output} {what}", "pick a new directory"),
    )


def test_score_output_with_other_files_or_scores_is_refused(tmp_path, run, no_launch):
    predictions = run / "eval" / "finetuned" / "predictions.jsonl"
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("my notes\n")
    score_refused(no_launch, predictions, notes, watch=(run,), fragments=("is not empty and holds no score",))
    other = tmp_path / "other-score"
    first = run_cli_in_process(
        "score", str(run / "eval" / "original" / "predictions.jsonl"), "--output", str(other)
    )
    assert first.returncode == 0, first.stdout + first.stderr
    score_refused(
        no_launch,
        predictions,
        other,
        watch=(run,),
        fragments=(f"--output {other} holds the rouge.json of other predictions",),
    )


def test_score_rescores_in_place_and_into_its_own_earlier_output(tmp_path, run):
    """The documented uses: the evaluation's own folder, a new folder, that folder again, an empty one."""
    predictions = run / "eval" / "original" / "predictions.jsonl"
    kept = predictions.read_bytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    for output in (predictions.parent, tmp_path / "scores", tmp_path / "scores", empty):
        result = run_cli_in_process("score", str(predictions), "--output", str(output))
        assert result.returncode == 0, result.stdout + result.stderr
        scores = json.loads((output / "rouge.json").read_text())
        assert scores["predictions"] == str(predictions.resolve())
    assert predictions.read_bytes() == kept


# ---------------------------------------------------------------- settings files (B6)


def test_settings_without_a_key_the_summaries_need_is_named(run, inputs, no_launch, no_generation):
    settings = run / "final" / "ftlaunch.json"
    settings.write_text('{"method": "full"}\n')
    settings_refused(no_launch, run, inputs, f"{settings} has no 'prompt'", "delete ftlaunch.json")
    settings.write_text(
        json.dumps({"prompt": "Summarize: {dialogue}", "max_source_length": "512", "precision": "fp32"})
    )
    settings_refused(no_launch, run, inputs, f"{settings}: max_source_length is '512', not an integer")


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [("num_beams", "x", "eval.num_beams='x'"), ("precision", "fp64", "model.precision='fp64'")],
)
def test_a_generation_setting_of_the_wrong_value_names_the_settings_file(
    run, inputs, no_launch, no_generation, key, value, said
):
    """ftlaunch.json's generation settings are validated as recipe keys: the line names that file
    (the one to repair), not only the model folder holding it."""
    settings = run / "final" / "ftlaunch.json"
    written = {"prompt": "Summarize: {dialogue}", "max_source_length": 512, "precision": "fp32"}
    settings.write_text(json.dumps({**written, "num_beams": 1, key: value}))
    settings_refused(no_launch, run, inputs, f"{settings}: {said}")


def test_adapter_base_model_that_is_no_name_is_named(tmp_path, inputs, no_launch, no_generation):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": 5})
    )
    settings_refused(
        no_launch,
        adapter,
        inputs,
        f"{adapter / 'adapter_config.json'}: base_model_name_or_path is 5, not a model name",
    )


def test_run_recipe_with_a_bad_section_is_named(run, inputs, no_launch, no_generation):
    recipe = run / "recipe.yaml"
    recipe.write_text("data: [1]\n")
    settings_refused(no_launch, run, inputs, f"recipe {recipe}: data=[1]")


# ---------------------------------------------------------------- standard input (B8)


@pytest.mark.parametrize(
    ("data", "line"), [(b"\xff\xfe\x00", 1), (b"A: hi\nB: \xffho\n", 2), (b"\xef\xbb\xbfA: hi\n\xc3", 2)]
)
def test_summarize_non_utf8_standard_input_is_named(run, no_launch, no_generation, monkeypatch, data, line):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="latin-1"))
    summarize_refused(
        no_launch,
        run,
        watch=(run,),
        fragments=(f"standard input line {line} is not UTF-8 text", "re-encode it as UTF-8"),
    )


def test_standard_input_is_decoded_as_utf8_whatever_the_locale(monkeypatch):
    """A byte-order mark is dropped, and the text is UTF-8 even where the locale says otherwise."""
    data = "\ufeffA: Grüße, Zoë!\nB: 👋".encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="ascii"))
    rows = summarize_module.read_inputs("-")
    assert rows == [{"id": summarize_module.STDIN_ID, "dialogue": "A: Grüße, Zoë!\nB: 👋"}]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b'[{"dialogue": "A: hi"}]', "standard input is a JSON array; give JSON Lines"),
        (
            b'{"id": {"a": 1}, "dialogue": "A: hi"}\n',
            "standard input line 1: id {'a': 1} is not text or a number",
        ),
    ],
    ids=["json-array", "object-id"],
)
def test_summarize_standard_input_of_the_wrong_shape_is_named(
    run, no_launch, no_generation, monkeypatch, data, fragment
):
    """What a file of the same content gets: not summarized as literal text, not a Python-style id."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    summarize_refused(no_launch, run, watch=(run,), fragments=(fragment,))


def test_a_plain_text_dialogue_that_opens_with_a_bracket_is_text(monkeypatch):
    monkeypatch.setattr(
        sys, "stdin", io.TextIOWrapper(io.BytesIO(b"[10:02] Tom: hi\n[10:03] Ann: hello"), encoding="utf-8")
    )
    rows = summarize_module.read_inputs("-")
    assert rows == [{"id": summarize_module.STDIN_ID, "dialogue": "[10:02] Tom: hi\n[10:03] Ann: hello"}]


def test_a_lone_surrogate_in_summarize_input_is_named(run, inputs, no_launch, no_generation):
    """The tokenizer would fail with a traceback on "\\ud800" (JSON's escape of half a UTF-16 pair)."""
    dialogues = inputs / "lone.jsonl"
    dialogues.write_text('{"id": "a", "dialogue": "#Person1#: hi \\ud800 there"}\n')
    summarize_refused(
        no_launch,
        run,
        "--input",
        str(dialogues),
        watch=(run, inputs),
        fragments=(f"{dialogues} line 1 holds \\ud800, half of a UTF-16 surrogate pair",),
    )
