"""`ftlaunch sweep full|lora` and `ftlaunch report SWEEP`.

Fast (in-process): every point is validated before anything is written (one bad value refuses the
whole sweep with one line); the points of --grid / --variants, their directory names and the
manifest; a --slurm dry run renders every point and the array's task arguments (read back by bash
as slurm/sweep.sh reads them); the report of a hand-made sweep (sorting, best run, statuses).

Slow (one test, training on one CPU rank per point: the failing point launched for real, the others'
ranks from the rank harness): a 2 x 2 sweep run here, one point failing on an injected fault without
stopping the others, its report; then the sweep extended with a new value: finished points are kept
untouched, the failed one resumes from its own checkpoint and ends with the same losses as the point
that differs only in how often it checkpoints.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import cli_env, read_jsonl, run_cli_harness, run_cli_in_process
from test_cli_errors import assert_refused, tree

TINY = ["--model", "tiny-t5", "--data", "sample", "--cpu"]


def sweep_in_process(output: Path, *args: str):
    return run_cli_in_process("sweep", *args, "--output", str(output))


def refused_sweep(output: Path, *args: str, fragments: tuple[str, ...] = ()) -> str:
    """Expect a refusal that leaves OUTPUT as it was (absent, or unchanged)."""
    before = tree(output) if output.exists() else None
    line = assert_refused(sweep_in_process(output, *args), *fragments)
    assert (tree(output) if output.exists() else None) == before, f"{output} was changed by a refused sweep"
    return line


# ---------------------------------------------------------------- refusals: nothing written


def test_one_bad_grid_value_refuses_the_whole_sweep(tmp_path):
    out = tmp_path / "sweep"
    line = refused_sweep(out, "lora", *TINY, "--grid", "train.lr=1e-4,abc", "--grid", "lora.r=4,8")
    assert (
        line
        == "error: sweep point lr=abc_r=4: train.lr='abc': input should be a valid number, unable to parse string as a number"
    ), line
    refused_sweep(
        out,
        "lora",
        *TINY,
        "--grid",
        "train.lrr=1e-4",
        fragments=("unknown key train.lrr", "did you mean train.lr?"),
    )
    # A value the schema accepts but the pre-launch checks refuse (the split is not in the data).
    refused_sweep(
        out,
        "lora",
        *TINY,
        "--grid",
        "data.train_split=train,nosuch",
        fragments=("sweep point train_split=nosuch", "nosuch"),
    )


def test_sweep_flags_that_cannot_apply_are_refused(tmp_path):
    out = tmp_path / "sweep"
    refused_sweep(out, "lora", *TINY, "--grid", "lora.r=4,8", "--resume", "auto", fragments=("--resume",))
    refused_sweep(
        out, "lora", *TINY, "--gpus", "2", "--grid", "launch.gpus=1,2", fragments=("--gpus fixes it",)
    )
    refused_sweep(out, "lora", *TINY, "--grid", "train.method=full,lora", fragments=("one method",))
    refused_sweep(out, "lora", *TINY, "--grid", "lora.r=4,4", fragments=("lists 4 twice",))
    refused_sweep(out, "lora", *TINY, "--grid", "lora.r", fragments=("KEY=V1,V2",))
    refused_sweep(out, "lora", *TINY, fragments=("--grid",))
    refused_sweep(out, "lora", *TINY, "--grid", "lora.r=4", "--max-parallel", "2", fragments=("--slurm",))
    refused_sweep(
        out, "lora", *TINY, "--grid", "lora.r=4", "--frobnicate", fragments=("No such option: --frobnicate",)
    )
    refused_sweep(out, "eval", *TINY, "--grid", "lora.r=4", fragments=("full or lora",))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine\n")
    refused_sweep(tmp_path / "other", "lora", *TINY, "--grid", "lora.r=4", fragments=("holds no sweep",))


def test_points_that_would_train_the_same_run_are_refused(tmp_path):
    """Values spelled differently but equal once parsed, and adapter settings in a full sweep."""
    out = tmp_path / "sweep"
    refused_sweep(
        out, "full", *TINY, "--grid", "train.lr=1e-3,0.001",
        fragments=("sweep points lr=1e-3 and lr=0.001 give the same recipe",),
    )  # fmt: skip
    refused_sweep(out, "full", *TINY, "--grid", "train.seed=1,01", fragments=("seed=1 and seed=01",))
    refused_sweep(
        out, "full", *TINY, "--grid", "lora.r=4,8",
        fragments=("lora.r is varied, but ftlaunch sweep full trains no LoRA adapters",),
    )  # fmt: skip


def test_quotes_keep_a_comma_in_a_grid_value_and_are_not_part_of_it(tmp_path):
    out = tmp_path / "sweep"
    grid = "data.prompt='Dialogue, then summary: {dialogue}',\"Summarize: {dialogue}\""
    result = sweep_in_process(out, "full", *TINY, "--grid", grid, "--dry-run")
    assert result.returncode == 0, result.stderr
    prompts = sorted(
        yaml.safe_load((run / "recipe.yaml").read_text())["data"]["prompt"]
        for run in out.iterdir()
        if run.is_dir()
    )
    assert prompts == ["Dialogue, then summary: {dialogue}", "Summarize: {dialogue}"]


def test_variants_file_names_points_and_refuses_a_bad_variant(tmp_path):
    variants = tmp_path / "variants.yaml"
    variants.write_text("- {train.lr: 1.0e-4, lora.r: 4}\n- train: {lr: 3.0e-4}\n  lora: {r: 16, alpha: 8}\n")
    out = tmp_path / "sweep"
    result = sweep_in_process(out, "lora", *TINY, "--variants", str(variants), "--dry-run")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "sweep.json").read_text())
    assert [point["name"] for point in manifest["points"]] == ["lr=0.0001_r=4", "lr=0.0003_r=16_alpha=8"]
    assert manifest["keys"] == ["train.lr", "lora.r", "lora.alpha"]
    recipe = (out / "lr=0.0003_r=16_alpha=8" / "recipe.yaml").read_text()
    assert "lr: 0.0003" in recipe and "r: 16" in recipe and "alpha: 8" in recipe

    bad = tmp_path / "bad.yaml"
    bad.write_text("- {lora.r: 4}\n- {lora.r: -1}\n")
    refused_sweep(
        tmp_path / "sweep2", "lora", *TINY, "--variants", str(bad), fragments=("sweep point r=-1: lora.r=-1",)
    )
    refused_sweep(
        out, "lora", *TINY, "--variants", str(variants), "--grid", "lora.r=4", fragments=("not both",)
    )


def test_extending_with_other_flags_is_refused(tmp_path):
    out = tmp_path / "sweep"
    assert sweep_in_process(out, "lora", *TINY, "--grid", "lora.r=4,8", "--dry-run").returncode == 0
    refused_sweep(
        out,
        "lora",
        *TINY,
        "--set",
        "train.lr=1e-2",
        "--grid",
        "lora.r=16",
        fragments=("holds a sweep made with other flags",),
    )
    # The same flags with a new value: the old points keep their index and name, the new one follows.
    assert sweep_in_process(out, "lora", *TINY, "--grid", "lora.r=16,4", "--dry-run").returncode == 0
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert [(p["index"], p["name"]) for p in points] == [(0, "r=4"), (1, "r=8"), (2, "r=16")]


def test_slurm_dry_run_renders_every_point_and_the_array(tmp_path):
    out = tmp_path / "sweep"
    result = sweep_in_process(
        out, "lora", *TINY, "--set", "eval.limit=2", "--grid", "train.lr=1e-3,3e-3", "--grid", "lora.r=4,8",
        "--slurm", "--max-parallel", "2", "--sbatch=--partition=debug", "--dry-run",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    sbatch = next(line for line in result.stdout.splitlines() if line.startswith("$ sbatch"))
    assert "--array=0-3%2 --nodes=1 " in sbatch and "--gres" not in sbatch, sbatch  # --cpu: no GPUs asked
    assert sbatch.endswith(
        "--partition=debug " + str(Path(__file__).resolve().parents[1] / "slurm" / "sweep.sh")
    )
    names = ["lr=1e-3_r=4", "lr=1e-3_r=8", "lr=3e-3_r=4", "lr=3e-3_r=8"]
    for index, name in enumerate(names):
        assert (out / name / "command.sh").is_file()
        # slurm/sweep.sh reads the task's arguments with `mapfile -d ''`: read them back the same way.
        read = subprocess.run(
            ["bash", "-c", 'mapfile -d "" -t a < "$1"; printf "%s\\n" "${a[@]}"', "-", str(out / "slurm" / f"{index}.args")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        args = read.stdout.splitlines()
        lr, r = name.split("_")
        assert args[-8:] == [
            "--set", f"train.lr={lr[3:]}", "--set", f"lora.r={r[2:]}", "--gpus", "1", "--output", str(out / name)
        ], args  # fmt: skip
        assert args[: len(TINY)] == TINY and "--recipe" in args
    assert not (out / "status").exists()


# ---------------------------------------------------------------- the report of a hand-made sweep


def fake_run(run_dir: Path, rougelsum: float | None, original: float = 0.10, losses=(3.0, 2.5)) -> None:
    """A run directory as training leaves it: metrics, and (finished) final/ and both rouge.json."""
    run_dir.mkdir(parents=True)
    rows = [{"step": i + 1, "loss": loss, "elapsed_s": 10.0} for i, loss in enumerate(losses)]
    if rougelsum is not None:
        rows.append({"step": len(losses), "val_loss": 2.0 - rougelsum, "final": True})
        (run_dir / "final").mkdir()
        for name, value in (("finetuned", rougelsum), ("original", original)):
            (run_dir / "eval" / name).mkdir(parents=True)
            scores = {
                "rouge1": value + 0.05,
                "rouge2": value / 2,
                "rougeL": value,
                "rougeLsum": value,
                "n": 2,
            }
            (run_dir / "eval" / name / "rouge.json").write_text(json.dumps(scores))
    text = "".join(json.dumps(row) + "\n" for row in rows)
    (run_dir / "metrics.jsonl").write_text(
        text + ('{"step": 3, "lo' if rougelsum is None else "")
    )  # half a line


def write_lora_r_manifest(sweep: Path, names: list[str]) -> None:
    """A sweep directory's manifest over lora.r, one point per name ("r=4", ...), no runs yet."""
    manifest = {
        "ftlaunch_sweep": 1, "method": "lora", "args": [], "keys": ["lora.r"], "jobs": [],
        "points": [{"index": i, "name": name, "values": {"lora.r": name[2:]}} for i, name in enumerate(names)],
    }  # fmt: skip
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps(manifest))


def test_report_of_a_sweep_sorts_names_the_best_and_shows_failures(tmp_path):
    sweep = tmp_path / "sweep"
    names = ["r=4", "r=8", "r=16", "r=32"]
    write_lora_r_manifest(sweep, names)
    fake_run(sweep / "r=4", 0.30)
    fake_run(sweep / "r=8", 0.35)
    fake_run(sweep / "r=16", None)  # failed: a rank's failure record, the status of its attempt
    failures = sweep / "r=16" / "logs" / "failures"
    failures.mkdir(parents=True)
    record = {"rank": 0, "local_rank": 0, "node": 0, "host": "h", "pid": 1, "time": 1.0, "exit_code": 1,
              "error": "RuntimeError: boom", "log": "x"}  # fmt: skip
    (failures / "rank0.json").write_text(json.dumps(record))
    (sweep / "r=16" / "recipe.yaml").write_text(
        Path(__file__).resolve().parents[1].joinpath("recipes", "lora.yaml").read_text()
    )
    (sweep / "status").mkdir()
    (sweep / "status" / "2.json").write_text(json.dumps({"state": "ended", "exit_code": 1}))
    fake_run(sweep / "r=32", None, losses=(3.0,))  # still running
    (sweep / "status" / "3.json").write_text(json.dumps({"state": "running", "exit_code": None}))

    result = run_cli_in_process("report", str(sweep))
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")][2:]
    assert [line.split(" | ")[1] for line in table] == ["r=8", "r=4", "r=16", "r=32"], table
    assert table[0].startswith(
        "| 1 | r=8 | 8 | 40.00 | 17.50 | 35.00 | 35.00 | +25.00 pp | 1.6500 | 20s | 2 | done |"
    )
    assert table[2].endswith("| 20s | 2 | failed: rank 0 (node 0): RuntimeError: boom |"), table[2]
    assert table[3].endswith("| 10s | 1 | running: step 1 |"), table[3]
    assert (
        f"Best: r=8 with rougeLsum 35.00 (+25.00 pp vs the original model): {sweep / 'r=8'}" in result.stdout
    )
    assert "(lora, 4 points: 2 done, 1 failed, 1 running)" in result.stdout
    for name in ("report.md", "results.json", "rougeLsum.png", "loss.png"):
        assert (sweep / "report" / name).stat().st_size > 0

    by_loss = run_cli_in_process("report", str(sweep), "--metric", "val_loss")  # lowest first: r=8 again
    assert "Best: r=8 with val_loss 1.6500" in by_loss.stdout, by_loss.stdout
    assert_refused(run_cli_in_process("report", str(sweep), "--metric", "bleu"), "use one of rouge1")
    assert_refused(
        run_cli_in_process("report", str(sweep / "r=8"), "--metric", "rouge1"), "--metric sorts a sweep"
    )


def test_a_point_whose_folder_went_missing_or_lost_its_results_says_so(tmp_path):
    """Status files say these points ended well; their folders say otherwise. A local sweep names
    what is gone (never SLURM's queue); on SLURM, an ended task that is not finished requeued."""
    sweep = tmp_path / "sweep"
    write_lora_r_manifest(sweep, ["r=4", "r=8", "r=16"])
    fake_run(sweep / "r=8", None)  # final/ and eval/ removed by hand
    fake_run(sweep / "r=16", None)
    (sweep / "r=16" / "INTERRUPTED").write_text("step_2\n")
    (sweep / "status").mkdir()
    for index in range(3):  # r=4: its folder is gone
        (sweep / "status" / f"{index}.json").write_text(json.dumps({"state": "ended", "exit_code": 0}))

    def statuses() -> list[str]:
        result = run_cli_in_process("report", str(sweep))
        assert result.returncode == 0, result.stderr
        table = [line for line in result.stdout.splitlines() if line.startswith("| ")][2:]
        return [line.rsplit(" | ", 1)[1].rstrip(" |") for line in table]

    assert statuses() == [
        f"missing: {sweep / 'r=4'} is gone: run the sweep command again to train it",
        "incomplete: final/ or its evaluation is gone: run the sweep command again to redo it",
        "interrupted: run the sweep again to resume it",
    ]
    manifest = json.loads((sweep / "sweep.json").read_text())
    manifest["jobs"] = [{"id": "42", "array": "0-2", "time": 1.0}]  # an array on SLURM
    (sweep / "sweep.json").write_text(json.dumps(manifest))
    assert statuses()[1:] == ["requeued: waits in the queue", "requeued: resumes from step_2"]


@pytest.mark.parametrize(
    "edit, problem",
    [
        (
            lambda m: m["points"][0]["values"].update({"lora.r": 4}),
            "point 0 has values {'lora.r': 4}, not one text",
        ),
        (lambda m: m.update(keys=[]), "keys is not a list of distinct recipe keys"),
        (
            lambda m: m.update(keys=["lora.r", "train.lr"]),
            "point 0 has values {'lora.r': '4'}, not one text value",
        ),
        (lambda m: m["points"][1].update(name=5), "point 1 has name 5, not a folder name"),
        (
            lambda m: m["points"][1].update(name="../elsewhere"),
            "point 1 has name '../elsewhere', not a folder",
        ),
        (lambda m: m.update(args=[1, 2]), "args is not a list of strings"),
        (lambda m: m.update(method="qlora"), "method is 'qlora', not full or lora"),
        (lambda m: m["points"].append("r=64"), "point 2 is not a JSON object"),
    ],
    ids=[
        "number-value",
        "no-keys",
        "missing-value",
        "number-name",
        "name-outside",
        "number-args",
        "method",
        "point",
    ],
)
def test_a_hand_edited_manifest_is_named_field_by_field(tmp_path, edit, problem):
    """The sweep and its report build folder names, command lines and columns from sweep.json."""
    sweep = tmp_path / "sweep"
    write_lora_r_manifest(sweep, ["r=4", "r=8"])
    manifest = json.loads((sweep / "sweep.json").read_text())
    edit(manifest)
    (sweep / "sweep.json").write_text(json.dumps(manifest))
    for args in (
        ("report", str(sweep)),
        ("sweep", "lora", "--grid", "lora.r=4,8", *TINY, "--output", str(sweep)),
    ):
        line = assert_refused(run_cli_in_process(*args), problem)
        assert f"{sweep / 'sweep.json'} is not a sweep manifest" in line and "new --output" in line, line


def test_a_point_s_damaged_files_leave_its_cells_empty(tmp_path):
    """The live table reads what it can: a damaged metrics line or status record of one point shows
    as missing values, and the other points are reported as usual. A damaged fine-tuned rouge.json
    is no blank row of a done point: the point is incomplete, with the line `ftlaunch report POINT`
    refuses the file with, out of the ranking, and the sweep runs it again."""
    from launcher.host.sweep import is_done

    sweep = tmp_path / "sweep"
    write_lora_r_manifest(sweep, ["r=4", "r=8", "r=16"])
    fake_run(sweep / "r=4", 0.30)
    fake_run(sweep / "r=8", 0.35)
    rouge = sweep / "r=8" / "eval" / "finetuned" / "rouge.json"
    rouge.write_text(json.dumps({**json.loads(rouge.read_text()), "rouge1": "0.4"}))
    with (sweep / "r=8" / "metrics.jsonl").open("a") as metrics:
        metrics.write(
            '{"loss": 1.0}\n{"step": 3, "val_loss": "x", "final": true}\n{"step": 2, "loss": 1.0, "elapsed_s": "x"}\n'
        )
    fake_run(sweep / "r=16", None)
    (sweep / "status").mkdir()
    (sweep / "status" / "2.json").write_text(json.dumps({"state": "ended", "exit_code": 1, "log": 5}))
    result = run_cli_in_process("report", str(sweep))
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")][2:]
    assert table[0].startswith(
        "| 1 | r=4 | 4 | 35.00 | 15.00 | 30.00 | 30.00 | +20.00 pp | 1.7000 | 20s | 2 | done"
    ), table
    alone = assert_refused(run_cli_in_process("report", str(sweep / "r=8")), "rouge1 is '0.4', not a number")
    assert table[1] == (
        f"|  | r=8 | 8 | - | - | - | - | - | 1.6500 | 20s | 2 | incomplete: {alone.removeprefix('error: ')}; "
        "or run the sweep command again to redo its evaluation |"
    ), table
    assert table[2].endswith("| failed: exit code 1 |"), table
    assert (
        f"Best: r=4 with rougeLsum 30.00 (+20.00 pp vs the original model): {sweep / 'r=4'}" in result.stdout
    )
    assert "(lora, 3 points: 1 done, 1 incomplete, 1 failed)" in result.stdout, result.stdout
    assert [is_done(sweep / name, None) for name in ("r=4", "r=8")] == [True, False]


# ---------------------------------------------------------------- a real sweep on this machine

# One CPU rank per point; 5 steps at most; fp32, so a resumed point matches an uninterrupted one.
SMALL = [
    *TINY, "--report-to", "none", "--set", "model.precision=fp32", "--set", "train.log_every=1",
    "--set", "eval.compare_original=false",
    "--set", "eval.limit=2", "--set", "eval.max_new_tokens=8", "--set", "data.validation_limit=4",
]  # fmt: skip


def finished_points(sweep: Path) -> dict[str, dict]:
    """Each finished point's fine-tuned rougeLsum and final validation loss, read from its own files."""
    found = {}
    for run_dir in sorted(path for path in sweep.iterdir() if (path / "final").is_dir()):
        rows = read_jsonl(run_dir / "metrics.jsonl")
        found[run_dir.name] = {
            "rougeLsum": json.loads((run_dir / "eval" / "finetuned" / "rouge.json").read_text())["rougeLsum"],
            "val_loss": next(row["val_loss"] for row in rows if row.get("final")),
            "steps": [row["step"] for row in rows if "loss" in row],
        }
    return found


def launch_one_point_really(real_point: str):
    """``launch.run_command`` for an in-process `ftlaunch sweep`: the point named ``real_point``
    through the real launch (the supervisor, command.sh, `accelerate launch`), every other point's
    ranks from the rank harness (tests/rankharness.py)."""
    import rankharness

    from launcher.host import launch

    real_run_command = launch.run_command  # taken before run_cli_in_process replaces it

    def run_command(run_dir: Path, machine_rank: int | None = None) -> int:
        if run_dir.name != real_point:
            return rankharness.run_ranks(run_dir, machine_rank)
        console = sys.stdout  # the captured output: text only, and the supervisor writes bytes
        sys.stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
        try:
            return real_run_command(run_dir, machine_rank)
        finally:
            sys.stdout.flush()
            text = sys.stdout.buffer.getvalue().decode("utf-8", errors="replace")
            sys.stdout = console
            console.write(text)

    return run_command


@pytest.mark.slow
def test_local_sweep_runs_every_point_reports_and_extends(tmp_path):
    """The subject is the sweep itself (its plan, every point run whatever another does, the report,
    the extension): three points' ranks come from the rank harness (what they train is not the
    subject), and the point that fails is launched for real, so that a real launch's failure is
    what the sweep survives and the report names."""
    out = tmp_path / "sweep"
    grid = ["--grid", "train.max_steps=2,5", "--grid", "train.checkpoint_every=2,3"]
    # The injected fault hits the only point that saves a checkpoint at step 4: it fails after step_2.
    failed = "max_steps=5_checkpoint_every=2"
    first = run_cli_in_process(
        *("sweep", "lora", *SMALL, *grid, "--output", str(out)),
        env=cli_env(FTLAUNCH_FAULT_RAISE_IN_SAVE="0:4"),
        run_ranks=launch_one_point_really(failed),
    )
    output = first.stdout + first.stderr
    assert first.returncode == 1, output[-6000:]
    names = ["max_steps=2_checkpoint_every=2", "max_steps=2_checkpoint_every=3",
             "max_steps=5_checkpoint_every=2", "max_steps=5_checkpoint_every=3"]  # fmt: skip
    assert sorted(path.name for path in out.iterdir() if (path / "recipe.yaml").is_file()) == sorted(names)
    done = finished_points(out)
    assert sorted(done) == sorted(set(names) - {failed}), output[-6000:]  # the failure stopped no other point
    assert "1 point(s) failed: max_steps=5_checkpoint_every=2" in first.stderr

    report = run_cli_in_process("report", str(out))
    assert report.returncode == 0, report.stderr
    rows = [line for line in report.stdout.splitlines() if line.startswith("| ")][2:]
    assert len(rows) == 4 and rows[-1].split(" | ")[1] == failed, rows
    assert (
        "failed: rank 0 (node 0): RuntimeError: injected fault: rank 0 raises while saving step 4" in rows[-1]
    )
    best = max(done.values(), key=lambda point: point["rougeLsum"])["rougeLsum"]
    top = rows[0].split(" | ")
    assert top[0] == "| 1" and done[top[1]]["rougeLsum"] == best, rows
    assert f"Best: {top[1]} with rougeLsum {100 * best:.2f}" in report.stdout
    by_loss = run_cli_in_process("report", str(out), "--metric", "val_loss")
    lowest = min(done, key=lambda name: done[name]["val_loss"])
    assert f"Best: {lowest} with val_loss {done[lowest]['val_loss']:.4f}" in by_loss.stdout, by_loss.stdout

    # Extend with one new value (same flags, fault gone): finished points are kept untouched, the
    # failed one resumes from its step_2 checkpoint, the new one runs.
    kept = {name: (out / name / "metrics.jsonl").stat().st_mtime_ns for name in done}
    # Its points' ranks come from the rank harness (tests/rankharness.py): what they resume and
    # compute is checked here; the first sweep's real launch showed the launch and the failure.
    second = run_cli_harness("sweep", "lora", *SMALL, "--grid", "train.max_steps=1", "--grid",
                             "train.checkpoint_every=2", "--output", str(out))  # fmt: skip
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-6000:]
    assert "5 point(s), 3 finished (kept), 2 to run" in output
    assert {name: (out / name / "metrics.jsonl").stat().st_mtime_ns for name in done} == kept
    assert (
        f"resumed from {out / failed}/checkpoints/step_2" in (out / failed / "logs" / "rank0.log").read_text()
    )
    done = finished_points(out)
    assert len(done) == 5 and done[failed]["steps"] == [1, 2, 3, 4, 5], done
    # Checkpointing every 2 or every 3 steps trains the same: the resumed point equals its sibling,
    # and so do the two 2-step points.
    sibling = done["max_steps=5_checkpoint_every=3"]
    assert math.isclose(done[failed]["val_loss"], sibling["val_loss"], rel_tol=1e-5), done
    assert (
        done["max_steps=2_checkpoint_every=2"]["val_loss"]
        == done["max_steps=2_checkpoint_every=3"]["val_loss"]
    )
    assert "(lora, 5 points: 5 done)" in output


@pytest.mark.slow
def test_a_point_with_a_damaged_rouge_json_is_incomplete_and_redone(tmp_path):
    """The best point's fine-tuned rouge.json damaged after a real sweep (ranks from the rank
    harness): the report shows it incomplete with the line `ftlaunch report POINT` gives, and names
    the other point best; the same sweep command runs it again (its evaluation redone from its
    last checkpoint), after which it is done and best with the scores it had."""
    out = tmp_path / "sweep"
    args = ("sweep", "full", *SMALL, "--set", "train.max_steps=2", "--grid", "train.lr=1e-3,2e-3")
    first = run_cli_harness(*args, "--output", str(out))
    assert first.returncode == 0, (first.stdout + first.stderr)[-6000:]
    scores = {name: point["rougeLsum"] for name, point in finished_points(out).items()}
    best, other = sorted(scores, key=scores.get, reverse=True)
    assert scores[best] > scores[other], scores  # the damaged point is the one that scored higher
    rouge = out / best / "eval" / "finetuned" / "rouge.json"
    rouge.write_text('{"rouge1": "x"')

    alone = assert_refused(run_cli_in_process("report", str(out / best)), "is not valid JSON")
    report = run_cli_in_process("report", str(out))
    assert report.returncode == 0, report.stderr
    rows = {line.split(" | ")[1]: line for line in report.stdout.splitlines() if line.startswith("| ")}
    assert rows[best].endswith(
        f"| incomplete: {alone.removeprefix('error: ')}; or run the sweep command again to redo its evaluation |"
    ), rows[best]
    assert f"Best: {other} with rougeLsum {100 * scores[other]:.2f}" in report.stdout, report.stdout
    assert "2 points: 1 done, 1 incomplete" in report.stdout, report.stdout

    again = run_cli_harness(*args, "--output", str(out))
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-6000:]
    assert "2 point(s), 1 finished (kept), 1 to run" in output, output[-6000:]
    assert f"resumed from {out / best}/checkpoints/step_2" in (out / best / "logs" / "rank0.log").read_text()
    assert json.loads(rouge.read_text())["rougeLsum"] == scores[best]
    assert f"Best: {best} with rougeLsum {100 * scores[best]:.2f}" in output, output[-3000:]
    assert "(full, 2 points: 2 done)" in output, output[-3000:]


@pytest.mark.parametrize("point_code", [0, 1], ids=["point ended well", "point failed"])
def test_a_stop_signal_during_a_point_stops_the_sweep_after_it(tmp_path, point_code):
    """Ctrl-C that lands as a point's final evaluation ends (the point then exits 0, or fails) must
    not start the next point: the sweep stops with exit 3 and says how to continue. The launch is
    replaced by a stand-in that receives the signal the way the supervisor does."""
    import signal

    from launcher.host import supervise

    launched = []

    def point_that_gets_ctrl_c(run_dir: Path, machine_rank: int | None = None) -> int:
        launched.append(run_dir.name)
        supervise.note_stop_signal(signal.SIGINT)  # what SignalForwarder.handle records
        return point_code

    out = tmp_path / "sweep"
    result = run_cli_in_process(
        *("sweep", "full", *SMALL, "--grid", "train.lr=1e-4,3e-4", "--output", str(out)),
        run_ranks=point_that_gets_ctrl_c,
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert launched == ["lr=1e-4"]
    assert (
        "sweep stopped after lr=1e-4 (a stop signal came as it ended): run the same command again"
        in result.stderr
    )


def test_a_rank_started_with_stop_signals_ignored_obeys_them(tmp_path):
    """bash starts `ftlaunch ... &` with SIGINT ignored and the ranks inherit that: a rank resets
    the stop signals it finds ignored, so the supervisor's forwarded Ctrl-C still stops it."""
    code = (
        "import signal\n"
        "from launcher.core.ranklog import obey_stop_signals\n"
        "assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN\n"
        "obey_stop_signals()\n"
        "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler, "
        "signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL)\n"
    )
    import signal

    def ignore_stop_signals():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)

    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        preexec_fn=ignore_stop_signals,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "True"]
