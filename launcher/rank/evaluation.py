"""Generation on all ranks, gathered once per example, scored with ROUGE.

Generation batches are formed once for the whole split (length-sorted, ``eval.batch_size``
each) and dealt whole to ranks, so predictions do not depend on the number of ranks. Under
ZeRO-3 and FSDP2 the whole model is gathered once for the generation when it fits
(``gathered.weights_for_generation``); otherwise every rank makes the same number of ``generate``
calls (placeholder batches where its share ran out), so the ranks' lockstep (``synced_gpus``)
cannot hang. Results are gathered as (index, text) objects and the main process checks it got
exactly one prediction per example before writing anything.

Entry point for ``ftlaunch eval``: ``accelerate launch -m launcher.rank.evaluation --run-dir OUT``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from launcher.core.dialogues import load_data_split
from launcher.core.fingerprint import examples_fingerprint
from launcher.core.jsonl import write_jsonl
from launcher.core.recipe import GENERATION_KEYS, MEASUREMENT_KEYS, Recipe
from launcher.core.recipe_loading import read_run_recipe
from launcher.core.rundir import ResultDir, RunDir
from launcher.rank.data import build_prompt, check_prompt_room, dealt_generation_batches
from launcher.rank.distributed import (
    build_accelerator,
    precision_autocast,
    print_main,
    without_zero3_init,
)
from launcher.rank.fsdp import root_weights_gathered
from launcher.rank.gathered import weights_for_generation
from launcher.rank.model import gather_dora_layers_whole, load_for_inference, load_tokenizer
from launcher.rank.progress import make_progress
from launcher.results.scoring import score_predictions


@torch.no_grad()
def generate_predictions(accelerator, model, tokenizer, rows: list[dict], recipe: Recipe) -> list[str]:
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
    with weights_for_generation(accelerator, model, generator, recipe.eval.gather_weights) as synced:
        for shard in shards:
            if shard.indices or synced:  # a placeholder batch only keeps ranks in lockstep
                local += generate_batch(
                    accelerator, generator, tokenizer, prompts, shard.indices, recipe, synced
                )
            progress.update(1)
    progress.close()
    gathered = gather_object(local) if accelerator.num_processes > 1 else local
    return in_dataset_order(gathered, len(rows))


def generate_batch(
    accelerator, generator, tokenizer, prompts: list[str], indices: list[int], recipe: Recipe, synced: bool
) -> list[tuple[int, str]]:
    """One ``generate`` call: (index, summary) for each of ``indices`` (none for a placeholder
    batch, which generates for the first prompt so that a rank in lockstep joins every step)."""
    inputs = tokenizer(
        [prompts[i] for i in indices or [0]],
        max_length=recipe.data.max_source_length,
        truncation=True,
        padding=True,
        return_tensors="pt",
    ).to(accelerator.device)
    # In lockstep under FSDP2 the root's own weights are gathered for the call (generate runs the
    # encoder outside the root's forward); gathered whole, they already are.
    gathered_root = root_weights_gathered(generator) if synced else contextlib.nullcontext()
    with precision_autocast(recipe, accelerator.device), gathered_root:
        output = generator.generate(**inputs, **recipe.eval.generation(), synced_gpus=synced)
    texts = tokenizer.batch_decode(output, skip_special_tokens=True)
    return [(index, text.strip()) for index, text in zip(indices, texts)]


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


def run_info(recipe: Recipe, model_label: str, rows: list[dict]) -> dict[str, Any]:
    """What rouge.json records beside the scores: which model, data and generation settings, and
    which examples were scored (``examples``: a fingerprint of their ids, dialogues and references)."""
    return {
        "model": model_label,
        "adapter": recipe.model.adapter,
        "dataset": recipe.data.dataset,
        "split": recipe.eval.split,
        "limit": recipe.eval.limit,
        "source_field": recipe.data.source_field,
        "target_field": recipe.data.target_field,
        "prompt": recipe.data.prompt,
        "max_source_length": recipe.data.max_source_length,
        **{key: getattr(recipe.eval, key) for key in GENERATION_KEYS},
        "batch_size": recipe.eval.batch_size,  # the generation batches: the same on any number of ranks
        "examples": examples_fingerprint(rows),
    }


# What decides an evaluation's predictions and scores besides the model's weights, as rouge.json
# records it (run_info, and the scoring settings score_predictions adds), with the recipe key
# that sets it. The original model's record is kept across resumes only while all of them match.
EVAL_INPUTS = {
    "split": "eval.split",
    "limit": "eval.limit",
    **{key: f"eval.{key}" for key in MEASUREMENT_KEYS},
    "source_field": "data.source_field",
    "target_field": "data.target_field",
    "prompt": "data.prompt",
    "max_source_length": "data.max_source_length",
    "examples": "examples",
}
# Inputs shown as a change, not as values (a prompt is long, a fingerprint says nothing).
CONTENT_INPUTS = ("prompt", "examples")


def current_eval_inputs(recipe: Recipe, rows: list[dict]) -> dict[str, Any]:
    """EVAL_INPUTS as an evaluation of ``recipe`` on ``rows`` would record them now."""
    recorded = run_info(recipe, "", rows) | {
        "scoring": recipe.eval.scoring,
        "use_stemmer": recipe.eval.use_stemmer,
        "split_sentences": recipe.eval.split_sentences,
    }
    return {key: recorded[key] for key in EVAL_INPUTS}


def rescore_reason(rouge_file: Path, current: dict[str, Any]) -> str | None:
    """Why the original's existing scores do not compare with an evaluation made now (None when
    they do): a changed generation, scoring, prompt or split setting, other examples, or a record
    that does not say (written before ftlaunch recorded them, or rescored by ``ftlaunch score``
    against other examples)."""
    name = f"{rouge_file.parent.parent.name}/{rouge_file.parent.name}"
    try:
        recorded = json.loads(rouge_file.read_text())
    except (OSError, ValueError):
        recorded = None
    if not isinstance(recorded, dict):
        return f"{name}/{rouge_file.name} is not readable; scoring the original again"
    missing = [key for key in EVAL_INPUTS if key not in recorded]
    if missing:
        # `ftlaunch score` records the predictions file it scored; it keeps the evaluation's
        # record of the same predictions, the examples only while it scored the same ones
        writer = (
            "rewritten by `ftlaunch score`"
            if "predictions" in recorded
            else "written by an older ftlaunch or by `ftlaunch score`"
        )
        return (
            f"{name}/{rouge_file.name} does not record its {', '.join(EVAL_INPUTS[key] for key in missing)} "
            f"({writer}); scoring the original again so that it compares with the fine-tuned model"
        )
    changed = [key for key in EVAL_INPUTS if recorded[key] != current[key]]
    if not changed:
        return None
    if {"split", "limit"} & set(changed):  # other examples, said by the setting that chose them
        changed = [key for key in changed if key != "examples"]
    settings = [key for key in changed if key not in CONTENT_INPUTS]
    content = [
        f"other {current['split']} examples" if key == "examples" else f"another {EVAL_INPUTS[key]}"
        for key in changed
        if key in CONTENT_INPUTS
    ]

    def values(source: dict[str, Any]) -> str:
        return ", ".join(f"{EVAL_INPUTS[key]}={json.dumps(source[key])}" for key in settings)

    if not settings:
        return f"{name} was scored with {' and '.join(content)}; scoring the original again with the current ones"
    also = f" (and {' and '.join(content)})" if content else ""
    return (
        f"{name} was scored with {values(recorded)}{also}; scoring the original again with {values(current)}"
    )


def original_needs_scoring(accelerator, recipe: Recipe, run_dir: Path) -> bool:
    """No scores of the original yet, or scores made with other evaluation inputs (a resume with
    changed eval.* settings or an edited test split): decided on the main rank, said in one line,
    the answer sent to all ranks (they generate together or not at all)."""
    answer = [True]
    if accelerator.is_main_process:
        result = RunDir(run_dir).eval_original
        if result.has_rouge():
            reason = rescore_reason(result.rouge, current_eval_inputs(recipe, eval_rows(recipe)))
            if reason:
                print_main(accelerator, reason)
            answer = [reason is not None]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(answer, from_process=0)
    return bool(answer[0])


def evaluate_model(accelerator, model, tokenizer, recipe: Recipe, out_dir: Path, label: str) -> dict | None:
    """Generate on the recipe's eval split, gather, score and write one model's predictions
    (labelled ``label`` in rouge.json); returns the scores on main."""
    rows = eval_rows(recipe)
    info = run_info(recipe, label, rows)
    predictions = generate_predictions(accelerator, model, tokenizer, rows, recipe)
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
    does not compare, or when a resumed run already holds scores made with the same evaluation
    inputs (split, examples, generation and scoring settings; original_needs_scoring).
    """
    if not (recipe.eval.after_training and recipe.eval.compare_original):
        return
    if not original_needs_scoring(accelerator, recipe, run_dir):
        return
    devices = [accelerator.device.index or 0] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # training draws the same random numbers either way
        label = f"{recipe.model.name} (original)"
        evaluate_model(accelerator, model, tokenizer, recipe, original_eval_dir(run_dir), label)
    accelerator.wait_for_everyone()


def evaluate_after_training(accelerator, model, tokenizer, recipe: Recipe, run_dir: Path) -> None:
    """The fine-tuned model (as trained, sharded or not), then the report with the original's
    scores written before training (``evaluate_original``)."""
    label = f"{recipe.model.name} ({recipe.train.method} fine-tuned)"
    out_dir = RunDir(run_dir).eval_finetuned.path
    evaluate_model(accelerator, model, tokenizer, recipe, out_dir, label)
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
    check_prompt_room(tokenizer, recipe)
    # Load whole on every rank, then let DeepSpeed shard it: the same path as training.
    with without_zero3_init():
        model = load_for_inference(recipe.model.name, recipe.model.adapter, len(tokenizer), recipe)
    if recipe.launch.zero:
        if recipe.launch.zero == 3:
            gather_dora_layers_whole(model)
        model = accelerator.prepare(model)  # ZeRO-3 shards the weights over the ranks
    else:
        model = model.to(accelerator.device)
    evaluate_model(accelerator, model, tokenizer, recipe, run_dir, evaluated_label(recipe))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def evaluated_label(recipe: Recipe) -> str:
    """What ``ftlaunch eval`` scored, for rouge.json's ``model`` and the console: the model, and
    the adapter on it (scores of an adapter must not read as its base model's own)."""
    if recipe.model.adapter:
        return f"{recipe.model.name} + adapter {recipe.model.adapter}"
    return recipe.model.name


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
