"""The final save: a standard Hugging Face model directory (full) or a PEFT adapter (LoRA).

Under ZeRO-3 every rank holds a shard, so the state dict is gathered on all ranks first
(``accelerator.get_state_dict``): saving the unwrapped model directly writes empty adapters
(peft #2500). Weights are saved in fp32, as trained, and config.json says so.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from launcher.core.atomic import abandoned_stagings, replace_dir, staging_sibling
from launcher.core.model_settings import write_inference_settings
from launcher.core.ranklog import console_print
from launcher.core.recipe import Recipe
from launcher.core.rundir import MERGED_DIR, RunDir
from launcher.rank.distributed import print_main, without_zero3_init


def without_tied_copies(model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None):
    """Drop the names under which a tied parameter appears a second time (T5's encoder and
    decoder ``embed_tokens`` are ``shared``). DeepSpeed's ZeRO-1/2 state dict holds clones, which
    save_pretrained can no longer recognise as one tensor: each would be written again."""
    if state_dict is None:
        return None
    first: dict[int, str] = {}
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases.add(name)
        else:
            first[id(param)] = name
    return {name: tensor for name, tensor in state_dict.items() if name not in aliases}


def saved_dtype(state_dict: dict[str, torch.Tensor] | None) -> torch.dtype:
    floats = {t.dtype for t in (state_dict or {}).values() if t.is_floating_point()}
    return floats.pop() if len(floats) == 1 else torch.float32


def save_final(accelerator, model, tokenizer, recipe: Recipe, out_dir: Path) -> None:
    # Every rank takes part (ZeRO-3 gathers the shards); fp32 under every strategy, since
    # DeepSpeed runs with torch_autocast and keeps fp32 weights in its module.
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        state_dict = without_tied_copies(unwrapped, state_dict)
        base_config = getattr(unwrapped, "config", None)
        if base_config is not None and recipe.train.method == "full":
            base_config.dtype = saved_dtype(state_dict)  # what the files hold, not the autocast dtype
        unwrapped.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        write_inference_settings(tmp, recipe)
        replace_dir(tmp, out_dir)
        print_main(
            accelerator, f"saved {'adapter' if recipe.train.method == 'lora' else 'model'} to {out_dir}"
        )
    accelerator.wait_for_everyone()
    if recipe.train.method == "lora" and recipe.lora.save_merged and accelerator.is_main_process:
        save_merged(accelerator, recipe, tokenizer, out_dir)
    accelerator.wait_for_everyone()


def save_merged(accelerator, recipe: Recipe, tokenizer, adapter_dir: Path) -> None:
    """Base model + adapter folded into one ordinary model directory (final/merged)."""
    from launcher.rank.model import load_for_inference

    with without_zero3_init():
        model = load_for_inference(recipe.model.name, str(adapter_dir), len(tokenizer), recipe)
    merged = model.merge_and_unload()
    out_dir = adapter_dir / MERGED_DIR
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    write_inference_settings(out_dir, recipe, method="full")
    print_main(accelerator, f"saved merged model to {out_dir}")


# ---------------------------------------------------------------- ftlaunch export

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def export_run(run_dir: Path, output: Path, merge: bool, dtype: str) -> Path:
    """A standalone folder from a run's final/: the model (a LoRA adapter merged into its base
    with PEFT's ``merge_and_unload`` when asked), weights in ``dtype``, tokenizer, settings, card.

    Everything the export reads is read and checked first (the model card included), then the
    folder is built beside ``output`` and renamed into place: ``output`` is absent or complete.
    """
    from launcher.core.errors import UserError
    from launcher.core.model_settings import inference_settings
    from launcher.core.modelfiles import check_model_files
    from launcher.core.recipe_loading import read_run_recipe
    from launcher.rank.quiet import quiet_libraries

    quiet_libraries()
    from launcher.results.card import CARD_FILE, render_card

    run = RunDir(run_dir.expanduser().resolve())
    run_dir, final = run.path, run.final
    if not run.has_recipe():
        inside = next((p for p in run_dir.parents if RunDir(p).has_recipe()), None)
        if inside and not RunDir(inside).final.is_dir():
            raise UserError(RunDir(inside).no_final_yet())
        fix = f"it is inside the run {inside}: pass that" if inside else "pass a run directory"
        raise UserError(f"{run_dir} is not a finished run (no {run.recipe_yaml.name}); {fix}")
    if not final.is_dir():
        raise UserError(run.no_final_yet())
    check_model_files(final, "run")
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype {dtype} is not supported; use bf16 or fp32")
    output = output.expanduser().resolve()
    check_export_output(output)
    recipe = read_run_recipe(run_dir)
    lora = recipe.train.method == "lora"
    if lora and not merge:
        if dtype != "fp32":
            raise UserError("--dtype bf16 applies to a model; add --merge to export a LoRA run as one model")
        with staged_dir(output) as staging:
            shutil.copytree(final, staging, dirs_exist_ok=True)
        return output
    card = render_card(run_dir, library="transformers", settings=inference_settings(recipe, method="full"))
    with staged_dir(output) as staging:
        save_exported_model(recipe, final, staging, EXPORT_DTYPES[dtype])
        (staging / CARD_FILE).write_text(card)
    return output


def save_exported_model(recipe: Recipe, final: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """One ordinary model directory (LoRA merged into its base) in ``dtype``, with its tokenizer
    and the run's inference settings."""
    from launcher.rank.model import load_for_inference, load_tokenizer

    lora = recipe.train.method == "lora"
    tokenizer_recipe = recipe.model_copy(
        update={"model": recipe.model.model_copy(update={"tokenizer": str(final)})}
    )
    tokenizer = load_tokenizer(tokenizer_recipe)
    name, adapter = (recipe.model.name, str(final)) if lora else (str(final), None)
    model = load_for_inference(name, adapter, len(tokenizer), recipe)
    if lora:
        model = model.merge_and_unload()
    model = model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    write_inference_settings(out_dir, recipe, method="full")


def check_export_output(output: Path) -> None:
    """``--output`` must be a new (or empty) directory that can be written, and so must the folder
    holding it: the export is built beside it and renamed into place."""
    from launcher.core.errors import UserError
    from launcher.core.writable import check_writable_dir

    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; pass a new directory for the export")
    if output.is_dir():
        try:
            occupied = any(output.iterdir())
        except OSError as exc:
            raise UserError(
                f"--output {output} cannot be read ({exc.strerror}); pick a new directory for the export"
            ) from None
        if occupied:
            raise UserError(f"--output {output} is not empty; pick a new directory for the export")
    check_writable_dir(output, "--output")
    if output.is_dir():  # the check above created nothing: the staging folder needs the parent
        check_writable_dir(output.parent, f"--output {output.name}'s parent folder")


@contextmanager
def staged_dir(output: Path) -> Iterator[Path]:
    """A fresh folder beside ``output``, put in its place when the block ends; on any failure it
    is removed (with the parents made for it), so ``output`` is never left half-written."""
    from launcher.core.errors import UserError

    made = [folder for folder in reversed(output.parents) if not folder.exists()]
    staging = staging_sibling(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        for abandoned in [staging, *abandoned_stagings(output)]:
            if abandoned.exists():
                console_print(f"removing {abandoned}, left by an export that was killed")
            shutil.rmtree(abandoned, ignore_errors=True)
        staging.mkdir()
        yield staging
        if output.is_dir():
            try:
                output.rmdir()  # the empty --output: refuses (and keeps) anything written there meanwhile
            except OSError as exc:
                raise UserError(
                    f"--output {output} was written to during the export ({exc.strerror}); "
                    "pick a new directory for the export"
                ) from None
        replace_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(made):
            try:
                folder.rmdir()
            except OSError:
                pass  # another process wrote into it meanwhile: not ours to remove
        raise
