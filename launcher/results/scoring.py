"""Scoring predictions with ROUGE under the recipe's eval settings: at the end of a run, in
``ftlaunch eval`` (evaluation.py) and in ``ftlaunch score`` (rescoring a predictions file).

rouge.py is the metric itself (evaluate's definitions over rouge_score); this module is the one
place that turns the settings (``eval.scoring``, ``eval.use_stemmer``, ``eval.split_sentences``)
into a call of it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from launcher.core.dialogues import load_split
from launcher.core.errors import UserError
from launcher.core.fingerprint import examples_fingerprint
from launcher.core.jsonl import read_jsonl
from launcher.core.recipe import GENERATION_KEYS, DataSection, EvalSection, Recipe
from launcher.core.recipe_loading import describe_validation_error, parse_override, read_yaml_mapping
from launcher.core.rundir import ResultDir, RunDir
from launcher.core.writable import check_writable_dir, same_file
from launcher.results.rouge import score_rouge


def score_predictions(
    predictions: list[str], references: list[list[str]], settings: EvalSection
) -> dict[str, Any]:
    """ROUGE of ``predictions`` against their references, as the eval settings say."""
    return score_rouge(
        predictions,
        references,
        mode=settings.scoring,
        use_stemmer=settings.use_stemmer,
        split_sentences=settings.split_sentences,
    )


def read_predictions(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"predictions file {path} does not exist")
    rows = read_jsonl(path)
    if not rows:
        raise UserError(f"{path} holds no predictions")
    first_line: dict[str, int] = {}
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("prediction"), str):
            raise UserError(
                f"{path} line {number} has no 'prediction' string; each line needs id and prediction"
            )
        key = row.get("id")
        if isinstance(key, str | int) and not isinstance(key, bool):
            if key in first_line:  # scored twice, it would weigh twice (and n exceed the split)
                raise UserError(
                    f"{path}: id {key!r} appears on lines {first_line[key]} and {number}; keep one "
                    "prediction per example"
                )
            first_line[key] = number
    return rows


def rows_from_data(
    rows: list[dict], dataset: str, split: str, path: Path, columns: DataSection
) -> tuple[list[dict], int]:
    """The dataset's rows of the predictions, in their order, matched by id (all of them must be
    found; each has the references and the dialogue, read through ``columns``); also the split's
    size, so that a score over part of it can say so."""
    by_id = {
        row["id"]: row for row in load_split(dataset, split, None, columns.source_field, columns.target_field)
    }
    missing = [row.get("id") for row in rows if row.get("id") not in by_id]
    if missing:
        raise UserError(
            f"{path}: {len(missing)} prediction ids are not in {dataset}[{split}] "
            f"(first: {missing[0]!r}); score against the split the predictions were made for"
        )
    return [by_id[row["id"]] for row in rows], len(by_id)


def references_from_file(rows: list[dict], path: Path) -> list[list[str]]:
    references = []
    for number, row in enumerate(rows, start=1):
        refs = row.get("references")
        if isinstance(refs, str):
            refs = [refs]
        if not refs or not all(isinstance(r, str) for r in refs):
            raise UserError(
                f"{path} line {number} has no 'references' list; pass --data to take references "
                "from a dataset"
            )
        references.append(refs)
    return references


MODEL_FILES = ("config.json", "adapter_config.json")  # what makes a folder a model (save_pretrained)


def check_score_output(output: Path, predictions: Path) -> None:
    """Where ``score --output`` may write rouge.json: a new or empty folder, the folder of the
    predictions being scored (rescoring in place) or an earlier score of them. Never a folder
    whose rouge.json belongs to other predictions (``report`` would pair them), nor a model, run
    or report folder, which other commands and people read."""
    check_writable_dir(output, "--output")
    if not output.is_dir() or not any(output.iterdir()):
        return
    result = ResultDir(output)
    model_file = next((name for name in MODEL_FILES if (output / name).is_file()), None)
    if model_file is not None:
        raise UserError(
            f"--output {output} is a model folder (it holds {model_file}); pick a new directory for rouge.json"
        )
    if result.report_md.is_file():
        raise UserError(
            f"--output {output} is a report folder ({result.report_md.name}); pick a new directory "
            "for rouge.json, or rewrite the report with `ftlaunch report`"
        )
    if same_file(result.predictions, predictions):
        return  # rescoring in place: this folder's rouge.json is the score of these predictions
    in_place = (
        f", or --output {predictions.parent} to rescore in place"
        if predictions.name == result.predictions.name
        else ""
    )
    if RunDir(output).has_recipe():
        raise UserError(
            f"--output {output} is a run directory; pick a new directory for rouge.json{in_place}"
        )
    if result.predictions.is_file():
        raise UserError(
            f"--output {output} holds the evaluation of other predictions ({result.predictions.name}); "
            f"pick a new directory{in_place}"
        )
    scored = scored_predictions(result.rouge) if result.rouge.is_file() else None
    if scored == str(predictions.resolve()):
        return  # an earlier `ftlaunch score` of the same predictions: replaced
    if result.rouge.is_file():
        of = f"of other predictions ({scored})" if scored else "of unknown predictions"
        raise UserError(
            f"--output {output} holds the {result.rouge.name} {of}; pick a new directory{in_place}"
        )
    raise UserError(
        f"--output {output} is not empty and holds no score of {predictions}; pick a new directory{in_place}"
    )


# What an evaluation's rouge.json records of how its predictions were made (evaluation.run_info):
# still true when the same predictions are scored again, against any references.
PREDICTION_FIELDS = (
    "model",
    "adapter",
    "limit",
    "source_field",
    "prompt",
    "max_source_length",
    *GENERATION_KEYS,
    "batch_size",
)
# What it records of the examples scored: true only while the examples scored now are the same
# (their fingerprint: ids, dialogues, references).
EXAMPLE_FIELDS = ("target_field", "examples")


def same_predictions_record(output: Path, predictions: Path) -> dict[str, Any]:
    """The rouge.json in ``output`` when it describes ``predictions`` (the folder's own
    predictions.jsonl: a rescore in place, or an earlier ``ftlaunch score`` of the same file),
    else {}: what ``rescore`` may keep of it."""
    result = ResultDir(output)
    try:
        recorded = json.loads(result.rouge.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(recorded, dict):
        return {}
    if same_file(result.predictions, predictions) or recorded.get("predictions") == str(
        predictions.resolve()
    ):
        return recorded
    return {}


def kept_fields(recorded: dict[str, Any], scored: list[dict] | None) -> dict[str, Any]:
    """What a rescore keeps of the record of the same predictions: how they were made (model,
    adapter, prompt, truncation, generation settings, limit), and which examples they were scored
    on when ``scored`` (the dataset rows scored now; None: references from the predictions file)
    are the same examples as recorded."""
    kept = {key: recorded[key] for key in PREDICTION_FIELDS if key in recorded}
    if scored is not None and recorded.get("examples") == examples_fingerprint(scored):
        kept |= {key: recorded[key] for key in EXAMPLE_FIELDS if key in recorded}
    return kept


# The dataset's columns an evaluation read (rouge.json records them, as the recipe's data keys do).
COLUMN_KEYS = ("source_field", "target_field")


def column_overrides(overrides: list[str]) -> dict[str, Any]:
    """``--set data.source_field=C`` / ``--set data.target_field=C``: the only recipe keys score takes."""
    columns: dict[str, Any] = {}
    for item in overrides:
        path, value = parse_override(item)
        if len(path) != 2 or path[0] != "data" or path[1] not in COLUMN_KEYS:
            raise UserError(
                f"--set {item}: score takes only data.source_field and data.target_field (the scoring "
                "settings are its flags: --scoring, --stemmer, --split-sentences)"
            )
        columns[path[1]] = value
    return columns


def run_recipe_columns(predictions: Path) -> dict[str, Any]:
    """The data columns in the recipe of the run whose evaluation wrote ``predictions`` (a training
    run's ``eval/NAME/``, or an ``ftlaunch eval --output`` folder); {} for any other file, or a
    recipe that cannot be read (it is only a hint here)."""
    folder = predictions.resolve().parent
    evaluation, training = RunDir(folder), RunDir(folder.parent.parent)
    for run, result in ((evaluation, evaluation.results), (training, training.eval_result(folder.name))):
        if run.has_recipe() and same_file(result.predictions, predictions):
            try:
                data = read_yaml_mapping(run.recipe_yaml).get("data")
            except UserError:
                return {}
            return {key: data[key] for key in COLUMN_KEYS if key in data} if isinstance(data, dict) else {}
    return {}


def column_sources(predictions: Path) -> Iterator[dict[str, Any]]:
    """What may say which columns the predictions were made with, most direct first: the record
    beside them (their evaluation's rouge.json; in place, the one --output replaces), then the
    recipe of the run they are in (read only when the record does not say)."""
    yield same_predictions_record(predictions.parent, predictions)
    yield run_recipe_columns(predictions)


def scored_columns(predictions: Path, overrides: list[str]) -> DataSection:
    """The columns ``--data``'s rows are read through: ``--set``'s, else those the predictions were
    made with where something records them (``column_sources``), else the dataset's defaults. The
    same columns give the same examples, so a rescore in place keeps their fingerprint."""
    columns = column_overrides(overrides)
    for source in column_sources(predictions):
        if len(columns) == len(COLUMN_KEYS):
            break
        columns = {key: source[key] for key in COLUMN_KEYS if key in source} | columns
    try:  # as a recipe's data section: its rules, and the keys named as recipe keys
        return Recipe.model_validate({"data": columns}).data
    except ValidationError as exc:
        raise UserError(
            f"{describe_validation_error(exc)}; pass the columns the predictions were made with: "
            "--set data.source_field=COLUMN --set data.target_field=COLUMN"
        ) from None


def scored_predictions(rouge_file: Path) -> str | None:
    """The predictions file an earlier ``ftlaunch score`` wrote ``rouge_file`` for (None: unknown)."""
    try:
        scores = json.loads(rouge_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return scores.get("predictions") if isinstance(scores, dict) else None


def rescore(
    path: Path,
    data: str | None,
    split: str,
    scoring: str,
    stemmer: bool,
    split_sentences: bool,
    output: Path | None,
    overrides: list[str] = (),
) -> tuple[str, str | None]:
    """rouge.json's text (also written to ``output``) and a note when the predictions cover only
    part of ``--data``'s split (a limited evaluation: legitimate, but the score is not the split's).
    ``--data``'s rows are read through the columns the predictions were made with (``scored_columns``;
    ``overrides``: score's ``--set data.source_field=...``, ``data.target_field=...``).

    Where ``output`` already holds the record of the same predictions (an evaluation's folder,
    rescored in place), what it says of how they were made is kept (``kept_fields``): only the
    scores and the scoring settings are replaced, and a resumed run still finds its original's
    record comparable."""
    try:  # the flags are the recipe's eval keys: the schema checks them
        settings = EvalSection(scoring=scoring, use_stemmer=stemmer, split_sentences=split_sentences)
    except ValidationError as exc:
        raise UserError(f"--scoring {scoring}: {describe_validation_error(exc)}") from None
    if overrides and not data:
        raise UserError(
            "--set data.source_field/data.target_field name --data's columns; without --data the "
            "references come from the predictions file"
        )
    rows = read_predictions(path)
    recorded: dict[str, Any] = {}
    if output is not None:
        check_score_output(output, path)
        recorded = same_predictions_record(output, path)
    split_size = None
    scored = None
    if data:
        columns = scored_columns(path, list(overrides))
        scored, split_size = rows_from_data(rows, data, split, path, columns)
        references = [row["references"] for row in scored]
    else:
        references = references_from_file(rows, path)
    scores = score_predictions([row["prediction"] for row in rows], references, settings)
    scores |= kept_fields(recorded, scored)
    scores.update(predictions=str(path.resolve()), dataset=data, split=split if data else None)
    note = None
    if split_size is not None and len(rows) < split_size:
        scores["split_size"] = split_size
        note = (
            f"{len(rows)} of the {split_size} examples of {data}[{split}] have a prediction: "
            f"the scores are over those {len(rows)} only"
        )
    text = json.dumps(scores, indent=2)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        ResultDir(output).rouge.write_text(text + "\n")
    return text, note
