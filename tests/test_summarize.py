"""`ftlaunch summarize` and the settings that travel in final/.

References: the predictions the run's own evaluation wrote (eval/finetuned/predictions.jsonl),
and plain transformers / PEFT loading final/ in a fresh process. One tiny full run and one tiny
LoRA run (on a base model saved as a directory) serve every check of this module.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import cli_env, read_jsonl, run_cli, run_cli_harness, save_tiny_t5

from launcher.core.errors import UserError

SAMPLE_TEST = Path(__file__).resolve().parents[1] / "launcher" / "assets" / "sample" / "test.jsonl"
TRAIN = (
    "--cpu",
    "--data",
    "sample",
    *("--set", "model.precision=fp32"),
    *("--set", "train.max_steps=3"),
    *("--set", "train.lr=1e-2"),  # far enough from the random init to give varied summaries
    *("--set", "eval.max_new_tokens=12"),
    *("--set", "eval.batch_size=4"),
    *("--set", "eval.compare_original=false"),
    # generation controls away from their defaults: eval, summarize, final/'s generation_config.json
    # and a plain transformers/PEFT user must all generate with them to give the same summaries
    *("--set", "eval.min_new_tokens=4"),
    *("--set", "eval.no_repeat_ngram_size=2"),
    *("--set", "eval.repetition_penalty=1.3"),
)
GENERATION = {"min_new_tokens": 4, "no_repeat_ngram_size": 2, "repetition_penalty": 1.3}
# Every check reads a trained run (the module's two fixtures launch ranks): the fast tier skips it.
pytestmark = pytest.mark.slow


def train_run(method: str, model: str, out: Path) -> Path:
    """A trained run (its ranks from the rank harness, tests/rankharness.py: what matters here is
    what it computed and wrote)."""
    result = run_cli_harness(method, "--model", model, *TRAIN, "--output", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """tiny-t5 saved as a directory: a LoRA adapter's base as users have it."""
    return save_tiny_t5(tmp_path_factory.mktemp("base") / "tiny-t5")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    return train_run("full", "tiny-t5", tmp_path_factory.mktemp("runs") / "full")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_dir) -> Path:
    return train_run("lora", str(base_dir), tmp_path_factory.mktemp("runs") / "lora")


def evaluated(run_dir: Path) -> list[dict]:
    rows = read_jsonl(run_dir / "eval" / "finetuned" / "predictions.jsonl")
    assert len({row["prediction"] for row in rows}) > 1  # a real comparison, not one repeated string
    return rows


def summarize_cli(source: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.host.cli", "summarize", str(source), "--cpu", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
        env=cli_env(),
    )


def first_dialogue() -> str:
    return json.loads(SAMPLE_TEST.read_text().splitlines()[0])["dialogue"]


# ---------------------------------------------------------------- settings in final/


def test_final_carries_prompt_truncation_and_generation_settings(full_run, lora_run, base_dir):
    for run_dir, base in ((full_run, "tiny-t5"), (lora_run, str(base_dir))):
        settings = json.loads((run_dir / "final" / "ftlaunch.json").read_text())
        assert settings["prompt"].startswith("Summarize the following conversation.")
        assert settings["max_source_length"] == 512 and settings["max_new_tokens"] == 12
        assert settings["num_beams"] == 1 and settings["base_model"] == base
        assert GENERATION.items() <= settings.items()
        tokenizer_config = json.loads((run_dir / "final" / "tokenizer_config.json").read_text())
        assert tokenizer_config["model_max_length"] == 512
    generation = json.loads((full_run / "final" / "generation_config.json").read_text())
    assert generation["max_new_tokens"] == 12 and generation["num_beams"] == 1
    assert GENERATION.items() <= generation.items()
    card = (full_run / "final" / "README.md").read_text()
    assert "min_new_tokens=4, num_beams=1, no_repeat_ngram_size=2, repetition_penalty=1.3" in card
    report = (full_run / "report" / "report.md").read_text()
    assert "no_repeat_ngram_size 2, repetition_penalty 1.3" in report


# ---------------------------------------------------------------- same predictions as the evaluation


@pytest.mark.parametrize("method,gpus", [("full", 1), ("full", 2), ("lora", 2)])
def test_summarize_gives_the_runs_own_predictions(request, tmp_path, method, gpus):
    run_dir = request.getfixturevalue(f"{method}_run")
    source = run_dir if method == "full" else run_dir / "final"  # a run dir, or its final/ folder
    out = tmp_path / "summaries.jsonl"
    args = ("--gpus", str(gpus), "--input", str(SAMPLE_TEST), "--output", str(out))
    if gpus == 1:  # generates in the `ftlaunch summarize` process itself
        result = summarize_cli(source, *args)
    else:
        # 2 ranks from the rank harness (tests/rankharness.py): the subject is what the ranks
        # generate and how the CLI hands it out; a real 2-rank summarize launch:
        # tests/test_failure_messages.py (a failing one, whose log the message names).
        result = run_cli_harness("summarize", str(source), "--cpu", *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    expected = evaluated(run_dir)
    got = read_jsonl(out)
    assert [row["id"] for row in got] == [row["id"] for row in expected]
    assert [row["summary"] for row in got] == [row["prediction"] for row in expected]
    # generation shows its progress, on stderr: standard output is the summaries' channel
    assert re.search(r"^generating: batch (\d+)/\1 \(100%\)", result.stderr, re.M), result.stderr[-3000:]
    assert "generating:" not in result.stdout


def test_summaries_are_byte_identical_on_1_2_and_3_ranks(full_run, tmp_path):
    """Generation batches are formed once and dealt whole to ranks (data.dealt_generation_batches):
    every dialogue is generated in the same batch, with the same padding, whatever the world size.
    64 dialogues of varied length in batches of 5: 13 batches, uneven over 2 and 3 ranks, the last short."""
    train = SAMPLE_TEST.with_name("train.jsonl")
    dialogues = tmp_path / "dialogues.jsonl"
    rows = [json.loads(line) for line in train.read_text().split("\n") if line.strip()]
    dialogues.write_text("".join(json.dumps({"id": r["id"], "dialogue": r["dialogue"]}) + "\n" for r in rows))
    outputs = {}
    for gpus in (1, 2, 3):
        out = tmp_path / f"summaries-{gpus}.jsonl"
        args = ("--gpus", str(gpus), "--input", str(dialogues), "--output", str(out))
        # 2 and 3 ranks through the rank harness (what they generate, as in the test above)
        if gpus == 1:
            result = summarize_cli(full_run, *args, "--set", "eval.batch_size=5")
        else:
            result = run_cli_harness("summarize", str(full_run), "--cpu", *args, "--set", "eval.batch_size=5")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        outputs[gpus] = out.read_bytes()
    assert len(read_jsonl(tmp_path / "summaries-1.jsonl")) == len(rows)
    assert outputs[2] == outputs[1] and outputs[3] == outputs[1]


def test_lora_summarize_in_process_gives_the_runs_own_predictions(lora_run, tmp_path):
    from launcher.host.summarize import summarize

    out = tmp_path / "summaries.jsonl"
    summarize(lora_run, str(SAMPLE_TEST), out, 1, True, [], ["ftlaunch", "summarize"])
    assert [row["summary"] for row in read_jsonl(out)] == [row["prediction"] for row in evaluated(lora_run)]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_ftlaunch_eval_of_final_gives_the_runs_own_predictions(request, tmp_path, base_dir, method):
    """`ftlaunch eval --model RUN/final` (a LoRA run: --adapter RUN/final on its base) follows
    final/ftlaunch.json: the runs decode with 12 new tokens at most, min_new_tokens 4, no repeated
    bigram and a repetition penalty (not eval's defaults), and eval gives their own predictions
    and scores (the advice after an interrupted final evaluation relies on it)."""
    run_dir = request.getfixturevalue(f"{method}_run")
    final = run_dir / "final"
    model = (
        ("--model", str(final)) if method == "full" else ("--model", str(base_dir), "--adapter", str(final))
    )
    out = tmp_path / "eval"
    args = (*model, "--data", "sample", "--split", "test", "--cpu", "--output", str(out))
    result = run_cli_harness("eval", *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    expected = evaluated(run_dir)
    got = read_jsonl(out / "predictions.jsonl")
    assert [(row["id"], row["prediction"]) for row in got] == [
        (row["id"], row["prediction"]) for row in expected
    ]
    ours, theirs = (
        json.loads(path.read_text())
        for path in (out / "rouge.json", run_dir / "eval" / "finetuned" / "rouge.json")
    )
    assert {key: ours[key] for key in ("rouge1", "rouge2", "rougeL", "rougeLsum")} == {
        key: theirs[key] for key in ("rouge1", "rouge2", "rougeL", "rougeLsum")
    }


# ---------------------------------------------------------------- plain transformers / PEFT, stdin, text files

PLAIN_FULL = """
import json, sys
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
final, dialogue = sys.argv[1], sys.stdin.read()
prompt = json.load(open(final + "/ftlaunch.json"))["prompt"].replace("{dialogue}", dialogue)
model, tokenizer = AutoModelForSeq2SeqLM.from_pretrained(final), AutoTokenizer.from_pretrained(final)
inputs = tokenizer(prompt, truncation=True, return_tensors="pt")  # model_max_length travels
print(tokenizer.decode(model.generate(**inputs)[0], skip_special_tokens=True).strip())  # generation_config too
"""

PLAIN_PEFT = """
import json, sys
from peft import AutoPeftModelForSeq2SeqLM
from transformers import AutoTokenizer
final, dialogue = sys.argv[1], sys.stdin.read()
settings = json.load(open(final + "/ftlaunch.json"))
model, tokenizer = AutoPeftModelForSeq2SeqLM.from_pretrained(final), AutoTokenizer.from_pretrained(final)
inputs = tokenizer(settings["prompt"].replace("{dialogue}", dialogue), truncation=True, return_tensors="pt")
keys = ("max_new_tokens", "min_new_tokens", "num_beams", "length_penalty", "no_repeat_ngram_size", "repetition_penalty")
output = model.generate(**inputs, **{key: settings[key] for key in keys})
print(tokenizer.decode(output[0], skip_special_tokens=True).strip())
"""


def plain_library_summary(script: str, final: Path, dialogue: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", script, str(final)],
        input=dialogue,
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env(),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout.strip().splitlines()[-1]


def test_full_final_loads_with_plain_transformers_like_summarize_from_stdin(full_run):
    dialogue = first_dialogue()
    result = summarize_cli(full_run / "final", stdin=dialogue)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = result.stdout.strip()  # one dialogue on stdin: the summary alone
    assert summary == evaluated(full_run)[0]["prediction"]
    assert plain_library_summary(PLAIN_FULL, full_run / "final", dialogue) == summary


def test_lora_final_loads_with_peft_like_summarize_from_a_text_file(lora_run, tmp_path):
    dialogue = first_dialogue()
    text_file = tmp_path / "call.txt"
    text_file.write_text(dialogue + "\n")
    result = summarize_cli(lora_run, "--input", str(text_file))
    assert result.returncode == 0, result.stderr[-4000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["id"] == "call" and row["summary"] == evaluated(lora_run)[0]["prediction"]
    assert plain_library_summary(PLAIN_PEFT, lora_run / "final", dialogue) == row["summary"]


# ---------------------------------------------------------------- model card


@pytest.mark.parametrize("method,library", [("full", "transformers"), ("lora", "peft")])
def test_model_card_rouge_equals_the_report(request, method, library):
    run_dir = request.getfixturevalue(f"{method}_run")
    text = (run_dir / "final" / "README.md").read_text()
    metadata = yaml.safe_load(text.split("---\n")[1])
    assert metadata["library_name"] == library and metadata["pipeline_tag"] == "summarization"
    report = json.loads((run_dir / "report" / "rouge.json").read_text())["finetuned"]
    metrics = metadata["model-index"][0]["results"][0]["metrics"]
    assert {m["type"]: m["value"] for m in metrics} == {
        k: report[k] for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")
    }
    assert f"| finetuned | {100 * report['rouge1']:.2f} |" in text
    assert ("AutoPeftModelForSeq2SeqLM" in text) == (method == "lora")


# ---------------------------------------------------------------- export


def test_export_merge_equals_adapter_on_base(lora_run, base_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from launcher.rank.export import export_run

    out = export_run(lora_run, tmp_path / "merged", merge=True, dtype="fp32")
    assert {"config.json", "model.safetensors", "tokenizer.json", "ftlaunch.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    merged = AutoModelForSeq2SeqLM.from_pretrained(str(out)).eval()
    reference = PeftModel.from_pretrained(
        AutoModelForSeq2SeqLM.from_pretrained(str(base_dir)), str(lora_run / "final")
    )
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    dialogues = [row["dialogue"] for row in read_jsonl(SAMPLE_TEST)[:4]]
    inputs = tokenizer(dialogues, truncation=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        # the same explicit settings for both (the export's generation_config.json carries the run's)
        got = merged.generate(**inputs, max_new_tokens=12, do_sample=False, **GENERATION)
        expected = reference.eval().generate(**inputs, max_new_tokens=12, do_sample=False, **GENERATION)
    assert torch.equal(got, expected)


def test_export_casts_a_full_model_to_bf16(full_run, tmp_path):
    import torch
    from safetensors.torch import load_file

    from launcher.rank.export import export_run

    out = export_run(full_run, tmp_path / "bf16", merge=False, dtype="bf16")
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors and {t.dtype for t in tensors.values()} == {torch.bfloat16}
    with pytest.raises(UserError, match="not empty"):
        export_run(full_run, out, merge=False, dtype="bf16")


# ---------------------------------------------------------------- refusals


def test_refusals_name_the_problem(tmp_path, full_run):
    from launcher.host.summarize import read_inputs, summarize_recipe

    with pytest.raises(UserError, match="is not a directory"):
        summarize_recipe(tmp_path / "missing", [], 1, True)
    with pytest.raises(UserError, match="holds no model"):
        summarize_recipe(tmp_path, [], 1, True)
    with pytest.raises(UserError, match="summarize takes only"):
        summarize_recipe(full_run, ["train.lr=1"], 1, True)
    with pytest.raises(UserError, match="eval.num_beams"):
        summarize_recipe(full_run, ["eval.num_beams=0"], 1, True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "text": "no dialogue"}\n')
    with pytest.raises(UserError, match="line 1 has no 'dialogue'"):
        read_inputs(str(bad))
    result = run_cli("summarize", str(tmp_path / "missing"), "--cpu", "--input", str(bad))
    assert result.returncode == 2 and result.stderr.startswith("error:") and "Traceback" not in result.stderr


def test_summarize_and_export_print_only_their_own_lines(full_run, tmp_path):
    """They load the model in the ftlaunch process itself, where no rank log takes the libraries'
    notices: DeepSpeed's accelerator probe, deprecation warnings and save/load progress bars stay
    off the console (--debug keeps them)."""
    summarized = run_cli(
        "summarize", full_run, "--cpu", "--input", SAMPLE_TEST, "--output", tmp_path / "s.jsonl"
    )
    exported = run_cli("export", full_run, "--output", tmp_path / "exported")
    assert summarized.returncode == 0 and exported.returncode == 0, summarized.stderr + exported.stderr
    assert exported.stdout.strip() == f"exported to {tmp_path / 'exported'}" and not exported.stderr.strip()
    progress = re.compile(r"^generating: batch \d+/\d+ ")
    for line in filter(None, (part.strip() for part in re.split(r"[\r\n]", summarized.stderr))):
        assert progress.match(line), summarized.stderr
