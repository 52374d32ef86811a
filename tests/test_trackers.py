"""Experiment trackers through Accelerate (--report-to): what each tracker holds, read back with the
tracker's own reader (MlflowClient on a SQLite store, W&B's offline run files, TensorBoard's event
reader), compared with the run's metrics.jsonl and report/rouge.json; a resumed run continues the
same tracker run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env, read_jsonl, run_cli_harness, run_cli_in_process


def tiny_args(out: Path, *extra: str) -> list[str]:
    return [
        "full", "--cpu", "--gpus", "2", "--model", "tiny-t5", "--data", "sample", "--output", str(out),
        "--set", "model.precision=fp32", "--set", "train.log_every=1", "--set", "train.micro_batch_size=4",
        "--set", "train.lr=2e-3", "--set", "eval.limit=4", "--set", "eval.max_new_tokens=8",
        "--set", "eval.compare_original=false", *extra,
    ]  # fmt: skip


# ---------------------------------------------------------------- DeepSpeed's import of mlflow

IMPORTS_AS_A_RANK = """
import sys
from launcher.rank.distributed import keep_deepspeed_from_importing_mlflow
keep_deepspeed_from_importing_mlflow(sys.argv[1:])
import deepspeed  # what Accelerate does in every rank (unwrap_model), DDP too
from accelerate.utils import is_mlflow_available
print(sys.modules.get("mlflow") is not None, is_mlflow_available(), deepspeed.__version__ != "")
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("report_to", "imported"), [(["tensorboard"], "False False True"), (["mlflow"], "True True True")]
)
def test_a_rank_imports_mlflow_only_when_it_reports_to_mlflow(report_to, imported):
    """DeepSpeed imports mlflow (its autotuner's) whenever installed, ~1.4 s per rank: a rank that
    does not report to MLflow sees it as absent; DeepSpeed itself still imports and works."""
    result = subprocess.run(
        [sys.executable, "-c", IMPORTS_AS_A_RANK, *report_to], capture_output=True, text=True, env=cli_env()
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2] == imported, result.stdout


# ---------------------------------------------------------------- refusals (in-process)


def test_an_unknown_tracker_is_refused_with_the_choices(tmp_path):
    result = run_cli_in_process(*tiny_args(tmp_path / "run", "--report-to", "comet"), "--dry-run")
    assert result.returncode == 2
    assert "train.report_to" in result.stderr and "'comet'" in result.stderr and "mlflow" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_tracker_that_is_not_installed_is_refused_naming_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a)
    )
    result = run_cli_in_process(*tiny_args(tmp_path / "run", "--report-to", "tensorboard,trackio"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1
    assert "pip install 'ftlaunch[trackio]'" in result.stderr and "--report-to tensorboard" in result.stderr
    assert not (tmp_path / "run" / "logs").exists()


def test_an_mlflow_server_that_cannot_be_reached_is_refused_before_anything_runs(tmp_path, monkeypatch):
    """Else rank 0 would retry it for minutes after the original model's evaluation, then crash."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    result = run_cli_in_process(*tiny_args(tmp_path / "run", "--report-to", "tensorboard,mlflow"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        f"error: train.report_to: mlflow: MLFLOW_TRACKING_URI=http://127.0.0.1:{port} cannot be reached ("
    )
    assert "start the tracking server" in result.stderr and not (tmp_path / "run").exists()


def test_a_listening_mlflow_server_and_local_stores_pass_the_check():
    import socket

    from launcher.core.trackers import check_tracking_server

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        check_tracking_server(["mlflow"], {"MLFLOW_TRACKING_URI": uri})
    for env in ({}, {"MLFLOW_TRACKING_URI": "sqlite:///x.db"}, {"MLFLOW_TRACKING_URI": "file:///tmp/m"}):
        check_tracking_server(["mlflow"], env)
    check_tracking_server(
        ["tensorboard"], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:1"}
    )  # not reporting to it


@pytest.mark.slow
def test_a_tracker_that_cannot_start_fails_the_run_before_the_original_evaluation(tmp_path):
    """W&B online without an API key: rank 0 fails as it starts the trackers, not after the
    original model's evaluation (minutes of generation for a real model)."""
    pytest.importorskip("wandb")
    home = tmp_path / "home"
    home.mkdir()
    env = cli_env(HOME=str(home), WANDB_MODE="online", WANDB_CONFIG_DIR=str(home), NETRC=str(home / "netrc"))
    env.pop("WANDB_API_KEY", None)
    run_dir = tmp_path / "run"
    result = run_cli_harness(
        *tiny_args(run_dir, "--report-to", "wandb"), "--set", "eval.compare_original=true", env=env
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    failure = json.loads((run_dir / "logs" / "failures" / "rank0.json").read_text())
    assert "wandb login" in failure["error"], failure
    assert not (run_dir / "eval" / "original").exists()


def test_report_to_none_and_lists_resolve(tmp_path):
    from launcher.core.recipe import Recipe

    assert Recipe().train.report_to == ["tensorboard"]
    assert Recipe.model_validate({"train": {"report_to": "none"}}).train.report_to == []
    assert Recipe.model_validate({"train": {"report_to": "mlflow, wandb"}}).train.report_to == [
        "mlflow",
        "wandb",
    ]
    result = run_cli_in_process(*tiny_args(tmp_path / "run", "--report-to", "none"), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "report_to: []" in (tmp_path / "run" / "recipe.yaml").read_text()


# ---------------------------------------------------------------- MLflow's store inside the run

# Folder names a URI would misread: a query, percent escapes (one a URI's own '?'), a fragment,
# a space, URL delimiters, non-ASCII
NASTY_NAMES = ["exp?a", "p%41", "q%3Fr", "h#x", "s p", "u@v:w;x=y&z+", "ü-ß", "normal"]


@pytest.mark.parametrize("name", NASTY_NAMES)
def test_the_mlflow_store_uri_names_the_run_s_own_file_for_any_folder_name(tmp_path, name):
    """SQLAlchemy's own parser reads the store URI back as the exact file in RUN/trackers: an
    unescaped '?' cut the path (a store beside the run, shared by every run with that prefix) and
    '%41' was decoded (a folder that does not exist: rank 0 retried for minutes, then failed)."""
    sqlalchemy_url = pytest.importorskip("sqlalchemy.engine.url")
    from launcher.core.trackers import sqlite_uri

    db = tmp_path / name / "trackers" / "mlflow.db"
    url = sqlalchemy_url.make_url(sqlite_uri(db))
    assert (url.get_backend_name(), url.database, dict(url.query)) == ("sqlite", str(db.resolve()), {})


def test_mlflow_keeps_its_store_and_artifacts_in_the_run_s_trackers_folder(tmp_path, monkeypatch):
    """Through MLflow itself: the store file, and an artifact of the tracker run, land inside
    RUN/trackers of a run whose name has every character a URI misreads; nothing is made beside
    the run (MLflow makes a sqlite:/// URI's folder from its undecoded text) nor in the working
    directory (MLflow's default artifact root is ./mlruns)."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from launcher.core.trackers import use_run_mlflow_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "runs" / "e?x%41 #ü" / "trackers"
    folder.mkdir(parents=True)
    store = use_run_mlflow_store(folder)
    client = MlflowClient()  # MLFLOW_TRACKING_URI, as Accelerate's tracker reads it
    experiment = client.create_experiment("ftlaunch", artifact_location=store["logging_dir"])
    run = client.create_run(experiment)
    client.log_text(run.info.run_id, "text", "probe.txt")
    assert (folder / "mlflow.db").is_file()
    assert [path.relative_to(folder).parts[0] for path in folder.rglob("probe.txt")] == ["mlartifacts"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["runs"]
    assert [path.name for path in (tmp_path / "runs").iterdir()] == ["e?x%41 #ü"]


@pytest.mark.slow
def test_a_real_run_whose_name_has_a_question_mark_keeps_its_mlflow_store(tmp_path):
    """The rank's tracker start, end to end: the store is the run's own and holds its loss."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from launcher.core.trackers import sqlite_uri

    env = cli_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    run_dir = tmp_path / "runs" / "exp?a%41"
    args = tiny_args(run_dir, "--report-to", "mlflow", "--set", "train.max_steps=1")
    result = run_cli_harness(*args, "--set", "eval.after_training=false", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [path.name for path in run_dir.parent.iterdir()] == ["exp?a%41"]
    db = run_dir / "trackers" / "mlflow.db"
    client = MlflowClient(tracking_uri=sqlite_uri(db))
    experiment = client.get_experiment_by_name("ftlaunch")
    assert experiment.artifact_location == (run_dir / "trackers" / "mlartifacts").as_uri()
    [run] = client.search_runs([experiment.experiment_id])
    losses = [row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row]
    assert run.data.metrics["loss"] == pytest.approx(losses[-1])


# ---------------------------------------------------------------- a real run on 2 CPU ranks


def tensorboard_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


@pytest.mark.slow
def test_trackers_receive_the_run_and_a_resume_continues_the_same_tracker_run(tmp_path):
    """The interrupted run and its resume have their ranks from the rank harness: the trackers live
    in the ranks (Accelerate's trackers on the main process), and the interruption is SIGUSR1 to
    the ranks, which stop by themselves (test_training.interrupt_after); no launch is the subject."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient
    from test_training import interrupt_after, losses

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # WANDB_PROJECT, as Seq2SeqTrainer's users set it, names every tracker's project
    env = cli_env(
        MLFLOW_TRACKING_URI=store, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_PROJECT="dialogsum-ft"
    )
    run_dir = tmp_path / "run"
    args = tiny_args(
        run_dir, "--report-to", "tensorboard,mlflow,wandb",
        "--set", "train.epochs=4", "--set", "train.checkpoint_every=1000",
    )  # fmt: skip
    stopped = interrupt_after(run_dir, args, step=3, env=env)
    assert stopped.returncode != 0 and (run_dir / "INTERRUPTED").is_file(), stopped.stdout[-3000:]
    first_ids = json.loads((run_dir / "trackers" / "ids.json").read_text())

    resumed = run_cli_harness(*args, "--resume", "auto", env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    logged = {row["step"]: row["loss"] for row in metrics if "loss" in row}
    assert list(logged) == list(range(1, len(logged) + 1)) and len(logged) == len(losses(metrics))
    rouge = json.loads((run_dir / "report" / "rouge.json").read_text())["finetuned"]

    # MLflow: one run, the same one before and after the resume; params = the resolved recipe
    ids = json.loads((run_dir / "trackers" / "ids.json").read_text())
    assert ids == first_ids
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("dialogsum-ft")
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [ids["mlflow"]]
    params = runs[0].data.params
    assert float(params["train.lr"]) == 2e-3 and params["model.name"] == "tiny-t5"
    history = client.get_metric_history(ids["mlflow"], "loss")
    by_step = {}
    for point in history:  # the steps logged again after the checkpoint replace the first attempt's
        by_step[point.step] = point.value
    assert sorted(by_step) == sorted(logged)
    assert by_step == pytest.approx(logged, rel=1e-6)
    assert runs[0].data.metrics["rouge/finetuned/rougeLsum"] == pytest.approx(rouge["rougeLsum"])
    assert runs[0].data.metrics["val_loss"] == pytest.approx(
        [r for r in metrics if r.get("final")][-1]["val_loss"]
    )

    # W&B offline: both attempts wrote offline runs with the same run id, nothing went to a server
    offline = sorted((run_dir / "trackers" / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(path.name.endswith(ids["wandb"]) for path in offline)
    assert all((path / f"run-{ids['wandb']}.wandb").is_file() for path in offline)
    assert all(b"dialogsum-ft" in (path / f"run-{ids['wandb']}.wandb").read_bytes() for path in offline)

    # TensorBoard: the resumed run purged the steps after its checkpoint: each step once
    scalars = tensorboard_scalars(run_dir / "trackers" / "dialogsum-ft", "loss")
    assert [step for step, _ in scalars] == sorted(logged)
    assert [value for _, value in scalars] == pytest.approx(list(logged.values()), rel=1e-6)


# ---------------------------------------------------------------- a resume that rewinds


def test_a_resume_continues_the_tracker_run_unless_it_rewinds_past_its_steps(tmp_path):
    """Which MLflow / W&B run a start logs to: a plain resume (nothing logged after its checkpoint)
    the earlier one, unrenamed; a resume before steps the earlier attempts logged (an older
    checkpoint, a restart after a crash past the newest) a new one named after the checkpoint, W&B's
    with notes naming the earlier run; a fresh start a new one, as before."""
    from launcher.core.trackers import Rewind, init_kwargs, rewind_of

    rows = [
        {"step": 0, "segment": 1, "start": "fresh"},
        *({"step": step, "loss": 7.0 - step / 10} for step in (1, 2, 3, 4)),
        {"step": 4, "val_loss": 6.5, "final": True},
    ]
    assert [rewind_of(rows, step) for step in (None, 4, 3, 2)] == [None, None, Rewind(3, 4), Rewind(2, 4)]
    assert rewind_of([*rows[:3], {"step": 3, "early_stop": "no better"}], 2) is None  # nothing tracked
    ids, names, run_dir = {"mlflow": "m1", "wandb": "w1"}, ["mlflow", "wandb"], tmp_path / "run"

    plain = init_kwargs(names, run_dir, ids, 4, rewind=rewind_of(rows, 4))
    assert (plain["mlflow"]["run_id"], plain["mlflow"]["run_name"]) == ("m1", None)
    assert plain["wandb"]["id"] == "w1" and "name" not in plain["wandb"]

    rewound = init_kwargs(names, run_dir, ids, 2, rewind=rewind_of(rows, 2))
    assert (rewound["mlflow"]["run_id"], rewound["mlflow"]["run_name"]) == (None, "run (resumed from step 2)")
    assert rewound["wandb"]["id"] != "w1" and rewound["wandb"]["name"] == "run (resumed from step 2)"
    assert rewound["wandb"]["tags"] == ["resumed-from-step-2"]
    assert "W&B run w1 holds the abandoned steps 3-4" in rewound["wandb"]["notes"]

    unknown = init_kwargs(names, run_dir, {}, 2, rewind=rewind_of(rows, 2))  # no earlier run to name
    assert (unknown["mlflow"]["run_name"], unknown["wandb"]["name"]) == ("run", "run")
    assert "notes" not in unknown["wandb"]

    fresh = init_kwargs(names, run_dir, ids, None)
    assert (fresh["mlflow"]["run_id"], fresh["mlflow"]["run_name"], fresh["wandb"]["name"]) == (
        None,
        "run",
        "run",
    )
    assert fresh["wandb"]["id"] != "w1" and "notes" not in fresh["wandb"]


def wandb_records(path: Path):
    """The records of a W&B run file (``run-ID.wandb``: LevelDB's log format of W&B's protobuf
    Records, which the offline runs write and ``wandb sync`` uploads)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    position, parts = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header: padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        parts += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last part of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def wandb_history(folder: Path) -> tuple[object, list[int]]:
    """An offline W&B run's run record and the step of each of its history rows."""
    [path] = folder.glob("run-*.wandb")
    records = list(wandb_records(path))
    [run] = [record.run for record in records if record.HasField("run")]
    return run, [record.history.step.num for record in records if record.HasField("history")]


def points_per_step(client, run_id: str) -> dict[str, list[int]]:
    """Each metric of an MLflow run: the step of each of its points."""
    keys = client.get_run(run_id).data.metrics
    return {key: [point.step for point in client.get_metric_history(run_id, key)] for key in keys}


@pytest.mark.slow
def test_a_resume_that_rewinds_continues_in_a_new_mlflow_and_wandb_run(tmp_path):
    """A plain resume (the newest checkpoint, nothing logged after it) appends to the same MLflow
    and W&B runs. A resume from an older checkpoint, before steps the tracker runs hold, starts new
    ones (named and tagged after the checkpoint and the earlier run) that get the kept steps
    first: no MLflow run holds two points at one step (MLflow kept both; W&B would have ignored
    the re-trained steps), and the new run's loss curve is metrics.jsonl's."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient
    from test_training import interrupt_after

    from launcher.core.trackers import sqlite_uri

    env = cli_env(WANDB_MODE="offline", WANDB_SILENT="true")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        env.pop(name, None)
    run_dir = tmp_path / "run"
    args = tiny_args(
        run_dir, "--report-to", "tensorboard,mlflow,wandb",
        "--set", "train.max_steps=6", "--set", "train.checkpoint_every=2",
    )  # fmt: skip
    stopped = interrupt_after(run_dir, args, step=3, env=env)
    assert stopped.returncode != 0 and (run_dir / "INTERRUPTED").is_file(), stopped.stdout[-3000:]
    first = json.loads((run_dir / "trackers" / "ids.json").read_text())
    resumed = run_cli_harness(*args, "--resume", "auto", env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    assert json.loads((run_dir / "trackers" / "ids.json").read_text()) == first  # the same runs
    assert "note: resuming from step" not in resumed.stdout + resumed.stderr

    rewound = run_cli_harness(*args, "--resume", str(run_dir / "checkpoints" / "step_4"), env=env)
    assert rewound.returncode == 0, rewound.stdout[-3000:] + rewound.stderr[-6000:]
    output = rewound.stdout + rewound.stderr
    assert "resuming from step 4 rewinds past steps 5-6, which the earlier MLflow and W&B runs" in output
    ids = json.loads((run_dir / "trackers" / "ids.json").read_text())
    assert ids["mlflow"] != first["mlflow"] and ids["wandb"] != first["wandb"]

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    logged = {row["step"]: row["loss"] for row in metrics if "loss" in row}
    assert list(logged) == [1, 2, 3, 4, 5, 6]
    client = MlflowClient(tracking_uri=sqlite_uri(run_dir / "trackers" / "mlflow.db"))
    experiment = client.get_experiment_by_name("ftlaunch")
    assert {run.info.run_id for run in client.search_runs([experiment.experiment_id])} == {
        first["mlflow"],
        ids["mlflow"],
    }
    for run_id in (first["mlflow"], ids["mlflow"]):
        for key, steps in points_per_step(client, run_id).items():
            assert len(steps) == len(set(steps)), (run_id, key, steps)
    new = client.get_run(ids["mlflow"])
    assert new.info.run_name == "run (resumed from step 4)"
    assert new.data.tags["ftlaunch.resumed_from_step"] == "4"
    assert new.data.tags["ftlaunch.earlier_run_id"] == first["mlflow"]
    curve = {point.step: point.value for point in client.get_metric_history(ids["mlflow"], "loss")}
    assert curve == pytest.approx(logged, rel=1e-6)  # steps 1-4 copied in, 5-6 this attempt's
    rouge = json.loads((run_dir / "report" / "rouge.json").read_text())["finetuned"]
    assert new.data.metrics["rouge/finetuned/rougeLsum"] == pytest.approx(rouge["rougeLsum"])
    assert client.get_run(first["mlflow"]).info.run_name == "run"  # the plain resume kept its name

    # W&B offline: the rewinding attempt's run is a new one, every step once; the earlier run's
    # attempts (the interrupted one and its plain resume) share one id
    offline = sorted((run_dir / "trackers" / "wandb").glob("offline-run-*"))
    assert [path.name[-12:] for path in offline] == [first["wandb"]] * 2 + [ids["wandb"]]
    run, steps = wandb_history(offline[-1])
    assert run.display_name == "run (resumed from step 4)" and first["wandb"] in run.notes
    assert steps == sorted(set(steps)) and steps[-1] == 6 and set(logged) <= set(steps)

    # TensorBoard (one writer over all attempts): each step once, the last attempt's values
    scalars = tensorboard_scalars(run_dir / "trackers" / "ftlaunch", "loss")
    assert [step for step, _ in scalars] == list(logged)
    assert [value for _, value in scalars] == pytest.approx(list(logged.values()), rel=1e-6)
