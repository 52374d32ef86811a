"""The launcher's side of resuming elsewhere, before any rank starts (in-process, --dry-run): the
accumulation and conversion lines, and what stays refused. The conversion itself runs on ranks:
tests/test_portable_resume.py."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from conftest import run_cli_in_process

from launcher.core import checkpoint as ckpt
from launcher.core.recipe_loading import read_run_recipe

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


def test_local_folders_are_recorded_as_absolute_paths(tmp_path):
    """A relative --data (or --model) in recipe.yaml would name another folder, or none, for a
    resume from another working directory, a copied run or a SLURM job elsewhere."""
    import shutil

    from conftest import save_tiny_t5

    from launcher.core.paths import SAMPLE_DATA_DIR

    shutil.copytree(SAMPLE_DATA_DIR, tmp_path / "ds")
    save_tiny_t5(tmp_path / "model")
    args = ("--cpu", "--model", "model", "--data", "ds", "--output", "run", "--dry-run")
    assert run_cli_in_process("full", *args, cwd=tmp_path).returncode == 0
    recipe = read_run_recipe(tmp_path / "run")
    assert (recipe.model.name, recipe.data.dataset) == (str(tmp_path / "model"), str(tmp_path / "ds"))
    (tmp_path / "sample").mkdir()
    embedded = run_cli_in_process("full", *COMMON, "--output", "run2", "--dry-run", cwd=tmp_path)
    assert embedded.returncode == 0  # embedded names stay names (even beside a folder called sample)
    assert (
        read_run_recipe(tmp_path / "run2").model.name,
        read_run_recipe(tmp_path / "run2").data.dataset,
    ) == (
        "tiny-t5",
        "sample",
    )


def test_command_sh_of_a_copied_or_moved_run_refuses_to_start_the_original(tmp_path):
    """command.sh names its run directory by absolute path: started from a copy it would train, and
    write logs, in the original run. It stops with one line naming the folder to render."""
    import shutil
    import subprocess

    original = tmp_path / "run"
    assert run_cli_in_process("full", *COMMON, "--output", str(original), "--dry-run").returncode == 0
    copy = shutil.copytree(original, tmp_path / "copy")
    before = sorted(p.name for p in original.iterdir())
    result = subprocess.run(["bash", str(copy / "command.sh")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == (
        f"error: {copy}/command.sh belongs to the run in {original}; render one for this folder with the same "
        f"ftlaunch command and --output {copy} --resume auto"
    )
    assert sorted(p.name for p in original.iterdir()) == before  # no logs written into the original
    moved = original.rename(tmp_path / "moved")
    result = subprocess.run(["bash", str(moved / "command.sh")], capture_output=True, text=True)
    assert result.returncode == 2 and f"belongs to the run in {original}" in result.stderr
