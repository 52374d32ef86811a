# ruff: noqa: F811 - no_launch is test_bad_input's fixture, imported to be used here
"""``--overwrite`` replaces a run and nothing else; a dry run deletes nothing; stray or damaged
checkpoint folders are ignored or reported, never a traceback.

``--overwrite`` clears the --output folder before the new run is written. Pointed at a project
folder, a run's final/, a sweep or the data, that is data loss: only a training run (or an
``ftlaunch eval`` output) may be replaced, and ``--dry-run`` ("nothing launched") must not clear a
run either. In checkpoints/, a user's ``step_4.bak`` copy is not a checkpoint (ignored, never
pruned), and a manifest or state file of the wrong JSON type marks its checkpoint damaged, as a
size mismatch does. Real CLI in-process, no training: the fast tier runs them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
from conftest import run_cli_in_process
from test_bad_input import CLI_TIMEOUT, data_dir, no_launch, refused, tree  # noqa: F401 - no_launch is a fixture
from test_no_clobber import TINY, finished_run, rendered_training_run

from launcher.core import checkpoint as ckpt
from launcher.core.rundir import RunDir

NO_RUN = "holds no ftlaunch run; --overwrite only replaces a run: pick a new directory"


def project_folder(path: Path) -> Path:
    """A user's folder with files of their own (no run)."""
    (path / "src").mkdir(parents=True)
    (path / "notes.txt").write_text("important\n")
    (path / "src" / "main.py").write_text("print('code')\n")
    return path


def sweep_folder(path: Path) -> Path:
    """A sweep's folder: its manifest beside one point's run."""
    rendered_training_run(path / "lr=1e-4")
    (path / "sweep.json").write_text(json.dumps({"points": ["lr=1e-4"]}))
    return path


# ---------------------------------------------------------------- --overwrite replaces only a run


@pytest.mark.parametrize("dry_run", [(), ("--dry-run",)], ids=["launch", "dry-run"])
@pytest.mark.parametrize("what", ["project", "final", "data"])
def test_overwrite_of_a_folder_that_is_not_a_run_is_refused(tmp_path, no_launch, what, dry_run):
    run = finished_run(tmp_path / "run")
    data = data_dir(tmp_path)
    out = {"project": project_folder(tmp_path / "proj"), "final": run / "final", "data": data}[what]
    refused(
        no_launch,
        "full",
        "--cpu",
        "--model",
        "tiny-t5",
        "--data",
        str(data),
        *dry_run,
        "--overwrite",
        "--output",
        str(out),
        output=out,
        watch=(run, data),
        fragments=(f"--output {out} is not empty and {NO_RUN}",),
    )


@pytest.mark.parametrize(
    "flags", [(), ("--overwrite",), ("--resume", "auto")], ids=["plain", "overwrite", "resume"]
)
def test_a_project_folder_with_its_own_recipe_yaml_is_not_a_run(tmp_path, no_launch, flags):
    """A user keeps their recipe beside their work: a recipe.yaml alone is no run (ftlaunch's runs
    have the command.sh it rendered), so nothing there is replaced, resumed into or rewritten."""
    proj = project_folder(tmp_path / "proj")
    shutil.copy(Path(__file__).parents[1] / "recipes" / "tiny-t5-full.yaml", proj / "recipe.yaml")
    refused(
        no_launch,
        "full",
        *TINY,
        "--recipe",
        str(proj / "recipe.yaml"),
        *flags,
        "--output",
        str(proj),
        output=proj,
        watch=(proj,),
        fragments=(f"--output {proj} is not empty and {NO_RUN}",),
    )


@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)], ids=["plain", "overwrite"])
def test_a_sweep_folder_is_named_and_never_replaced(tmp_path, no_launch, overwrite):
    sweep = sweep_folder(tmp_path / "sweep")
    refused(
        no_launch,
        "full",
        *TINY,
        "--dry-run",
        *overwrite,
        "--output",
        str(sweep),
        output=sweep,
        fragments=(f"--output {sweep} is a sweep's folder (it holds sweep.json)", "pick a new directory"),
    )


def test_the_not_empty_message_no_longer_suggests_overwrite(tmp_path, no_launch):
    out = project_folder(tmp_path / "proj")
    line = refused(
        no_launch, "full", *TINY, "--dry-run", "--output", str(out), output=out, fragments=(NO_RUN,)
    )
    assert "pass --overwrite" not in line, line


def overwrite(env: dict[str, str], out: Path, *extra: str, method: str = "full"):
    return run_cli_in_process(
        method,
        *TINY,
        *extra,
        "--overwrite",
        "--set",
        "train.lr=3e-5",
        "--output",
        str(out),
        env=env,
        timeout=CLI_TIMEOUT,
    )


def test_a_dry_run_never_clears_a_run_a_launch_replaces_it(tmp_path, no_launch):
    run = finished_run(tmp_path / "run")
    (run / "checkpoints" / "step_4").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (run / "notes.txt").write_text("the old run's notes\n")
    refused(
        no_launch,
        "full",
        *TINY,
        "--dry-run",
        "--overwrite",
        "--set",
        "train.lr=3e-5",
        "--output",
        str(run),
        output=run,
        fragments=(
            f"--dry-run --overwrite would delete the run in {run} (checkpoints, eval, final, metrics.jsonl, ...)",
            "dry-run into a new directory",
        ),
    )
    result = overwrite(no_launch, run)
    assert result.returncode == 99, result.stdout + result.stderr  # the fake launch, after the clearing
    left = sorted(entry.name for entry in run.iterdir() if not entry.name.startswith("."))
    assert left == ["accelerate.yaml", "command.sh", "recipe.yaml"], left
    assert "lr: 3.0e-05" in (run / "recipe.yaml").read_text()


def test_a_dry_run_re_renders_only_configs_and_eval_outputs(tmp_path, no_launch):
    """An earlier dry run (configs only) or an `ftlaunch eval` dry run: nothing to lose, re-rendered;
    a folder that is not a run beside them stays refused."""
    run = rendered_training_run(tmp_path / "run")
    evaluation = tmp_path / "eval-out"
    assert run_cli_in_process("eval", *TINY, "--dry-run", "--output", str(evaluation)).returncode == 0
    for out, method in ((run, "full"), (evaluation, "lora")):
        result = overwrite(no_launch, out, "--dry-run", method=method)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "lr: 3.0e-05" in (out / "recipe.yaml").read_text()
        assert "-m launcher.rank.train " in (out / "command.sh").read_text()
    other = project_folder(tmp_path / "proj")
    refused(
        no_launch,
        "full",
        *TINY,
        "--dry-run",
        "--overwrite",
        "--output",
        str(other),
        output=other,
        fragments=(NO_RUN,),
    )


# ---------------------------------------------------------------- checkpoint folder names


def intact_checkpoint(run: Path, step: int) -> Path:
    """A checkpoint this run (--data sample, one CPU rank) resumes: its state and a manifest."""
    folder = RunDir(run).checkpoint(step)
    folder.mkdir(parents=True)
    state = ckpt.TrainState(step=step, batches_in_epoch=step, micro_batch_size=8, seed=42)
    (folder / ckpt.STATE_FILE).write_text(json.dumps(state.__dict__))
    (folder / "model.safetensors").write_bytes(b"weights")
    ckpt.write_manifest(folder)
    RunDir(run).latest.write_text(folder.name + "\n")
    return folder


def test_a_backup_copy_of_a_checkpoint_is_not_a_checkpoint(tmp_path, no_launch):
    run = rendered_training_run(tmp_path / "run")
    step_4 = intact_checkpoint(run, 4)
    shutil.copytree(step_4, step_4.with_name("step_4.bak"))
    (run / "checkpoints" / "step_x").mkdir()
    (run / "checkpoints" / "step_x" / ckpt.STATE_FILE).write_text("{}")
    result = run_cli_in_process(
        "full", *TINY, "--dry-run", "--resume", "auto", "--output", str(run), env=no_launch
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert "step_4.bak" not in result.stderr and "step_x" not in result.stderr, result.stderr
    refused(
        no_launch,
        "full",
        *TINY,
        "--dry-run",
        "--output",
        str(run),
        output=run,
        fragments=("already holds this run with checkpoints",),
    )


def test_pruning_and_cleanup_leave_other_folders_alone(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4, 6):
        intact_checkpoint(run, step)
    checkpoints = RunDir(run).checkpoints
    shutil.copytree(checkpoints / "step_2", checkpoints / "step_2.bak")
    (checkpoints / ".tmp-step_8").mkdir()
    (checkpoints / ".tmp-step_8-mine").mkdir()
    ckpt.prune_checkpoints(checkpoints, keep=1)
    ckpt.remove_incomplete(run)
    assert sorted(path.name for path in checkpoints.iterdir()) == [
        ".tmp-step_8-mine",
        "latest",
        "step_2.bak",
        "step_6",
    ]


# ---------------------------------------------------------------- damaged manifests and state files


def damage_manifest_entry(checkpoint: Path) -> str:
    manifest = json.loads((checkpoint / ckpt.MANIFEST_FILE).read_text())
    manifest["files"]["model.safetensors"] = 5
    (checkpoint / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))
    return "the manifest.json entry of model.safetensors is 5, not an object"


def state_of_same_size(text: str, problem: str):
    """Replace the state file by ``text`` padded to its size, under a size-only manifest (as large
    checkpoints are written), so the manifest check alone passes."""

    def damage(checkpoint: Path) -> str:
        path = checkpoint / ckpt.STATE_FILE
        size = path.stat().st_size
        path.write_text(text[:-1] + " " * (size - len(text)) + text[-1])
        manifest = json.loads((checkpoint / ckpt.MANIFEST_FILE).read_text())
        for entry in manifest["files"].values():
            entry.pop("sha256", None)
        (checkpoint / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))
        return problem

    return damage


DAMAGE = {
    "manifest-entry-number": damage_manifest_entry,
    "state-list": state_of_same_size("[1, 2]", "ftlaunch_state.json is not a JSON object"),
    "state-bad-type": state_of_same_size('{"world_size": "two"}', 'ftlaunch_state.json has world_size="two"'),
    "state-zero-ranks": state_of_same_size('{"world_size": 0}', "ftlaunch_state.json has world_size=0"),
    "state-not-json": state_of_same_size("{not json}", "ftlaunch_state.json is not readable JSON"),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_checkpoint_is_skipped_by_auto_and_refused_by_path(tmp_path, no_launch, damage):
    run = rendered_training_run(tmp_path / "run")
    checkpoint = intact_checkpoint(run, 4)
    problem = damage(checkpoint)
    result = run_cli_in_process(
        "full", *TINY, "--dry-run", "--resume", "auto", "--output", str(run), env=no_launch
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert f"checkpoint {checkpoint} is damaged ({problem}" in result.stderr, result.stderr
    assert "starting from step 0" in result.stderr, result.stderr
    refused(
        no_launch,
        "full",
        *TINY,
        "--dry-run",
        "--resume",
        str(checkpoint),
        "--output",
        str(run),
        output=run,
        fragments=(f"--resume {checkpoint}: the checkpoint is damaged ({problem}",),
    )


def test_every_state_field_has_a_checked_type():
    assert {field.type for field in fields(ckpt.TrainState)} <= set(ckpt.STATE_TYPES)
