"""The launcher's side of resuming elsewhere, before any rank starts (in-process, --dry-run): the
accumulation and conversion lines, and what stays refused. The conversion itself runs on ranks:
tests/test_portable_resume.py."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from conftest import run_cli_in_process

from launcher.core import checkpoint as ckpt
from launcher.core.recipe import read_run_recipe

COMMON = ("--cpu", "--model", "tiny-t5", "--data", "sample", "--set", "train.micro_batch_size=4")


def zero3_checkpoint(run_dir: Path) -> Path:
    """A run directory rendered for ZeRO-3 on 2 ranks holding an intact step_4 of that shape."""
    result = run_cli_in_process(
        "full", *COMMON, "--gpus", "2", "--zero", "3", "--output", str(run_dir), "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    state = replace(ckpt.expected_state(read_run_recipe(run_dir), 2), step=4, batches_in_epoch=4)
    assert state.strategy == "zero3"
    checkpoint = ckpt.checkpoints_dir(run_dir) / "step_4"
    checkpoint.mkdir(parents=True)
    (checkpoint / ckpt.STATE_FILE).write_text(json.dumps(asdict(state)))
    ckpt.write_manifest(checkpoint)
    (ckpt.checkpoints_dir(run_dir) / ckpt.LATEST_FILE).write_text("step_4\n")
    return checkpoint


def resume(run_dir: Path, *shape: str):
    return run_cli_in_process(
        "full", *COMMON, *shape, "--output", str(run_dir), "--resume", "auto", "--dry-run"
    )


def test_another_strategy_on_other_ranks_is_said_in_two_lines(tmp_path):
    zero3_checkpoint(tmp_path / "run")
    result = resume(tmp_path / "run", "--gpus", "1")
    assert result.returncode == 0, result.stderr
    assert "train.grad_accum 1 -> 2 keeps its 2 micro-batches per optimizer step" in result.stderr
    assert (
        "checkpoint step_4 was written under ZeRO-3 on 2 rank(s); continuing under DDP on 1 rank(s) "
        "(converted per parameter)" in result.stderr
    )
    recipe = read_run_recipe(tmp_path / "run")
    assert (recipe.train.grad_accum, recipe.launch.world_size, recipe.launch.zero) == (2, 1, 0)


def test_what_cannot_move_is_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    zero3_checkpoint(run_dir)
    before = {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")}
    cases = (
        (("--gpus", "3", "--zero", "3"), "3 rank(s) cannot keep that"),
        (("--gpus", "2", "--set", "train.optimizer=adafactor"), "converts AdamW's state only"),
        (("--gpus", "2", "--zero", "3", "--set", "train.grad_accum=2"), "grad_accum 1 -> 2"),
    )
    for shape, words in cases:
        result = resume(run_dir, *shape)
        assert result.returncode == 2, (shape, result.stderr)
        assert words in result.stderr and "Traceback" not in result.stderr, (shape, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")} == before
