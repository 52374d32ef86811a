"""Evaluations during training, the best step and early stopping (``train.best_metric``).

Every ``train.eval_every`` steps (or epochs) the loop measures the validation loss, every
``eval.rouge_every`` steps (or epochs) ROUGE on the validation split (generated on all ranks with the
evaluation's own distributed generation). When the recipe names a best metric, each evaluation
of it is compared with the best so far: a better one is saved as a checkpoint that pruning
keeps; ``train.early_stopping_patience`` evaluations without one end training early. At the end
the best checkpoint's weights are loaded back (``accelerator.load_state``, any strategy), so
``final/``, the final evaluation and the report are the best step's model. The last step's own
validation loss is measured before (when due); the final one, of the best step's model, is logged
with its ``model_step``.

The record (best step, value, evaluations since) lives in ``TrainState``: a resumed run keeps it.
"""

from __future__ import annotations

from pathlib import Path

from launcher.core import checkpoint as ckpt
from launcher.core.recipe import MEASUREMENT_KEYS, Recipe
from launcher.core.rundir import RunDir
from launcher.rank.distributed import print_main
from launcher.results.rouge import ROUGE_TYPES


def metric_key(best_metric: str) -> str:
    """The metrics.jsonl key a best metric is logged under (validation ROUGE: ``val_rougeLsum``)."""
    return best_metric if best_metric == "val_loss" else f"val_{best_metric}"


def interval_due(every: int | str | None, step: int, epoch_ended: bool) -> bool:
    """A recipe interval (``train.eval_every``, ``train.checkpoint_every``, ``eval.rouge_every``)
    at this optimizer step: every N steps, at the step that ends an epoch (``epoch``), or never."""
    if every == "epoch":
        return epoch_ended
    return bool(every) and step % every == 0


def due(
    step: int, every: int | str | None, last_step: int, best_metric_here: bool, epoch_ended: bool
) -> bool:
    """Every ``every`` steps (or epochs); also at the last step when the best metric is measured
    this way, so the final weights compete with the earlier ones."""
    if not every:
        return False
    return interval_due(every, step, epoch_ended) or (best_metric_here and step == last_step)


def improves(value: float, best: float | None, best_metric: str, delta: float) -> bool:
    """ROUGE: higher is better; val_loss: lower. ``delta``: the margin that counts as better."""
    if best is None:
        return True
    return value < best - delta if best_metric == "val_loss" else value > best + delta


def record(state: ckpt.TrainState, recipe: Recipe, value: float) -> bool:
    """Update the best-so-far record with this evaluation; True when it is the new best."""
    train = recipe.train
    if improves(value, state.best_value, train.best_metric, train.early_stopping_delta):
        state.best_step, state.best_value, state.best_metric = state.step, value, train.best_metric
        state.best_measured = measurement(recipe)
        state.evaluations_without_improvement = 0
        return True
    state.evaluations_without_improvement += 1
    return False


def early_stop_reason(state: ckpt.TrainState, recipe: Recipe) -> str | None:
    """Why training stops now (patience used up), or None."""
    train = recipe.train
    patience = train.early_stopping_patience
    if not patience or state.evaluations_without_improvement < patience:
        return None
    margin = f" by more than {train.early_stopping_delta:g}" if train.early_stopping_delta else ""
    return (
        f"early stopping at step {state.step}: {metric_key(train.best_metric)} did not improve{margin} "
        f"in {patience} evaluation(s) since step {state.best_step} ({state.best_value:.4f})"
    )


def validation_rouge(accelerator, model, tokenizer, recipe: Recipe, run_dir: Path, step: int) -> dict:
    """ROUGE of the model as it is now on the validation split (its first ``eval.rouge_limit``
    dialogues), generated on every rank in lockstep like the final evaluation; the scores (fractions)
    on every rank, so every rank takes the same best/early-stop decision. Predictions are kept in
    ``eval/step_N/``."""
    from accelerate.utils import broadcast_object_list

    from launcher.rank.evaluation import evaluate_model

    settings = recipe.eval.model_copy(
        update={"split": recipe.data.validation_split, "limit": recipe.eval.rouge_limit}
    )
    during = recipe.model_copy(update={"eval": settings})
    label = f"{recipe.model.name} (step {step})"
    out_dir = RunDir(run_dir).eval_step(step).path
    scores = evaluate_model(accelerator, model, tokenizer, during, out_dir, label)
    model.train()  # generation put it in eval mode
    shared = broadcast_object_list([scores]) if accelerator.num_processes > 1 else [scores]
    return {f"val_{key}": shared[0][key] for key in ROUGE_TYPES}


# What a validation ROUGE depends on besides the weights (the validation split itself is
# fingerprinted with the checkpoint, and a change of it refused).
ROUGE_MEASUREMENT = ("rouge_limit", *MEASUREMENT_KEYS)


def measurement(recipe: Recipe) -> str:
    """How train.best_metric is measured, as ``eval.rouge_limit=16, eval.num_beams=1, ...``: two
    ROUGE values compare only when measured alike (a validation loss has no such settings)."""
    if recipe.train.best_metric not in ROUGE_TYPES:
        return ""
    return ", ".join(f"eval.{key}={getattr(recipe.eval, key)}" for key in ROUGE_MEASUREMENT)


def measured_otherwise(before: str, now: str) -> str:
    """The settings that differ between two measurements, ``eval.rouge_limit 16 -> 8``."""
    # partition, not split: a hand-edited checkpoint state may hold any text there
    old, new = (dict(part.partition("=")[::2] for part in text.split(", ")) for text in (before, now))
    return ", ".join(f"{key} {old[key]} -> {new.get(key)}" for key in old if old[key] != new.get(key))


def continued_record(
    saved: ckpt.TrainState, recipe: Recipe, run_dir: Path
) -> tuple[ckpt.TrainState, str | None]:
    """The best-so-far record a resume continues: the checkpoint's, unless it is about another
    train.best_metric or a ROUGE measured otherwise (its values are not comparable: another
    eval.rouge_limit, generation or scoring setting) or its best step's checkpoint is gone
    (final/ could not be loaded from it). Then the record starts again, and the note says why."""
    kept = ckpt.TrainState(
        best_step=saved.best_step,
        best_value=saved.best_value,
        evaluations_without_improvement=saved.evaluations_without_improvement,
        best_metric=saved.best_metric,
        best_measured=saved.best_measured,
    )
    if saved.best_step is None or not recipe.train.best_metric:
        return kept, None
    was = f"the best-so-far record (step {saved.best_step}, {metric_key(saved.best_metric or recipe.train.best_metric)} "
    was += f"{saved.best_value:.4f})"
    if saved.best_metric and saved.best_metric != recipe.train.best_metric:
        why = f"train.best_metric changed {saved.best_metric} -> {recipe.train.best_metric}"
    elif saved.best_measured and saved.best_measured != measurement(recipe):
        why = f"validation ROUGE is measured otherwise now ({measured_otherwise(saved.best_measured, measurement(recipe))})"
    elif saved.best_step != saved.step and not RunDir(run_dir).checkpoint(saved.best_step).is_dir():
        why = f"the best step's checkpoint {RunDir(run_dir).checkpoint(saved.best_step)} is gone"
    else:
        return kept, None
    return ckpt.TrainState(), f"{why}: {was} starts again from step {saved.step}"


def restore_best(run) -> dict | None:
    """Load the best step's checkpoint into the model (all ranks) when it is not the last step;
    returns the metrics.jsonl marker that says which step final/ holds."""
    state, train = run.state, run.recipe.train
    if not train.best_metric or state.best_step is None:
        return None
    marker = {
        "step": state.step,
        "best_step": state.best_step,
        "best_metric": metric_key(train.best_metric),
        "best_value": state.best_value,
    }
    if state.best_step != state.step:
        best = RunDir(run.run_dir).checkpoint(state.best_step)
        if not best.is_dir():  # removed by hand while training ran: keep the last step, say so
            print_main(
                run.accelerator,
                f"warning: the best step's checkpoint {best} is gone: final/ holds the last step",
            )
            return None
        run.accelerator.load_state(str(best))
        run.model.train()
    print_main(
        run.accelerator,
        f"final/ holds the best step {state.best_step} of {state.step} "
        f"({metric_key(train.best_metric)} {state.best_value:.4f})",
    )
    return marker
