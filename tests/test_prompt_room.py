"""A source length the prompt fills, or a target length that keeps only the end-of-sequence token,
is refused in one line before anything is launched (docs/ARCHITECTURE.md, "The path of one run":
Checks), not trained on: every input would be the same truncated prompt whatever the dialogue,
every label ``</s>`` alone, and the run would end with empty predictions and no word said.

The host counts the prompt's tokens from the tokenizer's tokenizer.json (launcher/core/prompt_room.py);
the counts here come from the tokenizer the ranks load (transformers), so both must agree. A rank
counts again with its own tokenizer, for a tokenizer the host could not read: the same line.
"""

from __future__ import annotations

import pytest
from conftest import run_cli, run_cli_in_process, save_tiny_t5, set_refused
from test_cli_errors import assert_refused, refused

from launcher.core.paths import TINY_TOKENIZER_DIR
from launcher.core.recipe import DEFAULT_PROMPT
from launcher.core.rundir import RunDir

TINY = ("--cpu", "--model", "tiny-t5", "--data", "sample")


def prompt_tokens(prompt: str = DEFAULT_PROMPT) -> int:
    """What the ranks' tokenizer makes of the prompt's text before {dialogue}, </s> included."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    return len(tokenizer(prompt.split("{dialogue}")[0])["input_ids"])


def room_refusal(length: int, tokens: int) -> str:
    return (
        f"error: data.max_source_length={length} leaves no room for the dialogue: the prompt's text before "
        f"{{dialogue}} takes {tokens} tokens, the end-of-sequence token included (tokenizer tiny-t5), so "
        f"every input would be the same truncated prompt; set data.max_source_length to at least "
        f"{tokens + 1} (the default is 512), or shorten data.prompt"
    )


@pytest.mark.parametrize("command", ["full", "lora", "eval"])
def test_a_source_length_the_prompt_fills_is_refused_before_launch(tmp_path, command):
    """The fuzzer's run (max_source_length=4 < the prompt's 10 tokens), and the boundary: the
    prompt's tokens exactly (nothing left for the dialogue) refused, one more accepted. Under
    --dry-run too, and nothing written."""
    tokens = prompt_tokens()
    assert tokens == 10  # the default prompt with the embedded tokenizer
    for length in (4, tokens):
        line = refused(
            tmp_path / f"run-{length}", command, *TINY, "--dry-run",
            "--set", f"data.max_source_length={length}",
        )  # fmt: skip
        assert line == room_refusal(length, tokens)
    fits = ("--set", f"data.max_source_length={tokens + 1}", "--output", str(tmp_path / "fits"))
    result = run_cli_in_process(command, *TINY, "--dry-run", *fits)
    assert result.returncode == 0, result.stderr


def test_the_prompt_is_counted_as_written(tmp_path):
    """A prompt with the dialogue first leaves everything but </s> to it; a longer one takes more."""
    short = "{dialogue}\nSummary:"
    assert prompt_tokens(short) == 1
    result = run_cli_in_process(
        "full", *TINY, "--dry-run", "--set", f"data.prompt={short}", "--set", "data.max_source_length=2",
        "--output", str(tmp_path / "short"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    long = "Read the conversation below carefully, then write a short summary of it.\n\n{dialogue}"
    tokens = prompt_tokens(long)
    assert tokens > 10
    line = refused(
        tmp_path / "long", "full", *TINY, "--dry-run",
        "--set", f"data.prompt={long}", "--set", "data.max_source_length=12",
    )  # fmt: skip
    assert f"takes {tokens} tokens" in line and f"at least {tokens + 1}" in line


def test_summarize_refuses_a_source_length_the_prompt_fills(tmp_path):
    """`ftlaunch summarize --set data.max_source_length=...` (its settings override): one line, not
    the same summary for every dialogue."""
    model = save_tiny_t5(tmp_path / "model")
    dialogues = tmp_path / "new.jsonl"
    dialogues.write_text('{"id": "a", "dialogue": "#Person1#: Lunch at noon?\\n#Person2#: Sure."}\n')
    result = run_cli_in_process(
        "summarize", str(model), "--cpu", "--input", str(dialogues), "--set", "data.max_source_length=4"
    )
    line = assert_refused(result)
    assert line == room_refusal(4, prompt_tokens()).replace("tokenizer tiny-t5", f"tokenizer {model}")


def test_a_target_length_that_keeps_only_the_end_of_sequence_token_is_refused(tmp_path):
    set_refused(
        tmp_path,
        ["data.max_target_length=1"],
        [
            "data.max_target_length=1 keeps only the end-of-sequence token of every summary as its label",
            "set it to at least 2",
        ],
    )
    result = run_cli_in_process(
        "recipe", "validate", "recipes/tiny-t5-full.yaml", "--set", "data.max_target_length=2"
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.slow  # a real launch: the supervisor's summary of a rank's refusal
@pytest.mark.parametrize("command", ["full", "eval"])
def test_a_rank_refuses_a_prompt_that_fills_the_source_in_the_same_line(tmp_path, command):
    """A recipe the host did not count for (its tokenizer was not on disk there: a hub id the
    ranks download) is refused by the ranks with their tokenizer, before the model is built: the
    same one line, exit 2. Here the rendered recipe.yaml is edited, then started as SLURM starts
    it (`ftlaunch supervise`)."""
    run = tmp_path / "run"
    rendered = run_cli_in_process(command, *TINY, "--gpus", "1", "--dry-run", "--output", str(run))
    assert rendered.returncode == 0, rendered.stderr
    recipe = RunDir(run).recipe_yaml
    text = recipe.read_text()
    assert "  max_source_length: 512\n" in text
    recipe.write_text(text.replace("  max_source_length: 512\n", "  max_source_length: 6\n"))
    result = run_cli("supervise", str(run))
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == room_refusal(6, prompt_tokens())
    assert "parameters:" not in result.stdout  # refused before the model was built
