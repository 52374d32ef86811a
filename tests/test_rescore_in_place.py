"""What stays true when an evaluation is rescored, and what a report says of it.

* ``ftlaunch score RUN/eval/original/predictions.jsonl --data D --output RUN/eval/original`` (the
  README's rescore in place) keeps what rouge.json recorded of how the predictions were made
  (model, adapter, prompt, generation settings, limit, ...) and, while it scored the same
  examples, their fingerprint: a resumed run then finds the original's record comparable. Scored
  against other data, the fingerprint goes (a resume scores the original again, saying why);
* the predictions' dataset is read through the columns they were made with (the record of the
  same predictions, in ``--output`` or beside them, else their run's recipe; ``--set
  data.source_field=...``/``data.target_field=...`` win), so a run with its own columns keeps its
  fingerprint too;
* ``ftlaunch report`` leaves the header's ``generation:`` out where the record does not say, and
  a comparison of rows generated with other settings says so.

Hand-made files, in-process CLI, no model is loaded: the fast tier runs them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from conftest import run_cli_in_process
from test_cli_errors import refused
from test_no_clobber import SCORES, finished_run

from launcher.core.dialogues import dataset_dir
from launcher.core.jsonl import read_jsonl, write_jsonl
from launcher.core.recipe import GENERATION_KEYS
from launcher.core.recipe_loading import read_run_recipe
from launcher.rank.evaluation import EVAL_INPUTS, current_eval_inputs, eval_rows, rescore_reason, run_info
from launcher.results.rouge import ROUGE_TYPES
from launcher.results.scoring import score_predictions

LIMIT = 5


def evaluated_run(tmp_path: Path, **data: str) -> Path:
    """A run whose eval/original is as the evaluation writes it: the recipe's first LIMIT test
    examples, their predictions, and rouge.json with the scores and run_info. ``data``: recipe
    data keys (dataset, source_field, target_field) other than the rendered run's."""
    run = finished_run(tmp_path / "run")
    text = (run / "recipe.yaml").read_text()
    for key, value in data.items():
        text = re.sub(rf"(?m)^  {key}: .*$", f"  {key}: {value}", text, count=1)
    evaluation = text.index("\neval:\n")
    settings = (
        text[evaluation:]
        .replace("  limit: null", f"  limit: {LIMIT}", 1)
        .replace("  num_beams: 1", "  num_beams: 3", 1)
    )
    (run / "recipe.yaml").write_text(text[:evaluation] + settings)
    recipe = read_run_recipe(run)
    assert (recipe.eval.limit, recipe.eval.num_beams) == (LIMIT, 3)
    assert {key: getattr(recipe.data, key) for key in data} == data
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


def own_columns_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run (and its data) evaluated through the data's own columns, conversation -> notes, of a
    test split that also has the default ones (dialogue, summary1..3): read through those, the
    same predictions have other examples and other references."""
    data = shutil.copytree(dataset_dir("sample"), tmp_path / "own-columns")
    rows = read_jsonl(data / "test.jsonl")
    write_jsonl(
        data / "test.jsonl",
        (
            {**row, "conversation": f"Call log.\n{row['dialogue']}", "notes": f"Notes: {row['summary2']}"}
            for row in rows
        ),
    )
    run = evaluated_run(tmp_path, dataset=str(data), source_field="conversation", target_field="notes")
    return run, data


def rouge_of(scores: dict) -> dict:
    return {key: scores[key] for key in ROUGE_TYPES}


def test_score_in_place_reads_the_columns_the_predictions_were_made_with(tmp_path):
    """The README's rescore in place of a run with its own columns: the same examples (their
    fingerprint kept, so a resume keeps the original's scores) and the same references."""
    run, data = own_columns_run(tmp_path)
    folder = run / "eval" / "original"
    before = json.loads((folder / "rouge.json").read_text())
    result = run_cli_in_process(
        "score", str(folder / "predictions.jsonl"), "--data", str(data), "--output", str(folder)
    )
    assert result.returncode == 0, result.stderr
    after = json.loads((folder / "rouge.json").read_text())
    assert (after["examples"], after["target_field"]) == (before["examples"], "notes")
    assert rouge_of(after) == rouge_of(before)
    recipe = read_run_recipe(run)
    assert rescore_reason(folder / "rouge.json", current_eval_inputs(recipe, eval_rows(recipe))) is None


def test_score_elsewhere_reads_the_columns_from_the_predictions_record_or_their_run(tmp_path):
    """Scored into a new folder, the columns come from the rouge.json beside the predictions (here
    in a copy of the evaluation's folder, outside its run); where that is damaged (the README's fix
    is this command), from the recipe of the run the predictions are in."""
    run, data = own_columns_run(tmp_path)
    predictions = run / "eval" / "original" / "predictions.jsonl"
    before = json.loads((predictions.parent / "rouge.json").read_text())
    copied = shutil.copytree(predictions.parent, tmp_path / "copied")
    elsewhere = run_cli_in_process(
        "score", str(copied / "predictions.jsonl"), "--data", str(data), "--output", str(tmp_path / "scores")
    )
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert rouge_of(json.loads((tmp_path / "scores" / "rouge.json").read_text())) == rouge_of(before)
    (predictions.parent / "rouge.json").write_text("{damaged")
    from_recipe = run_cli_in_process("score", str(predictions), "--data", str(data))
    assert from_recipe.returncode == 0, from_recipe.stderr
    assert rouge_of(json.loads(from_recipe.stdout)) == rouge_of(before)


def test_score_set_names_the_columns_over_the_record(tmp_path):
    """--set data.source_field/data.target_field win over what the record says (then the examples
    are others: the fingerprint goes); any other key, or columns without --data, are refused in
    one line."""
    run, data = own_columns_run(tmp_path)
    folder = run / "eval" / "original"
    predictions = folder / "predictions.jsonl"
    result = run_cli_in_process(
        "score", str(predictions), "--data", str(data), "--output", str(folder),
        "--set", "data.source_field=dialogue", "--set", "data.target_field=[summary1, summary3]",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    after = json.loads((folder / "rouge.json").read_text())
    assert "examples" not in after and after["source_field"] == "conversation"  # how they were made
    rows = read_jsonl(data / "test.jsonl")[:LIMIT]
    expected = score_predictions(
        [row["prediction"] for row in read_jsonl(predictions)],
        [[row["summary1"], row["summary3"]] for row in rows],
        read_run_recipe(run).eval,
    )
    assert rouge_of(after) == rouge_of(expected)
    refused(
        folder, "score", str(predictions), "--data", str(data), "--set", "eval.num_beams=3",
        fragments=("--set eval.num_beams=3: score takes only data.source_field and data.target_field",),
    )  # fmt: skip
    refused(
        folder, "score", str(predictions), "--set", "data.target_field=notes",
        fragments=("without --data the references come from the predictions file",),
    )  # fmt: skip


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
