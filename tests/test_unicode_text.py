"""Text holding Unicode line separators (issue 24, class 1): every JSON Lines file ends its records
at ``\\n`` only.

``str.splitlines()`` also splits at U+2028, U+2029, U+0085, \\x1c-\\x1e, \\x0b and \\x0c, which
``json.dumps(..., ensure_ascii=False)`` leaves raw in a string, so a reader using it cuts such a
record in two. The unit tests check launcher/core/jsonl.py against ``json`` itself; the slow test runs
the whole round trip on 2 CPU ranks: data holding every such character in ids, dialogues and
summaries -> training -> predictions.jsonl -> ROUGE -> report, then ``ftlaunch summarize`` of the
same dialogues on 2 ranks, whose summaries must be the run's own predictions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import run_cli_harness, run_cli_in_process

from launcher.core.jsonl import (
    append_jsonl,
    dumps_line,
    parse_jsonl_text,
    read_jsonl,
    read_jsonl_lines,
    read_jsonl_partial,
    write_jsonl,
)

SAMPLE = Path(__file__).resolve().parents[1] / "launcher" / "assets" / "sample"
# Every character str.splitlines() splits at besides \n and \r (Python docs, str.splitlines).
SEPARATORS = "\u2028\u2029\u0085\x1c\x1d\x1e\x0b\x0c"


def test_separators_are_what_splitlines_splits_at():
    """The premise: each character cuts a str.splitlines() line, and json.dumps keeps three of them raw."""
    for char in SEPARATORS:
        assert len(f"a{char}b".splitlines()) == 2, repr(char)
    raw = [char for char in SEPARATORS if char in json.dumps(char, ensure_ascii=False)]
    assert raw == ["\u2028", "\u2029", "\u0085"]  # the C0 controls among them are escaped


def test_round_trip_keeps_every_separator(tmp_path):
    rows = [{"id": f"r{i}{char}", "text": f"one{char}two{char}"} for i, char in enumerate(SEPARATORS)]
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, rows[:4])
    for row in rows[4:]:
        append_jsonl(path, row)
    assert read_jsonl(path) == rows
    assert [number for number, _ in read_jsonl_lines(path)] == list(range(1, len(rows) + 1))
    text = "".join(dumps_line(row) for row in rows)
    assert [row for _, row in parse_jsonl_text(text, "stdin")] == rows
    assert read_jsonl_partial(path) == rows


def test_crlf_blank_lines_and_a_half_written_last_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": "x\xe2\x80\xa8y"}\r\n\r\n{"a": 2}\n{"a": ')
    assert read_jsonl_partial(path) == [{"a": "x\u2028y"}, {"a": 2}]
    from launcher.core.errors import UserError

    with pytest.raises(UserError, match=r"line 4 is not JSON"):
        read_jsonl(path)


def test_summarize_reads_separators_from_standard_input(monkeypatch):
    import io

    from launcher.host.summarize import read_inputs

    text = "".join(dumps_line({"id": f"d{c}", "dialogue": f"A: hi{c}B: hello"}) for c in SEPARATORS)
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    rows = read_inputs("-")
    assert [row["id"] for row in rows] == [f"d{c}" for c in SEPARATORS]


def test_report_examples_stay_on_one_markdown_line():
    from launcher.results.report import qualitative_examples

    evals = {"finetuned": {"predictions": [{"prediction": "p\u2028q\nr"}]}}
    rows = [{"id": "x", "dialogue": "a\u2029b", "references": ["s\u0085t"]}]
    text = qualitative_examples(evals, rows, 1)
    assert "**Human summary:** s t" in text and "**finetuned:** p q r" in text
    assert not any(char in text for char in "\u2028\u2029\u0085")


# ---------------------------------------------------------------- 2 ranks, end to end


def with_separators(text: str, index: int) -> str:
    """``text`` with one separator in the middle and another at the end (cycling through them)."""
    first, second = SEPARATORS[index % len(SEPARATORS)], SEPARATORS[(index + 3) % len(SEPARATORS)]
    middle = len(text) // 2
    return f"{text[:middle]}{first}{text[middle:]}{second}"


def unicode_dataset(directory: Path) -> Path:
    directory.mkdir()
    for split in ("train", "validation", "test"):
        rows = [json.loads(line) for line in (SAMPLE / f"{split}.jsonl").read_text().split("\n") if line]
        for index, row in enumerate(rows):
            row["id"] = with_separators(row["id"], index)
            for key in ("dialogue", "summary", "summary1", "summary2", "summary3"):
                if key in row:
                    row[key] = with_separators(row[key], index)
        (directory / f"{split}.jsonl").write_text(
            "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8"
        )
    return directory


RUN_ARGS = (
    *("--cpu", "--gpus", "2", "--model", "tiny-t5"),
    *("--set", "model.precision=fp32"),
    *("--set", "train.max_steps=2"),
    *("--set", "eval.max_new_tokens=8"),
    *("--set", "eval.batch_size=4"),
    *("--set", "eval.compare_original=false"),
)


@pytest.fixture(scope="module")
def unicode_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, data directory): one 2-rank training run on the separator-laden data."""
    base = tmp_path_factory.mktemp("unicode")
    data = unicode_dataset(base / "data")
    run_dir = base / "run"
    # ranks from the rank harness (tests/rankharness.py): what they read and write is the subject
    result = run_cli_harness("full", *RUN_ARGS, "--data", str(data), "--output", str(run_dir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return run_dir, data


def expected_test_rows(data: Path) -> list[dict]:
    return [
        json.loads(line) for line in (data / "test.jsonl").read_text(encoding="utf-8").split("\n") if line
    ]


@pytest.mark.slow
def test_training_run_reports_on_text_with_line_separators(unicode_run):
    run_dir, data = unicode_run
    assert (run_dir / "report" / "report.md").is_file()
    rows = expected_test_rows(data)
    predictions = [
        json.loads(line)
        for line in (run_dir / "eval" / "finetuned" / "predictions.jsonl")
        .read_text(encoding="utf-8")
        .split("\n")
        if line
    ]
    assert [p["id"] for p in predictions] == [row["id"] for row in rows]
    assert [p["references"][0] for p in predictions] == [row["summary1"] for row in rows]
    # the readers of the same files, in process: rescoring and the report
    scored = run_cli_in_process("score", str(run_dir / "eval" / "finetuned" / "predictions.jsonl"))
    assert scored.returncode == 0, scored.stderr
    report = run_cli_in_process("report", str(run_dir))
    assert report.returncode == 0 and "Traceback" not in report.stderr, report.stderr


@pytest.mark.slow
def test_summarize_on_two_ranks_reads_and_writes_line_separators(unicode_run, tmp_path):
    run_dir, data = unicode_run
    out = tmp_path / "summaries.jsonl"
    result = run_cli_harness(
        "summarize",
        str(run_dir),
        "--input",
        str(data / "test.jsonl"),
        "--gpus",
        "2",
        "--cpu",
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    summaries = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line]
    predictions = [
        json.loads(line)
        for line in (run_dir / "eval" / "finetuned" / "predictions.jsonl")
        .read_text(encoding="utf-8")
        .split("\n")
        if line
    ]
    assert [row["id"] for row in summaries] == [row["id"] for row in expected_test_rows(data)]
    assert [row["summary"] for row in summaries] == [row["prediction"] for row in predictions]
