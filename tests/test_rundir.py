"""One rule for "this run is finished" (launcher/core/rundir.py ``RunDir.is_finished``), shared by the
sweep (which keeps a finished point instead of running it again) and the sweep report (which shows
it as done), and the interrupted marker read and written through RunDir.

Fast (in-process, hand-made directories like tests/test_sweep.py's report test): a sweep whose
points do not evaluate after training (``eval.after_training: false``) has no
``eval/finetuned/rouge.json`` to wait for, so its trained points are done in the report, as the
sweep itself counts them.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import run_cli_in_process
from test_sweep import fake_run, write_lora_r_manifest

from launcher.core.recipe_loading import read_run_recipe
from launcher.core.rundir import RunDir
from launcher.host.sweep import is_done
from launcher.results.report import eval_scores_problem

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def write_recipe(run_dir: Path, after_training: bool) -> None:
    raw = yaml.safe_load((RECIPES / "lora.yaml").read_text())
    raw.setdefault("eval", {})["after_training"] = after_training
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(raw))


def test_a_sweep_without_evaluation_reports_its_trained_points_done(tmp_path):
    sweep = tmp_path / "sweep"
    names = ["r=4", "r=8", "r=16"]
    write_lora_r_manifest(sweep, names)
    # r=4 and r=8 trained to the end without evaluating: final/ and metrics, no eval/ folder.
    for name in ("r=4", "r=8"):
        fake_run(sweep / name, None, losses=(3.0, 2.5))
        (sweep / name / "final").mkdir()
        write_recipe(sweep / name, after_training=False)
    # r=16 evaluates after training and has not written its fine-tuned ROUGE yet: not finished.
    fake_run(sweep / "r=16", None, losses=(3.0,))
    (sweep / "r=16" / "final").mkdir()
    write_recipe(sweep / "r=16", after_training=True)

    # The sweep's own rule (the one that keeps a point instead of running it again).
    kept = {name: is_done(sweep / name, read_run_recipe(sweep / name)) for name in names}
    assert kept == {"r=4": True, "r=8": True, "r=16": False}

    result = run_cli_in_process("report", str(sweep))
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")][2:]
    status = {line.split(" | ")[1]: line.rstrip(" |").split(" | ")[-1] for line in table}
    assert status == {"r=4": "done", "r=8": "done", "r=16": "pending"}, table
    assert "(lora, 3 points: 2 done, 1 pending)" in result.stdout, result.stdout


def test_the_interrupted_marker_keeps_a_run_unfinished(tmp_path):
    run = RunDir(tmp_path / "run")
    fake_run(run.path, 0.3)
    recipe = None  # no recipe.yaml: evaluated after training, the default
    assert run.is_finished(recipe, eval_scores_problem)
    run.write_interrupted(7)
    assert run.interrupted.read_text() == "step_7\n" and run.interrupted_checkpoint() == "step_7"
    assert not run.is_finished(recipe, eval_scores_problem)
    assert run.interrupted_checkpoint(since=run.interrupted.stat().st_mtime + 1) is None
    run.clear_interrupted()
    assert run.is_finished(recipe, eval_scores_problem) and run.interrupted_checkpoint() is None
