"""Bad input to `ftlaunch full|lora`: exit code 2, one `error: ...` line on stderr, no traceback,
and nothing written into --output (absent afterwards, or a pre-existing directory unchanged).

Each case runs the CLI's ``main()`` in-process (``run_cli_in_process``: milliseconds); the GPU check
runs it as a subprocess, as a user would (CUDA visibility is fixed once per process).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import cli_env, run_cli, run_cli_in_process

BAD_YAML = "model:\n  name: [google/flan-t5-base\ntrain:\n  lr: 1e-5\n"
UNKNOWN_KEY = "train:\n  method: full\n  learning_rate: 1.0e-5\n"


def tree(directory: Path) -> dict[str, bytes]:
    """Every file under a directory with its bytes (empty directories as b'<dir>')."""
    return {
        str(path.relative_to(directory)): path.read_bytes() if path.is_file() else b"<dir>"
        for path in sorted(directory.rglob("*"))
    }


def assert_refused(result, *fragments: str) -> str:
    """Exit 2, exactly one non-empty stderr line starting with `error:`, no traceback; returns it."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == 2, f"exit code {result.returncode}:\n{output}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (
        f"expected one `error:` line, got:\n{result.stderr}"
    )
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def refused(
    output: Path, *args: str, fragments: tuple[str, ...] = (), run=run_cli_in_process, **env: str
) -> str:
    """Run `ftlaunch ARGS --output OUTPUT`, expect a refusal that leaves OUTPUT as it was."""
    before = tree(output) if output.exists() else None
    line = assert_refused(run(*args, "--output", str(output), env=cli_env(**env)), *fragments)
    if before is None:
        assert not output.exists(), f"{output} was created by a refused command"
    else:
        assert tree(output) == before, f"{output} was changed by a refused command"
    return line


def dry_run(output: Path, *args: str) -> None:
    result = run_cli_in_process(*args, "--dry-run", "--output", str(output))
    assert result.returncode == 0, result.stderr


@pytest.fixture
def bad_recipes(tmp_path) -> Path:
    directory = tmp_path / "recipes"
    directory.mkdir()
    (directory / "syntax.yaml").write_text(BAD_YAML)
    (directory / "unknown.yaml").write_text(UNKNOWN_KEY)
    return directory


CLICK_ERROR = "BUG: Click/Typer parses this flag itself and prints a multi-line usage box, not `error: ...`"

# id: (args with {recipes} for the bad_recipes dir, fragments of the error line)
BAD_INPUTS = {
    "recipe-yaml-syntax": (
        ["full", "--dry-run", "--recipe", "{recipes}/syntax.yaml"],
        ("syntax.yaml", "line", "not valid YAML"),
    ),
    "recipe-unknown-key": (
        ["full", "--dry-run", "--recipe", "{recipes}/unknown.yaml"],
        ("unknown key train.learning_rate",),
    ),
    "recipe-missing": (
        ["full", "--dry-run", "--recipe", "{recipes}/nope.yaml"],
        ("nope.yaml", "does not exist"),
    ),
    "recipe-a-directory": (
        ["full", "--dry-run", "--recipe", "{recipes}"],
        ("recipes is a directory", "a YAML file"),
    ),
    "variants-a-directory": (
        ["sweep", "full", "--dry-run", "--cpu", "--variants", "{recipes}"],
        ("--variants", "recipes is a directory", "a YAML file"),
    ),
    "set-wrong-type": (["full", "--dry-run", "--set", "train.lr=abc"], ("train.lr", "abc")),
    "set-without-equals": (["full", "--dry-run", "--set", "nonsense"], ("nonsense", "KEY=VALUE")),
    "set-unknown-key": (["full", "--dry-run", "--set", "train.lrr=1e-4"], ("did you mean train.lr?",)),
    "zero-5": (["full", "--dry-run", "--zero", "5"], ("--zero 5", "0", "3")),
    "offload-full-zero2": (["full", "--dry-run", "--offload", "full", "--zero", "2"], ("--zero 3",)),
    "offload-without-zero": (["full", "--dry-run", "--offload", "optimizer"], ("--zero",)),
    "fp16-t5": (["full", "--dry-run", "--set", "model.precision=fp16"], ("fp16", "T5")),
    "method-mismatch": (
        ["full", "--dry-run", "--recipe", "recipes/lora.yaml"],
        ("lora recipe", "ftlaunch lora"),
    ),
    "data-missing-dir": (["full", "--dry-run", "--data", "/nonexistent/dir"], ("/nonexistent/dir",)),
    "model-missing-path": (["full", "--dry-run", "--model", "/nonexistent/path"], ("/nonexistent/path",)),
    "gpus-zero": (["full", "--dry-run", "--gpus", "0"], ("launch.gpus",)),
    "offload-not-a-choice": (["full", "--dry-run", "--offload", "bogus"], ("--offload", "bogus")),
    "gpus-not-a-number": (["full", "--dry-run", "--gpus", "four"], ("--gpus", "four")),
}


@pytest.mark.parametrize(("args", "fragments"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_refused(tmp_path, bad_recipes, args, fragments):
    refused(tmp_path / "out", *[arg.format(recipes=bad_recipes) for arg in args], fragments=fragments)


def test_gpus_without_gpu_says_how_to_fix(tmp_path):
    """Launching (no --dry-run) 4 GPU ranks where no GPU is visible: refused before anything is written."""
    line = refused(
        tmp_path / "out",
        "full",
        "--gpus",
        "4",
        fragments=("--gpus 4", "--cpu", "--dry-run"),
        run=run_cli,
        CUDA_VISIBLE_DEVICES="",
    )
    assert "none is visible" in line


def test_lora_target_that_is_not_a_module(tmp_path):
    """Slow (imports transformers): the targets are checked on a meta-device tiny T5."""
    refused(
        tmp_path / "out",
        "lora",
        "--dry-run",
        "--model",
        "tiny-t5",
        "--set",
        "lora.target_modules=[q,nonexistent]",
        fragments=("nonexistent", "tiny-t5"),
    )


def test_output_holding_a_different_run_needs_overwrite(tmp_path):
    output = tmp_path / "run"
    dry_run(output, "full", "--set", "train.lr=2e-5")
    dry_run(output, "full", "--set", "train.lr=2e-5")  # the same run again is fine
    refused(output, "full", "--dry-run", "--set", "train.lr=3e-5", fragments=("different run", "--overwrite"))
    dry_run(output, "full", "--set", "train.lr=3e-5", "--overwrite")
    assert "lr: 3.0e-05" in (output / "recipe.yaml").read_text()


def test_output_not_empty_without_a_run(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine\n")
    refused(output, "full", "--dry-run", fragments=("not empty", "--overwrite"))


def test_output_is_a_file(tmp_path):
    output = tmp_path / "out"
    output.write_text("not a directory\n")
    assert_refused(run_cli_in_process("full", "--dry-run", "--output", str(output)), "is a file")
    assert output.read_text() == "not a directory\n"


def test_refused_overwrite_keeps_the_existing_run(tmp_path):
    output = tmp_path / "run"
    dry_run(output, "full")
    (output / "notes.txt").write_text("results of the first run\n")
    refused(
        output,
        "full",
        "--dry-run",
        "--overwrite",
        "--set",
        "train.lr=3e-5",
        "--resume",
        str(tmp_path / "none"),
        fragments=("--resume",),
    )


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli_in_process(
        "full", "--dry-run", "--zero", "5", "--debug", "--output", str(tmp_path / "out")
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "UserError" in result.stderr
    assert not (tmp_path / "out").exists()
