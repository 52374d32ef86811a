"""The user's own data: CSV and Parquet splits, columns mapped with data.source_field and
data.target_field (several references, scored best-of-n), hub datasets with their own columns, and
the refusals. In-process loader tests, and one short mT5 LoRA run on CSV + Parquet files.

References: the rows as written by the test (json, csv, pyarrow), and rouge_score itself.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_jsonl, run_cli_harness
from rouge_score import rouge_scorer
from tiny_families import SAMPLE, save_tiny

from launcher.core.dialogues import load_split
from launcher.core.errors import UserError
from launcher.core.recipe_loading import build_recipe
from launcher.results.rouge import ROUGE_TYPES, score_rouge

TARGETS = ["notes", "notes_2", "notes_3"]


def sample_rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (SAMPLE / f"{split}.jsonl").read_text().splitlines()]


def renamed(row: dict) -> dict:
    """A sample row under other column names: conversation, notes (notes_2, notes_3 for the test
    split's three references, the last one left empty on even rows)."""
    out = {"id": row["id"], "conversation": row["dialogue"], "topic": row.get("topic", "")}
    if "summary" in row:
        out["notes"] = row["summary"]
    else:
        out["notes"], out["notes_2"] = row["summary1"], row["summary2"]
        out["notes_3"] = "" if int(row["id"].split("_")[1]) % 2 == 0 else row["summary3"]
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_parquet(path: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)


WRITERS = {".csv": write_csv, ".parquet": write_parquet}


def own_data(directory: Path, formats: dict[str, str]) -> Path:
    """The sample's splits in the given formats ({split: suffix}) under other column names."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, suffix in formats.items():
        WRITERS[suffix](directory / f"{split}{suffix}", [renamed(row) for row in sample_rows(split)])
    return directory


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_csv_and_parquet_with_other_column_names_load_every_row(tmp_path, suffix):
    data = own_data(tmp_path / "data", {"train": suffix, "test": suffix})
    rows = load_split(str(data), "train", source_field="conversation", target_field="notes")
    expected = sample_rows("train")
    assert [(r["dialogue"], r["summary"], r["references"]) for r in rows] == [
        (e["dialogue"], e["summary"], [e["summary"]]) for e in expected
    ]
    assert all("\n" in r["dialogue"] for r in rows)  # quoted multi-line cells survive
    test = load_split(str(data), "test", source_field="conversation", target_field=TARGETS)
    for row, original in zip(test, sample_rows("test")):
        kept = [original["summary1"], original["summary2"]]
        if int(original["id"].split("_")[1]) % 2:
            kept.append(original["summary3"])
        assert row["references"] == kept and row["summary"] == original["summary1"]


def test_a_mapped_column_that_is_missing_is_refused_with_the_columns_present(tmp_path):
    data = own_data(tmp_path / "data", {"train": ".csv", "test": ".parquet"})
    with pytest.raises(UserError) as source:
        load_split(str(data), "train")
    assert "data.source_field 'dialogue' is not a column" in str(source.value)
    assert "(columns: id, conversation, topic, notes)" in str(source.value)
    with pytest.raises(UserError) as target:
        load_split(str(data), "test", source_field="conversation", target_field=["abstract", "summary"])
    assert "none of data.target_field ['abstract', 'summary'] is a column" in str(target.value)
    assert "test.parquet (columns: id, conversation, topic, notes, notes_2, notes_3)" in str(target.value)


def test_a_split_may_hold_only_some_reference_columns_but_every_row_needs_one(tmp_path):
    data = own_data(tmp_path / "data", {"train": ".csv"})
    rows = load_split(str(data), "train", source_field="conversation", target_field=TARGETS)
    assert all(len(row["references"]) == 1 for row in rows)
    broken = [renamed(row) for row in sample_rows("train")]
    broken[4]["notes"] = "  "
    write_csv(data / "train.csv", broken)
    with pytest.raises(UserError, match=r"train.csv row 5 has no 'notes' or 'notes_2' or 'notes_3' text"):
        load_split(str(data), "train", source_field="conversation", target_field=TARGETS)


def test_one_file_per_split_and_missing_splits_list_every_format(tmp_path):
    data = own_data(tmp_path / "data", {"train": ".csv", "validation": ".parquet"})
    with pytest.raises(UserError, match=r"split 'test' not found: .*test.jsonl does not exist, nor .csv or "):
        load_split(str(data), "test", source_field="conversation", target_field="notes")
    with pytest.raises(UserError, match=r"splits there: train, validation\)"):
        load_split(str(data), "test", source_field="conversation", target_field="notes")
    write_parquet(data / "train.parquet", [renamed(row) for row in sample_rows("train")])
    with pytest.raises(UserError, match=r"'train' is in 2 files \(train.csv, train.parquet\)"):
        load_split(str(data), "train", source_field="conversation", target_field="notes")


def test_files_that_are_not_csv_or_parquet_are_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.parquet").write_text("conversation,notes\nhello,hi\n")
    with pytest.raises(UserError, match="is not a readable Parquet file"):
        load_split(str(data), "train")
    (data / "train.parquet").unlink()
    (data / "train.csv").write_bytes(b"conversation,notes\n\xff\xfe,hi\n")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        load_split(str(data), "train")


def test_a_hub_dataset_is_read_through_its_own_columns(monkeypatch):
    """XSum's layout (document, summary, id); the hub itself is out of reach in tests."""
    import datasets

    table = datasets.Dataset.from_dict(
        {"document": ["A long article.", "Another one."], "summary": ["Short.", "Brief."], "id": ["7", "8"]}
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: table)
    rows = load_split("EdinburghNLP/xsum", "test", source_field="document")
    assert [(r["id"], r["dialogue"], r["references"]) for r in rows] == [
        ("7", "A long article.", ["Short."]),
        ("8", "Another one.", ["Brief."]),
    ]
    with pytest.raises(UserError, match=r"EdinburghNLP/xsum\[test\] \(columns: document, summary, id\)"):
        load_split("EdinburghNLP/xsum", "test")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"target_field": 3}, "data.target_field=3 must be a column name or a non-empty list"),
        ({"target_field": []}, "data.target_field=[] must be a column name or a non-empty list"),
        ({"target_field": ["a", "a"]}, "names a column twice"),
        ({"source_field": "a", "target_field": ["b", "a"]}, "both name 'a'"),
        ({"source_field": ""}, "data.source_field=''"),
    ],
)
def test_field_mapping_is_validated_with_a_message_naming_the_key(data, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_recipe({"data": data}, "recipe x.yaml")


def best_of_n_by_hand(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Per example and per ROUGE type the best F-measure over its references, then the mean."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, refs in zip(predictions, references):
        pairs = [scorer.score(ref, prediction) for ref in refs]
        for key in ROUGE_TYPES:
            totals[key] += max(pair[key].fmeasure for pair in pairs)
    return {key: total / len(predictions) for key, total in totals.items()}


def test_several_reference_columns_are_scored_best_of_n(tmp_path):
    data = own_data(tmp_path / "data", {"test": ".parquet"})
    rows = load_split(str(data), "test", source_field="conversation", target_field=TARGETS)
    predictions = [row["references"][-1].split(".")[0] for row in rows]  # close to one reference only
    scores = score_rouge(predictions, [row["references"] for row in rows])
    by_hand = best_of_n_by_hand(predictions, [row["references"] for row in rows])
    for key in ROUGE_TYPES:
        assert scores[key] == pytest.approx(by_hand[key], abs=1e-12)
    first_only = score_rouge(predictions, [row["references"][:1] for row in rows])
    assert scores["rouge2"] > first_only["rouge2"] + 0.05  # the other columns count
    assert "best reference (of up to 3) per metric" in scores["description"]


@pytest.mark.slow
def test_mt5_lora_on_csv_and_parquet_files_trains_and_scores_best_of_n(tmp_path):
    """mT5 LoRA under DDP on train/validation CSV and a test Parquet file with three reference
    columns; the run's ROUGE equals rouge_score's best-of-n on its own predictions."""
    model_dir = save_tiny("mt5", tmp_path / "mt5")
    data = own_data(tmp_path / "data", {"train": ".csv", "validation": ".csv", "test": ".parquet"})
    run_dir = tmp_path / "run"
    result = run_cli_harness(  # ranks from the rank harness (tests/rankharness.py)
        "lora",
        "--cpu",
        "--gpus",
        "2",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--output",
        str(run_dir),
        *("--set", "data.source_field=conversation", "--set", f"data.target_field=[{','.join(TARGETS)}]"),
        *(
            "--set",
            "model.precision=fp32",
            "--set",
            "data.train_limit=16",
            "--set",
            "data.validation_limit=8",
        ),
        *("--set", "data.max_source_length=128", "--set", "data.max_target_length=32"),
        *("--set", "train.micro_batch_size=4", "--set", "train.max_steps=2", "--set", "train.lr=1e-2"),
        *("--set", "eval.limit=6", "--set", "eval.max_new_tokens=8", "--set", "eval.batch_size=4"),
        *("--set", "eval.compare_original=false"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    adapter = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q", "v"]
    predictions = read_jsonl(run_dir / "eval" / "finetuned" / "predictions.jsonl")
    written = {row["id"]: row for row in pq.read_table(data / "test.parquet").to_pylist()}
    references = [[written[p["id"]][c] for c in TARGETS if written[p["id"]][c]] for p in predictions]
    assert len(predictions) == 6 and [len(r) for r in references] == [2, 3, 2, 3, 2, 3]
    scores = json.loads((run_dir / "eval" / "finetuned" / "rouge.json").read_text())
    by_hand = best_of_n_by_hand([p["prediction"] for p in predictions], references)
    for key in ROUGE_TYPES:
        assert scores[key] == pytest.approx(by_hand[key], abs=1e-12)
    report = (run_dir / "report" / "report.md").read_text()
    assert "best reference (of up to 3) per metric" in report
    assert "references: columns notes, notes_2, notes_3" in report
