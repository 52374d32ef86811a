"""The original model's ROUGE is re-scored on a resume that evaluates with other inputs.

eval/original/rouge.json is written before the first training step and kept by a resume (the
original's generation is not repeated). A resume with other eval.* settings (eval.limit, eval.num_beams,
...) or an edited test split used to keep the old scores anyway, and the report compared the
original (13 examples, greedy, the old references) with the fine-tuned model (5 examples, 3 beams)
in one table. Now rouge.json records what it was made with (settings and a fingerprint of the
scored examples) and evaluate_original scores the original again, still before the checkpoint is
loaded, when they differ; a plain resume keeps it (nothing generated again).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import read_jsonl, run_cli_harness

SAMPLE = Path(__file__).resolve().parents[1] / "launcher" / "assets" / "sample"
RUN = (
    *("full", "--cpu", "--gpus", "2", "--model", "tiny-t5", "--report-to", "none"),
    *("--set", "model.precision=fp32", "--set", "train.micro_batch_size=4"),
    *("--set", "train.checkpoint_every=4", "--set", "eval.max_new_tokens=16"),
)


@pytest.fixture(scope="module")
def first_start(tmp_path_factory) -> tuple[Path, Path]:
    """A run of 4 steps with its original and fine-tuned evaluations, on a copy of the sample data
    (run directory, data directory); tests copy both before resuming."""
    root = tmp_path_factory.mktemp("rescored")
    data, run = root / "data", root / "run"
    shutil.copytree(SAMPLE, data)
    result = run_cli_harness(*RUN, "--data", str(data), "--set", "train.max_steps=4", "--output", str(run))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return run, data


def resumed(first_start, tmp_path: Path, *extra: str, edit_test=None) -> tuple[Path, str]:
    """The first start copied to ``tmp_path`` and resumed to step 8 with ``extra``; ``edit_test``
    changes the copy's test.jsonl first."""
    run, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(first_start[0], run)
    shutil.copytree(first_start[1], data)
    if edit_test:
        path = data / "test.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        edit_test(rows)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run_cli_harness(
        *RUN,
        "--data",
        str(data),
        "--set",
        "train.max_steps=8",
        *extra,
        "--resume",
        "auto",
        "--output",
        str(run),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return run, output


def evaluations(run: Path) -> dict[str, dict]:
    return {
        name: json.loads((run / "eval" / name / "rouge.json").read_text())
        for name in ("original", "finetuned")
    }


def assert_comparable(run: Path) -> dict[str, dict]:
    """Both rows of the report were made with the same examples and settings."""
    scores = evaluations(run)
    original, finetuned = scores["original"], scores["finetuned"]
    for key in ("n", "split", "limit", "examples", "num_beams", "max_new_tokens", "scoring", "prompt"):
        assert original[key] == finetuned[key], (key, original[key], finetuned[key])
    report = json.loads((run / "report" / "rouge.json").read_text())
    assert report["original"]["n"] == report["finetuned"]["n"] == original["n"]
    return scores


@pytest.mark.slow
def test_a_resume_with_other_eval_settings_scores_the_original_again(first_start, tmp_path):
    run, output = resumed(first_start, tmp_path, "--set", "eval.limit=5", "--set", "eval.num_beams=3")
    assert (
        "eval/original was scored with eval.limit=null, eval.num_beams=1; scoring the original again "
        "with eval.limit=5, eval.num_beams=3" in output
    ), output[-3000:]
    scores = assert_comparable(run)
    assert scores["original"]["n"] == 5 and scores["original"]["num_beams"] == 3
    assert len(read_jsonl(run / "eval" / "original" / "predictions.jsonl")) == 5
    table = (run / "report" / "report.md").read_text()
    assert "| original |" in table and table.count("| 5 |") == 2, table


@pytest.mark.slow
def test_a_resume_with_an_edited_test_split_scores_the_original_again(first_start, tmp_path):
    def edit(rows: list[dict]) -> None:
        rows[0]["summary1"] = "Person1 asks for a new phone."

    run, output = resumed(first_start, tmp_path, edit_test=edit)
    assert (
        "eval/original was scored with other test examples; scoring the original again with the current ones"
        in output
    ), output[-3000:]
    assert_comparable(run)
    first = read_jsonl(run / "eval" / "original" / "predictions.jsonl")[0]
    assert "Person1 asks for a new phone." in first["references"], first


@pytest.mark.slow
def test_a_plain_resume_keeps_the_originals_scores(first_start, tmp_path):
    """Nothing changed: the original is not generated again (its files are untouched)."""
    before = tmp_path / "before"
    shutil.copytree(first_start[0] / "eval" / "original", before)
    stamps = {p.name: p.stat().st_mtime_ns for p in (first_start[0] / "eval" / "original").iterdir()}
    run, output = resumed(first_start, tmp_path)
    assert "scoring the original again" not in output and "tiny-t5 (original)" not in output, output[-3000:]
    for path in (run / "eval" / "original").iterdir():
        assert path.read_bytes() == (before / path.name).read_bytes(), path
        assert path.stat().st_mtime_ns == stamps[path.name], path  # copytree keeps the times
    assert_comparable(run)


# ---------------------------------------------------------------- the decision itself


def recorded_inputs(tmp_path: Path, **changes) -> tuple[Path, dict]:
    """A rouge.json as evaluate_model writes it for the sample's test split, with ``changes``
    (a value of None removes the key), and the inputs of an evaluation made now."""
    from launcher.core.recipe import Recipe
    from launcher.rank.evaluation import current_eval_inputs, eval_rows, run_info

    recipe = Recipe.model_validate({"model": {"name": "tiny-t5"}, "data": {"dataset": "sample"}})
    rows = eval_rows(recipe)
    record = {"rouge1": 0.1, "n": len(rows), "scoring": "best_of_n", "use_stemmer": True}
    record |= {"split_sentences": False, **run_info(recipe, "tiny-t5 (original)", rows)}
    for key, value in changes.items():
        if value is None:
            record.pop(key)
        else:
            record[key] = value
    path = tmp_path / "eval" / "original" / "rouge.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    return path, current_eval_inputs(recipe, rows)


def test_the_same_inputs_keep_the_scores(tmp_path):
    from launcher.rank.evaluation import rescore_reason

    assert rescore_reason(*recorded_inputs(tmp_path)) is None


def test_a_record_of_an_older_version_is_scored_again(tmp_path):
    """rouge.json of runs made before the scored examples were recorded: unknown, so re-scored."""
    from launcher.rank.evaluation import rescore_reason

    reason = rescore_reason(*recorded_inputs(tmp_path, examples=None, limit=None, prompt=None))
    assert reason.startswith(
        "eval/original/rouge.json does not record its eval.limit, data.prompt, examples"
    ), reason
    assert "scoring the original again" in reason


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"use_stemmer": False},
            "eval.use_stemmer=false; scoring the original again with eval.use_stemmer=true",
        ),
        ({"repetition_penalty": 1.2}, "eval.repetition_penalty=1.2; scoring the original again with "),
        ({"prompt": "Summarize: {dialogue}"}, "was scored with another data.prompt; scoring"),
        ({"max_source_length": 64}, "data.max_source_length=64; scoring"),
    ],
    ids=["scoring", "generation", "prompt", "truncation"],
)
def test_other_scoring_generation_or_prompt_settings_are_scored_again(tmp_path, changes, expected):
    from launcher.rank.evaluation import rescore_reason

    reason = rescore_reason(*recorded_inputs(tmp_path, **changes))
    assert reason and expected in reason, reason
