# ruff: noqa: F811 - no_launch is test_bad_input's fixture, imported to be used here
"""A stop signal that comes as a finished training run exits, and the advice after an interrupted
final evaluation.

Ctrl-C (or SLURM's SIGTERM) can land after the ranks wrote the last file of the run (final/, the
evaluation, the report, the model card) but before they exit. The run is complete then: the
supervisor says so and exits 0, not 3 ("interrupted"), which a SLURM requeue or a sweep would act
on. When the signal does cut the final evaluation short, the advised ``ftlaunch eval ... --output
RUN/eval/finetuned`` must be accepted: a training run's own evaluation folder may be evaluated
into again. The supervisor's ``decide`` on a rendered run (no ranks); the CLI in-process.
"""

from __future__ import annotations

import json
import os
import signal
import time

from conftest import run_cli_in_process
from test_bad_input import no_launch  # noqa: F401 - a fixture
from test_no_clobber import finished_run

from launcher.core.errors import EXIT_INTERRUPTED
from launcher.core.recipe_loading import read_run_recipe
from launcher.host.supervise import decide, launcher_log_path


def decided(run, started: float, code: int = EXIT_INTERRUPTED, signals=(signal.SIGINT,)):
    recipe = read_run_recipe(run)
    return decide(run, recipe, 0, code, started, list(signals), [], launcher_log_path(run, recipe, 0))


def test_a_signal_after_the_last_file_of_the_run_exits_0(tmp_path):
    started = time.time() - 60
    run = finished_run(tmp_path / "run")
    (run / "final" / "README.md").write_text("# card\n")  # the model card: the run's last file
    outcome = decided(run, started)
    assert outcome.code == 0
    assert outcome.lines == [
        f"ftlaunch: the run had finished when the stop signal came: final/, the evaluation and the report "
        f"are complete; see {run / 'report'}"
    ]


def test_a_signal_before_the_card_is_an_interrupted_final_evaluation(tmp_path):
    started = time.time() - 60
    run = finished_run(tmp_path / "run")  # final/ saved in this launch, no card yet
    outcome = decided(run, started)
    assert outcome.code == EXIT_INTERRUPTED
    assert "interrupted in the final evaluation" in outcome.lines[0]
    assert f"--output {run / 'eval' / 'finetuned'}" in outcome.lines[0]


def test_a_card_of_an_earlier_launch_does_not_count(tmp_path):
    run = finished_run(tmp_path / "run")
    card = run / "final" / "README.md"
    card.write_text("# card\n")
    old = time.time() - 3600
    os.utime(card, (old, old))  # written by an earlier launch: this one's evaluation did not finish
    assert decided(run, time.time() - 60).code == EXIT_INTERRUPTED


def test_the_advised_eval_into_the_runs_own_evaluation_is_accepted(tmp_path, no_launch):
    """RUN/eval/finetuned takes RUN/final again, RUN/eval/original the run's base model (tiny-t5);
    another model there is refused (its scores would be reported as the run's)."""
    run = finished_run(tmp_path / "run")
    data = ("--data", "sample", "--cpu", "--dry-run")
    for name, model in (("finetuned", str(run / "final")), ("original", "tiny-t5")):
        out = run / "eval" / name
        result = run_cli_in_process("eval", "--model", model, *data, "--output", str(out), env=no_launch)
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads((out / "rouge.json").read_text())["n"]  # the earlier scores stay until replaced
    for name, model, said in (
        ("finetuned", "tiny-t5", "is the evaluation of its final/"),
        (
            "original",
            str(run / "final"),
            "is the evaluation of its base model (--model tiny-t5, no --adapter)",
        ),
    ):
        out = run / "eval" / name
        result = run_cli_in_process("eval", "--model", model, *data, "--output", str(out), env=no_launch)
        assert result.returncode == 2 and said in result.stderr, result.stderr
    other = tmp_path / "elsewhere" / "eval" / "finetuned"  # the same names outside a run: not a run's
    other.mkdir(parents=True)
    (other / "notes.txt").write_text("mine\n")
    result = run_cli_in_process("eval", "--model", "tiny-t5", *data, "--output", str(other), env=no_launch)
    assert result.returncode == 2 and "is not empty" in result.stderr
