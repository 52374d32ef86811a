"""The ``ftlaunch`` command line (Typer): full | lora | sweep | eval | summarize | export | score | report | estimate | recipe.

Every command turns bad input into ``error: <one line>`` and exit code 2 (``--debug`` shows the
traceback); nothing is written before the input has been checked.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from launcher.core.errors import EXIT_INTERRUPTED, EXIT_USAGE, UserError
from launcher.core.rundir import ResultDir, RunDir
from launcher.host.options import (
    FLAG_KEYS,
    EvalOptions,
    Offload,
    TrainOptions,
    eval_recipe,
    ignored_overrides,
    train_recipe,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune FLAN-T5 for dialogue summarization on one GPU, many GPUs or many nodes, "
    "and end every run with a ROUGE report.",
)


def user_errors(command: Callable) -> Callable:
    """One line and exit 2 for UserError; a traceback only with --debug (or FTLAUNCH_DEBUG=1)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            if os.environ.get("FTLAUNCH_DEBUG") == "1":
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_USAGE) from None

    return wrapper


def debug_callback(value: bool) -> None:
    if value:
        os.environ["FTLAUNCH_DEBUG"] = "1"


DebugOption = typer.Option(False, "--debug", help="Show tracebacks.", callback=debug_callback, is_eager=True)


def gib_amount(value: float | None) -> float | None:
    """--gpu-mem: a positive, finite GiB count (with inf every stage "fits", with nan none does)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value:g} is not a positive number of GiB; e.g. --gpu-mem 80")
    return value


def without_option(args: list[str], option: str) -> list[str]:
    """``args`` less ``option VALUE`` / ``option=VALUE``: what differs per node stays out of command.sh."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


def default_output(method: str, model: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{method}-{Path(model).name}-{stamp}"


def key_help(flag: str, extra: str = "") -> str:
    """A flag's help: the description of the recipe key it sets (launcher/core/recipe.py), and the key."""
    from launcher.core.recipe_loading import key_description

    key = FLAG_KEYS[flag]
    return f"{key_description(key).rstrip('.')}{extra} (recipe key {key})"


def train_command(method: str):
    """Build the `full` / `lora` command (same flags, different recipe)."""

    @user_errors
    def command(
        gpus: int | None = typer.Option(None, "--gpus", help=key_help("gpus")),
        nodes: int | None = typer.Option(None, "--nodes", help=key_help("nodes")),
        zero: str | None = typer.Option(
            None, "--zero", help=key_help("zero", "; auto: the smallest that fits --gpu-mem")
        ),
        gpu_mem: float | None = typer.Option(
            None, "--gpu-mem", help="GiB per GPU for --zero auto (default: detected).", callback=gib_amount
        ),
        offload: Offload | None = typer.Option(None, "--offload", help=key_help("offload")),
        fsdp: bool = typer.Option(False, "--fsdp", help=key_help("fsdp")),
        recipe_path: Path | None = typer.Option(
            None, "--recipe", help=f"Recipe YAML (default: recipes/{method}.yaml)."
        ),
        model: str | None = typer.Option(None, "--model", help=key_help("model")),
        data: str | None = typer.Option(None, "--data", help=key_help("data")),
        overrides: list[str] = typer.Option([], "--set", help="Override a recipe key: --set train.lr=3e-4."),
        output: Path | None = typer.Option(
            None, "--output", help="Run directory (default: runs/<method>-<model>-<time>)."
        ),
        cpu: bool = typer.Option(False, "--cpu", help=key_help("cpu")),
        report_to: str | None = typer.Option(None, "--report-to", help=key_help("report_to")),
        dry_run: bool = typer.Option(
            False, "--dry-run", help="Write the configs and command, launch nothing."
        ),
        resume: str | None = typer.Option(
            None, "--resume", help="auto (newest checkpoint) or a checkpoint dir."
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different run in --output."),
        force_resume: bool = typer.Option(
            False, "--force-resume", help="Resume despite a changed run shape."
        ),
        main_address: str | None = typer.Option(None, "--main-address", help=key_help("main_address")),
        main_port: int | None = typer.Option(None, "--main-port", help=key_help("main_port")),
        max_restarts: int | None = typer.Option(None, "--max-restarts", help=key_help("max_restarts")),
        machine_rank: int | None = typer.Option(
            None,
            "--machine-rank",
            help="Multi-node: this node's rank (default: $FTLAUNCH_MACHINE_RANK, $SLURM_NODEID).",
        ),
        debug: bool = DebugOption,
    ) -> None:
        from launcher.host import launch

        if resume is not None and not resume.strip():  # "$CKPT" with the variable unset
            raise UserError(
                f"--resume {resume!r} names no checkpoint: pass auto (the newest), a checkpoint "
                "folder, or leave --resume out to start from scratch"
            )
        recipe, zero_note = train_recipe(
            method,
            TrainOptions(
                recipe_path=recipe_path,
                overrides=overrides,
                model=model,
                data=data,
                gpus=gpus,
                nodes=nodes,
                zero=zero,
                gpu_mem=gpu_mem,
                offload=offload,
                fsdp=fsdp,
                cpu=cpu,
                report_to=report_to,
                main_address=main_address,
                main_port=main_port,
                max_restarts=max_restarts,
            ),
        )
        run_dir = (output or default_output(method, recipe.model.name)).expanduser().resolve()
        rank = launch.resolve_machine_rank(recipe, machine_rank, dict(os.environ), dry_run)
        recipe, kept = launch.keep_effective_batch(recipe, run_dir, resume, force_resume)
        recipe, found = launch.keep_found_batch(recipe, run_dir, resume, force_resume)
        notes = (
            kept
            + found
            + launch.prepare_launch(
                recipe,
                run_dir,
                resume=resume,
                overwrite=overwrite,
                force_resume=force_resume,
                dry_run=dry_run,
                argv=["ftlaunch", method, *without_option(sys.argv[2:], "--machine-rank")],
                machine_rank=rank,
            )
        )

        from launcher.host.console import command_line, run_summary

        for note in [*ignored_overrides(method, overrides), *notes]:
            typer.echo(f"warning: {note}", err=True)
        typer.echo(run_summary(recipe, run_dir, (("zero auto", zero_note),) if zero_note else ()))
        typer.echo(command_line(run_dir))
        if dry_run:
            typer.echo("dry run: nothing launched")
            return
        raise typer.Exit(launch.run_command(run_dir, rank))

    command.__doc__ = (
        "Full fine-tuning (every weight)." if method == "full" else "LoRA fine-tuning (adapters on q and v)."
    )
    return command


app.command("full", help="Full fine-tuning: render configs and launch (or --dry-run).")(train_command("full"))
app.command("lora", help="LoRA fine-tuning: render configs and launch (or --dry-run).")(train_command("lora"))


@app.command("eval")
@user_errors
def eval_command(
    model: str = typer.Option("tiny-t5", "--model", help="Hub id, local path, or tiny-t5."),
    adapter: Path | None = typer.Option(None, "--adapter", help="LoRA adapter directory (a run's final/)."),
    data: str = typer.Option("sample", "--data", help="Hub id, directory of JSONL splits, or sample."),
    split: str = typer.Option("test", "--split"),
    gpus: int = typer.Option(1, "--gpus", help="Ranks on this node."),
    zero: str = typer.Option(
        "0", "--zero", help="0: each rank holds the model; 3: weights sharded (ZeRO-3)."
    ),
    cpu: bool = typer.Option(False, "--cpu", help="Run the ranks as CPU processes (gloo)."),
    limit: int | None = typer.Option(None, "--limit", help="First K examples only."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe key (eval.*, data.*, model.*)."),
    output: Path = typer.Option(..., "--output", help="Writes predictions.jsonl and rouge.json here."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Write the configs and command, launch nothing."),
    debug: bool = DebugOption,
) -> None:
    """Generate with one model on one split across ranks, and score it with ROUGE."""
    from launcher.core.modelfiles import check_model_files
    from launcher.core.prompt_room import check_prompt_room_on_host
    from launcher.core.writable import check_writable_dir
    from launcher.host import launch, runlock
    from launcher.host.render import EVAL_MODULE, RankEntry
    from launcher.host.summarize import adapter_on_another_base

    recipe = eval_recipe(
        EvalOptions(
            model=model,
            adapter=adapter,
            data=data,
            split=split,
            limit=limit,
            gpus=gpus,
            zero=zero,
            cpu=cpu,
            overrides=overrides,
        )
    )
    if adapter and not (adapter / "adapter_config.json").is_file():
        inner = RunDir(adapter).final / "adapter_config.json"
        fix = f"pass --adapter {inner.parent}" if inner.is_file() else "pass the final/ folder of a LoRA run"
        raise UserError(f"--adapter {adapter} has no adapter_config.json; {fix}")
    if adapter:
        check_model_files(adapter, "--adapter")
        other_base = adapter_on_another_base(adapter, model)
        if other_base:
            typer.echo(f"warning: {other_base}", err=True)
    launch.check_eval_data(recipe)
    launch.check_hub_ids(recipe)
    launch.local_model_dir(model)
    launch.check_local_tokenizer(recipe)
    check_prompt_room_on_host(recipe)
    if not dry_run:
        if not cpu:
            launch.check_gpus(recipe)
        launch.check_hub_references(recipe)
    run_dir = output.expanduser().resolve()
    runlock.check_free(run_dir)  # an evaluation is a run: one per directory at a time
    launch.check_eval_output(run_dir, recipe)
    check_writable_dir(run_dir, "--output")
    entry = RankEntry(["ftlaunch", "eval", *sys.argv[2:]], module=EVAL_MODULE)
    if not dry_run:
        runlock.hold(run_dir)  # before its files are written
    launch.write_run_files(recipe, run_dir, entry)
    from launcher.host.console import command_line

    typer.echo(command_line(run_dir))
    if dry_run:
        return
    raise typer.Exit(launch.run_command(run_dir))


@app.command("summarize")
@user_errors
def summarize_command(
    source: Path = typer.Argument(
        ..., help="A run directory, its final/ folder (model or LoRA adapter), or a seq2seq model folder."
    ),
    input_path: str = typer.Option(
        "-", "--input", help="JSON Lines with dialogue (+ id), a text file (one dialogue), or - (stdin)."
    ),
    output: Path | None = typer.Option(
        None, "--output", help="Write JSON Lines {id, summary} here [stdout]."
    ),
    gpus: int = typer.Option(1, "--gpus", help="Ranks on this node."),
    cpu: bool = typer.Option(False, "--cpu", help="Run the ranks as CPU processes (gloo)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a setting: --set eval.num_beams=4."),
    debug: bool = DebugOption,
) -> None:
    """Summarize new dialogues with the prompt and generation settings the model was evaluated with."""
    from launcher.host.summarize import summarize

    summarize(source, input_path, output, gpus, cpu, overrides, ["ftlaunch", "summarize", *sys.argv[2:]])


@app.command("export")
@user_errors
def export_command(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    merge: bool = typer.Option(False, "--merge", help="LoRA: fold the adapter into its base model."),
    dtype: str = typer.Option("fp32", "--dtype", help="Weights in bf16 or fp32."),
    output: Path = typer.Option(..., "--output", help="The standalone model folder to write."),
    push_to_hub: str | None = typer.Option(
        None, "--push-to-hub", metavar="NAMESPACE/NAME", help="Then upload the folder to this Hub model repo."
    ),
    private: bool = typer.Option(False, "--private", help="--push-to-hub: create the repo private."),
    debug: bool = DebugOption,
) -> None:
    """A standalone model folder: weights (merged LoRA), tokenizer, generation settings, card."""
    from launcher.host.hub import check_push, push_folder
    from launcher.rank.export import export_run

    if private and not push_to_hub:
        raise UserError("--private applies to --push-to-hub REPO; add it, or drop --private")
    if push_to_hub:
        check_push(push_to_hub)
    folder = export_run(run_dir, output, merge, dtype)
    typer.echo(f"exported to {folder}")
    if push_to_hub:
        url = push_folder(folder, push_to_hub, private, f"ftlaunch export of {run_dir.resolve().name}")
        typer.echo(f"uploaded to {url}")


@app.command("sweep", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def sweep_command(
    ctx: typer.Context,
    method: str = typer.Argument(..., help="full or lora (then any flag of `ftlaunch full|lora`)."),
    grid: list[str] = typer.Option(
        [], "--grid", help="KEY=V1,V2,...: values of a recipe key; several --grid: every combination."
    ),
    variants: Path | None = typer.Option(
        None, "--variants", help="YAML list of variants, each a mapping of recipe keys (instead of --grid)."
    ),
    output: Path = typer.Option(..., "--output", help="Sweep directory: one run directory per point."),
    slurm: bool = typer.Option(False, "--slurm", help="Submit the points as one SLURM job array."),
    max_parallel: int | None = typer.Option(
        None, "--max-parallel", min=1, help="--slurm: at most K array tasks at once (%K)."
    ),
    sbatch_args: list[str] = typer.Option(
        [], "--sbatch", help="--slurm: an sbatch option for the array, e.g. --sbatch=--partition=gpu."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Render every point, launch or submit nothing."),
    debug: bool = DebugOption,
) -> None:
    """Fine-tune once per point of a grid (flags of full/lora apply to all): here one after another, or one SLURM array."""
    from launcher.host.sweep import run_sweep

    if method not in ("full", "lora"):
        raise UserError(
            f"ftlaunch sweep {method}: sweep full or lora, e.g. ftlaunch sweep lora --grid lora.r=8,32"
        )
    code = run_sweep(
        method,
        ctx.args,
        grid,
        variants,
        output,
        slurm=slurm,
        max_parallel=max_parallel,
        sbatch_args=sbatch_args,
        dry_run=dry_run,
        parse_flags=parse_train_flags,
    )
    raise typer.Exit(code)


def parse_train_flags(method: str, args: list[str]) -> dict[str, Any]:
    """The options `ftlaunch METHOD ARGS` would run with, parsed by that very command (a sweep's
    shared flags); a usage error is one line naming the command."""
    import typer.main

    command = typer.main.get_command(app).commands[method]
    usage_errors = click_exceptions()[0]
    try:
        return dict(command.make_context(f"ftlaunch {method}", list(args)).params)
    except usage_errors as exc:
        raise UserError(
            f"{exc.format_message()} (a sweep takes the flags of `ftlaunch {method} --help`)"
        ) from None


@app.command("supervise", hidden=True)
@user_errors
def supervise_command(
    run_dir: Path = typer.Argument(
        ..., help="A run directory rendered by `ftlaunch full|lora|eval --dry-run`."
    ),
    debug: bool = DebugOption,
) -> None:
    """Run RUN/command.sh on this node as `ftlaunch` does (the SLURM job scripts' srun task)."""
    from launcher.core.diskspace import check_free_space
    from launcher.core.recipe_loading import read_run_recipe
    from launcher.host import launch

    run_dir = run_dir.expanduser().resolve()
    command_sh = RunDir(run_dir).command_sh
    if not command_sh.is_file():
        raise UserError(
            f"{run_dir} has no {command_sh.name}; render it first with `ftlaunch full|lora ... --dry-run`"
        )
    from launcher.core.writable import check_writable_dir

    check_writable_dir(run_dir, "run directory")  # logs, metrics, checkpoints are written there
    if "-m launcher.rank.train " in command_sh.read_text():  # a training run (not `ftlaunch eval`)
        check_free_space(read_run_recipe(run_dir), run_dir)
    raise typer.Exit(launch.run_command(run_dir))


@app.command("estimate")
@user_errors
def estimate_command(
    model: str = typer.Option(
        "google/flan-t5-base",
        "--model",
        help="Known name (flan-t5-small..xxl), flan-t5-all, tiny-t5 or a local directory.",
    ),
    gpus: int = typer.Option(1, "--gpus", help="GPUs per node."),
    nodes: int = typer.Option(1, "--nodes"),
    gpu_mem: float | None = typer.Option(
        None, "--gpu-mem", help="GiB per GPU (default: detected, else 80).", callback=gib_amount
    ),
    lora: bool = typer.Option(False, "--lora", help="LoRA (r=32 on q, v) instead of full fine-tuning."),
    fsdp: bool = typer.Option(True, "--fsdp/--no-fsdp", help="Also the FSDP2 rows (--fsdp)."),
    micro_batch: int = typer.Option(8, "--micro-batch", help="Micro batch per GPU (activations)."),
    micro_batch_tokens: int | None = typer.Option(
        None,
        "--micro-batch-tokens",
        help="Token budget per micro-batch (train.micro_batch_tokens); replaces --micro-batch.",
    ),
    source_len: int = typer.Option(512, "--source-len"),
    target_len: int = typer.Option(128, "--target-len"),
    gradient_checkpointing: bool = typer.Option(
        False,
        "--gradient-checkpointing",
        help="Activations with train.gradient_checkpointing (the table shows the other case too).",
    ),
    optimizer: str = typer.Option(
        "adamw", "--optimizer", help="adamw or adafactor (train.optimizer; adafactor: not with FSDP2)."
    ),
    debug: bool = DebugOption,
) -> None:
    """Per-GPU memory for each ZeRO stage and offload (ftlaunch's fp32 model states + activations)."""
    from launcher.host import estimate

    if gpus < 1 or nodes < 1 or micro_batch < 1:
        raise UserError("--gpus, --nodes and --micro-batch must be at least 1")
    for flag, length in (("--source-len", source_len), ("--target-len", target_len)):
        if length < 1:
            raise UserError(f"{flag} {length}: tokens per example must be at least 1")
    if optimizer not in ("adamw", "adafactor"):
        raise UserError(f"--optimizer {optimizer!r} is not one of adamw, adafactor")
    if micro_batch_tokens is not None:
        if micro_batch_tokens < source_len + target_len:
            raise UserError(
                f"--micro-batch-tokens {micro_batch_tokens} is smaller than one example of "
                f"--source-len {source_len} + --target-len {target_len}; use at least {source_len + target_len}"
            )
        micro_batch = estimate.budget_micro_batch(micro_batch_tokens, source_len, target_len)
    memory = gpu_mem or estimate.detect_gpu_mem_gib() or 80.0
    shape = estimate.RunShape(
        gpus,
        nodes,
        lora,
        micro_batch,
        source_len,
        target_len,
        gradient_checkpointing=gradient_checkpointing,
        micro_batch_tokens=micro_batch_tokens,
        optimizer=optimizer,
    )
    models = estimate.expand_models(model)
    if len(models) > 1:
        typer.echo(estimate.render_models_table(models, memory, shape))
        return
    spec = estimate.model_spec(model)
    rows = estimate.estimate_rows(spec, shape, fsdp=fsdp)
    title = f"{estimate.canonical_name(model)}: {shape.describe()}"
    typer.echo(
        estimate.render_table(
            rows, memory, title=title, checkpointing=gradient_checkpointing, spec=spec, shape=shape
        )
    )


@app.command("score")
@user_errors
def score_command(
    predictions: Path = typer.Argument(..., help="predictions.jsonl (id, prediction, optional references)."),
    data: str | None = typer.Option(None, "--data", help="Take references from this dataset instead."),
    split: str = typer.Option("test", "--split"),
    scoring: str = typer.Option(
        "best_of_n", "--scoring", help="best_of_n or per_reference (seed-compatible)."
    ),
    stemmer: bool = typer.Option(True, "--stemmer/--no-stemmer"),
    split_sentences: bool = typer.Option(
        False, "--split-sentences", help="One sentence per line for rougeLsum."
    ),
    output: Path | None = typer.Option(None, "--output", help="Write rouge.json here."),
    overrides: list[str] = typer.Option(
        [],
        "--set",
        help="--data's columns: --set data.source_field=C, --set data.target_field=C "
        "[those the predictions were made with, where their rouge.json or run recipe says].",
    ),
    debug: bool = DebugOption,
) -> None:
    """Rescore an existing predictions file without generating."""
    from launcher.results.scoring import rescore

    result, note = rescore(predictions, data, split, scoring, stemmer, split_sentences, output, overrides)
    typer.echo(result)
    if note:
        typer.echo(f"note: {note}", err=True)


@app.command("report")
@user_errors
def report_command(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories or `ftlaunch eval` output directories."),
    output: Path | None = typer.Option(None, "--output", help="Write report.md and rouge.json here."),
    metric: str | None = typer.Option(
        None, "--metric", help="A sweep: sort by and name the best run by this column (default rougeLsum)."
    ),
    debug: bool = DebugOption,
) -> None:
    """Compare several runs/models in one ROUGE table (one run: its full report; a sweep: every point)."""
    from launcher.host.sweep_manifest import is_sweep
    from launcher.results.report import compare_runs, write_run_report

    if len(run_dirs) == 1 and is_sweep(run_dirs[0]):
        from launcher.host.sweep_report import DEFAULT_METRIC, write_sweep_report

        typer.echo(write_sweep_report(run_dirs[0], output, metric or DEFAULT_METRIC))
        return
    if metric is not None:
        raise UserError("--metric sorts a sweep's report: pass one sweep directory (with sweep.json)")
    if len(run_dirs) == 1 and RunDir(run_dirs[0]).eval.is_dir():
        out = write_run_report(run_dirs[0], output)
        typer.echo(ResultDir(out).report_md.read_text())
        return
    typer.echo(compare_runs(run_dirs, output))


recipe_app = typer.Typer(
    no_args_is_help=True, help="The recipe schema: every key, and checking a recipe file without running it."
)
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("keys")
@user_errors
def recipe_keys_command(
    markdown: bool = typer.Option(False, "--markdown", help="A Markdown table (README's key table)."),
    debug: bool = DebugOption,
) -> None:
    """Every recipe key: type, default and description (from the schema in launcher/core/recipe.py)."""
    from launcher.core.recipe_loading import keys_markdown, recipe_keys

    if markdown:
        typer.echo(keys_markdown(), nl=False)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("key", "type", "default", "description", box=None, pad_edge=False)
    for info in recipe_keys():
        table.add_row(info.key, info.type, info.default, info.description)
    Console(width=200, soft_wrap=True).print(table)


@recipe_app.command("validate")
@user_errors
def recipe_validate_command(
    path: Path = typer.Argument(..., help="A recipe YAML file."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe key: --set train.lr=3e-4."),
    debug: bool = DebugOption,
) -> None:
    """Check a recipe (with --set overrides) against the schema: one line OK, or the error (exit 2)."""
    from launcher.core.recipe_loading import load_recipe

    recipe = load_recipe(path, overrides)
    typer.echo(f"OK: {path} is a valid {recipe.train.method} recipe")


def click_exceptions():
    """Typer >= 0.24 vendors Click (typer._click); older Typer raises Click's own classes."""
    import click

    try:
        from typer._click import exceptions as vendored
    except ImportError:
        return (click.UsageError,), (click.exceptions.Abort,), (click.exceptions.Exit,)
    return (
        (vendored.UsageError, click.UsageError),
        (typer.Abort, click.exceptions.Abort),
        (typer.Exit, click.exceptions.Exit),
    )


def given_value(exc) -> str:
    """The value the user typed for the flag Click rejected (Click's message omits it)."""
    param = getattr(exc, "param", None)
    for opt in getattr(param, "opts", []):
        for index, arg in enumerate(sys.argv[:-1]):
            if arg == opt:
                return f" (got {sys.argv[index + 1]!r})"
    return ""


def main() -> None:
    """Run the app; usage errors (a bad flag value) also become one line and exit 2."""
    usage_errors, aborts, exits = click_exceptions()
    try:
        result = app(standalone_mode=False)
    except aborts:
        typer.echo("interrupted (exit 3): nothing was launched", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except usage_errors as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            typer.echo(exc.ctx.get_help() if exc.ctx else "", err=False)
            sys.exit(0)
        if os.environ.get("FTLAUNCH_DEBUG") == "1" or "--debug" in sys.argv:
            raise
        command = f" {exc.ctx.info_name}" if exc.ctx is not None and exc.ctx.parent is not None else ""
        typer.echo(
            f"error: {exc.format_message()}{given_value(exc)} (see ftlaunch{command} --help)", err=True
        )
        sys.exit(EXIT_USAGE)
    except exits as exc:
        sys.exit(exc.exit_code)
    finally:
        from launcher.host import runlock

        runlock.release_all()  # run-directory locks: the process's exit frees them; in-process callers too
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
