"""Distributed generation, gathering, ROUGE scoring and reports, through the real CLI.

References: predictions from one process (for the multi-rank runs), and rouge_score called
directly in the test (for `ftlaunch score`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import read_jsonl, run_cli, run_cli_harness, run_cli_in_process
from rouge_score import rouge_scorer

SAMPLE_TEST_SIZE = 13  # does not divide by 2 ranks (nor by the batch sizes used below)
FP32 = ("--set", "model.precision=fp32")


def evaluate(out: Path, *extra: str, gpus: int = 1) -> list[dict]:
    """`ftlaunch eval` with its ranks from the rank harness (tests/rankharness.py): these tests
    check what the ranks generate, gather and score, not how they are launched."""
    result = run_cli_harness(
        "eval",
        "--model",
        "tiny-t5",
        "--data",
        "sample",
        "--cpu",
        "--gpus",
        str(gpus),
        "--output",
        str(out),
        *FP32,
        *extra,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return read_jsonl(out / "predictions.jsonl")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> list[dict]:
    return evaluate(
        tmp_path_factory.mktemp("eval") / "one",
        "--set",
        "eval.batch_size=3",  # 5 batches: on 2 ranks one has a batch fewer
        "--set",
        "eval.max_new_tokens=12",  # a ZeRO-3 rank gathering per module does so per token: keep it short
    )


@pytest.mark.slow  # `ftlaunch eval` on a rank (forked by the rank harness: seconds, once it is up)
def test_one_process_predictions_cover_the_split_in_order(one_process):
    sample = read_jsonl(Path(__file__).resolve().parents[1] / "launcher" / "assets" / "sample" / "test.jsonl")
    assert [row["id"] for row in one_process] == [row["id"] for row in sample]
    assert all(row["prediction"] for row in one_process)
    assert all(len(row["references"]) == 3 for row in one_process)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("zero", "gather"), [(0, "auto"), (3, "auto"), (3, "false")], ids=["ddp", "zero3", "zero3-per-module"]
)
def test_two_ranks_gather_exactly_the_one_process_predictions(tmp_path, one_process, zero, gather):
    """ZeRO-3 gathers the whole model once (auto: it fits) and the ranks generate on their own,
    one of them a batch fewer; or gathers per module and token, in lockstep (false)."""
    predictions = evaluate(
        tmp_path / "two",
        "--zero",
        str(zero),
        "--set",
        "eval.batch_size=3",
        "--set",
        "eval.max_new_tokens=12",
        "--set",
        f"eval.gather_weights={gather}",
        gpus=2,
    )
    assert len(predictions) == SAMPLE_TEST_SIZE
    assert [(row["id"], row["prediction"]) for row in predictions] == [
        (row["id"], row["prediction"]) for row in one_process
    ]
    scores = json.loads((tmp_path / "two" / "rouge.json").read_text())
    assert scores["n"] == SAMPLE_TEST_SIZE and scores["scoring"] == "best_of_n"


@pytest.mark.slow  # `ftlaunch eval` on a rank (the rank harness)
def test_an_adapter_evaluated_on_another_model_is_named_with_it(tmp_path):
    """`ftlaunch eval --model M --adapter A`, A trained on another base (here tiny-t5, applied to a
    saved copy of it, as to a fine-tuned one): a warning, and the scores are labelled with both,
    in rouge.json's ``model`` and on the console, never as M's own."""
    from conftest import save_tiny_t5

    from launcher.core.recipe import LoraSection
    from launcher.rank.model import apply_lora, build_tiny_t5

    adapter = tmp_path / "adapter"
    apply_lora(build_tiny_t5(100), LoraSection(r=4)).save_pretrained(str(adapter))
    (adapter / "ftlaunch.json").write_text(
        json.dumps(
            {"base_model": "tiny-t5", "prompt": "{dialogue}", "max_source_length": 64, "precision": "fp32"}
        )
    )
    other = save_tiny_t5(tmp_path / "other-model")
    out = tmp_path / "eval"
    result = run_cli_harness(
        "eval", "--cpu", "--model", str(other), "--adapter", str(adapter), "--limit", "2",
        "--set", "eval.max_new_tokens=4", "--output", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"warning: --adapter {adapter} was trained on tiny-t5, not on --model {other}" in result.stderr
    scores = json.loads((out / "rouge.json").read_text())
    label = f"{other} + adapter {adapter}"
    assert (scores["model"], scores["adapter"]) == (label, str(adapter))
    assert f"{label}: rouge1 " in result.stdout


def write_predictions(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


PREDICTIONS = [
    {
        "id": "a",
        "prediction": "The cats were running to the park.\nThey played there.",
        "references": ["A cat runs to the park.\nIt plays in the park.", "Cats went to a park and played."],
    },
    {
        "id": "b",
        "prediction": "#Person1# asks #Person2# about the train ticket price.",
        "references": [
            "#Person2# tells #Person1# the ticket costs ten dollars.",
            "#Person1# wants to know how much the ticket is.",
        ],
    },
    {"id": "c", "prediction": "", "references": ["Nothing was said."]},
]


def independent_rouge(rows: list[dict], best_of: bool) -> dict[str, float]:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    per_key: dict[str, list[float]] = {key: [] for key in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    for row in rows:
        scores = [scorer.score(ref, row["prediction"]) for ref in row["references"]]
        for key in per_key:
            values = [s[key].fmeasure for s in scores]
            per_key[key] += [max(values)] if best_of else values
    return {key: sum(values) / len(values) for key, values in per_key.items()}


@pytest.mark.parametrize("scoring", ["best_of_n", "per_reference"])
def test_score_matches_rouge_score(tmp_path, scoring):
    path = write_predictions(tmp_path / "predictions.jsonl", PREDICTIONS)
    result = run_cli_in_process("score", str(path), "--scoring", scoring, "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    scores = json.loads((tmp_path / "out" / "rouge.json").read_text())
    expected = independent_rouge(PREDICTIONS, best_of=scoring == "best_of_n")
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value, abs=1e-12)
    assert scores["rougeLsum"] != pytest.approx(scores["rougeL"])  # newline-split sentences
    assert scores["scoring"] == scoring


def test_score_single_reference_takes_references_from_data(tmp_path):
    sample = read_jsonl(
        Path(__file__).resolve().parents[1] / "launcher" / "assets" / "sample" / "validation.jsonl"
    )
    rows = [{"id": row["id"], "prediction": row["summary"].split(".")[0]} for row in sample]
    path = write_predictions(tmp_path / "predictions.jsonl", rows)
    result = run_cli_in_process("score", str(path), "--data", "sample", "--split", "validation")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    expected = independent_rouge(
        [{**row, "references": [ref["summary"]]} for row, ref in zip(rows, sample)], True
    )
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value, abs=1e-12)


def test_score_refuses_an_example_predicted_twice(tmp_path):
    """A repeated id would weigh that example twice (and n would exceed the split)."""
    rows = [
        {"id": "a", "prediction": "x", "references": ["x"]},
        {"id": "b", "prediction": "y", "references": ["y"]},
    ]
    path = write_predictions(tmp_path / "predictions.jsonl", [*rows, {**rows[0], "prediction": "z"}])
    result = run_cli_in_process("score", str(path), "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    assert result.stderr.strip() == (
        f"error: {path}: id 'a' appears on lines 1 and 3; keep one prediction per example"
    )


def test_score_of_part_of_a_split_says_so(tmp_path):
    """Predictions for the first 5 of the 13 test examples (a limited evaluation): scored over
    those 5, with a note on stderr and the split's size in rouge.json."""
    split = read_jsonl(Path(__file__).resolve().parents[1] / "launcher" / "assets" / "sample" / "test.jsonl")
    rows = [{"id": row["id"], "prediction": row["summary1"]} for row in split[:5]]
    path = write_predictions(tmp_path / "predictions.jsonl", rows)
    result = run_cli_in_process("score", str(path), "--data", "sample", "--split", "test")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["n"] == 5 and scores["split_size"] == len(split) == 13
    note = "note: 5 of the 13 examples of sample[test] have a prediction: the scores are over those 5 only"
    assert result.stderr.strip() == note
    whole = [{"id": row["id"], "prediction": row["summary1"]} for row in split]
    result = run_cli_in_process(
        "score", str(write_predictions(tmp_path / "all.jsonl", whole)), "--data", "sample"
    )
    assert result.returncode == 0 and result.stderr == "" and "split_size" not in json.loads(result.stdout)


def test_score_rejects_unknown_ids(tmp_path):
    path = write_predictions(tmp_path / "predictions.jsonl", [{"id": "nope", "prediction": "x"}])
    result = run_cli_in_process("score", str(path), "--data", "sample")
    assert result.returncode == 2 and result.stderr.startswith("error:") and "nope" in result.stderr


@pytest.mark.slow
def test_lora_run_ends_with_report_and_compare(tmp_path):
    run_dir = tmp_path / "lora"
    result = run_cli_harness(
        "lora",
        "--cpu",
        "--gpus",
        "2",
        "--model",
        "tiny-t5",
        "--data",
        "sample",
        "--output",
        str(run_dir),
        "--set",
        "train.log_every=2",
        "--set",
        "eval.max_new_tokens=16",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    report = run_dir / "report"
    for name in (
        "report.md",
        "rouge.json",
        "rouge.png",
        "loss.png",
        "predictions_original.jsonl",
        "predictions_finetuned.jsonl",
    ):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    assert (report / "rouge.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (report / "report.md").read_text()
    assert "| original |" in text and "| finetuned |" in text and " pp |" in text
    assert "best reference" in text  # the report says how it was scored
    scores = json.loads((report / "rouge.json").read_text())
    assert set(scores) == {"original", "finetuned"}
    assert all(scores[name]["n"] == SAMPLE_TEST_SIZE for name in scores)

    other = tmp_path / "other-eval"
    evaluate(other, "--set", "eval.max_new_tokens=16")
    compared = run_cli("report", str(run_dir), str(other), "--output", str(tmp_path / "cmp"))
    assert compared.returncode == 0, compared.stderr
    table = (tmp_path / "cmp" / "report.md").read_text()
    assert "lora/original" in table and "lora/finetuned" in table and "other-eval" in table
