"""Everything between "the recipe is valid" and "the ranks are running", on the launching host:
checks that must fail before a launch (data, model, GPUs, run directory, resume shape), the
run directory's files, and the supervised run of ``command.sh``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import yaml

from launcher.core import checkpoint as ckpt
from launcher.core.dialogues import dataset_dir, load_data_split
from launcher.core.diskspace import check_free_space
from launcher.core.errors import UserError
from launcher.core.families import (
    T5_MODULE_NAMES,
    ModuleNames,
    check_lora_rank,
    module_names,
    resolve_lora_targets,
    skeleton,
)
from launcher.core.model_facts import model_facts
from launcher.core.modelfiles import check_model_files
from launcher.core.paths import check_hub_id, is_local_reference, shadowed_hub_id
from launcher.core.prompt_room import check_prompt_room_on_host
from launcher.core.recipe import EMBEDDED_MODEL, Recipe
from launcher.core.recipe_loading import dump_recipe, read_run_recipe
from launcher.core.rundir import LOCK_FILE, RENDERED_FILES, RunDir, SweepDir
from launcher.core.trackers import check_trackers_installed, check_tracking_server
from launcher.core.writable import check_writable_dir
from launcher.host import runlock
from launcher.host.render import (
    EVAL_MODULE,
    MACHINE_RANK_ENV,
    TRAIN_MODULE,
    RankEntry,
    render_run,
    rendered_module,
    require_multinode_address,
)

RUN_FILES = RENDERED_FILES


# ---------------------------------------------------------------- checks before launch


def check_data(recipe: Recipe) -> None:
    """Read every split the run will use (local files only: the hub is read by the ranks)."""
    if dataset_dir(recipe.data.dataset) is None:
        return
    load_data_split(recipe.data, recipe.data.train_split)
    load_data_split(recipe.data, recipe.data.validation_split)
    if recipe.eval.after_training:
        load_data_split(recipe.data, recipe.eval.split)


def check_eval_data(recipe: Recipe) -> None:
    if dataset_dir(recipe.data.dataset) is not None:
        load_data_split(recipe.data, recipe.eval.split, recipe.eval.limit)


def local_model_dir(name: str) -> Path | None:
    """The directory behind a local model reference (None for tiny-t5 or a hub id)."""
    if name == EMBEDDED_MODEL or not is_local_reference(name):
        return None
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"--model {name}{why_no_model(path)}")
    check_model_files(path, "--model")
    return path


def why_no_model(path: Path) -> str:
    """What a local --model path is instead of a model folder, and what to pass."""
    run = RunDir(path)
    if not path.exists() and path.name == run.final.name and holds_run(path.parent):
        return f" does not exist: {RunDir(path.parent).no_final_yet()}"
    if not path.exists():
        return (
            f" does not exist{shadowed_hub_id(str(path))}; pass a directory written by save_pretrained, "
            "a hub id, or tiny-t5"
        )
    if holds_run(path) and not run.final.exists():
        return f" is a run directory, not a model: {run.no_final_yet()}"
    if (path / "adapter_config.json").is_file():
        return " is a LoRA adapter, not a whole model; pass its base model as --model and this folder as --adapter"
    if run.has_recipe() and (run.final / "adapter_config.json").is_file():
        return f" is a LoRA run directory; pass its base model as --model and --adapter {run.final}"
    if run.has_recipe() and (run.final / "config.json").is_file():
        return f" is a run directory, not its model; pass --model {run.final}"
    return (
        ": no config.json there; pass a directory written by save_pretrained "
        "(e.g. a run's final/ folder), a hub id, or tiny-t5"
    )


def check_model_reference(recipe: Recipe) -> None:
    """A local path must be a model directory; LoRA targets must name modules of the model."""
    check_hub_ids(recipe)
    check_local_tokenizer(recipe)
    name = recipe.model.name
    if name != EMBEDDED_MODEL and not is_local_reference(name):
        return  # hub ids are resolved by the ranks (offline: from the local cache)
    model_dir = local_model_dir(name)
    if recipe.train.method == "lora":
        check_lora_targets(recipe, model_dir)


def check_hub_ids(recipe: Recipe) -> None:
    """model.name and model.tokenizer that are no local path (paths.is_local_reference) must be hub
    ids: checked without the network, so also under --dry-run, before a rank's hub client fails on
    them with a traceback."""
    for what, name in (("--model", recipe.model.name), ("model.tokenizer", recipe.model.tokenizer)):
        if name and name != EMBEDDED_MODEL and not is_local_reference(name):
            check_hub_id(name, what)


def check_local_tokenizer(recipe: Recipe) -> None:
    """A model.tokenizer that is a local path must be a tokenizer folder."""
    tokenizer = recipe.model.tokenizer
    if tokenizer and tokenizer != EMBEDDED_MODEL and is_local_reference(tokenizer):
        if not Path(tokenizer).expanduser().is_dir():
            raise UserError(
                f"model.tokenizer {tokenizer}: no such directory; pass a tokenizer folder or a hub id"
            )
        check_model_files(Path(tokenizer).expanduser(), "model.tokenizer", model=False)


def model_module_names(config_dir: Path | None) -> ModuleNames:
    """The module names LoRA targets can name: T5's from a list (tiny-t5, a local T5: no
    transformers import), any other family's from a meta-device skeleton (no weights loaded)."""
    if config_dir is None or model_facts(str(config_dir)).family == "t5":
        return T5_MODULE_NAMES
    return module_names(skeleton(config_dir))


def check_lora_targets(recipe: Recipe, config_dir: Path | None) -> None:
    """The ranks' rules (families.resolve_lora_targets, check_lora_rank), applied before the launch."""
    names = model_module_names(config_dir)
    if names is T5_MODULE_NAMES:
        names = t5_module_names(model_facts(recipe.model.name))
    targets = resolve_lora_targets(names, recipe.lora.target_modules, recipe.model.name)
    check_lora_rank(names, targets, recipe.lora.r, recipe.model.name)


def t5_module_names(facts) -> ModuleNames:
    """T5's module names narrowed by what the configuration says: a gated feed-forward (FLAN-T5,
    T5 v1.1: ``gated-gelu``) has wi_0 and wi_1, the original T5's has wi; and the layers' sizes."""
    names = T5_MODULE_NAMES
    projection = facts.config.get("feed_forward_proj", "gated-gelu" if facts.known_t5 else None)
    if isinstance(projection, str):
        absent = {"wi"} if projection.startswith("gated") else {"wi_0", "wi_1"}
        names = dataclasses.replace(names, leaves=names.leaves - absent, adaptable=names.adaptable - absent)
    return dataclasses.replace(names, smallest_side=t5_layer_sides(facts))


def t5_layer_sides(facts) -> dict[str, int]:
    """The smaller side of each adaptable T5 layer, from the configuration (empty when unknown)."""
    d_model, d_ff, heads, d_kv, vocab = (
        facts.d_model,
        facts.d_ff,
        facts.num_heads,
        facts.d_kv,
        facts.vocab_size,
    )
    if None in (d_model, d_ff, heads, d_kv, vocab):
        return {}
    attention, feed_forward = min(d_model, heads * d_kv), min(d_model, d_ff)
    buckets = facts.config.get("relative_attention_num_buckets", 32)
    return {
        **dict.fromkeys(("q", "k", "v", "o"), attention),
        **dict.fromkeys(("wi", "wi_0", "wi_1", "wo"), feed_forward),
        "lm_head": min(d_model, vocab),
        "relative_attention_bias": min(buckets, heads),
    }


def hub_reference_problem(name: str, repo_type: str) -> str | None:
    """Why a hub id cannot be loaded by the ranks (None when it is cached or reachable)."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError

    marker = "config.json" if repo_type == "model" else "README.md"
    if isinstance(try_to_load_from_cache(name, marker, repo_type=repo_type), str):
        return None
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return "HF_HUB_OFFLINE=1 and it is not in the local cache"
    try:
        info = HfApi().model_info if repo_type == "model" else HfApi().dataset_info
        info(name, timeout=10)
    except RepositoryNotFoundError:
        return "no such repository on the hub (or it is private: log in with `hf auth login`)"
    except (NotADirectoryError, PermissionError, FileExistsError) as exc:  # the cache folder, not the network
        raise UserError(
            f"{repo_type} {name!r}: the Hugging Face cache cannot be used ({exc.strerror}: {exc.filename}); "
            "point HF_HOME (or HF_HUB_CACHE) at a folder you can write"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any network failure means the ranks would fail too
        return f"the hub cannot be reached ({type(exc).__name__}) and it is not in the local cache"
    return None


def check_hub_references(recipe: Recipe) -> None:
    """Hub ids must be loadable before a launch costs an allocation (skipped for --dry-run)."""
    check_hub_ids(recipe)
    if dataset_dir(recipe.data.dataset) is None:
        problem = hub_reference_problem(recipe.data.dataset, "dataset")
        if problem:
            raise UserError(
                f"dataset {recipe.data.dataset!r}: {problem}; download it where there is network and "
                "pass --data DIR with train/validation/test.jsonl"
            )
    for what, name in (("model", recipe.model.name), ("tokenizer", recipe.model.tokenizer)):
        if name and name != EMBEDDED_MODEL and not is_local_reference(name):
            problem = hub_reference_problem(name, "model")
            if problem:
                raise UserError(
                    f"{what} {name!r}: {problem}; download it where there is network "
                    f"(hf download {name} --local-dir DIR) and pass --model DIR"
                )


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_gpus(recipe: Recipe) -> None:
    available = visible_gpus()
    if recipe.launch.gpus <= available:
        return
    seen = (
        f"only {available} are visible here; use --gpus {available}, "
        if available
        else "none is visible here; use "
    )
    raise UserError(
        f"--gpus {recipe.launch.gpus} asks for {recipe.launch.gpus} GPUs per node but {seen}"
        "--cpu to run the ranks as CPU processes, or --dry-run to only render the configs"
    )


def keep_effective_batch(
    recipe: Recipe, run_dir: Path, resume: str | None, force: bool
) -> tuple[Recipe, list[str]]:
    """Resuming a checkpoint on another number of ranks (any strategy): the accumulation that keeps
    the checkpoint's step (micro-batches per step over all ranks), said in one line; refused (one
    line, before anything is written) when no whole accumulation keeps it."""
    checkpoint = ckpt.resolve_resume(run_dir, resume, []) if resume and not force else None
    if checkpoint is None:
        return recipe, []
    saved = ckpt.read_state(checkpoint)
    world = recipe.launch.world_size
    if saved.world_size == world or not saved.strategy:
        return recipe, []  # same ranks, or a checkpoint too old to say its layout: check_compatible decides
    per_step = ckpt.micro_batches_per_step(saved)
    if per_step % world:
        raise UserError(
            f"checkpoint {checkpoint} was written by {saved.world_size} rank(s) x train.grad_accum "
            f"{saved.grad_accum} ({per_step} micro-batches per optimizer step); {world} rank(s) cannot "
            f"keep that with a whole accumulation: resume on a number of ranks that divides {per_step}, "
            "or pass --force-resume to change the step"
        )
    accum = per_step // world
    adjusted = recipe.model_copy(update={"train": recipe.train.model_copy(update={"grad_accum": accum})})
    note = (
        f"resuming a {saved.world_size}-rank checkpoint on {world} rank(s): train.grad_accum "
        f"{recipe.train.grad_accum} -> {accum} keeps its {per_step} micro-batches per optimizer step"
    )
    return adjusted, [note] if accum != recipe.train.grad_accum else []


def keep_found_batch(
    recipe: Recipe, run_dir: Path, resume: str | None, force: bool
) -> tuple[Recipe, list[str]]:
    """Resuming under train.auto_find_batch_size a checkpoint written after the supervisor made the
    micro batch smaller (a step ran out of memory): continue with the micro batch it found, not the
    command's larger one that would run out of memory again (Seq2SeqTrainer keeps its found batch
    in trainer_state.json the same way). Only a change that keeps the examples (or the token
    budget) per optimizer step per rank is taken over, said in one line."""
    if not (resume and recipe.train.auto_find_batch_size) or force:
        return recipe, []
    checkpoint = ckpt.resolve_resume(run_dir, resume, [])
    if checkpoint is None:
        return recipe, []
    saved, train = ckpt.read_state(checkpoint), recipe.train
    found = (saved.micro_batch_size, saved.micro_batch_tokens, saved.grad_accum)
    ours = (train.micro_batch_size, train.micro_batch_tokens, train.grad_accum)
    if found == ours or saved.world_size != recipe.launch.world_size:
        return recipe, []
    if train.micro_batch_tokens:
        smaller = saved.micro_batch_tokens is not None and saved.micro_batch_tokens < train.micro_batch_tokens
        same_step = (
            smaller
            and saved.micro_batch_tokens * saved.grad_accum == train.micro_batch_tokens * train.grad_accum
        )
        what = f"token budget {saved.micro_batch_tokens} x accumulation {saved.grad_accum}"
    else:
        smaller = saved.micro_batch_tokens is None and saved.micro_batch_size < train.micro_batch_size
        same_step = (
            smaller and saved.micro_batch_size * saved.grad_accum == train.micro_batch_size * train.grad_accum
        )
        what = f"micro batch {saved.micro_batch_size} x accumulation {saved.grad_accum}"
    if not same_step:
        return recipe, []
    update = {"micro_batch_size": saved.micro_batch_size, "grad_accum": saved.grad_accum}
    if train.micro_batch_tokens:
        update = {"micro_batch_tokens": saved.micro_batch_tokens, "grad_accum": saved.grad_accum}
    note = (
        f"train.auto_find_batch_size: continuing with the {what} this run found (checkpoint "
        f"{checkpoint.name}), not the command's larger one, which ran out of memory"
    )
    return recipe.model_copy(update={"train": train.model_copy(update=update)}), [note]


def check_resume_shape(recipe: Recipe, run_dir: Path, resume: str | None, force: bool) -> list[str]:
    """The checkpoint a resume will load must be intact and of this run; returns lines to show
    (damaged checkpoints ``auto`` skipped, or that it starts over)."""
    notes: list[str] = []
    checkpoint = ckpt.resolve_resume(run_dir, resume, notes)
    if checkpoint is None:
        return notes
    current = ckpt.expected_state(recipe, recipe.launch.world_size)
    saved = ckpt.read_state(checkpoint)
    ckpt.check_compatible(saved, current, checkpoint, force)
    if ckpt.needs_conversion(saved, current):
        if recipe.train.optimizer != "adamw":
            raise UserError(
                f"checkpoint {checkpoint} was written under {saved.strategy} on {saved.world_size} rank(s): "
                f"moving it to {current.strategy} on {current.world_size} rank(s) converts AdamW's state only, "
                f"not train.optimizer={recipe.train.optimizer}'s; resume with the strategy and ranks it was "
                "written with"
            )
        notes.append(ckpt.describe_conversion(checkpoint, saved, current))
    return notes


# ---------------------------------------------------------------- the run directory


def holds_run(run_dir: Path) -> bool:
    """A folder ftlaunch rendered a training run into: its recipe.yaml and a command.sh that starts
    the training module. A recipe.yaml alone may be the user's own (a project folder), and an
    ``ftlaunch eval`` output has both files but starts another module."""
    return RunDir(run_dir).has_recipe() and rendered_module(run_dir) == TRAIN_MODULE


def has_entries(run_dir: Path) -> bool:
    """Anything in the folder but the lock (which a refused or finished ftlaunch may leave)."""
    return run_dir.is_dir() and any(entry.name != LOCK_FILE for entry in run_dir.iterdir())


def not_a_run(run_dir: Path) -> UserError:
    """A non-empty folder that is not a run: nothing may be written into it, nothing replaced."""
    if SweepDir(run_dir).is_sweep():
        return UserError(
            f"--output {run_dir} is a sweep's folder (it holds {SweepDir(run_dir).manifest.name}), not a "
            "run; --overwrite only replaces a run: pick a new directory"
        )
    return UserError(
        f"--output {run_dir} is not empty and holds no ftlaunch run; --overwrite only replaces a run: "
        "pick a new directory"
    )


def run_outputs(run_dir: Path) -> list[str]:
    """What --overwrite would delete: everything but the rendered files and the lock."""
    kept = {*RUN_FILES, LOCK_FILE}
    if not run_dir.is_dir():
        return []
    return sorted(entry.name for entry in run_dir.iterdir() if entry.name not in kept)


def check_replaceable(run_dir: Path, dry_run: bool) -> None:
    """--overwrite replaces a training run or an ``ftlaunch eval`` output, nothing else (not a
    project folder, a run's final/, a sweep, the data); a dry run deletes nothing, so it may only
    re-render a folder that holds no more than the configs of an earlier render."""
    if not has_entries(run_dir):
        return
    if not holds_run(run_dir) and rendered_module(run_dir) != EVAL_MODULE:
        raise not_a_run(run_dir)
    outputs = run_outputs(run_dir)
    if dry_run and outputs:
        shown = ", ".join(outputs[:4]) + (", ..." if len(outputs) > 4 else "")
        raise UserError(
            f"--dry-run --overwrite would delete the run in {run_dir} ({shown}) before writing the "
            "configs; dry-run into a new directory, or drop --dry-run to replace the run"
        )


def check_run_dir(
    run_dir: Path, recipe: Recipe, resume: str | None, overwrite: bool, dry_run: bool = False
) -> None:
    """Refuse to mix two runs in one directory (checks only: nothing is deleted here).

    The machine rank is not part of a run: every node of a multi-node run passes these checks
    against the same directory with the same recipe.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--output {run_dir} is a file; pass a directory")
    if overwrite and resume:
        raise UserError("--overwrite starts the run again and --resume continues it; pass only one of them")
    if overwrite:
        check_replaceable(run_dir, dry_run)
        return
    check_training_output(run_dir)
    if not holds_run(run_dir):
        if has_entries(run_dir):
            raise not_a_run(run_dir)
        return
    same = RunDir(run_dir).recipe_yaml.read_text() == dump_recipe(recipe)
    if not same and not resume:
        raise UserError(
            f"--output {run_dir} already holds a different run; pass --resume auto to continue it, "
            "--overwrite to replace it, or pick a new directory"
        )
    if same and not resume and ckpt.has_checkpoints(run_dir):
        raise UserError(
            f"--output {run_dir} already holds this run with checkpoints; pass --resume auto to "
            "continue it or --overwrite to start again"
        )


def check_eval_output(run_dir: Path, recipe: Recipe) -> None:
    """`ftlaunch eval --output`: a new or empty folder, or an earlier evaluation's (replaced). Never a
    training run: its recipe.yaml and command.sh are what --resume and SLURM requeues start from.
    A training run's own RUN/eval/finetuned or RUN/eval/original takes only the model it is the
    evaluation of, so that the run's report never shows another model's scores as its own."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--output {run_dir} is a file; pass a directory for the evaluation")
    if is_runs_own_evaluation(run_dir, recipe):
        return
    module = rendered_module(run_dir)
    if module == EVAL_MODULE:
        return
    if module == TRAIN_MODULE:
        raise UserError(
            f"--output {run_dir} holds a training run; an evaluation there would replace the recipe.yaml "
            f"and command.sh it resumes from: pick a new directory, e.g. --output {run_dir.name}-eval"
        )
    if has_entries(run_dir):
        raise UserError(f"--output {run_dir} is not empty; pick a new directory for the evaluation")


def is_runs_own_evaluation(folder: Path, recipe: Recipe) -> bool:
    """Whether ``folder`` is RUN/eval/finetuned (RUN/eval/original) of a training run and the
    evaluation is of RUN/final (of the run's base model): then it replaces only that evaluation, as
    the advice after an interrupted final evaluation does. Another model there is refused."""
    run = RunDir(folder.parent.parent)
    if not holds_run(run.path) or folder not in (run.eval_finetuned.path, run.eval_original.path):
        return False
    model = recipe.model.adapter or recipe.model.name  # what is evaluated: an adapter is no base model
    if folder == run.eval_finetuned.path:
        expected = str(run.final)
        what = f"its final/ (--model {run.final}, or --adapter {run.final} for a LoRA run)"
    else:
        expected = read_run_recipe(run.path).model.name
        what = f"its base model (--model {expected}, no --adapter)"
    if same_model(model, expected):
        return True
    raise UserError(
        f"--output {folder} is the evaluation of {what} in run {run.path}; another model's scores there "
        "would be reported as that run's: pick a new directory"
    )


def same_model(name: str, other: str) -> bool:
    """Two model references name the same model: the same folder, or the same hub id."""
    if is_local_reference(name) and is_local_reference(other):
        return Path(name).expanduser().resolve() == Path(other).expanduser().resolve()
    return name == other


def check_training_output(run_dir: Path) -> None:
    """`ftlaunch full|lora --output` on an `ftlaunch eval` folder: no run there to resume or replace."""
    if rendered_module(run_dir) == EVAL_MODULE:
        raise UserError(
            f"--output {run_dir} holds an `ftlaunch eval` output, not a training run; pick a new "
            "directory (or pass --overwrite to replace the evaluation)"
        )


def write_run_files(recipe: Recipe, run_dir: Path, entry: RankEntry) -> None:
    render_run(recipe, run_dir, entry).write(run_dir)


def clear_run_dir(run_dir: Path) -> None:
    """--overwrite: remove the old run's outputs but keep its run files, which are then replaced
    in one rename each, so another node reading them never finds them missing."""
    if not run_dir.is_dir():
        return
    for entry in run_dir.iterdir():
        if entry.name in RUN_FILES or entry.name == LOCK_FILE:  # the lock this process holds
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def run_command(run_dir: Path, machine_rank: int | None = None) -> int:
    """Run command.sh as a supervised child (this node's machine rank in its environment): per-rank
    logs, signals forwarded to the ranks, a summary on failure; returns ftlaunch's exit code."""
    from launcher.host.supervise import node_rank, supervise

    if node_rank(machine_rank) == 0:
        runlock.hold(run_dir)  # a no-op where prepare_launch took it; `ftlaunch supervise` takes it here
    return supervise(run_dir, machine_rank)


def resolve_machine_rank(recipe: Recipe, flag: int | None, env: dict[str, str], dry_run: bool) -> int | None:
    """This node's machine rank: --machine-rank, else FTLAUNCH_MACHINE_RANK, else SLURM_NODEID.

    A multi-node launch without any of them is refused: assuming 0 on every node makes two
    "main" nodes whose rendezvous waits forever.
    """
    nodes = recipe.launch.nodes
    if flag is not None:
        source, raw = "--machine-rank", str(flag)
    elif env.get(MACHINE_RANK_ENV, "") != "":
        source, raw = MACHINE_RANK_ENV, env[MACHINE_RANK_ENV]
    elif env.get("SLURM_NODEID", "") != "":
        source, raw = "SLURM_NODEID", env["SLURM_NODEID"]
    else:
        if nodes > 1 and not dry_run:
            raise UserError(
                f"--nodes {nodes}: this node's machine rank is unknown; pass --machine-rank R "
                f"(0 on the node at --main-address, 1..{nodes - 1} on the others), set "
                f"{MACHINE_RANK_ENV}=R, or run under SLURM"
            )
        return None
    if not raw.isdigit() or int(raw) >= nodes:
        raise UserError(f"{source}={raw} is not a machine rank of a {nodes}-node run; use 0..{nodes - 1}")
    return int(raw)


def prepare_launch(
    recipe: Recipe,
    run_dir: Path,
    *,
    resume: str | None,
    overwrite: bool,
    force_resume: bool,
    dry_run: bool,
    argv: list[str],
    machine_rank: int | None = None,
) -> list[str]:
    """Every check first, then (only then) touch the run directory and write its files.

    On a multi-node run every node may call this on the same (shared) directory: only machine
    rank 0 clears it for --overwrite; the others write the same files (atomically).
    Only node 0 holds the run directory's lock (runlock.py): the others join its run. A dry run
    takes no lock but is refused on a held directory, as it would rewrite the run's files.
    Returns lines for the user (checkpoints a resume skipped).
    """
    if not machine_rank:
        check_lock_free(run_dir, recipe)  # first: the line names the holder, whatever else is wrong
    else:
        check_joins_the_same_run(run_dir, recipe, machine_rank)
    notes = check_launch(
        recipe, run_dir, resume=resume, overwrite=overwrite, force_resume=force_resume, dry_run=dry_run
    )
    if not dry_run and not machine_rank:
        runlock.hold(run_dir)  # until ftlaunch exits: checked above, taken before anything is written
    if overwrite and not dry_run and not machine_rank:  # a dry run deletes nothing (check_replaceable)
        clear_run_dir(run_dir)
    write_run_files(recipe, run_dir, RankEntry(argv, resume=resume, force_resume=force_resume))
    return notes


def check_lock_free(run_dir: Path, recipe: Recipe) -> None:
    """The run directory's lock is free; on a multi-node run, a held lock may be a second node
    started as machine rank 0 (only rank 0 takes it): the refusal says so."""
    try:
        runlock.check_free(run_dir)
    except UserError as exc:
        if recipe.launch.nodes == 1:
            raise
        raise UserError(
            f"{exc} (with --nodes {recipe.launch.nodes} only machine rank 0 holds it: is another node "
            "started with machine rank 0 too?)"
        ) from None


def check_joins_the_same_run(run_dir: Path, recipe: Recipe, machine_rank: int) -> None:
    """A node other than 0 joins the run node 0 rendered in the shared directory: its flags must
    resolve to that very recipe. Otherwise its files would replace node 0's (with --resume), and
    the ranks of both nodes would train with whichever recipe.yaml was written last."""
    if not RunDir(run_dir).has_recipe() or not holds_run(run_dir):
        return
    theirs, mine = RunDir(run_dir).recipe_yaml.read_text(), dump_recipe(recipe)
    if theirs == mine:
        return
    differing = recipe_differences(yaml.safe_load(theirs) or {}, yaml.safe_load(mine))
    shown = ", ".join(f"{key}={mine!r} (the run's: {run!r})" for key, mine, run in differing[:3])
    more = f" and {len(differing) - 3} more" if len(differing) > 3 else ""
    raise UserError(
        f"machine rank {machine_rank}: its recipe differs from the run in {run_dir} ({shown}{more}); "
        "start every node with the same flags, node 0 first"
    )


def recipe_differences(run: dict, mine: dict) -> list[tuple[str, object, object]]:
    """(dotted key, this node's value, the run's value) for every key whose values differ."""
    from launcher.host.sweep_grid import flatten

    theirs, ours = flatten(run), flatten(mine)
    return [
        (key, ours.get(key), theirs.get(key))
        for key in sorted(set(theirs) | set(ours))
        if theirs.get(key) != ours.get(key)
    ]


def check_launch(
    recipe: Recipe, run_dir: Path, *, resume: str | None, overwrite: bool, force_resume: bool, dry_run: bool
) -> list[str]:
    """Every check of ``prepare_launch``, writing nothing (a sweep checks all its points first)."""
    validate_before_launch(recipe)
    if not dry_run:
        require_multinode_address(recipe, dict(os.environ))
        if not recipe.launch.cpu:
            check_gpus(recipe)
        check_hub_references(recipe)
        check_trackers_installed(recipe.train.report_to)
        check_tracking_server(recipe.train.report_to, dict(os.environ))
    check_run_dir(run_dir, recipe, resume, overwrite, dry_run)
    check_writable_dir(run_dir, "--output")
    notes = check_resume_shape(recipe, run_dir, resume, force_resume) if resume else []
    if not dry_run:
        check_free_space(recipe, run_dir)  # an --overwrite frees what it replaces: the same count holds
    return notes


def validate_before_launch(recipe: Recipe) -> None:
    if recipe.model.adapter:
        raise UserError(
            f"model.adapter: {recipe.model.adapter!r} is read by `ftlaunch eval` only; a fine-tune starts from "
            "model.name (merge an adapter first with `ftlaunch export RUN --merge` to train on top of it)"
        )
    check_data(recipe)
    check_model_reference(recipe)
    check_prompt_room_on_host(recipe)
