"""Under the default bf16 autocast, `ftlaunch eval` and `ftlaunch summarize` generate exactly what
the run's own evaluations generated: eval/finetuned from final/ (a LoRA run: its adapter on its
base), eval/original from the base model.

bf16 rounds each elementwise kernel's output, so two computations that are equal in fp32 (the
eight-kernel ``gelu_new`` and the one-kernel tanh GELU training swaps in) give different bf16
activations, and near-tied tokens of a tiny random model flip. tests/test_summarize.py makes the
same comparisons in fp32, where they also hold against plain transformers/PEFT loading.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import read_jsonl, run_cli_harness, save_tiny_t5

SAMPLE_TEST = Path(__file__).resolve().parents[1] / "launcher" / "assets" / "sample" / "test.jsonl"
TRAIN = (
    *("--cpu", "--gpus", "1", "--data", "sample"),  # model.precision: the default bf16
    *("--set", "train.max_steps=3", "--set", "train.lr=1e-2"),
    *("--set", "eval.max_new_tokens=12", "--set", "eval.batch_size=4"),
)
pytestmark = pytest.mark.slow  # every check reads a trained run


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_tiny_t5(tmp_path_factory.mktemp("base") / "tiny-t5")


@pytest.fixture(scope="module", params=["full", "lora"])
def trained(request, tmp_path_factory, base_dir) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("runs") / request.param
    result = run_cli_harness(request.param, "--model", str(base_dir), *TRAIN, "--output", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return request.param, out


def predictions(path: Path) -> list[tuple[str, str]]:
    rows = read_jsonl(path)
    assert len({row["prediction"] for row in rows}) > 1  # a real comparison, not one repeated string
    return [(row["id"], row["prediction"]) for row in rows]


def eval_cli(tmp_path: Path, *model: str) -> list[tuple[str, str]]:
    out = tmp_path / "eval"
    args = (*model, "--data", "sample", "--split", "test", "--cpu", "--gpus", "1", "--output", str(out))
    result = run_cli_harness("eval", *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return predictions(out / "predictions.jsonl")


def test_eval_of_final_generates_the_runs_own_finetuned_predictions(trained, base_dir, tmp_path):
    method, run_dir = trained
    final = str(run_dir / "final")
    model = ("--model", final) if method == "full" else ("--model", str(base_dir), "--adapter", final)
    assert eval_cli(tmp_path, *model) == predictions(run_dir / "eval" / "finetuned" / "predictions.jsonl")


def test_eval_of_the_base_generates_the_runs_own_original_predictions(trained, base_dir, tmp_path):
    _, run_dir = trained
    got = eval_cli(tmp_path, "--model", str(base_dir), "--set", "eval.max_new_tokens=12")
    assert got == predictions(run_dir / "eval" / "original" / "predictions.jsonl")


def test_summarize_generates_the_runs_own_finetuned_predictions(trained, tmp_path):
    from launcher.host.summarize import summarize

    _, run_dir = trained
    out = tmp_path / "summaries.jsonl"
    summarize(run_dir, str(SAMPLE_TEST), out, 1, True, [], ["ftlaunch", "summarize"])
    expected = predictions(run_dir / "eval" / "finetuned" / "predictions.jsonl")
    assert [(row["id"], row["summary"]) for row in read_jsonl(out)] == expected
