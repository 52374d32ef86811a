"""Tests for launcher.results.rouge.

Expected values are computed here with ``rouge_score`` itself (the library that HF
``evaluate``'s rouge metric wraps), never by calling ``score_rouge`` a second time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest tests/...` without a conftest/pythonpath setting
    sys.path.insert(0, str(ROOT))

from launcher.results.rouge import ROUGE_TYPES, SCORING_MODES, score_rouge  # noqa: E402

TYPES = list(ROUGE_TYPES)


def ref_scorer(use_stemmer: bool = True) -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(TYPES, use_stemmer=use_stemmer)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def assert_scores(result: dict, expected: dict[str, float]) -> None:
    for k in TYPES:
        assert result[k] == pytest.approx(expected[k], abs=1e-12), k


PREDS = [
    "The cat sat on the mat.",
    "Person1 is running late for the meeting with Ms. Dawson.",
    "",
]
REFS1 = [
    "A cat was sitting on the mat.",
    "#Person1# runs late and misses the meeting.",
    "Nobody says anything.",
]


def test_result_shape_and_metadata():
    r = score_rouge(PREDS, [[x] for x in REFS1])
    assert set(r) == {*TYPES, "n", "n_pairs", "scoring", "use_stemmer", "split_sentences", "description"}
    assert r["n"] == 3 and r["n_pairs"] == 3
    assert r["scoring"] == "best_of_n" and r["use_stemmer"] is True and r["split_sentences"] is False
    assert isinstance(r["description"], str) and r["description"]
    for k in TYPES:
        assert isinstance(r[k], float) and 0.0 <= r[k] <= 1.0


@pytest.mark.parametrize("mode", SCORING_MODES)
def test_every_advertised_mode_scores_like_rouge_score(mode):
    """Each mode the module advertises is accepted, reported, and scored as rouge_score scores it
    (best_of_n: per-metric max over references; per_reference: mean over every pair)."""
    sc = ref_scorer()
    by_ref = [[sc.score(ref, pred) for ref in refs] for pred, refs in zip(MULTI_PREDS, MULTI_REFS)]
    if mode == "best_of_n":
        expected = {k: mean([max(s[k].fmeasure for s in row) for row in by_ref]) for k in TYPES}
    else:
        expected = {k: mean([s[k].fmeasure for row in by_ref for s in row]) for k in TYPES}
    r = score_rouge(MULTI_PREDS, MULTI_REFS, mode=mode)
    assert r["scoring"] == mode
    assert_scores(r, expected)


def test_single_reference_matches_rouge_score():
    sc = ref_scorer()
    rows = [sc.score(ref, pred) for pred, ref in zip(PREDS, REFS1)]
    expected = {k: mean([row[k].fmeasure for row in rows]) for k in TYPES}
    for mode in SCORING_MODES:  # one reference each: both modes agree
        assert_scores(score_rouge(PREDS, [[x] for x in REFS1], mode=mode), expected)


def test_empty_prediction_scores_zero():
    r = score_rouge([""], [["something to say"]])
    expected = {k: v.fmeasure for k, v in ref_scorer().score("something to say", "").items()}
    assert_scores(r, expected)
    assert all(r[k] == 0.0 for k in TYPES)


# Built so the best reference differs by metric: A has the same words scrambled (best
# ROUGE-1), B shares a long bigram run (best ROUGE-2).
MULTI_PREDS = ["the cat sat on the mat", "he is running to the station"]
MULTI_REFS = [
    ["mat the on sat cat the", "the cat sat quietly somewhere else today", "a dog barked"],
    ["he runs to the station", "she walked home"],
]


def test_best_of_n_is_per_metric_max_over_references():
    sc = ref_scorer()
    per_ex = []
    best_ref_index = []
    for pred, refs in zip(MULTI_PREDS, MULTI_REFS):
        by_ref = [sc.score(ref, pred) for ref in refs]  # by hand, no score_multi
        per_ex.append({k: max(s[k].fmeasure for s in by_ref) for k in TYPES})
        best_ref_index.append({k: max(range(len(refs)), key=lambda i: by_ref[i][k].fmeasure) for k in TYPES})
    # Sanity of the fixture: the first example takes rouge1 and rouge2 from different refs.
    assert best_ref_index[0]["rouge1"] != best_ref_index[0]["rouge2"]
    expected = {k: mean([e[k] for e in per_ex]) for k in TYPES}
    r = score_rouge(MULTI_PREDS, MULTI_REFS)
    assert_scores(r, expected)
    assert r["n"] == 2 and r["n_pairs"] == 5 and r["scoring"] == "best_of_n"


def test_per_reference_is_mean_over_exploded_rows():
    sc = ref_scorer()
    rows = [sc.score(ref, pred) for pred, refs in zip(MULTI_PREDS, MULTI_REFS) for ref in refs]
    expected = {k: mean([row[k].fmeasure for row in rows]) for k in TYPES}
    r = score_rouge(MULTI_PREDS, MULTI_REFS, mode="per_reference")
    assert_scores(r, expected)
    assert r["n"] == 2 and r["n_pairs"] == 5 and r["scoring"] == "per_reference"
    # Best-of-n can only be higher or equal.
    best = score_rouge(MULTI_PREDS, MULTI_REFS)
    assert all(best[k] >= r[k] for k in TYPES)


def test_stemmer_on_off():
    pred, ref = "he runs home", "he is running home"
    on = score_rouge([pred], [[ref]], use_stemmer=True)
    off = score_rouge([pred], [[ref]], use_stemmer=False)
    assert_scores(on, {k: v.fmeasure for k, v in ref_scorer(True).score(ref, pred).items()})
    assert_scores(off, {k: v.fmeasure for k, v in ref_scorer(False).score(ref, pred).items()})
    assert on["rouge1"] > off["rouge1"]
    assert on["use_stemmer"] is True and off["use_stemmer"] is False


def test_rougelsum_splits_on_newlines():
    pred, ref = "the dog ran\nthe cat sat", "the cat sat\nthe dog ran"
    expected = {k: v.fmeasure for k, v in ref_scorer().score(ref, pred).items()}
    r = score_rouge([pred], [[ref]])
    assert_scores(r, expected)
    assert r["rougeLsum"] > r["rougeL"]  # summary-level LCS matches both sentences


def test_split_sentences_makes_lsum_sentence_level():
    pred, ref = "The dog ran. The cat sat.", "The cat sat. The dog ran."
    sc = ref_scorer()
    one_line = {k: v.fmeasure for k, v in sc.score(ref, pred).items()}
    by_line = {
        k: v.fmeasure for k, v in sc.score("The cat sat.\nThe dog ran.", "The dog ran.\nThe cat sat.").items()
    }
    plain = score_rouge([pred], [[ref]])
    split = score_rouge([pred], [[ref]], split_sentences=True)
    assert_scores(plain, one_line)
    assert_scores(split, by_line)
    assert plain["rougeLsum"] == pytest.approx(plain["rougeL"])  # one line: Lsum == L
    assert split["rougeLsum"] > plain["rougeLsum"]
    for k in ("rouge1", "rouge2", "rougeL"):  # line breaks are invisible to the tokenizer
        assert split[k] == pytest.approx(plain[k])
    assert split["split_sentences"] is True


@pytest.mark.parametrize(
    "preds, refs, kwargs, match",
    [
        (["a", "b"], [["a"]], {}, "2 predictions but 1"),
        (["a"], [[]], {}, "at least one reference"),
        (["a"], ["a"], {}, "list of reference strings"),
        (["a"], [[None]], {}, r"references\[0\]\[0\]"),
        ([None], [["a"]], {}, r"predictions\[0\]"),
        ([], [], {}, "empty"),
        (["a"], [["a"]], {"mode": "mean"}, "mode must be one of"),
    ],
)
def test_invalid_input_raises(preds, refs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        score_rouge(preds, refs, **kwargs)


# --- real data: DialogSum test set and the authors' BART-large outputs -----------------

PUBLISHED_BART = {"rouge1": 0.4595, "rouge2": 0.2136, "rougeL": 0.3872}  # vs summary1, stemmed


def dialogsum_dir() -> Path:
    shared = os.environ.get("FTLAUNCH_SHARED_DIR")
    base = Path(shared) if shared else Path(__file__).resolve().parents[2] / "shared"
    return base / "data" / "dialogsum"


@pytest.fixture(scope="module")
def bart_test():
    d = dialogsum_dir()
    test_file = d / "test.jsonl"
    pred_file = d / "baselines" / "bart-large.test.predictions.jsonl"
    if not (test_file.is_file() and pred_file.is_file()):
        pytest.skip(f"DialogSum test data not found under {d} (set FTLAUNCH_SHARED_DIR to the shared dir)")
    rows = [json.loads(line) for line in test_file.read_text().splitlines() if line.strip()]
    preds = {}
    for line in pred_file.read_text().splitlines():
        if line.strip():
            obj = json.loads(line)
            preds[obj["id"]] = obj["prediction"]
    assert len(rows) == 500 and set(preds) == {r["id"] for r in rows}
    return [preds[r["id"]] for r in rows], rows


def test_bart_baseline_matches_published_numbers(bart_test):
    preds, rows = bart_test
    single = score_rouge(preds, [[r["summary1"]] for r in rows])
    multi = score_rouge(preds, [[r["summary1"], r["summary2"], r["summary3"]] for r in rows])
    for k, published in PUBLISHED_BART.items():
        assert abs(single[k] - published) < 0.015, (k, single[k], published)
    for k in TYPES:
        assert multi[k] >= single[k], k
    assert single["n"] == multi["n"] == 500
    assert single["n_pairs"] == 500 and multi["n_pairs"] == 1500


def test_only_scoring_imports_rouge_score_and_nltk():
    """rouge_score imports nltk (~1 s): every rank imports the training loop and the evaluation,
    but only the main rank scores, and the report readers only need the metric names."""
    code = (
        "import sys, launcher.rank.train, launcher.rank.evaluation, launcher.results.report, launcher.host.sweep_report\n"
        "before = 'nltk' in sys.modules\n"
        "from launcher.results.rouge import score_rouge\n"
        "score_rouge(['a cat'], [['a cat']])\n"
        "print(before, 'nltk' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "True"], result.stdout
