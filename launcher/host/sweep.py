"""``ftlaunch sweep full|lora``: many fine-tunes of one method, one ordinary run directory per point
under SWEEP/, run one after another on this machine or as one SLURM job array (``--slurm``).

SWEEP/ holds:

* ``sweep.json``: the manifest (method, the flags every point shares, the points: index, directory
  name, values), written only here;
* ``<point>/``: each point's run directory, exactly as ``ftlaunch full|lora --output`` makes it;
* ``status/<index>.json``: how a point's latest attempt stands (running, or ended with an exit
  code), written here for local runs and by ``slurm/sweep.sh`` for array tasks;
* ``slurm/<index>.args`` (the ``ftlaunch`` arguments of array task ``index``) and ``slurm/logs/``;
* ``report/``: ``ftlaunch report SWEEP`` (sweep_report.py).

Every point is validated (its recipe, data, model, run directory) before anything is written or
started. Re-running the command with more values extends the sweep: finished points are kept,
failed or interrupted ones resume from their newest checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.core.errors import EXIT_CRASHED, EXIT_INTERRUPTED, UserError
from launcher.core.paths import PACKAGE_DIR
from launcher.core.rundir import RunDir, SweepDir
from launcher.core.writable import check_writable_dir
from launcher.host.options import FLAG_KEYS, TrainOptions, train_recipe
from launcher.host.sweep_grid import Values, grid_points, parse_grid, point_name, read_variants
from launcher.host.sweep_manifest import (
    MANIFEST,
    Point,
    Sweep,
    is_sweep,
    read_sweep,
    status_path,
    write_manifest,
    write_status,
)
from launcher.results.report import eval_scores_problem

# Flags of full/lora that make no sense for a sweep's points, and why.
REFUSED = {
    "resume": "--resume: a sweep always continues its points (finished ones are kept, the others "
    "resume from their newest checkpoint); drop --resume",
    "overwrite": "--overwrite: a sweep never replaces a point's run; delete SWEEP/POINT to run that "
    "point again",
    "machine_rank": "--machine-rank: a sweep runs its points here one after another, or as a SLURM "
    "job array with --slurm; --machine-rank is for one multi-node run outside SLURM",
}
# The job environment must not redirect a point (its arguments say where it goes and what it runs).
JOB_ENV_DROPPED = ("FTLAUNCH_OUTPUT", "FTLAUNCH_RECIPE", "FTLAUNCH_GPUS_PER_NODE")


# ---------------------------------------------------------------- planning: points and their recipes

# (method, arguments) -> the options `ftlaunch METHOD ARGUMENTS` would run with (cli.parse_train_flags)
FlagParser = Callable[[str, list[str]], dict[str, Any]]


def parse_train_options(method: str, args: list[str], parse_flags: FlagParser) -> dict[str, Any]:
    """The flags of `ftlaunch full|lora` among the sweep's arguments, parsed by that very command
    (``parse_flags``: the CLI hands its own parser in), less the ones a sweep refuses."""
    options = parse_flags(method, list(args))
    for name, message in REFUSED.items():
        if options.get(name) not in (None, False):
            raise UserError(message)
    return options


def fixed_keys(options: dict[str, Any]) -> dict[str, str]:
    """Recipe keys a flag sets (flags win over --set, so over a grid value too) -> the flag."""
    fixed = {key: f"--{flag.replace('_', '-')}" for flag, key in FLAG_KEYS.items() if options.get(flag)}
    if options.get("zero") == "auto":
        fixed["launch.offload"] = "--zero auto"
    return fixed


def new_point_values(grid: list[str], variants: Path | None) -> list[Values]:
    if bool(grid) == bool(variants):
        raise UserError(
            "give the points either as --grid KEY=V1,V2 (one or more) or as --variants FILE.yaml, not both"
            if grid
            else "a sweep needs its points: --grid KEY=V1,V2 (one or more), or --variants FILE.yaml"
        )
    return grid_points(parse_grid(grid)) if grid else read_variants(variants)


def plan_sweep(method: str, args: list[str], values: list[Values], sweep_dir: Path) -> Sweep:
    """The sweep in SWEEP/ (read back when it exists) with the new points added after the old ones."""
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise UserError(f"--output {sweep_dir} is a file; pass a directory for the sweep")
    if is_sweep(sweep_dir):
        sweep = read_sweep(sweep_dir)
        if sweep.method != method or sweep.args != args:
            raise UserError(
                f"--output {sweep_dir} holds a sweep made with other flags (ftlaunch sweep {sweep.method} "
                f"{' '.join(sweep.args)}); extend it with the same flags, or pick a new --output"
            )
    elif sweep_dir.is_dir() and any(sweep_dir.iterdir()):
        raise UserError(
            f"--output {sweep_dir} is not empty and holds no sweep (no {MANIFEST}); pick a new directory"
        )
    else:
        sweep = Sweep(sweep_dir, method, list(args), [])
    for point in values:
        sweep.keys += [key for key in point if key not in sweep.keys]
    known = {json.dumps(point.values, sort_keys=True) for point in sweep.points}
    for point in values:
        if json.dumps(point, sort_keys=True) not in known:
            known.add(json.dumps(point, sort_keys=True))
            sweep.points.append(Point(len(sweep.points), point_name(point, sweep.keys), point))
    names: dict[str, Point] = {}
    for point in sweep.points:
        other = names.setdefault(point.name, point)
        if other is not point:
            raise UserError(
                f"the points {other.values} and {point.values} would share the run directory "
                f"{point.name}; give values that differ in letters, digits or . _ = + -"
            )
    return sweep


def point_recipe(method: str, options: dict[str, Any], point: Point, fixed: dict[str, str]):
    """The point's recipe, validated like `ftlaunch METHOD ... --set KEY=VALUE` would."""
    for key in point.values:
        if key in fixed:
            raise UserError(
                f"sweep point {point.name}: {key} is varied but {fixed[key]} fixes it; drop one of them"
            )
    try:
        recipe, _ = train_recipe(method, TrainOptions.from_params(options).with_overrides(point.sets()))
    except UserError as exc:
        # A bad value of a key the point varies is the point's: its name replaces the --set blame
        # (the point's values reach the recipe as --set overrides).
        own = exc.source in ("--set", "command line") and exc.key in point.values
        text = exc.reason if own else str(exc)
        raise UserError(
            f"sweep point {point.name}: {text}", key=exc.key, source=f"sweep point {point.name}", reason=text
        ) from None
    return recipe


def check_keys_apply(method: str, keys: list[str]) -> None:
    """A full fine-tune trains no adapters: varying lora.* there would train the same run twice."""
    unused = [key for key in keys if method == "full" and key.startswith("lora.")]
    if unused:
        raise UserError(
            f"{unused[0]} is varied, but ftlaunch sweep full trains no LoRA adapters (every point would be "
            "the same run); drop it, or sweep lora"
        )


def check_points_differ(points: list[Point], recipes: list) -> None:
    """Values spelled differently may mean the same (``1e-3`` and ``0.001``, ``1`` and ``01``):
    two points with one resolved recipe would train the same run twice."""
    seen: dict[str, Point] = {}
    for point, recipe in zip(points, recipes):
        earlier = seen.setdefault(recipe.model_dump_json(), point)
        if earlier is not point:
            raise UserError(
                f"sweep points {earlier.name} and {point.name} give the same recipe "
                f"({', '.join(point.sets())} is {', '.join(earlier.sets())}); give each value once"
            )


def is_done(run_dir: Path, recipe) -> bool:
    """A finished point (RunDir.is_finished: the one rule the sweep report uses too); one whose
    fine-tuned rouge.json cannot be read runs again (its evaluation is redone)."""
    return RunDir(run_dir).is_finished(recipe, eval_scores_problem)


def set_args(point: Point) -> list[str]:
    return [arg for item in point.sets() for arg in ("--set", item)]


def point_argv(sweep: Sweep, point: Point) -> list[str]:
    """What `ftlaunch` runs for the point (also the comment in its command.sh)."""
    run_dir = str(sweep.run_dir(point))
    return ["ftlaunch", sweep.method, *sweep.args, *set_args(point), "--output", run_dir, "--resume", "auto"]


def prepare_point(sweep: Sweep, point: Point, recipe, options: dict[str, Any], dry_run: bool) -> list[str]:
    """The point's run directory as `ftlaunch METHOD ... --output SWEEP/POINT --resume auto` prepares it."""
    from launcher.host import launch

    return launch.prepare_launch(
        recipe,
        sweep.run_dir(point),
        resume="auto",
        overwrite=False,
        force_resume=options["force_resume"],
        dry_run=dry_run,
        argv=point_argv(sweep, point),
    )


# ---------------------------------------------------------------- the command


def run_sweep(
    method: str,
    args: list[str],
    grid: list[str],
    variants: Path | None,
    output: Path,
    *,
    slurm: bool,
    max_parallel: int | None,
    sbatch_args: list[str],
    dry_run: bool,
    parse_flags: FlagParser,
) -> int:
    """Plan and check every point, then run them here one after another, or submit one job array."""
    from launcher.host import launch

    if (max_parallel is not None or sbatch_args) and not slurm:
        raise UserError("--max-parallel and --sbatch shape the SLURM job array: add --slurm")
    options = parse_train_options(method, args, parse_flags)
    check_writable_dir(output.expanduser().resolve(), "--output")
    sweep = plan_sweep(method, list(args), new_point_values(grid, variants), output.expanduser().resolve())
    fixed = fixed_keys(options)
    check_keys_apply(method, sweep.keys)
    recipes = [point_recipe(method, options, point, fixed) for point in sweep.points]
    check_points_differ(sweep.points, recipes)
    if not slurm and not dry_run and any(recipe.launch.nodes > 1 for recipe in recipes):
        raise UserError(
            "a sweep without --slurm runs on this machine only: add --slurm for multi-node points"
        )
    done = [is_done(sweep.run_dir(point), recipe) for point, recipe in zip(sweep.points, recipes)]
    for point, recipe, finished in zip(sweep.points, recipes, done):
        if finished:
            continue
        try:
            launch.check_launch(
                recipe,
                sweep.run_dir(point),
                resume="auto",
                overwrite=False,
                force_resume=options["force_resume"],
                dry_run=dry_run or slurm,
            )
        except UserError as exc:
            raise UserError(f"sweep point {point.name}: {exc}") from None
    if slurm:
        return submit_array(sweep, options, recipes, done, max_parallel, sbatch_args, dry_run)
    return run_here(sweep, options, recipes, done, dry_run)


def print_plan(sweep: Sweep, done: list[bool]) -> None:
    todo = done.count(False)
    print(
        f"sweep {sweep.dir}: {len(sweep.points)} point(s), {len(sweep.points) - todo} finished (kept), {todo} to run"
    )
    for point, finished in zip(sweep.points, done):
        print(f"  [{point.index}] {point.name}{'  (finished: kept)' if finished else ''}")


@contextlib.contextmanager
def sweep_lock(sweep: Sweep):
    """One `ftlaunch sweep` at a time in a sweep directory (a second would run the same points)."""
    sweep.dir.mkdir(parents=True, exist_ok=True)
    with SweepDir(sweep.dir).lock.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another `ftlaunch sweep` is running in {sweep.dir}; wait for it to end"
            ) from None
        yield


def run_here(sweep: Sweep, options: dict[str, Any], recipes: list, done: list[bool], dry_run: bool) -> int:
    """Each unfinished point in turn through `ftlaunch full|lora`'s own launch path; a failed point
    does not stop the others; an interrupted one (Ctrl-C) stops the sweep."""
    from launcher.host import launch
    from launcher.host.console import command_line, run_summary
    from launcher.host.supervise import stop_signals_received

    print_plan(sweep, done)
    with sweep_lock(sweep):
        write_manifest(sweep)
        codes: dict[str, int] = {}
        todo = [
            (point, recipe) for point, recipe, finished in zip(sweep.points, recipes, done) if not finished
        ]
        for number, (point, recipe) in enumerate(todo, start=1):
            run_dir = sweep.run_dir(point)
            print(f"\n===== sweep point [{point.index}] {point.name} ({number}/{len(todo)})", flush=True)
            notes = prepare_point(sweep, point, recipe, options, dry_run)
            for note in notes:
                print(f"warning: {note}", file=sys.stderr)
            print(run_summary(recipe, run_dir))
            print(command_line(run_dir), flush=True)
            if dry_run:
                continue
            write_status(sweep.dir, point.index, "running")
            signals = stop_signals_received()
            codes[point.name] = launch.run_command(run_dir)
            write_status(sweep.dir, point.index, "ended", codes[point.name])
            if codes[point.name] == EXIT_INTERRUPTED:
                print(
                    f"sweep interrupted at {point.name}: run the same command again to continue",
                    file=sys.stderr,
                )
                return EXIT_INTERRUPTED
            if stop_signals_received() > signals:  # it came as the point ended: stop before the next
                print(
                    f"sweep stopped after {point.name} (a stop signal came as it ended): run the same "
                    "command again to continue",
                    file=sys.stderr,
                )
                return EXIT_INTERRUPTED
    if dry_run:
        print("\ndry run: every point rendered, nothing launched")
        return 0
    from launcher.host.sweep_report import write_sweep_report

    print("\n" + write_sweep_report(sweep.dir))
    failed = [name for name, code in codes.items() if code != 0]
    if failed:
        print(f"{len(failed)} point(s) failed: {', '.join(failed)}; fix the cause and run the same command "
              "again (finished points are kept)", file=sys.stderr)  # fmt: skip
    return EXIT_CRASHED if failed else 0


# ---------------------------------------------------------------- SLURM: one job array


def sweep_script() -> Path:
    """slurm/sweep.sh of this ftlaunch checkout (it sources slurm/common.sh beside it)."""
    script = PACKAGE_DIR.parent / "slurm" / "sweep.sh"
    if not script.is_file():
        raise UserError(
            f"--slurm needs the slurm/ folder of an ftlaunch checkout (not found: {script}); "
            "install ftlaunch from its repository (pip install -e .)"
        )
    return script


def array_spec(indices: list[int], max_parallel: int | None) -> str:
    """``0-3%2``: ranges of the indices to run, throttled to ``max_parallel`` tasks at once."""
    ranges, start = [], None
    for position, index in enumerate(indices):
        if start is None:
            start = index
        if position + 1 == len(indices) or indices[position + 1] != index + 1:
            ranges.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ",".join(ranges) + (f"%{max_parallel}" if max_parallel else "")


def task_args(sweep: Sweep, options: dict[str, Any], point: Point, recipe) -> list[str]:
    """The `ftlaunch METHOD` arguments of the point's array task, after slurm/common.sh's own
    (--nodes, --gpus, --output, --resume auto): the recipe, the point's values and its GPU count
    come last, so they win over the job's defaults."""
    from launcher.core.recipe_loading import default_recipe_path

    recipe_args = [] if options["recipe_path"] else ["--recipe", str(default_recipe_path(sweep.method))]
    return [
        *sweep.args,
        *recipe_args,
        *set_args(point),
        "--gpus",
        str(recipe.launch.gpus),
        "--output",
        str(sweep.run_dir(point)),
    ]


def active_jobs(sweep: Sweep) -> list[str]:
    """Array jobs of this sweep still queued or running (their tasks would share run directories)."""
    active = []
    for job in sweep.jobs:
        result = subprocess.run(
            ["squeue", "-h", "-j", str(job["id"]), "-o", "%i"], capture_output=True, text=True
        )
        if result.returncode == 0 and result.stdout.strip():
            active.append(str(job["id"]))
    return active


def submit_array(
    sweep: Sweep,
    options: dict[str, Any],
    recipes: list,
    done: list[bool],
    max_parallel: int | None,
    sbatch_args: list[str],
    dry_run: bool,
) -> int:
    """Render every unfinished point and submit them as one `sbatch --array` of slurm/sweep.sh."""

    script = sweep_script()
    todo = [point for point, finished in zip(sweep.points, done) if not finished]
    node_counts = {recipe.launch.nodes for recipe in recipes}
    if len(node_counts) > 1:
        raise UserError("one job array has one node count: launch.nodes cannot vary in a --slurm sweep")
    if not dry_run:
        if shutil.which("sbatch") is None:
            raise UserError(
                "--slurm: sbatch is not on PATH; submit from a SLURM login node (or use --dry-run)"
            )
        running = active_jobs(sweep)
        if running:
            raise UserError(
                f"array job {', '.join(running)} of this sweep is still queued or running (squeue -j "
                f"{running[0]}); wait for it or scancel it, then run the sweep again"
            )
    print_plan(sweep, done)
    if not todo:
        print("nothing to submit: every point is finished")
        return 0
    logs = SweepDir(sweep.dir).slurm_logs
    logs.mkdir(parents=True, exist_ok=True)
    gpus = max(recipes[point.index].launch.gpus for point in todo)
    cpu = all(recipes[point.index].launch.cpu for point in todo)
    for point in todo:
        recipe = recipes[point.index]
        prepare_point(sweep, point, recipe, options, dry_run=True)
        args = task_args(sweep, options, point, recipe)
        SweepDir(sweep.dir).slurm_args(point.index).write_bytes(b"".join(a.encode() + b"\0" for a in args))
    spec = array_spec([point.index for point in todo], max_parallel)
    command = [
        "sbatch",
        "--parsable",
        f"--array={spec}",
        f"--nodes={node_counts.pop()}",
        *([] if cpu else [f"--gres=gpu:{gpus}"]),
        f"--output={logs}/%A_%a.out",
        *sbatch_args,
        str(script),
    ]
    env = {key: value for key, value in os.environ.items() if key not in JOB_ENV_DROPPED}
    env.update(
        FTLAUNCH_METHOD=sweep.method, FTLAUNCH_SWEEP=str(sweep.dir), FTLAUNCH_REPO=str(script.parent.parent)
    )
    print("$ " + " ".join(command))
    write_manifest(sweep)
    if dry_run:
        print("dry run: every point rendered, nothing submitted")
        return 0
    for point in todo:
        status_path(sweep.dir, point.index).unlink(missing_ok=True)  # pending again, not failed
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"sbatch refused the job array (exit {result.returncode}): {last}")
    job_id = result.stdout.strip().split(";")[0]
    sweep.jobs.append({"id": job_id, "array": spec, "time": time.time()})
    write_manifest(sweep)
    print(
        f"submitted array job {job_id}: {len(todo)} task(s){f', at most {max_parallel} at once' if max_parallel else ''}; "
        f"logs in {logs}/; follow with: squeue -j {job_id}; ftlaunch report {sweep.dir}"
    )
    return 0
