"""The run directory contract in code: every path of ``RUN/`` (and of a sweep's folder), whether a
run is finished, and the interrupted marker.

``--output RUN`` is the only place a run writes, and many processes read it: the ranks, the
supervising ``ftlaunch``, ``--resume``, ``ftlaunch report``, sweeps, SLURM job scripts. Each of
them asks this module where a file lives instead of spelling its name, so the layout is written
down once (docs/ARCHITECTURE.md's table is this module in prose; tests/test_architecture.py fails
on a run-directory name spelled anywhere else in launcher/). Pure paths: importing it loads
nothing heavy and it imports no other launcher module but ``atomic``.

    RUN/recipe.yaml accelerate.yaml deepspeed.json command.sh   (rendered before launching)
    RUN/.ftlaunch.lock                                           (runlock: one ftlaunch per run)
    RUN/logs/{rank<N>.log, launcher*.log, failures/rank<N>.json}
    RUN/metrics.jsonl  RUN/trackers/                             (rank 0, every logged step)
    RUN/checkpoints/{step_N/, .tmp-step_N/, latest}              (atomic saves)
    RUN/INTERRUPTED                                              (stopped by a signal at step_N)
    RUN/cache/                                                   (the tokenized splits)
    RUN/final/  RUN/final/merged/                                (the trained model or adapter)
    RUN/eval/{original,finetuned,step_N}/{predictions.jsonl, rouge.json}
    RUN/report/{report.md, rouge.json, ...}
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.core.atomic import write_text_atomic

# What `ftlaunch full|lora` renders into a run before anything starts (render.py).
RECIPE_FILE = "recipe.yaml"
ACCELERATE_FILE = "accelerate.yaml"
DEEPSPEED_FILE = "deepspeed.json"
COMMAND_FILE = "command.sh"
RENDERED_FILES = (RECIPE_FILE, ACCELERATE_FILE, DEEPSPEED_FILE, COMMAND_FILE)

LOCK_FILE = ".ftlaunch.lock"
LOGS_DIR = "logs"
FAILURES_DIR = "failures"
METRICS_FILE = "metrics.jsonl"
TRACKERS_DIR = "trackers"
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
CHECKPOINT_PREFIX = "step_"
TMP_CHECKPOINT_PREFIX = f".tmp-{CHECKPOINT_PREFIX}"
INTERRUPTED_FILE = "INTERRUPTED"
CACHE_DIR = "cache"
FINAL_DIR = "final"
MERGED_DIR = "merged"  # final/merged: base + adapter in one model (lora.save_merged)
EVAL_DIR = "eval"
ORIGINAL = "original"  # the model before fine-tuning
FINETUNED = "finetuned"
REPORT_DIR = "report"
PREDICTIONS_FILE = "predictions.jsonl"
ROUGE_FILE = "rouge.json"
REPORT_FILE = "report.md"

# A sweep's folder: one run directory per point beside its own record (sweep_manifest.py).
SWEEP_MANIFEST = "sweep.json"
SWEEP_STATUS_DIR = "status"
SWEEP_SLURM_DIR = "slurm"
SWEEP_LOCK_FILE = ".lock"


def checkpoint_name(step: int) -> str:
    """The folder name of step N's checkpoint, as ``latest`` and messages name it."""
    return f"{CHECKPOINT_PREFIX}{step}"


def is_checkpoint_name(name: str, prefix: str = CHECKPOINT_PREFIX) -> bool:
    """``step_<digits>`` (``.tmp-step_<digits>`` with that prefix): a user's backup copy
    (``step_4.bak``) or a ``step_x`` folder is not a checkpoint, so resumes, listings,
    keep_checkpoints pruning and the mid-save cleanup leave it alone."""
    step = name.removeprefix(prefix)
    return name != step and step.isascii() and step.isdigit()


def checkpoint_step(name: str) -> int:
    """The step of a checkpoint folder's name (``step_12`` -> 12; see is_checkpoint_name)."""
    return int(name.removeprefix(CHECKPOINT_PREFIX))


class ResultDir:
    """What one evaluation writes (``RUN/eval/<model>/``, ``ftlaunch eval --output``, ``report/``)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @property
    def predictions(self) -> Path:
        return self.path / PREDICTIONS_FILE

    @property
    def rouge(self) -> Path:
        return self.path / ROUGE_FILE

    def has_rouge(self) -> bool:
        return self.rouge.is_file()

    @property
    def report_md(self) -> Path:
        """A report folder's text (``RUN/report/``, ``SWEEP/report/``, ``ftlaunch report --output``)."""
        return self.path / REPORT_FILE


class RunDir:
    """The paths of one run directory (``--output RUN``); nothing is created by asking."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------ rendered before launching
    @property
    def recipe_yaml(self) -> Path:
        return self.path / RECIPE_FILE

    @property
    def accelerate_yaml(self) -> Path:
        return self.path / ACCELERATE_FILE

    @property
    def deepspeed_json(self) -> Path:
        return self.path / DEEPSPEED_FILE

    @property
    def command_sh(self) -> Path:
        return self.path / COMMAND_FILE

    def has_recipe(self) -> bool:
        """A run directory ftlaunch rendered (a finished run, a running one or a dry run)."""
        return self.recipe_yaml.is_file()

    @property
    def lock(self) -> Path:
        return self.path / LOCK_FILE

    # ------------------------------------------------------------ logs
    @property
    def logs(self) -> Path:
        return self.path / LOGS_DIR

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.log"

    def launcher_log(self, node: int, nodes: int) -> Path:
        """The supervisor's log of ``command.sh`` (one per node on several nodes)."""
        return self.logs / ("launcher.log" if nodes == 1 else f"launcher-node{node}.log")

    def launcher_logs(self) -> list[Path]:
        return sorted(self.logs.glob("launcher*.log"))

    @property
    def shared_check(self) -> Path:
        """Rank 0's token, read back by every rank at start: do all nodes see one directory?"""
        return self.logs / "shared-directory-check"

    @property
    def failures(self) -> Path:
        return self.logs / FAILURES_DIR

    def failure_record(self, rank: int) -> Path:
        return self.failures / f"rank{rank}.json"

    # ------------------------------------------------------------ training
    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def trackers(self) -> Path:
        return self.path / TRACKERS_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)

    def checkpoint_tmp(self, step: int) -> Path:
        """Where step N's checkpoint is written until it is complete (then renamed)."""
        return self.checkpoints / f"{TMP_CHECKPOINT_PREFIX}{step}"

    def checkpoint_tmps(self) -> list[Path]:
        """What a crash left mid-save (``.tmp-step_N``; other names are not ftlaunch's to remove)."""
        found = self.checkpoints.glob(f"{TMP_CHECKPOINT_PREFIX}*")
        return sorted(path for path in found if is_checkpoint_name(path.name, TMP_CHECKPOINT_PREFIX))

    def checkpoint_dirs(self) -> list[Path]:
        """Every ``step_N`` folder (complete or not), in no particular order."""
        return self.checkpoint_dirs_in(self.checkpoints)

    @staticmethod
    def checkpoint_dirs_in(root: Path) -> list[Path]:
        """The ``step_N`` folders of a checkpoints/ folder (other names are not checkpoints)."""
        return [
            path
            for path in root.glob(f"{CHECKPOINT_PREFIX}*")
            if is_checkpoint_name(path.name) and path.is_dir()
        ]

    @property
    def latest(self) -> Path:
        """``checkpoints/latest``: the name of the newest complete checkpoint."""
        return self.checkpoints / LATEST_FILE

    @property
    def cache(self) -> Path:
        """The tokenized training and validation splits (data.py), reused by a resumed run."""
        return self.path / CACHE_DIR

    @property
    def final(self) -> Path:
        return self.path / FINAL_DIR

    def no_final_yet(self) -> str:
        """The one line for a run whose final/ is not written yet (interrupted, crashed or still
        training) where a command needs its model: export, summarize, --model RUN/final."""
        return (
            f"{self.path} has no {FINAL_DIR}/ model yet (training has not finished: continue it with "
            "the same command and --resume auto)"
        )

    # ------------------------------------------------------------ evaluation and report
    @property
    def eval(self) -> Path:
        return self.path / EVAL_DIR

    def eval_result(self, model: str) -> ResultDir:
        """``eval/original``, ``eval/finetuned``, or ``eval/step_N`` (in-training ROUGE)."""
        return ResultDir(self.eval / model)

    @property
    def eval_original(self) -> ResultDir:
        return self.eval_result(ORIGINAL)

    @property
    def eval_finetuned(self) -> ResultDir:
        return self.eval_result(FINETUNED)

    def eval_step(self, step: int) -> ResultDir:
        return self.eval_result(checkpoint_name(step))

    @property
    def results(self) -> ResultDir:
        """An ``ftlaunch eval`` run writes its predictions and ROUGE at its top."""
        return ResultDir(self.path)

    @property
    def report(self) -> ResultDir:
        return ResultDir(self.path / REPORT_DIR)

    # ------------------------------------------------------------ the interrupted marker
    @property
    def interrupted(self) -> Path:
        """Written by rank 0 after a stop-signal checkpoint (``step_N``); cleared by the next start."""
        return self.path / INTERRUPTED_FILE

    def write_interrupted(self, step: int) -> None:
        write_text_atomic(self.interrupted, checkpoint_name(step) + "\n")

    def clear_interrupted(self) -> None:
        self.interrupted.unlink(missing_ok=True)

    def is_interrupted(self) -> bool:
        return self.interrupted.exists()

    def interrupted_checkpoint(self, since: float = 0.0) -> str | None:
        """The checkpoint the marker names (``step_N``), if it was written at or after ``since``."""
        try:
            if self.interrupted.stat().st_mtime >= since:
                return self.interrupted.read_text().strip()
        except OSError:
            return None
        return None

    # ------------------------------------------------------------ state
    def is_finished(self, recipe: Any | None, scores_problem: Callable[[Path], str | None]) -> bool:
        """A run that ended and need not run again: its final model, its fine-tuned ROUGE when the
        recipe evaluates after training (readable: a damaged rouge.json is redone, not kept), and
        no interrupted marker.

        ``recipe`` is the run's recipe (``eval.after_training`` is read); None (a folder without
        its recipe.yaml) counts as evaluating, the default. ``scores_problem`` says why a
        rouge.json cannot be read (results.report.eval_scores_problem: core does not import results).
        """
        evaluates = recipe is None or recipe.eval.after_training
        rouge = self.eval_finetuned
        evaluated = not evaluates or (rouge.has_rouge() and scores_problem(rouge.rouge) is None)
        return self.final.is_dir() and evaluated and not self.is_interrupted()


class SweepDir:
    """A sweep's folder: its manifest, the points' status records, the SLURM files, one run each."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @property
    def manifest(self) -> Path:
        return self.path / SWEEP_MANIFEST

    def is_sweep(self) -> bool:
        return self.manifest.is_file()

    def point(self, name: str) -> RunDir:
        return RunDir(self.path / name)

    @property
    def status_dir(self) -> Path:
        return self.path / SWEEP_STATUS_DIR

    def status(self, index: int) -> Path:
        return self.status_dir / f"{index}.json"

    @property
    def lock(self) -> Path:
        return self.path / SWEEP_LOCK_FILE

    @property
    def slurm(self) -> Path:
        return self.path / SWEEP_SLURM_DIR

    @property
    def slurm_logs(self) -> Path:
        return self.slurm / LOGS_DIR

    def slurm_args(self, index: int) -> Path:
        return self.slurm / f"{index}.args"

    @property
    def report(self) -> ResultDir:
        return ResultDir(self.path / REPORT_DIR)
