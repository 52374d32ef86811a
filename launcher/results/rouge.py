"""ROUGE scoring for the end-of-run report.

Same definitions as Hugging Face ``evaluate``'s ``rouge`` metric, which is a thin
wrapper over Google's ``rouge_score`` package: one
``rouge_scorer.RougeScorer(rouge_types, use_stemmer=...)``, ``scorer.score`` for one
reference and ``scorer.score_multi`` (best reference per metric, by F-measure) for
several. We call ``rouge_score`` directly because ``evaluate.load("rouge")`` needs the
hub (the metric script is not shipped in the ``evaluate`` wheel) and we work offline.

Differences from ``evaluate.load("rouge").compute(...)``, all deliberate:

* Aggregation. ``evaluate``'s default ``use_aggregator=True`` feeds the per-example
  scores to ``rouge_score.scoring.BootstrapAggregator`` and reports the *median of
  1000 bootstrap resamples of the mean* (unseeded, so it changes from run to run). On
  ~500 examples that differs from the plain mean by ~1e-3 at most. We report the plain
  mean of the per-example F-measures, which is deterministic and equals the mean of
  ``evaluate``'s ``use_aggregator=False`` lists.
* Stemming. ``evaluate`` defaults to ``use_stemmer=False``; we default to ``True``
  because the DialogSum authors and the HF summarization examples score with stemming.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

SCORING_MODES = ("best_of_n", "per_reference")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# A sentence ends at . ! or ? followed by whitespace. nltk's punkt (what the HF
# summarization examples use) is not downloadable offline, so this is a plain regex; it
# only skips a few English titles ("Ms. Dawson", "Mr. Smith"), which DialogSum is full of
# and which punkt would not split either.
_SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\bMr\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bMrs\.)\s+")


def split_into_lines(text: str) -> str:
    """Put each sentence of ``text`` on its own line (``rougeLsum`` splits on "\\n")."""
    return _SENTENCE_END.sub("\n", text.strip())


def _validate(predictions: Sequence[str], references: Sequence[Sequence[str]], mode: str) -> None:
    if mode not in SCORING_MODES:
        raise ValueError(f"mode must be one of {SCORING_MODES}, got {mode!r}")
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError("predictions and references must be lists, not a single string")
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} reference lists; "
            "they must pair up one to one"
        )
    if not predictions:
        raise ValueError("nothing to score: predictions is empty")
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if not isinstance(pred, str):
            raise ValueError(f"predictions[{i}] must be a string, got {type(pred).__name__}")
        # A bare string is a Sequence too; scoring it would silently use single characters.
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise ValueError(
                f"references[{i}] must be a list of reference strings (e.g. [summary]), "
                f"got {type(refs).__name__}"
            )
        if len(refs) == 0:
            raise ValueError(f"references[{i}] is empty; each prediction needs at least one reference")
        for j, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise ValueError(f"references[{i}][{j}] must be a string, got {type(ref).__name__}")


def score_rouge(
    predictions: list[str],
    references: list[list[str]],
    *,
    mode: str = "best_of_n",
    use_stemmer: bool = True,
    split_sentences: bool = False,
) -> dict:
    """Score ``predictions`` against ``references`` (one list of references each).

    Returns ROUGE-1/2/L/Lsum F-measures as fractions in [0, 1], each the plain mean over
    scored rows (not ``evaluate``'s bootstrap median, see the module docstring), plus
    ``n`` (predictions), ``n_pairs`` ((prediction, reference) pairs scored), the settings
    and a one-sentence ``description``.

    ``mode="best_of_n"``: each prediction is scored with ``score_multi`` against all its
    references, keeping for each metric separately the reference with the best F-measure
    (so ROUGE-1 and ROUGE-2 may come from different references), then averaged over
    predictions. This is what ``evaluate`` does when given a list of references each.
    ``mode="per_reference"``: every (prediction, reference) pair is one row and rows are
    averaged; it reproduces numbers computed on a split that repeats each example once
    per reference (the hub's DialogSum test split). With a single reference per
    prediction both modes agree.

    ``rougeLsum`` splits texts into sentences on "\\n" only (``rouge_score`` behaviour), so
    for one-line summaries it equals ``rougeL``. ``split_sentences=True`` first puts each
    sentence on its own line (see ``split_into_lines``), making it the summary-level LCS
    used by the HF summarization examples. It does not change ROUGE-1/2/L, whose
    tokenizer ignores punctuation and line breaks.

    Empty predictions are allowed and score 0. The ``rouge_score`` tokenizer lowercases
    and keeps only ``[a-z0-9]`` runs, so non-ASCII text scores as if those characters were
    spaces. Raises ``ValueError`` on mismatched lengths, an empty or non-list references
    entry, non-string texts, empty input or an unknown ``mode``.
    """
    # Imported here: rouge_score imports nltk (~1 s), which a rank that never scores (every rank
    # but the main one, every run with eval.after_training false, the report readers) should not pay.
    from rouge_score import rouge_scorer

    _validate(predictions, references, mode)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)

    def prep(text: str) -> str:
        return split_into_lines(text) if split_sentences else text

    rows = []
    for pred, refs in zip(predictions, references):
        pred = prep(pred)
        refs = [prep(r) for r in refs]
        if mode == "best_of_n":
            rows.append(scorer.score_multi(refs, pred))
        else:
            rows.extend(scorer.score(ref, pred) for ref in refs)

    result: dict = {k: sum(row[k].fmeasure for row in rows) / len(rows) for k in ROUGE_TYPES}
    n_pairs = sum(len(refs) for refs in references)
    n = len(predictions)
    max_refs = max(len(refs) for refs in references)
    if mode == "per_reference":
        how = f"each of {n_pairs} (prediction, reference) pairs scored on its own"
    elif max_refs > 1:
        how = (
            f"each of {n} predictions scored against its best reference (of up to {max_refs}) per metric "
            "(best-of-n: rouge_score's score_multi keeps the highest F-measure over the references, "
            "for each ROUGE type separately)"
        )
    else:
        how = f"each of {n} predictions scored against its single reference"
    stem = "with" if use_stemmer else "without"
    lsum = "regex-split sentences" if split_sentences else "newline-separated lines"
    result.update(
        n=n,
        n_pairs=n_pairs,
        scoring=mode,
        use_stemmer=use_stemmer,
        split_sentences=split_sentences,
        description=(
            f"ROUGE F-measures from rouge_score ({stem} Porter stemming, rougeLsum on {lsum}), "
            f"{how}, then a plain mean over {'pairs' if mode == 'per_reference' else 'predictions'}."
        ),
    )
    return result
