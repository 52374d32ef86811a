"""Checkpoints that survive crashes: written to a temporary folder, renamed when complete, and
only then named by the ``latest`` marker.

A checkpoint is ``checkpoints/step_N/``: Accelerate's state (model, optimizer, scheduler, RNG of
every rank; DeepSpeed's sharded engine state under ZeRO) plus ``ftlaunch_state.json`` with the
data position, the shape of the run that wrote it (world size, accumulation, seed) and what it
trains (model, tokenizer, data, method), and, written last, ``manifest.json``: every file with its
size (and SHA-256 when the checkpoint is small enough to hash cheaply). A checkpoint whose files
do not match its manifest is damaged: ``--resume auto`` skips it, ``--resume PATH`` refuses it.
A disk that fills during a save ends the run with one line (DiskFull); the previous checkpoint
and ``latest`` are untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from launcher.core import diskspace
from launcher.core.atomic import replace_dir, write_text_atomic
from launcher.core.errors import RunFailure, UserError
from launcher.core.ranklog import RESTART_ENV
from launcher.core.rundir import LATEST_FILE, RunDir, checkpoint_name, checkpoint_step

STATE_FILE = "ftlaunch_state.json"
MANIFEST_FILE = "manifest.json"
# Checkpoints up to this size get SHA-256 sums in their manifest (a second or two to hash);
# larger ones are checked by file sizes only, which catch truncated and missing files.
CHECKSUM_LIMIT_BYTES = 2 * 2**30
# Fault injection for the crash-during-save test: the main rank dies after the shards are
# written but before the checkpoint is complete, as a crash or a full disk would leave it.
CRASH_IN_SAVE_ENV = "FTLAUNCH_FAULT_CRASH_IN_SAVE_AT_STEP"
# Fault injection for the failure-summary test: "RANK:STEP" makes that rank raise when it starts
# saving that step (the other ranks are then waiting for it, as with any real error).
RAISE_IN_SAVE_ENV = "FTLAUNCH_FAULT_RAISE_IN_SAVE"
# Both faults strike the first start only: a restart (launch.max_restarts) runs clean, as after a
# real crash, which does not recur at the same step.


class DiskFull(RunFailure):
    """The disk filled up while a checkpoint was written."""


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches this rank consumed in `epoch`
    world_size: int = 1
    grad_accum: int = 1
    micro_batch_size: int = 1
    micro_batch_tokens: int | None = None  # token budget (null: fixed micro_batch_size)
    seed: int = 0
    method: str = "full"
    # What is trained (launcher/core/fingerprint.py); empty in checkpoints of older versions.
    model: str = ""
    tokenizer: str = ""
    data: str = ""
    lora: str = ""
    # The validation split (fingerprint.validation_fingerprint); None in checkpoints of older
    # versions, which are not compared on it.
    validation: str | None = None
    # ddp, zero1..3 or fsdp: how the weights and optimizer state are laid out in the checkpoint
    # ("" in checkpoints of older versions)
    strategy: str = ""
    # train.best_metric: the best evaluated step so far, its value, evaluations since it improved,
    # and which metric they are about ("" in checkpoints of older versions).
    best_step: int | None = None
    best_value: float | None = None
    evaluations_without_improvement: int = 0
    best_metric: str = ""
    best_measured: str = ""  # how a ROUGE best_metric was measured (best.measurement); "" for val_loss
    # What a resume may change but should say it did ("" in checkpoints of older versions): the
    # learning-rate schedule as optimization.schedule_summary describes it, and model.precision;
    # train.label_smoothing (None in checkpoints of older versions: 0.0 is a value).
    schedule: str = ""
    precision: str = ""
    label_smoothing: float | None = None
    # Whether batches were padded to train.compile's length buckets ("on"/"off"; "" in checkpoints
    # of older versions): a token budget counts bucketed lengths, so it packs other micro-batches.
    length_buckets: str = ""


SHAPE_FIELDS = ("world_size", "grad_accum", "micro_batch_size", "micro_batch_tokens")
BATCH_FIELDS = ("grad_accum", "micro_batch_size", "micro_batch_tokens")  # what auto_find_batch_size changes
IDENTITY_FIELDS = ("model", "tokenizer", "data", "validation", "method", "lora")


def expected_state(recipe, world_size: int) -> TrainState:
    """The state a checkpoint must match to continue this recipe (launcher and ranks build it here)."""
    from launcher.core import fingerprint

    return TrainState(
        world_size=world_size,
        grad_accum=recipe.train.grad_accum,
        micro_batch_size=recipe.train.micro_batch_size,
        micro_batch_tokens=recipe.train.micro_batch_tokens,
        seed=recipe.train.seed,
        method=recipe.train.method,
        model=fingerprint.model_fingerprint(recipe.model.name),
        tokenizer=fingerprint.tokenizer_fingerprint(recipe),
        data=fingerprint.data_fingerprint(recipe),
        lora=fingerprint.lora_fingerprint(recipe),
        validation=fingerprint.validation_fingerprint(recipe),
        strategy=strategy_name(recipe),
        length_buckets="on" if recipe.compiles else "off",
    )


def strategy_name(recipe) -> str:
    launch = recipe.launch
    return "fsdp" if launch.fsdp else f"zero{launch.zero}" if launch.zero else "ddp"


def micro_batches_per_step(state: TrainState) -> int:
    """What an optimizer step is made of, whatever the ranks: micro-batches over all ranks."""
    return state.world_size * state.grad_accum


def repacked_budget(saved: TrainState, current: TrainState) -> str | None:
    """A token budget with and without train.compile's length buckets forms other micro-batches
    (each example counts at its bucket's length): the epoch's position would point elsewhere."""
    if not (saved.micro_batch_tokens and current.micro_batch_tokens):
        return None
    if not saved.length_buckets or saved.length_buckets == current.length_buckets:
        return None
    return (
        f"train.compile's length buckets {saved.length_buckets} -> {current.length_buckets} under "
        f"train.micro_batch_tokens={current.micro_batch_tokens}: the budget packs other micro-batches"
    )


def moves_world_size(saved: TrainState, current: TrainState) -> bool:
    """A checkpoint continues on another number of ranks or under another strategy (DDP, ZeRO-1/2/3,
    FSDP2) when the step keeps its micro-batches (the sampler then forms every step from the same
    examples): the libraries' own loaders, or the per-parameter conversion (launcher/rank/portable.py),
    carry its state over. Changed batches, and checkpoints of versions that did not record their
    strategy, do not."""
    return (
        bool(saved.strategy)
        and (saved.world_size != current.world_size or saved.strategy != current.strategy)
        and micro_batches_per_step(saved) == micro_batches_per_step(current)
        and (saved.micro_batch_size, saved.micro_batch_tokens)
        == (current.micro_batch_size, current.micro_batch_tokens)
    )


STRATEGY_LABELS = {"ddp": "DDP", "fsdp": "FSDP2", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}


def needs_conversion(saved: TrainState, current: TrainState) -> bool:
    """The libraries load their own checkpoints on the same ranks (DDP's whole files also on other
    ranks); anything else goes through the per-parameter layout (launcher/rank/portable.py)."""
    if not saved.strategy:
        return False
    if saved.strategy != current.strategy:
        return True
    return saved.world_size != current.world_size and saved.strategy != "ddp"


def describe_conversion(checkpoint: Path, saved: TrainState, current: TrainState) -> str:
    """The one line a converted resume prints."""

    def where(state: TrainState) -> str:
        return f"{STRATEGY_LABELS.get(state.strategy, state.strategy)} on {state.world_size} rank(s)"

    return (
        f"checkpoint {checkpoint.name} was written under {where(saved)}; continuing under "
        f"{where(current)} (converted per parameter)"
    )


def resumed_position(saved: TrainState, current: TrainState) -> int:
    """This rank's micro-batches into the epoch: the saved steps into the epoch, at this run's
    accumulation (a checkpoint is written after a whole step). A step of another size (a micro
    batch changed under --force-resume) counts the examples already seen, in whole new steps, so
    the epoch does not go backwards; token budgets pack steps unevenly and keep the step count."""
    steps = saved.batches_in_epoch // saved.grad_accum
    if saved.micro_batch_tokens is None and current.micro_batch_tokens is None:
        seen = steps * examples_per_step(saved)
        steps = seen // examples_per_step(current)
    return steps * current.grad_accum


def examples_per_step(state: TrainState) -> int:
    return state.micro_batch_size * state.world_size * state.grad_accum


def checkpoints_dir(run_dir: Path) -> Path:
    return RunDir(run_dir).checkpoints


def save_checkpoint(accelerator, run_dir: Path, state: TrainState, keep: int) -> Path:
    """All ranks call this. The previous checkpoint stays valid until the new one is complete."""
    run = RunDir(run_dir)
    final, tmp = run.checkpoint(state.step), run.checkpoint_tmp(state.step)
    raise_if_injected(accelerator.process_index, state.step)
    with disk_full_explained(accelerator, run_dir, tmp, state.step):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and first_start() and os.environ.get(CRASH_IN_SAVE_ENV) == str(state.step):
        os._exit(17)
    if accelerator.is_main_process:
        with disk_full_explained(accelerator, run_dir, tmp, state.step):
            write_text_atomic(tmp / STATE_FILE, json.dumps(asdict(state), indent=2))
            write_manifest(tmp)  # last: a checkpoint without a matching manifest is not complete
        replace_dir(tmp, final)  # the same step saved again (a resumed run) is replaced whole
        write_text_atomic(run.latest, final.name + "\n")
        prune_checkpoints(run.checkpoints, keep, state.best_step)
    accelerator.wait_for_everyone()
    return final


def first_start() -> bool:
    """Not a restart by the supervisor (launch.max_restarts)."""
    return not os.environ.get(RESTART_ENV)


def raise_if_injected(rank: int, step: int) -> None:
    if first_start() and os.environ.get(RAISE_IN_SAVE_ENV) == f"{rank}:{step}":
        raise RuntimeError(
            f"injected fault: rank {rank} raises while saving step {step} ({RAISE_IN_SAVE_ENV})"
        )


@contextlib.contextmanager
def disk_full_explained(accelerator, run_dir: Path, tmp: Path, step: int):
    """Turn a full disk during a save into DiskFull: one line with the path and the space needed.

    The half-written folder is removed (its space is needed more than its bytes); the previous
    checkpoint and ``latest`` were never touched.
    """
    try:
        yield
    except Exception as exc:
        if not (diskspace.is_disk_full(exc) or diskspace.free_bytes(tmp) < diskspace.LOW_SPACE_BYTES):
            raise
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise DiskFull(disk_full_message(run_dir, step)) from exc


def disk_full_message(run_dir: Path, step: int) -> str:
    root = checkpoints_dir(run_dir)
    previous = find_latest_checkpoint(run_dir, checksums=False)
    needed = manifest_bytes(previous) if previous else None
    if needed is None:
        from launcher.core.recipe_loading import read_run_recipe

        with contextlib.suppress(Exception):
            needed = diskspace.estimate_checkpoint_bytes(read_run_recipe(run_dir))
    size = f"about {diskspace.human(needed)}" if needed else "more space"
    kept = (
        f"{previous.name} is intact and {LATEST_FILE} still names it"
        if previous
        else "there is no earlier checkpoint"
    )
    return (
        f"disk full: checkpoint {checkpoint_name(step)} could not be written to {root} (it needs {size}; "
        f"{diskspace.human(diskspace.free_bytes(root))} free); {kept}; free space (or lower "
        "train.keep_checkpoints), then continue with --resume auto"
    )


# ---------------------------------------------------------------- manifests


def write_manifest(directory: Path) -> None:
    """Every file of a finished checkpoint with its size (and SHA-256 when cheap), written last."""
    from launcher.core.fingerprint import file_sha256

    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    total = sum(p.stat().st_size for p in files)
    checksums = total <= CHECKSUM_LIMIT_BYTES
    entries = {}
    for path in files:
        entry = {"size": path.stat().st_size}
        if checksums:
            entry["sha256"] = file_sha256(path)
        entries[str(path.relative_to(directory))] = entry
    write_text_atomic(
        directory / MANIFEST_FILE, json.dumps({"total_bytes": total, "files": entries}, indent=1)
    )


def read_manifest(checkpoint: Path) -> dict | None:
    try:
        manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def manifest_bytes(checkpoint: Path) -> int | None:
    manifest = read_manifest(checkpoint)
    total = manifest.get("total_bytes") if manifest else None
    return total if isinstance(total, int) and not isinstance(total, bool) else None


# The JSON types each TrainState field may hold (a damaged or hand-edited state file is refused
# like a damaged checkpoint, not loaded into arithmetic that fails later with a traceback).
STATE_TYPES = {
    "int": (int,),
    "int | None": (int, type(None)),
    "float | None": (int, float, type(None)),
    "str": (str,),
    "str | None": (str, type(None)),
}
STATE_AT_LEAST_ONE = ("world_size", "grad_accum", "micro_batch_size")  # divisors and batch sizes


def state_problem(checkpoint: Path) -> str | None:
    """Why ftlaunch_state.json cannot be read back into a TrainState (None when it can)."""
    return parse_state(checkpoint)[1]


def parse_state(checkpoint: Path) -> tuple[TrainState | None, str | None]:
    """The checkpoint's TrainState, or why its ftlaunch_state.json cannot give one (read once)."""
    try:
        saved = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None, f"{STATE_FILE} is not readable JSON"
    if not isinstance(saved, dict):
        return None, f"{STATE_FILE} is not a JSON object"
    for field in fields(TrainState):
        if field.name not in saved:
            continue  # older versions wrote fewer fields: the default holds
        value = saved[field.name]
        if isinstance(value, bool) or not isinstance(value, STATE_TYPES.get(field.type, (object,))):
            return None, f"{STATE_FILE} has {field.name}={json.dumps(value)}"
        if field.name in STATE_AT_LEAST_ONE and value < 1:
            return None, f"{STATE_FILE} has {field.name}={value}"
    known = {field.name for field in fields(TrainState)}
    return TrainState(**{key: value for key, value in saved.items() if key in known}), None


def checkpoint_problem(checkpoint: Path, checksums: bool = True) -> str | None:
    """Why a checkpoint cannot be trusted (None when every file matches its manifest)."""
    from launcher.core.fingerprint import file_sha256

    if not (checkpoint / STATE_FILE).is_file():
        return f"no {STATE_FILE}"
    manifest = read_manifest(checkpoint)
    if manifest is None:
        return f"no readable {MANIFEST_FILE}: the save did not finish"
    for name, entry in manifest["files"].items():
        if not isinstance(entry, dict):
            return f"the {MANIFEST_FILE} entry of {name} is {json.dumps(entry)}, not an object"
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{name} is {size} bytes, its manifest says {entry.get('size')}"
    if checksums:
        for name, entry in manifest["files"].items():
            if "sha256" in entry and file_sha256(checkpoint / name) != entry["sha256"]:
                return f"{name} does not match its SHA-256 in the manifest"
    return state_problem(checkpoint)


def remove_incomplete(run_dir: Path) -> None:
    """Drop what a crash left mid-save (``.tmp-step_N``); complete checkpoints are untouched."""
    for leftover in RunDir(run_dir).checkpoint_tmps():
        shutil.rmtree(leftover, ignore_errors=True)


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints in ``root`` (a run's checkpoints/), oldest first (a folder counts once
    its state file is in it)."""
    found = [p for p in RunDir.checkpoint_dirs_in(root) if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: checkpoint_step(p.name))


def prune_checkpoints(root: Path, keep: int, best_step: int | None = None) -> None:
    """The newest ``keep`` checkpoints stay, and the best step's (train.best_metric) whatever its age."""
    for old in complete_checkpoints(root)[:-keep]:
        if best_step is None or old.name != checkpoint_name(best_step):
            shutil.rmtree(old, ignore_errors=True)


def find_intact_checkpoint(run_dir: Path, checksums: bool = True) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files match its manifest, and a line for each damaged newer one."""
    skipped = []
    for checkpoint in reversed(complete_checkpoints(checkpoints_dir(run_dir))):
        problem = checkpoint_problem(checkpoint, checksums)
        if problem is None:
            return checkpoint, skipped
        skipped.append(f"checkpoint {checkpoint} is damaged ({problem}): skipped")
    return None, skipped


def find_latest_checkpoint(run_dir: Path, checksums: bool = True) -> Path | None:
    """The newest intact checkpoint (``latest`` names it unless a newer save was cut short)."""
    return find_intact_checkpoint(run_dir, checksums)[0]


def has_checkpoints(run_dir: Path) -> bool:
    """Any checkpoint folder at all, intact or not (a run directory that holds training progress)."""
    return bool(complete_checkpoints(checkpoints_dir(run_dir)))


def not_a_checkpoint(path: Path) -> str:
    """Why ``--resume PATH`` names no checkpoint, and what to pass instead."""
    if not path.exists():
        return (
            "no such checkpoint folder; pass --resume auto (the newest intact one) "
            "or an existing RUN/checkpoints/step_N"
        )
    if RunDir(path).has_recipe():
        return (
            "that is a run directory, not one of its checkpoints; pass --resume auto "
            "(with --output that run) or one of its checkpoints/step_N"
        )
    return f"not a complete ftlaunch checkpoint (no {STATE_FILE} in it)"


def resolve_resume(run_dir: Path, resume: str | None, notes: list[str] | None = None) -> Path | None:
    """``auto``: the newest intact checkpoint of this run, if any; a path: that checkpoint, if intact.

    ``notes`` collects one line per damaged checkpoint ``auto`` skipped (and one when none is left).
    """
    if not resume:
        return None
    if resume == "auto":
        found, skipped = find_intact_checkpoint(run_dir)
        if notes is not None:
            notes.extend(skipped)
            if found is None and skipped:
                notes.append(f"no intact checkpoint in {checkpoints_dir(run_dir)}: starting from step 0")
        return found
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise UserError(f"--resume {resume}: {not_a_checkpoint(path)}")
    problem = checkpoint_problem(path)
    if problem:
        raise UserError(
            f"--resume {resume}: the checkpoint is damaged ({problem}); pass another checkpoint "
            f"from {path.parent}, or --resume auto for the newest intact one"
        )
    return path


def resolve_resume_on_main(accelerator, run_dir: Path, resume: str | None) -> Path | None:
    """resolve_resume on the main rank only (it reads and hashes the files), the answer sent to all ranks."""
    answer: list = [None]
    if accelerator.is_main_process:
        notes: list[str] = []
        try:
            found = resolve_resume(run_dir, resume, notes)
            answer = [("found", str(found) if found else None)]
        except UserError as exc:
            answer = [("error", str(exc))]
        for note in notes:
            print(note, flush=True)  # the launcher said so on the console already: the rank log only
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(answer, from_process=0)
    kind, value = answer[0]
    if kind == "error":
        raise UserError(value)
    return Path(value) if value else None


def read_state(checkpoint: Path) -> TrainState:
    """A checkpoint's TrainState (resolve_resume has already refused or skipped a damaged one)."""
    state, problem = parse_state(checkpoint)
    if state is None:
        raise UserError(
            f"checkpoint {checkpoint} is damaged ({problem}); pass another checkpoint from "
            f"{checkpoint.parent}, or --resume auto for the newest intact one"
        )
    return state


def check_compatible(
    saved: TrainState, current: TrainState, checkpoint: Path, force: bool = False, accept_batch: bool = False
) -> None:
    """Refuse to resume a checkpoint written by a run of another shape (DeepSpeed #3810) or one that
    trains something else (another model, tokenizer, training or validation data, method or LoRA
    shape). ``force`` (--force-resume) accepts all of these but the trained weights' own layout
    (another method or LoRA shape), which no rank could load. ``accept_batch`` accepts another
    micro batch, token budget and accumulation only (the supervisor's smaller micro batch,
    train.auto_find_batch_size)."""
    unloadable = unloadable_changes(saved, current)
    if unloadable:
        raise UserError(
            f"checkpoint {checkpoint} was written for other training inputs ({'; '.join(unloadable)}): "
            "its trained weights have another layout, which --force-resume cannot load; resume with the "
            "method and LoRA settings it was trained with, or start a new run (another --output)"
        )
    if force:
        return
    changed = [
        name
        for name in IDENTITY_FIELDS
        if getattr(saved, name) and getattr(current, name) and getattr(saved, name) != getattr(current, name)
    ]
    if changed:
        raise UserError(
            f"checkpoint {checkpoint} was written for other training inputs ({', '.join(describe(name, saved, current) for name in changed)}); "
            "resume with the model, tokenizer, data and method it was trained with, start a new run "
            "(another --output), or pass --force-resume to continue anyway"
        )
    repacked = repacked_budget(saved, current)
    if repacked:
        raise UserError(
            f"checkpoint {checkpoint} was written by a different run shape ({repacked}); resume with the "
            "train.compile it was trained with, or pass --force-resume to accept a changed data order"
        )
    if moves_world_size(saved, current):
        return
    # ranks and accumulation that keep the micro-batches per step are a move (ftlaunch sets the
    # accumulation itself): not worth naming when something else refuses the resume
    moved = (
        ("world_size", "grad_accum")
        if micro_batches_per_step(saved) == micro_batches_per_step(current)
        else ()
    )
    problems = [
        f"{name} {getattr(saved, name)} -> {getattr(current, name)}"
        for name in (*SHAPE_FIELDS, "strategy")
        if getattr(saved, name) != getattr(current, name)
        and (name != "strategy" or saved.strategy)
        and name not in moved
        and not (accept_batch and name in BATCH_FIELDS)
    ]
    if problems:
        raise UserError(
            f"checkpoint {checkpoint} was written by a different run shape ({'; '.join(problems)}); resume with "
            "the same batch settings (other --gpus/--nodes and another strategy are fine when the micro-batches "
            "per step are kept), or pass --force-resume to accept a changed data order"
        )


# The parts of a LoRA fingerprint that are not tensors (the scaling): a change of them still loads.
SCALING_ONLY = ("alpha=", "rslora")


def lora_layout(fingerprint: str) -> dict[str, str]:
    """What of a LoRA fingerprint (``r=8 alpha=16 targets=q,v dora``) shapes the saved tensors."""
    parts = [part for part in fingerprint.split() if not part.startswith(SCALING_ONLY)]
    return {part.split("=", 1)[0]: part.split("=", 1)[-1] if "=" in part else "on" for part in parts}


def unloadable_changes(saved: TrainState, current: TrainState) -> list[str]:
    """Changes of the trained tensors' layout (another method, LoRA rank, targets or DoRA), named;
    empty when the checkpoint's weights load into this run (checkpoints of versions that did not
    record their LoRA shape are compared on the method only)."""
    if saved.method != current.method:
        return [f"train.method {saved.method} -> {current.method}"]
    if not (saved.lora and current.lora):
        return []
    old, new = lora_layout(saved.lora), lora_layout(current.lora)
    names = {"r": "lora.r", "targets": "lora.target_modules", "dora": "lora.use_dora"}
    keys = [*names, *sorted((set(old) | set(new)) - set(names))]
    return [
        f"{names.get(key, key)} {old.get(key, 'off')} -> {new.get(key, 'off')}"
        for key in keys
        if old.get(key) != new.get(key) and not (key == "targets" and same_targets(old[key], new[key]))
    ]


def same_targets(old: str, new: str) -> bool:
    """LoRA targets as fingerprinted: ``query+value`` (lora.target_modules unset) is the family's
    query and value projections, the same layers as naming them (``q,v`` for T5)."""
    from launcher.core.families import QUERY_VALUE_NAMES

    def layers(targets: str) -> set[frozenset[str]]:
        if targets == "query+value":
            return {frozenset(pair) for pair in QUERY_VALUE_NAMES}
        return {frozenset(targets.split(","))}

    return bool(layers(old) & layers(new))


def describe(name: str, saved: TrainState, current: TrainState) -> str:
    """One changed input in words (content fingerprints are not worth showing)."""
    old, new = getattr(saved, name), getattr(current, name)
    if name == "data":
        return "data: the training file or a data.* setting (split, limit, prompt, lengths) changed"
    if name == "validation":
        return (
            "validation: the validation file or data.validation_split/validation_limit changed, so "
            "train.best_metric and early stopping would compare validation values across the change"
        )
    if old.startswith("sha256:") or new.startswith("sha256:"):
        return f"{name}: other files than the checkpoint's"
    return f"{name} {old or 'none'} -> {new or 'none'}"
