"""The final save: a standard Hugging Face model directory (full) or a PEFT adapter (LoRA).

Under ZeRO-3 every rank holds a shard, so the state dict is gathered on all ranks first
(``accelerator.get_state_dict``): saving the unwrapped model directly writes empty adapters
(peft #2500). Under DeepSpeed with bf16 the module holds bf16 copies; a full fine-tune saves
the fp32 master weights instead, so no precision is lost in the saved model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from launcher.distributed import print_main, uses_deepspeed, without_zero3_init
from launcher.recipe import Recipe


def fp32_master_state_dict(accelerator, model) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights from DeepSpeed's optimizer (every rank must call; main gets the dict)."""
    from deepspeed.utils import safe_get_full_fp32_param

    state: dict[str, torch.Tensor] = {}
    for name, param in accelerator.unwrap_model(model).named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is not None and accelerator.is_main_process:
            state[name] = full.detach().cpu().clone()
    return state if accelerator.is_main_process else None


def gathered_state_dict(accelerator, model, method: str):
    if uses_deepspeed(accelerator) and method == "full" and accelerator.mixed_precision == "bf16":
        masters = fp32_master_state_dict(accelerator, model)
        if masters is not None:
            full = accelerator.get_state_dict(model)  # buffers and any parameter without a master
            full.update(masters)
            return full
        accelerator.get_state_dict(model)  # collective: every rank takes part
        return None
    return accelerator.get_state_dict(model)


def save_final(accelerator, model, tokenizer, recipe: Recipe, out_dir: Path) -> None:
    state_dict = gathered_state_dict(accelerator, model, recipe.train.method)
    if accelerator.is_main_process:
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
        print_main(accelerator, f"saved {'adapter' if recipe.train.method == 'lora' else 'model'} to {out_dir}")
    accelerator.wait_for_everyone()
    if recipe.train.method == "lora" and recipe.lora.save_merged and accelerator.is_main_process:
        save_merged(accelerator, recipe, tokenizer, out_dir)
    accelerator.wait_for_everyone()


def save_merged(accelerator, recipe: Recipe, tokenizer, adapter_dir: Path) -> None:
    """Base model + adapter folded into one ordinary model directory (final/merged)."""
    from launcher.model import load_for_inference

    with without_zero3_init():
        model = load_for_inference(recipe.model.name, str(adapter_dir), len(tokenizer), recipe)
    merged = model.merge_and_unload()
    merged.save_pretrained(str(adapter_dir / "merged"), safe_serialization=True)
    tokenizer.save_pretrained(str(adapter_dir / "merged"))
    print_main(accelerator, f"saved merged model to {adapter_dir / 'merged'}")
