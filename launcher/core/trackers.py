"""Experiment trackers (TensorBoard, MLflow, Weights & Biases, trackio) through Accelerate's tracker API.

The loop logs through ``accelerator.log`` only; which trackers receive it is the recipe's
``train.report_to``. Everything a tracker writes locally goes under ``RUN/trackers/``. A resumed
run continues the same tracker run: the ids of the first start are kept in
``RUN/trackers/ids.json`` (MLflow's run id, W&B's run id) and TensorBoard purges the steps logged
after the checkpoint, as ``metrics.jsonl`` does. A fresh start (no checkpoint) purges every step of
earlier attempts in TensorBoard, step 0's included; MLflow, W&B and trackio start a new tracker run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

from launcher.core.errors import UserError
from launcher.core.rundir import RunDir

IDS_FILE = "ids.json"
MLFLOW_STORE = "mlflow.db"  # MLflow's SQLite store when no MLFLOW_TRACKING_URI is set
MLFLOW_ARTIFACTS = "mlartifacts"  # that store's artifact root (MLflow's default: ./mlruns of the cwd)
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


def init_kwargs(
    names: list[str],
    run_dir: Path,
    ids: dict[str, str],
    resume_step: int | None,
    mlflow_store: dict[str, str] | None = None,
) -> dict[str, dict]:
    """Per-tracker start arguments: the same run again when resuming (``resume_step``: the
    checkpoint's step; None: a fresh start), local files under RUN/trackers (``mlflow_store``:
    use_run_mlflow_store's arguments)."""
    kwargs: dict[str, dict] = {}
    if "tensorboard" in names:
        # events from step resume_step + 1 on are dropped: the resumed run logs them again; a fresh
        # start drops all, step 0's too (an earlier attempt's evaluation on start)
        kwargs["tensorboard"] = {"purge_step": 0 if resume_step is None else resume_step + 1}
    if "mlflow" in names:
        kwargs["mlflow"] = {
            "run_name": run_dir.name,
            "run_id": ids.get("mlflow") if resume_step else None,
            **(mlflow_store or {}),
        }
    if "wandb" in names:
        run_id = ids.get("wandb") if resume_step and ids.get("wandb") else uuid.uuid4().hex[:12]
        kwargs["wandb"] = {
            "id": run_id,
            "resume": "allow",
            "name": run_dir.name,
            "dir": str(trackers_dir(run_dir)),
        }
    if "trackio" in names:
        kwargs["trackio"] = {"name": run_dir.name, "resume": "allow" if resume_step else "never"}
    return kwargs


def start_trackers(accelerator, recipe, run_dir: Path, resume_step: int | None) -> None:
    """Start the recipe's trackers on the main process, log the resolved recipe as the run's config,
    and remember the tracker run ids for a later resume."""
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
        init_kwargs=init_kwargs(names, run_dir, ids, resume_step, mlflow_store),
    )
    if accelerator.is_main_process:
        kept = {}
        if "mlflow" in names:
            kept["mlflow"] = accelerator.get_tracker("mlflow", unwrap=True).info.run_id
        if "wandb" in names:
            kept["wandb"] = accelerator.get_tracker("wandb", unwrap=True).id
        (folder / IDS_FILE).write_text(json.dumps(kept, indent=1) + "\n")


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
