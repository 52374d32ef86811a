"""What stays true when an evaluation is rescored, and what a report says of it.

* ``ftlaunch score RUN/eval/original/predictions.jsonl --data D --output RUN/eval/original`` (the
  README's rescore in place) keeps what rouge.json recorded of how the predictions were made
  (model, adapter, prompt, generation settings, limit, ...) and, while it scored the same
  examples, their fingerprint: a resumed run then finds the original's record comparable. Scored
  against other data, the fingerprint goes (a resume scores the original again, saying why);
* ``ftlaunch report`` leaves the header's ``generation:`` out where the record does not say, and
  a comparison of rows generated with other settings says so.

Hand-made files, in-process CLI, no model is loaded: the fast tier runs them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import run_cli_in_process
from test_no_clobber import SCORES, finished_run

from launcher.core.dialogues import dataset_dir
from launcher.core.jsonl import write_jsonl
from launcher.core.recipe import GENERATION_KEYS, read_run_recipe
from launcher.rank.evaluation import EVAL_INPUTS, current_eval_inputs, eval_rows, rescore_reason, run_info
from launcher.results.scoring import score_predictions

LIMIT = 5


def evaluated_run(tmp_path: Path) -> Path:
    """A run whose eval/original is as the evaluation writes it: the recipe's first LIMIT test
    examples, their predictions, and rouge.json with the scores and run_info."""
    run = finished_run(tmp_path / "run")
    text = (run / "recipe.yaml").read_text()
    evaluation = text.index("\neval:\n")
    settings = (
        text[evaluation:]
        .replace("  limit: null", f"  limit: {LIMIT}", 1)
        .replace("  num_beams: 1", "  num_beams: 3", 1)
    )
    (run / "recipe.yaml").write_text(text[:evaluation] + settings)
    recipe = read_run_recipe(run)
    assert (recipe.eval.limit, recipe.eval.num_beams) == (LIMIT, 3)
    rows = eval_rows(recipe)
    predictions = [row["dialogue"].split("\n")[0] for row in rows]
    folder = run / "eval" / "original"
    write_jsonl(
        folder / "predictions.jsonl",
        (
            {"id": row["id"], "prediction": p, "references": row["references"]}
            for row, p in zip(rows, predictions)
        ),
    )
    scores = score_predictions(predictions, [row["references"] for row in rows], recipe.eval)
    info = run_info(recipe, f"{recipe.model.name} (original)", rows)
    (folder / "rouge.json").write_text(json.dumps({**scores, **info}, indent=2) + "\n")
    return run


def test_the_kept_fields_are_what_the_evaluation_records():
    """Every field run_info writes is kept by a rescore (how the predictions were made, or which
    examples they scored), or rewritten by it (dataset, split)."""
    from launcher.results.scoring import EXAMPLE_FIELDS, PREDICTION_FIELDS

    recorded = set(EVAL_INPUTS) - {"scoring", "use_stemmer", "split_sentences"}
    assert recorded <= {*PREDICTION_FIELDS, *EXAMPLE_FIELDS, "split"}
    assert set(GENERATION_KEYS) <= set(PREDICTION_FIELDS)


def test_score_in_place_keeps_the_evaluation_s_record(tmp_path):
    run = evaluated_run(tmp_path)
    folder = run / "eval" / "original"
    before = json.loads((folder / "rouge.json").read_text())
    recipe = read_run_recipe(run)
    current = current_eval_inputs(recipe, eval_rows(recipe))
    assert rescore_reason(folder / "rouge.json", current) is None
    result = run_cli_in_process(
        "score", str(folder / "predictions.jsonl"), "--data", "sample", "--output", str(folder)
    )
    assert result.returncode == 0, result.stderr
    after = json.loads((folder / "rouge.json").read_text())
    assert after["predictions"] == str((folder / "predictions.jsonl").resolve())
    for key in ("model", "adapter", "limit", "prompt", "max_source_length", "batch_size", "examples"):
        assert after[key] == before[key], key
    assert {key: after[key] for key in GENERATION_KEYS} == {key: before[key] for key in GENERATION_KEYS}
    assert after["num_beams"] == 3 and after["limit"] == LIMIT
    # a resume of the run (same eval settings) keeps the original's scores
    assert rescore_reason(folder / "rouge.json", current) is None
    # and its report shows the generation settings
    report = run_cli_in_process("report", str(run))
    assert report.returncode == 0, report.stderr
    assert "generation: max_new_tokens 128, num_beams 3" in (run / "report" / "report.md").read_text()


def test_score_in_place_against_other_data_drops_the_examples(tmp_path):
    run = evaluated_run(tmp_path)
    folder = run / "eval" / "original"
    other = shutil.copytree(dataset_dir("sample"), tmp_path / "other-data")
    lines = (other / "test.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["summary1"] = "Another reference altogether."
    (other / "test.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    result = run_cli_in_process(
        "score", str(folder / "predictions.jsonl"), "--data", str(other), "--output", str(folder)
    )
    assert result.returncode == 0, result.stderr
    after = json.loads((folder / "rouge.json").read_text())
    assert "examples" not in after and "target_field" not in after
    assert (
        after["model"] == "tiny-t5 (original)" and after["num_beams"] == 3 and after["dataset"] == str(other)
    )
    recipe = read_run_recipe(run)
    reason = rescore_reason(folder / "rouge.json", current_eval_inputs(recipe, eval_rows(recipe)))
    assert reason is not None and "examples" in reason
    assert "rewritten by `ftlaunch score`" in reason and "older ftlaunch wrote it" not in reason


def test_score_into_a_new_folder_keeps_nothing(tmp_path):
    """A new folder holds no record of the predictions: nothing is kept."""
    run = evaluated_run(tmp_path)
    predictions = run / "eval" / "original" / "predictions.jsonl"
    scores = tmp_path / "scores"
    result = run_cli_in_process("score", str(predictions), "--data", "sample", "--output", str(scores))
    assert result.returncode == 0, result.stderr
    assert not {"model", "num_beams", "examples"} & set(json.loads((scores / "rouge.json").read_text()))


def test_a_report_without_generation_settings_leaves_them_out(tmp_path):
    """rouge.json files that do not record the generation (a predictions file of one's own,
    scored by `ftlaunch score`): the header says nothing of it rather than an empty ``generation:``."""
    run = finished_run(tmp_path / "run")
    result = run_cli_in_process("report", str(run))
    assert result.returncode == 0, result.stderr
    header = next(
        line for line in (run / "report" / "report.md").read_text().splitlines() if line.startswith("Data:")
    )
    assert "generation" not in header and header.endswith("1 examples")


def test_a_comparison_names_differing_generation_settings(tmp_path):
    """num_beams and max_new_tokens differ between the runs: said, with the rows of each value;
    a row that records neither is not counted as different."""
    run = finished_run(tmp_path / "run")
    generation = {"max_new_tokens": 128, "num_beams": 1, "length_penalty": 1.0}
    for name in ("original", "finetuned"):
        scored = run / "eval" / name / "rouge.json"
        scored.write_text(json.dumps({**json.loads(scored.read_text()), **generation}))
    beams = shutil.copytree(run, tmp_path / "beams")
    for name in ("original", "finetuned"):
        scored = beams / "eval" / name / "rouge.json"
        scored.write_text(
            json.dumps({**json.loads(scored.read_text()), "num_beams": 3, "max_new_tokens": 20})
        )
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "rouge.json").write_text(json.dumps(SCORES))
    result = run_cli_in_process("report", str(run), str(beams), str(unknown))
    assert result.returncode == 0, result.stderr
    assert (
        "Generation settings differ between rows (their numbers do not compare): max_new_tokens "
        "128 (run/original, run/finetuned), 20 (beams/original, beams/finetuned); num_beams 1 "
        "(run/original, run/finetuned), 3 (beams/original, beams/finetuned)"
    ) in result.stdout
    same = run_cli_in_process("report", str(run), str(unknown))
    assert same.returncode == 0 and "Generation settings differ" not in same.stdout
