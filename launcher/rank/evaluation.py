"""Generation on all ranks, gathered once per example, scored with ROUGE.

Generation batches are formed once for the whole split (length-sorted, ``eval.batch_size``
each) and dealt whole to ranks, so predictions do not depend on the number of ranks; every rank
makes the same number of ``generate`` calls (placeholder batches where its share ran out), so
ZeRO-3's and FSDP's ``synced_gpus`` generation cannot hang. Results are gathered as (index, text) objects and the main process checks it got
exactly one prediction per example before writing anything.

Entry point for ``ftlaunch eval``: ``accelerate launch -m launcher.rank.evaluation --run-dir OUT``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from launcher.core.dialogues import load_data_split
from launcher.core.jsonl import write_jsonl
from launcher.core.recipe import GENERATION_KEYS, Recipe, read_run_recipe
from launcher.core.rundir import ResultDir, RunDir
from launcher.rank.data import build_prompt, dealt_generation_batches
from launcher.rank.distributed import (
    build_accelerator,
    precision_autocast,
    print_main,
    shards_weights,
    without_zero3_init,
    zero_stage,
)
from launcher.rank.fsdp import root_weights_gathered
from launcher.rank.model import gather_dora_layers_whole, load_for_inference, load_tokenizer
from launcher.rank.progress import make_progress
from launcher.results.scoring import score_predictions


@torch.no_grad()
def generate_predictions(
    accelerator, model, tokenizer, rows: list[dict], recipe: Recipe, synced: bool
) -> list[str]:
    """Predictions for ``rows`` in dataset order, on every rank."""
    from accelerate.utils import gather_object

    prompts = [build_prompt(recipe.data.prompt, row["dialogue"]) for row in rows]
    lengths = [
        len(ids)
        for ids in tokenizer(prompts, max_length=recipe.data.max_source_length, truncation=True)["input_ids"]
    ]
    generator = accelerator.unwrap_model(model)
    generator.eval()
    local: list[tuple[int, str]] = []
    shards = dealt_generation_batches(
        lengths, recipe.eval.batch_size, accelerator.process_index, accelerator.num_processes
    )
    # Every rank runs the same number of batches (lockstep): the main rank's count is the job's.
    progress = make_progress(accelerator.is_main_process, len(shards), 0, label="generating", unit="batch")
    for shard in shards:
        indices = shard.indices or [0]
        inputs = tokenizer(
            [prompts[i] for i in indices],
            max_length=recipe.data.max_source_length,
            truncation=True,
            padding=True,
            return_tensors="pt",
        ).to(accelerator.device)
        with precision_autocast(recipe, accelerator.device), root_weights_gathered(generator):
            output = generator.generate(**inputs, **recipe.eval.generation(), synced_gpus=synced)
        texts = tokenizer.batch_decode(output, skip_special_tokens=True)
        if shard.indices:
            local += [(index, text.strip()) for index, text in zip(shard.indices, texts)]
        progress.update(1)
    progress.close()
    gathered = gather_object(local) if accelerator.num_processes > 1 else local
    return in_dataset_order(gathered, len(rows))


def in_dataset_order(pairs: list[tuple[int, str]], expected: int) -> list[str]:
    """Exactly one prediction per example, or a loud failure (never a silently short report)."""
    by_index = dict(pairs)
    if len(pairs) != expected or len(by_index) != expected or set(by_index) != set(range(expected)):
        raise RuntimeError(
            f"gathered {len(pairs)} predictions ({len(by_index)} distinct) for {expected} examples"
        )
    return [by_index[i] for i in range(expected)]


def write_eval_outputs(
    out_dir: Path, rows: list[dict], predictions: list[str], scores: dict, info: dict
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    result = ResultDir(out_dir)
    write_jsonl(
        result.predictions,
        (
            {"id": row["id"], "prediction": p, "references": row["references"]}
            for row, p in zip(rows, predictions)
        ),
    )
    result.rouge.write_text(json.dumps({**scores, **info}, indent=2) + "\n")


def eval_rows(recipe: Recipe) -> list[dict]:
    return load_data_split(recipe.data, recipe.eval.split, recipe.eval.limit)


def run_info(recipe: Recipe, model_label: str) -> dict[str, Any]:
    """What rouge.json records beside the scores: which model, data and generation settings."""
    return {
        "model": model_label,
        "adapter": recipe.model.adapter,
        "dataset": recipe.data.dataset,
        "split": recipe.eval.split,
        "source_field": recipe.data.source_field,
        "target_field": recipe.data.target_field,
        **{key: getattr(recipe.eval, key) for key in GENERATION_KEYS},
        "batch_size": recipe.eval.batch_size,  # the generation batches: the same on any number of ranks
    }


def evaluate_model(
    accelerator, model, tokenizer, recipe: Recipe, out_dir: Path, label: str, synced: bool
) -> dict | None:
    """Generate on the recipe's eval split, gather, score and write one model's predictions
    (labelled ``label`` in rouge.json); returns the scores on main."""
    rows = eval_rows(recipe)
    info = run_info(recipe, label)
    predictions = generate_predictions(accelerator, model, tokenizer, rows, recipe, synced)
    if not accelerator.is_main_process:
        return None
    scores = score_predictions(predictions, [row["references"] for row in rows], recipe.eval)
    write_eval_outputs(out_dir, rows, predictions, scores, info)
    print_main(
        accelerator,
        f"{info['model']}: rouge1 {scores['rouge1']:.4f} rouge2 {scores['rouge2']:.4f} "
        f"rougeL {scores['rougeL']:.4f} rougeLsum {scores['rougeLsum']:.4f} (n={scores['n']})",
    )
    return scores


def original_eval_dir(run_dir: Path) -> Path:
    return RunDir(run_dir).eval_original.path


def evaluate_original(accelerator, model, tokenizer, recipe: Recipe, run_dir: Path) -> None:
    """Score the model before fine-tuning: the very module that will be trained, already
    prepared (sharded under ZeRO-3, in the recipe's autocast), before its first step.

    So the original and the fine-tuned model are generated with the same code, precision and
    memory footprint, and no second copy of the model is ever loaded. Skipped when the recipe
    does not compare, or when a resumed run already holds the scores.
    """
    if not (recipe.eval.after_training and recipe.eval.compare_original):
        return
    if RunDir(run_dir).eval_original.has_rouge():
        return
    devices = [accelerator.device.index or 0] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # training draws the same random numbers either way
        label = f"{recipe.model.name} (original)"
        evaluate_model(
            accelerator,
            model,
            tokenizer,
            recipe,
            original_eval_dir(run_dir),
            label,
            shards_weights(accelerator),
        )
    accelerator.wait_for_everyone()


def evaluate_after_training(accelerator, model, tokenizer, recipe: Recipe, run_dir: Path) -> None:
    """The fine-tuned model (as trained, sharded or not), then the report with the original's
    scores written before training (``evaluate_original``)."""
    label = f"{recipe.model.name} ({recipe.train.method} fine-tuned)"
    out_dir = RunDir(run_dir).eval_finetuned.path
    evaluate_model(accelerator, model, tokenizer, recipe, out_dir, label, shards_weights(accelerator))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from launcher.results.card import write_model_card
        from launcher.results.report import write_run_report

        write_run_report(run_dir)
        write_model_card(run_dir)  # after the report: the card's ROUGE is report/rouge.json


def evaluate_standalone(run_dir: Path) -> int:
    """``ftlaunch eval``: one model (optionally + adapter) on one split, on every rank."""
    recipe = read_run_recipe(run_dir)
    accelerator = build_accelerator(recipe)
    tokenizer = load_tokenizer(recipe)
    # Load whole on every rank, then let DeepSpeed shard it: the same path as training.
    with without_zero3_init():
        model = load_for_inference(recipe.model.name, recipe.model.adapter, len(tokenizer), recipe)
    synced = False
    if recipe.launch.zero:
        if recipe.launch.zero == 3:
            gather_dora_layers_whole(model)
        model = accelerator.prepare(model)  # ZeRO-3 shards the weights over the ranks
        synced = zero_stage(accelerator) == 3
    else:
        model = model.to(accelerator.device)
    evaluate_model(accelerator, model, tokenizer, recipe, run_dir, recipe.model.name, synced)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def main(argv: list[str] | None = None) -> int:
    from launcher.core.ranklog import rank_main

    return rank_main(
        argv,
        "Generate and score one model on one split (ftlaunch eval).",
        lambda run_dir, _args: evaluate_standalone(run_dir),
    )


if __name__ == "__main__":
    from launcher.core.ranklog import exit_rank

    exit_rank(main())
