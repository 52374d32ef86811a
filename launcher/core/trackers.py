"""Experiment trackers (TensorBoard, MLflow, Weights & Biases, trackio) through Accelerate's tracker API.

The loop logs through ``accelerator.log`` only; which trackers receive it is the recipe's
``train.report_to``. Everything a tracker writes locally goes under ``RUN/trackers/``. A resumed
run continues the same tracker run: the ids of the last start are kept in
``RUN/trackers/ids.json`` (MLflow's run id, W&B's run id) and TensorBoard purges the steps logged
after the checkpoint, as ``metrics.jsonl`` does. A fresh start (no checkpoint) purges every step of
earlier attempts in TensorBoard, step 0's included; MLflow, W&B and trackio start a new tracker run.

MLflow and W&B cannot drop points (MLflow keeps every one, W&B ignores a step below its last): a
resume that rewinds past steps their tracker run already holds (an older checkpoint than the
newest, a restart after a crash past the newest) continues in a new tracker run, named and tagged
after the checkpoint and the earlier run. A tracker run that starts on a resume first gets the
steps the resume keeps, copied from metrics.jsonl: each tracker run reads as metrics.jsonl does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.core.errors import UserError
from launcher.core.ranklog import console_print
from launcher.core.rundir import RunDir

IDS_FILE = "ids.json"
MLFLOW_STORE = "mlflow.db"  # MLflow's SQLite store when no MLFLOW_TRACKING_URI is set
MLFLOW_ARTIFACTS = "mlartifacts"  # that store's artifact root (MLflow's default: ./mlruns of the cwd)
TRACKER_LABELS = {"mlflow": "MLflow", "wandb": "W&B"}  # as a note names them
PROJECT_NAME = (
    "ftlaunch"  # TensorBoard subfolder, MLflow experiment (MLFLOW_EXPERIMENT_NAME wins), W&B project
)

# tracker -> (module that must import, how to install it: tensorboard is a dependency, the others extras)
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "mlflow": ("mlflow", "pip install 'ftlaunch[mlflow]'"),
    "wandb": ("wandb", "pip install 'ftlaunch[wandb]'"),
    "trackio": ("trackio", "pip install 'ftlaunch[trackio]'"),
}


def missing_tracker_packages(names: list[str]) -> list[str]:
    """The trackers asked for whose package is not importable here."""
    return [name for name in names if importlib.util.find_spec(TRACKER_PACKAGES[name][0]) is None]


def check_trackers_installed(names: list[str]) -> None:
    """Refuse, before any rank starts, a tracker whose package is missing (one line, the extra named)."""
    missing = missing_tracker_packages(names)
    if missing:
        name = missing[0]
        raise UserError(
            f"train.report_to: {name} is asked for but not installed: {TRACKER_PACKAGES[name][1]} "
            f"(or --report-to {','.join(n for n in names if n != name) or 'none'})"
        )


def project_name(names: list[str]) -> str:
    """The project every tracker files the run under: W&B's own ``WANDB_PROJECT`` when the run
    reports to W&B (what Seq2SeqTrainer's users set; Accelerate passes its project name to
    ``wandb.init`` explicitly, which would override the variable), else ftlaunch."""
    return (os.environ.get("WANDB_PROJECT") or PROJECT_NAME) if "wandb" in names else PROJECT_NAME


def check_tracking_server(names: list[str], env: dict[str, str], timeout_s: float = 5.0) -> None:
    """Refuse, before any rank starts, an MLflow tracking server that cannot be reached: the ranks
    would reach it only after the original model's evaluation, then retry for minutes and crash.
    Only a TCP connection is tried (a server that answers is the server's business)."""
    uri = env.get("MLFLOW_TRACKING_URI", "")
    if "mlflow" not in names or not uri.startswith(("http://", "https://")):
        return  # unset: a SQLite store inside the run; file:, sqlite:, databricks: are not probed
    parts = urllib.parse.urlsplit(uri)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise UserError(f"train.report_to: mlflow: MLFLOW_TRACKING_URI={uri!r} is not a valid URL")
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise UserError(
            f"train.report_to: mlflow: MLFLOW_TRACKING_URI={uri} cannot be reached ({reason}); start the "
            "tracking server, correct MLFLOW_TRACKING_URI (unset: a store inside the run), or report "
            "without mlflow (--report-to)"
        ) from None


def trackers_dir(run_dir: Path) -> Path:
    return RunDir(run_dir).trackers


def sqlite_uri(db: Path) -> str:
    """The SQLAlchemy URI of the SQLite file ``db``, whatever its folders are named: SQLAlchemy ends
    the path at a ``?`` and percent-decodes it, so the path is percent-encoded. The driver is named
    (``sqlite+pysqlite``) because MLflow creates the parent folder of a ``sqlite:///`` URI from the
    URI's text, undecoded (a stray ``exp%3Fa/trackers/`` beside a run named ``exp?a``)."""
    return "sqlite+pysqlite:///" + urllib.parse.quote(str(db.resolve()))


def use_run_mlflow_store(folder: Path) -> dict[str, str]:
    """Point MLflow at a SQLite store in ``folder`` (RUN/trackers) unless the user set a tracking
    URI; returns the MLflow tracker's extra start arguments: the run's own store keeps its
    artifacts beside it (as a file URI: a plain path would be percent-decoded too), a store the
    user named keeps its own artifact root."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return {}
    os.environ["MLFLOW_TRACKING_URI"] = sqlite_uri(folder / MLFLOW_STORE)
    return {"logging_dir": (folder / MLFLOW_ARTIFACTS).resolve().as_uri()}


def flat_config(recipe_dict: dict[str, Any]) -> dict[str, Any]:
    """The resolved recipe as ``section.key: scalar`` (what every tracker accepts as a parameter)."""
    flat: dict[str, Any] = {}
    for section, values in recipe_dict.items():
        for key, value in values.items():
            if isinstance(value, bool | int | float | str):
                flat[f"{section}.{key}"] = value
            else:  # None, lists: text, so TensorBoard's hparams and MLflow's params take them
                flat[f"{section}.{key}"] = json.dumps(value)
    return flat


def read_ids(run_dir: Path) -> dict[str, str]:
    try:
        ids = json.loads((trackers_dir(run_dir) / IDS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return ids if isinstance(ids, dict) else {}


@dataclass(frozen=True)
class Rewind:
    """A resume from the step-``step`` checkpoint while earlier attempts sent the trackers steps up
    to ``last``: a resume from an older checkpoint than the newest, a restart after a crash past
    the newest. MLflow and W&B continue in new tracker runs (they cannot drop the steps)."""

    step: int
    last: int

    def abandoned(self) -> str:
        first = self.step + 1
        return f"step {first}" if first == self.last else f"steps {first}-{self.last}"

    def run_name(self, run_dir: Path) -> str:
        return f"{run_dir.name} (resumed from step {self.step})"

    def description(self, tracker: str, earlier: str) -> str:
        """The new tracker run's description (MLflow's note, W&B's notes)."""
        return (
            f"Resumed from the step-{self.step} checkpoint: steps up to {self.step} are copied from "
            f"metrics.jsonl; {tracker} run {earlier} holds the abandoned {self.abandoned()}."
        )


def rewind_of(rows: list[dict[str, Any]], resume_step: int | None) -> Rewind | None:
    """The Rewind of a resume from ``resume_step``, given the earlier attempts' metrics.jsonl
    ``rows``; None when they sent the trackers nothing after it (a plain resume) or on a fresh start."""
    if resume_step is None:
        return None
    past = [row["step"] for row in rows if row.get("step", 0) > resume_step and scalars(row)]
    return Rewind(resume_step, max(past)) if past else None


def continued_id(
    name: str, ids: dict[str, str], resume_step: int | None, rewind: Rewind | None
) -> str | None:
    """The earlier tracker run (MLflow's or W&B's id) this start logs on in: on a plain resume
    only; None starts a new one (a fresh start, a rewinding resume, no earlier run known)."""
    return (ids.get(name) or None) if resume_step is not None and rewind is None else None


def left_behind(name: str, ids: dict[str, str], rewind: Rewind | None) -> str | None:
    """The earlier tracker run a rewinding resume leaves with the abandoned steps (None: none)."""
    return (ids.get(name) or None) if rewind else None


def init_kwargs(
    names: list[str],
    run_dir: Path,
    ids: dict[str, str],
    resume_step: int | None,
    mlflow_store: dict[str, str] | None = None,
    rewind: Rewind | None = None,
) -> dict[str, dict]:
    """Per-tracker start arguments: the same run again when resuming (``resume_step``: the
    checkpoint's step; None: a fresh start) unless the resume rewinds past steps the tracker runs
    hold (``rewind``), local files under RUN/trackers (``mlflow_store``: use_run_mlflow_store's)."""
    kwargs: dict[str, dict] = {}
    if "tensorboard" in names:
        # events from step resume_step + 1 on are dropped: the resumed run logs them again; a fresh
        # start drops all, step 0's too (an earlier attempt's evaluation on start)
        kwargs["tensorboard"] = {"purge_step": 0 if resume_step is None else resume_step + 1}
    if "mlflow" in names:
        run_id = continued_id("mlflow", ids, resume_step, rewind)
        kwargs["mlflow"] = {
            "run_id": run_id,  # a continued run keeps its name (MLflow would rename it)
            "run_name": None if run_id else new_run_name(run_dir, left_behind("mlflow", ids, rewind), rewind),
            **(mlflow_store or {}),
        }
    if "wandb" in names:
        run_id = continued_id("wandb", ids, resume_step, rewind)
        kwargs["wandb"] = {
            "id": run_id or uuid.uuid4().hex[:12],
            "resume": "allow",
            "dir": str(trackers_dir(run_dir)),
        }
        if not run_id:  # as MLflow's: a continued run keeps its name
            kwargs["wandb"].update(new_wandb_run(run_dir, left_behind("wandb", ids, rewind), rewind))
    if "trackio" in names:
        kwargs["trackio"] = {"name": run_dir.name, "resume": "allow" if resume_step else "never"}
    return kwargs


def new_run_name(run_dir: Path, earlier: str | None, rewind: Rewind | None) -> str:
    """The run directory's name; a new run a rewind starts beside an ``earlier`` one says where it began."""
    return rewind.run_name(run_dir) if rewind and earlier else run_dir.name


def new_wandb_run(run_dir: Path, earlier: str | None, rewind: Rewind | None) -> dict[str, Any]:
    """A new W&B run's name; beside an ``earlier`` one, notes on where it began and a tag to filter by."""
    if not (rewind and earlier):
        return {"name": run_dir.name}
    return {
        "name": rewind.run_name(run_dir),
        "notes": rewind.description("W&B", earlier),
        "tags": [f"resumed-from-step-{rewind.step}"],
    }


def start_trackers(
    accelerator,
    recipe,
    run_dir: Path,
    resume_step: int | None,
    kept: list[dict[str, Any]] | None = None,
    rewind: Rewind | None = None,
) -> None:
    """Start the recipe's trackers on the main process, log the resolved recipe as the run's config,
    and remember the tracker run ids for a later resume. ``kept``: the earlier attempts' rows this
    start keeps (metrics.kept_rows), copied into a tracker run that starts on a resume;
    ``rewind``: rewind_of's (then MLflow and W&B start new tracker runs)."""
    names = list(recipe.train.report_to)
    if not names:
        return
    folder = trackers_dir(run_dir)
    mlflow_store: dict[str, str] = {}
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if "mlflow" in names:  # a tracking server the user points at, else a store inside the run
            mlflow_store = use_run_mlflow_store(folder)
    ids = read_ids(run_dir)
    accelerator.init_trackers(
        project_name(names),
        config=flat_config(recipe.model_dump(mode="json")),
        init_kwargs=init_kwargs(names, run_dir, ids, resume_step, mlflow_store, rewind),
    )
    if accelerator.is_main_process:
        started = started_ids(accelerator, names)
        new = [name for name, run_id in started.items() if run_id != ids.get(name)]
        if resume_step is not None and new:
            carry_over(accelerator, new, started, kept or [])
        beside = {name: ids[name] for name in new if left_behind(name, ids, rewind)}
        if rewind and beside:
            relate(beside, rewind, rewind.run_name(run_dir))
        (folder / IDS_FILE).write_text(json.dumps(started, indent=1) + "\n")


def started_ids(accelerator, names: list[str]) -> dict[str, str]:
    """The MLflow and W&B run ids this start logs to (what ids.json keeps for the next resume)."""
    started = {}
    if "mlflow" in names:
        started["mlflow"] = accelerator.get_tracker("mlflow", unwrap=True).info.run_id
    if "wandb" in names:
        started["wandb"] = accelerator.get_tracker("wandb", unwrap=True).id
    return started


def carry_over(accelerator, new: list[str], started: dict[str, str], kept: list[dict[str, Any]]) -> None:
    """The steps a resume keeps, into its ``new`` MLflow / W&B runs (not the earlier attempts'
    runs, which hold them): each tracker run reads as metrics.jsonl does."""
    points = points_by_step(kept)
    if "mlflow" in new:
        replay_mlflow(started["mlflow"], points)
    if "wandb" in new:
        replay(accelerator.get_tracker("wandb"), points)


def relate(earlier: dict[str, str], rewind: Rewind, name: str) -> None:
    """A rewinding resume's new tracker runs beside the ``earlier`` ones (tracker: run id): MLflow's
    tagged with where it began and the earlier run (W&B's has it from its start arguments); one
    line says so."""
    if "mlflow" in earlier:
        tag_mlflow_run(relation_tags(earlier["mlflow"], rewind))
    trackers = " and ".join(TRACKER_LABELS[tracker] for tracker in earlier)
    runs, hold, new = ("runs", "hold", "new") if len(earlier) > 1 else ("run", "holds", "a new")
    console_print(
        f"note: resuming from step {rewind.step} rewinds past {rewind.abandoned()}, which the "
        f"earlier {trackers} {runs} already {hold}: this attempt logs to {new} {trackers} {runs}, "
        f"'{name}', with the steps up to {rewind.step} copied in"
    )


def points_by_step(rows: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """The tracked numbers of ``rows``, step by step, one value per key and step (the last)."""
    points: dict[int, dict[str, float]] = {}
    for row in rows:
        points.setdefault(row.get("step", 0), {}).update(scalars(row))
    return {step: values for step, values in points.items() if values}


def replay_mlflow(run_id: str, points: dict[int, dict[str, float]]) -> None:
    """``points`` into the MLflow run in batches: one call per step takes ~20 ms on a local store
    (seconds for a long run), more on a server."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH

    now = int(time.time() * 1000)
    metrics = [
        Metric(key, value, now, step) for step, values in points.items() for key, value in values.items()
    ]
    client = MlflowClient()
    for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])


def replay(tracker, points: dict[int, dict[str, float]]) -> None:
    """``points`` into one tracker (Accelerate's wrapper), step by step, in order."""
    for step in sorted(points):
        tracker.log(points[step], step=step)


def relation_tags(earlier: str, rewind: Rewind) -> dict[str, str]:
    """A rewinding resume's MLflow run: where it began, and the run that holds the abandoned steps."""
    return {
        "ftlaunch.resumed_from_step": str(rewind.step),
        "ftlaunch.earlier_run_id": earlier,
        "mlflow.note.content": rewind.description("MLflow", earlier),  # the run's description
    }


def tag_mlflow_run(tags: dict[str, str]) -> None:
    """Tags on the active MLflow run, after its start (Accelerate's start would also put its
    arguments' tags on an experiment it creates)."""
    import mlflow

    mlflow.set_tags(tags)


# The validation loss of final/'s model when it is an earlier (best) step's, not the last step's
FINAL_MODEL_VAL_LOSS = "final_model/val_loss"


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row (not its step or ``model_step``, not flags such as ``final``).
    A final row that measures an earlier step's model (``model_step``: train.best_metric) gives
    its validation loss as ``final_model/val_loss``: not a point of the last step's curve."""
    numbers = {
        key: value
        for key, value in row.items()
        if key not in ("step", "model_step")
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    }
    if row.get("final") and row.get("model_step", row["step"]) != row["step"] and "val_loss" in numbers:
        numbers[FINAL_MODEL_VAL_LOSS] = numbers.pop("val_loss")
    return numbers


def log_rouge(accelerator, run_dir: Path, step: int) -> None:
    """The report's ROUGE (fine-tuned, and the original model's) as the tracker run's final metrics."""
    try:
        table = json.loads(RunDir(run_dir).report.rouge.read_text())
    except (OSError, ValueError):
        return
    values = {
        f"rouge/{model}/{metric}": float(score)
        for model, scores in table.items()
        if isinstance(scores, dict)
        for metric, score in scores.items()
        if metric.startswith("rouge") and isinstance(score, int | float)
    }
    if values:
        accelerator.log(values, step=step)
