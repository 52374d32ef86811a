"""The training loop every rank runs: ``accelerate launch -m launcher.rank.train --run-dir RUN``.

Features: full or LoRA fine-tuning; DDP or DeepSpeed ZeRO-1/2/3 (from the rendered
deepspeed.json); fp32 weights, gradients and reductions with bf16 autocast under every strategy;
the objective is the token-weighted mean cross-entropy over each whole optimizer step (every
micro-batch of the accumulation window on every rank); gradient accumulation and clipping;
AdamW with warmup + linear/cosine decay; length-grouped batches, one shard per rank;
validation loss reduced over all ranks; metrics.jsonl + TensorBoard; atomic checkpoints with
mid-epoch resume; SIGTERM/SIGUSR1 -> checkpoint -> exit 3; final save; generation with the
original model before the first step and with the fine-tuned model after the last, and the
ROUGE report (evaluation.py), unless ``eval.after_training`` is false.

Batch-size formula: effective batch = micro_batch_size x grad_accum x world size; with
``train.micro_batch_tokens`` (which takes precedence) every micro-batch holds at most that many
padded tokens and a step is grad_accum x world size such micro-batches (launcher/rank/data.py).
Raises: UserError (exit 2) for a checkpoint of another run shape.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from launcher.core import checkpoint as ckpt
from launcher.core.errors import EXIT_INTERRUPTED
from launcher.core.metrics import MetricsLogger, read_metrics
from launcher.core.ranklog import RESTART_CAUSE_ENV, RESTART_ENV
from launcher.core.recipe import Recipe
from launcher.core.recipe_loading import read_run_recipe
from launcher.core.rundir import RunDir
from launcher.rank import best
from launcher.rank.data import check_prompt_room, example_lengths, shard_sorted_batches
from launcher.rank.distributed import (
    build_accelerator,
    check_shared_run_dir,
    print_main,
    sum_over_ranks,
    uses_deepspeed,
    uses_fsdp,
)
from launcher.rank.finite import check_values, check_weights
from launcher.rank.loaders import (
    batches_per_rank_by_epoch,
    epoch_batches,
    epoch_length,
    prepare_data,
)
from launcher.rank.model import (
    build_model,
    checkpointed_layers,
    count_parameters,
    gather_dora_layers_whole,
    load_tokenizer,
    store_frozen_linear_weights,
    use_tanh_gelu_kernel,
)
from launcher.rank.optimization import (
    build_optimizer,
    build_scheduler,
    describe_optimizer,
    schedule_summary,
    total_optimizer_steps,
)
from launcher.rank.out_of_memory import inject_fault, recorded_as_out_of_memory
from launcher.rank.resume import past_the_end, restart_resume, restore, resume_point
from launcher.rank.run import Run
from launcher.rank.step_stats import StepResult, WindowStats, metrics_row
from launcher.rank.stopping import StopRequest, stop_requested, stopped_message
from launcher.results.card import effective_batch
from launcher.results.rouge import ROUGE_TYPES

# ---------------------------------------------------------------- validation


def summed_cross_entropy(
    model, batch: dict, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies in fp32, number of target tokens) of one micro-batch.

    The loss is computed here from the logits, in fp32 whatever the activations' dtype, instead
    of the model's own mean: the caller decides what to divide by. ``label_smoothing`` (the
    training objective only) mixes the target with a uniform distribution over the vocabulary,
    torch's definition, which is also Seq2SeqTrainer's ``LabelSmoother``.
    """
    labels = batch["labels"]
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=padding_mask_4d(model, batch["attention_mask"]),
        decoder_input_ids=batch["decoder_input_ids"],
        use_cache=False,  # the decoder's own config copy says True: no KV cache to build in training
    ).logits
    total = torch.nn.functional.cross_entropy(
        logits.float().view(-1, logits.size(-1)),
        labels.view(-1),
        ignore_index=-100,
        reduction="sum",
        label_smoothing=label_smoothing,
    )
    return total, (labels != -100).sum()


def attention_implementation(model) -> str | None:
    """The attention kernel family the model was loaded with (through DDP/DeepSpeed/PEFT wrappers)."""
    config = getattr(getattr(model, "module", model), "config", None)
    return getattr(config, "_attn_implementation", None)


def padding_mask_4d(model, mask: torch.Tensor) -> torch.Tensor:
    """The source padding mask as a ready 4-D boolean mask (batch, 1, 1, source length).

    transformers' masking utilities return a 4-D mask as it is, but turn a 2-D one into a 4-D one
    after asking ``padding_mask.all()`` (can the mask be dropped?): a host sync for the encoder's
    mask and another for the cross-attention's, every forward. A 4-D mask skips both and gives SDPA
    the same values (it broadcasts over heads and queries; T5 merges it with its position bias
    by ``torch.where``). Only for SDPA, which reads a boolean mask: other attention kernels take
    the 2-D mask as before.
    """
    if attention_implementation(model) != "sdpa":
        return mask
    return mask[:, None, None, :].bool()


def prepare_model_for_training(model, recipe: Recipe, accelerator) -> dict[str, int]:
    """Fewer kernels per step, same numbers (issue 23): what the model's own config does not choose.

    - the one-kernel tanh GELU for ``gelu_new`` (model.use_tanh_gelu_kernel);
    - LoRA under bf16 autocast: frozen linear weights stored in bf16 (model.store_frozen_linear_weights),
      under DDP and in one process only. Not under ZeRO (its ``torch_autocast`` mode is given an
      fp32 module, and ZeRO-3 partitions and gathers frozen parameters too: a module of mixed
      dtypes is untested there) nor FSDP2 (it shards each block's parameters as one flat group,
      which needs one dtype), nor with DoRA (its column norms read the base weight: rounding
      it would move every norm);
    - ZeRO-3 with DoRA: each DoRA layer gathered whole (model.gather_dora_layers_whole).
    Returns what was changed, for the log line.
    """
    changed = {"tanh_gelu": use_tanh_gelu_kernel(model), "bf16_frozen": 0}
    if recipe.launch.zero == 3:
        gather_dora_layers_whole(model)
    if (
        recipe.train.method == "lora"
        and not recipe.lora.use_dora
        and recipe.model.precision == "bf16"
        and not uses_deepspeed(accelerator)
        and not uses_fsdp(accelerator)
        and not recipe.launch.fsdp
    ):
        changed["bf16_frozen"] = store_frozen_linear_weights(model, torch.bfloat16)
    return changed


@torch.no_grad()
def validation_loss(model, validation, collator, accelerator, batch_size: int) -> float:
    """Token-weighted cross-entropy over the whole validation split, summed over all ranks.

    Every rank runs the same number of forward passes (ZeRO-3 gathers weights collectively);
    a rank with no examples left runs a placeholder batch and counts nothing.
    """
    model.eval()
    lengths = example_lengths(validation)
    loss_sum = tokens = 0.0
    for shard in shard_sorted_batches(
        lengths, batch_size, accelerator.process_index, accelerator.num_processes
    ):
        indices = shard.indices or [0]
        batch = collator([validation[i] for i in indices])
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        with accelerator.autocast():
            losses, count = summed_cross_entropy(model, batch)
        if shard.indices:
            loss_sum += losses.item()
            tokens += count.item()
    model.train()
    loss_sum, tokens = sum_over_ranks(accelerator, [loss_sum, tokens])
    return loss_sum / max(tokens, 1.0)


# ---------------------------------------------------------------- the loop


def deepspeed_grad_norm(accelerator, model):
    """DeepSpeed's norm of the step it just took, as it comes (a device tensor, or None).

    Neither ``float()`` nor a truth test here: either makes the host wait for the GPU every
    step; metrics_row converts it on logged steps only.
    """
    return model.get_global_grad_norm() if uses_deepspeed(accelerator) else None


def set_up(run_dir: Path) -> Run:
    recipe = read_run_recipe(run_dir)
    accelerator = build_accelerator(recipe, run_dir=run_dir, log_with=recipe.train.report_to)
    check_shared_run_dir(accelerator, run_dir)
    from accelerate.utils import set_seed

    set_seed(recipe.train.seed)
    tokenizer = load_tokenizer(recipe)
    check_prompt_room(tokenizer, recipe)
    model = build_model(recipe, len(tokenizer))
    if recipe.launch.fsdp:
        from launcher.rank.fsdp import share_input_embedding

        share_input_embedding(model)
    trainable, total = count_parameters(model)
    checkpointing = ", gradient checkpointing on" if checkpointed_layers(model) else ""
    print_main(
        accelerator,
        f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%){checkpointing}",
    )
    changed = prepare_model_for_training(model, recipe, accelerator)
    if changed["bf16_frozen"]:
        print_main(accelerator, f"LoRA: {changed['bf16_frozen']} frozen linear tensors stored in bf16")
    data = prepare_data(recipe, tokenizer, accelerator, run_dir, model)
    optimizer = build_optimizer(model, recipe, accelerator.device)
    print_main(accelerator, describe_optimizer(optimizer))
    by_epoch = batches_per_rank_by_epoch(data.sampler, recipe.train.epochs, accelerator.num_processes)
    total_steps = total_optimizer_steps(recipe, by_epoch)
    scheduler = build_scheduler(optimizer, recipe, total_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, data.loader, scheduler)
    state = ckpt.expected_state(recipe, accelerator.num_processes)
    state.schedule, state.precision = schedule_summary(recipe, total_steps), recipe.model.precision
    state.label_smoothing = recipe.train.label_smoothing
    return Run(
        recipe,
        run_dir,
        accelerator,
        model,
        tokenizer,
        optimizer,
        scheduler,
        loader,
        data,
        state,
        total_steps,
        by_epoch,
    )


def train_step(run: Run, window: list[dict]) -> StepResult:
    """One optimizer step over the micro-batches of one accumulation window, top to bottom.

    The objective is the mean cross-entropy over every target token of the step: all
    micro-batches of the window on all ranks, so a micro-batch of 400 target tokens counts ten
    times one of 40, and 2 ranks == accumulation 2 == a doubled micro batch. Each micro-batch
    backpropagates sum(CE) x (world size x accumulation) / (tokens of the whole step): DDP and
    DeepSpeed average gradients over ranks and Accelerate/DeepSpeed divide by the accumulation
    steps, which this factor undoes. Nothing here reads a device value on the host.

    The window is already fetched (optimizer_windows), so the loop says itself which backward ends
    it, with Accelerate's public ``sync_gradients`` and ``no_sync``, instead of
    ``accelerator.accumulate``, which decides by counting batches and by the loader's end (seen
    one batch early when the loop reads a whole window ahead).
    """
    accelerator, model, train = run.accelerator, run.model, run.recipe.train
    # 1. The loss denominator: target tokens of the whole step, over all ranks (one small all-reduce).
    local_tokens = sum((batch["labels"] != -100).sum() for batch in window)
    step_tokens = local_tokens
    if accelerator.num_processes > 1:
        step_tokens = accelerator.reduce(local_tokens.clone(), reduction="sum")
    scale = accelerator.num_processes * train.grad_accum / step_tokens.clamp(min=1).float()

    # 2. Forward and backward of each micro-batch; gradients add up locally until the last one.
    loss_sum = torch.zeros((), device=accelerator.device)
    for index, batch in enumerate(window):
        last = index == len(window) - 1
        # Does this backward end the window? Under DeepSpeed, accelerator.backward passes it to
        # engine.set_gradient_accumulation_boundary (ZeRO-1 reduces in the boundary's backward)
        # and, after the last backward, runs engine.step(): clipping, the update, zeroing.
        # Elsewhere only the optimizer's step and zero_grad below read it (Accelerate skips them
        # while it is False); it is True again when they run.
        accelerator.sync_gradients = last
        # Before the last micro-batch the gradients stay local: DDP and ZeRO-1 skip their
        # all-reduce, FSDP2 its reduce-scatter (ZeRO-2/3 reduce into their partitions in every
        # backward: Accelerate's no_sync is a null context there).
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            ce_sum, _ = summed_cross_entropy(model, batch, train.label_smoothing)
            # Divides by the accumulation steps (Accelerate, or the engine under DeepSpeed),
            # which ``scale`` undoes; DDP all-reduces here on the window's last micro-batch.
            accelerator.backward(ce_sum * scale)
        loss_sum = loss_sum + ce_sum.detach()

    # 3. Clip the synchronized gradients; DeepSpeed clipped inside engine.step() and reports its norm.
    if train.max_grad_norm and not uses_deepspeed(accelerator):
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), train.max_grad_norm)
    else:
        grad_norm = deepspeed_grad_norm(accelerator, model)

    # 4. The update, once per window. Under DeepSpeed Accelerate's optimizer step and zero_grad
    #    are no-ops (engine.step() did both in the last backward); the schedule is ours everywhere
    #    (a LambdaLR that Accelerate keeps out of the engine, stepped here and only here).
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()

    # 5. What the metrics line needs, still on the device: source + target tokens, examples.
    tokens = local_tokens + sum(batch["attention_mask"].sum() for batch in window)
    samples = sum(batch["input_ids"].size(0) for batch in window)
    return StepResult(loss_sum, local_tokens, tokens, samples, grad_norm)


def optimizer_windows(batches, size: int):
    """Consecutive groups of ``size`` micro-batches (the last of an epoch may be shorter)."""
    window: list[dict] = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def epoch_progress(epoch: int, batches_done: int, batches_by_epoch: list[int]) -> float:
    """Epochs trained, as the metrics log them: whole epochs plus the part of this one."""
    return epoch + batches_done / max(epoch_length(epoch, batches_by_epoch), 1)


def log_and_validate(run: Run, stats: WindowStats, grad_norm, logger: MetricsLogger, progress) -> WindowStats:
    """Metrics line every ``log_every`` steps and periodic validation; returns the next window."""
    state, train = run.state, run.recipe.train
    progress.update(1)
    if state.step % train.log_every == 0 or state.step == run.total_steps:
        progress_in_epochs = epoch_progress(state.epoch, state.batches_in_epoch, run.batches_by_epoch)
        lr = run.scheduler.get_last_lr()[0]
        row, norms = metrics_row(run.accelerator, stats, state.step, progress_in_epochs, lr, grad_norm)
        # Before the line is written: JSON has no NaN, and a diverged run stops here.
        check_values(run.run_dir, state.step, train.lr, {"loss": row["loss"], "gradient norm": norms})
        logger.log(row)
        progress.set_postfix(loss=f"{row['loss']:.4f}")
        stats = WindowStats()
    return stats


def epoch_ended(run: Run) -> bool:
    """Whether the optimizer step just taken used this epoch's last micro-batch."""
    return run.state.batches_in_epoch >= epoch_length(run.state.epoch, run.batches_by_epoch)


def evaluate_at_step(run: Run, logger: MetricsLogger) -> dict[str, float]:
    """This step's evaluations, logged: the validation loss every ``train.eval_every`` steps or
    epochs and validation ROUGE every ``eval.rouge_every`` steps or epochs; {} when none is due.

    At the last step the validation loss is measured here only with a train.best_metric: then
    final/ may hold an earlier step, and finish() measures that one's (without, finish() measures
    the last step's, which is final/'s: one pass, not two)."""
    state, recipe = run.state, run.recipe
    metric = recipe.train.best_metric
    scores: dict[str, float] = {}
    last = state.step >= run.total_steps
    ended = epoch_ended(run)
    if best.due(state.step, recipe.train.eval_every, run.total_steps, metric == "val_loss", ended) and (
        not last or metric
    ):
        scores["val_loss"] = checked_validation(run)
        run.logged_val_loss = (state.step, scores["val_loss"])
    if best.due(state.step, recipe.eval.rouge_every, run.total_steps, metric in ROUGE_TYPES, ended):
        scores.update(
            best.validation_rouge(run.accelerator, run.model, run.tokenizer, recipe, run.run_dir, state.step)
        )
    if scores:
        logger.log({"step": state.step, **scores})
    return scores


def evaluate_on_start(run: Run, logger: MetricsLogger) -> None:
    """train.eval_on_start: step 0's evaluations of the model before its first update, logged as a
    baseline for the curves. Not a candidate for train.best_metric (final/ is a fine-tuned step)."""
    scores = {"val_loss": checked_validation(run)}
    if run.recipe.eval.rouge_every is not None:
        scores.update(
            best.validation_rouge(run.accelerator, run.model, run.tokenizer, run.recipe, run.run_dir, 0)
        )
    logger.log({"step": 0, **scores})
    print_main(run.accelerator, f"step 0 validation loss {scores['val_loss']:.4f}")


def track_best(run: Run, scores: dict[str, float], logger: MetricsLogger) -> tuple[bool, bool]:
    """(saved, stop): a better ``train.best_metric`` is checkpointed at once (pruning keeps it);
    ``train.early_stopping_patience`` evaluations without one stop training."""
    metric = run.recipe.train.best_metric
    if not metric or best.metric_key(metric) not in scores:
        return False, False
    saved = best.record(run.state, run.recipe, scores[best.metric_key(metric)])
    if saved:
        save_checked(run)
    reason = best.early_stop_reason(run.state, run.recipe)
    if reason:
        print_main(run.accelerator, reason)
        logger.log({"step": run.state.step, "early_stop": reason})
    return saved, reason is not None


def run_validation(run: Run) -> float:
    return validation_loss(
        run.model, run.data.validation, run.data.collator, run.accelerator, run.recipe.eval.batch_size
    )


def checked_validation(run: Run) -> float:
    """The validation loss (summed over ranks: every rank decides alike), or a Diverged stop."""
    val = run_validation(run)
    check_values(run.run_dir, run.state.step, run.recipe.train.lr, {"validation loss": val})
    return val


def save_checked(run: Run) -> None:
    """A checkpoint, after checking every trainable weight is finite (never a NaN checkpoint)."""
    check_weights(run.accelerator, run.model, run.run_dir, run.state.step, run.recipe.train.lr)
    ckpt.save_checkpoint(run.accelerator, run.run_dir, run.state, run.recipe.train.keep_checkpoints)


def train_loop(run: Run, logger: MetricsLogger, stop: StopRequest, resumed: bool) -> bool:
    """Epochs of optimizer steps until the budget is spent; False when a signal stopped it."""
    state, recipe, accelerator = run.state, run.recipe, run.accelerator
    progress = make_progress(accelerator, run.total_steps, state.step)
    stats, grad_norm = WindowStats(), None
    last_saved = state.step if resumed else -1
    stopped_early = False
    run.model.train()
    while not stopped_early and state.step < run.total_steps and state.epoch < recipe.train.epochs:
        run.data.sampler.epoch = state.epoch
        batches = epoch_batches(accelerator, run.loader, state.batches_in_epoch)
        for window in optimizer_windows(batches, recipe.train.grad_accum):
            with recorded_as_out_of_memory(recipe):  # the supervisor may continue with a smaller batch
                inject_fault(recipe, state.step)
                step = train_step(run, window)
            grad_norm = step.grad_norm if step.grad_norm is not None else grad_norm  # last known
            state.batches_in_epoch += len(window)
            state.step += 1
            stats.add(step)
            stats = log_and_validate(run, stats, grad_norm, logger, progress)
            scores = evaluate_at_step(run, logger)
            saved, stopped_early = track_best(run, scores, logger)
            last_saved = state.step if saved else last_saved
            # after an evaluation (a generation may take minutes) a signal is acted on at once
            interrupted = stop_requested(accelerator, stop, state.step, run.total_steps, bool(scores))
            periodic = best.interval_due(recipe.train.checkpoint_every, state.step, epoch_ended(run))
            if (periodic or interrupted) and last_saved != state.step:
                save_checked(run)
                last_saved = state.step
            if interrupted:
                progress.close()
                return False
            if stopped_early or state.step >= run.total_steps:
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
    progress.close()
    if last_saved != state.step:
        save_checked(run)
    return True


def stop_after_signal(run: Run) -> int:
    print_main(run.accelerator, stopped_message(run.state.step))
    write_interrupted_marker(run.accelerator, run.run_dir, run.state.step)
    run.accelerator.wait_for_everyone()  # no rank exits (and gets its peers killed) before the marker
    return EXIT_INTERRUPTED


def final_validation(run: Run, logger: MetricsLogger, model_step: int) -> None:
    """The validation loss of final/'s model, as the ``final`` row. ``model_step``: the step whose
    weights the model holds (train.best_metric: the best step, loaded back by best.restore_best);
    when it is an earlier one than the last step, the row says so (``model_step``), and trackers
    get the value as ``final_model/val_loss``, not as the last step's ``val_loss``. The last step's
    own loss, when evaluate_at_step measured it, is taken as it is (not measured twice)."""
    step = run.state.step
    reused = model_step == step and run.logged_val_loss is not None and run.logged_val_loss[0] == step
    val = run.logged_val_loss[1] if reused else checked_validation(run)
    row = {"step": step, "val_loss": val, "final": True}
    if model_step != step:
        row["model_step"] = model_step
    # a reused value is in the trackers already, at this step
    logger.log({**row, **compile_summary(run)}, untracked=("val_loss",) if reused else ())
    held = f" (final/: the step-{model_step} model)" if model_step != step else ""
    print_main(run.accelerator, f"final validation loss {val:.4f}{held}")


def finish(run: Run, logger: MetricsLogger, model_step: int | None = None) -> None:
    """Final validation loss, final/ save, then generation and the report. ``model_step``: the
    step final/'s weights are (the best step's, train.best_metric), by default the last."""
    final_validation(run, logger, run.state.step if model_step is None else model_step)
    from launcher.rank.export import save_final

    check_weights(run.accelerator, run.model, run.run_dir, run.state.step, run.recipe.train.lr)
    # The compiled wrapper's state_dict prefixes every key with _orig_mod.: save the module inside.
    model = uncompiled(run.model)
    save_final(run.accelerator, model, run.tokenizer, run.recipe, RunDir(run.run_dir).final)
    clear_interrupted_marker(run.accelerator, run.run_dir)
    if run.recipe.eval.after_training:
        from launcher.rank.evaluation import evaluate_after_training

        evaluate_after_training(run.accelerator, model, run.tokenizer, run.recipe, run.run_dir)
        from launcher.core.trackers import log_rouge

        log_rouge(run.accelerator, run.run_dir, run.state.step)
    run.accelerator.wait_for_everyone()


def uncompiled(model):
    """The module torch.compile wrapped (DDP's or the bare model), or ``model`` itself. DeepSpeed
    compiles inside its engine and keeps no wrapper to remove."""
    return getattr(model, "_orig_mod", model) if type(model).__name__ == "OptimizedModule" else model


def compile_summary(run: Run) -> dict:
    """train.compile: graphs dynamo compiled on this rank (first compiles and recompilations, for
    training and validation) and the distinct (source, target) batch lengths they served."""
    if not run.recipe.compiles:
        return {}
    from launcher.rank.compiling import compiled_graphs

    shapes = len(getattr(run.data.collator, "shapes", ()))
    summary = {"compiled_graphs": compiled_graphs(), "batch_shapes": shapes}
    print_main(
        run.accelerator,
        f"torch.compile: {summary['compiled_graphs']} graph(s) compiled for {shapes} batch shape(s)",
    )
    return summary


def train(run_dir: Path, resume: str | None, force_resume: bool = False) -> int:
    stop = StopRequest()  # installed once training starts: until then a signal stops a rank at once
    run = set_up(run_dir)
    found = resume_point(run, resume, force_resume)
    # The trackers start before the original model's evaluation (which may take long): a tracker
    # that cannot start fails the run at once. A fresh start (also a --resume with no checkpoint
    # yet) drops metrics of earlier attempts, step 0's too; a resume those after its checkpoint.
    logger = MetricsLogger(run.accelerator, run_dir, run.recipe, found[1].step if found else None)
    try:
        return train_started(run, logger, stop, found)
    finally:
        logger.close()


def train_started(run: Run, logger: MetricsLogger, stop: StopRequest, found) -> int:
    """The original model's evaluation, the checkpoint ``found`` loaded, training, the final save,
    evaluation and report (the trackers run throughout)."""
    from launcher.rank.evaluation import evaluate_original

    # Before restore() loads trained weights: the model is still the original here.
    evaluate_original(run.accelerator, run.model, run.tokenizer, run.recipe, run.run_dir)
    if found is not None:
        restore(run, *found)
    log_restart(run, logger)
    log_segment(run, logger)
    print_main(
        run.accelerator,
        f"training: {run.total_steps} optimizer steps, {run.describe_batches()} micro-batches "
        f"per rank per epoch, effective batch {effective_batch(run.recipe)}",
    )
    if run.state.step > run.total_steps:
        print_main(run.accelerator, past_the_end(run))
    if run.recipe.train.eval_on_start and run.state.step == 0:
        evaluate_on_start(run, logger)
    # From here a stop signal is a flag the loop asks all ranks about (checkpoint, then exit 3).
    # Before, nothing is trained that a checkpoint would keep: loading, the original model's
    # evaluation and step 0's are stopped by the signal itself, at once, however long they take.
    stop.install()
    stopped_before = best.early_stop_reason(run.state, run.recipe) if found is not None else None
    if stopped_before:  # the checkpoint is where an early stop ended training: it stays ended
        print_main(
            run.accelerator,
            f"training had already stopped: {stopped_before} (to train on, raise "
            "train.early_stopping_patience or set it to null)",
        )
        completed = True
    else:
        completed = train_loop(run, logger, stop, found is not None)
    stop.uninstall()
    if not completed:
        return stop_after_signal(run)
    marker = best.restore_best(run)
    if marker:
        logger.log(marker)
    finish(run, logger, marker["best_step"] if marker else None)
    return 0


def make_progress(accelerator, total: int, initial: int):
    from launcher.rank.progress import make_progress as console_progress

    return console_progress(accelerator.is_main_process, total, initial)


def write_interrupted_marker(accelerator, run_dir: Path, step: int) -> None:
    if accelerator.is_main_process:
        RunDir(run_dir).write_interrupted(step)


def clear_interrupted_marker(accelerator, run_dir: Path) -> None:
    if accelerator.is_main_process:
        RunDir(run_dir).clear_interrupted()


def log_restart(run: Run, logger: MetricsLogger) -> None:
    """The restart's marker in metrics.jsonl (the report lists restarts): step, number, cause."""
    number = os.environ.get(RESTART_ENV)
    if number:
        cause = os.environ.get(RESTART_CAUSE_ENV, "")
        logger.log({"step": run.state.step, "restart": int(number), "cause": cause})


def log_segment(run: Run, logger: MetricsLogger) -> None:
    """This start's marker in metrics.jsonl (history.py): the shape it trains in and where it began."""
    if not run.accelerator.is_main_process:
        return
    from launcher.core.history import segment_row, segments

    start = "restarted" if os.environ.get(RESTART_ENV) else "resumed" if run.resumed_from else "fresh"
    number = len(segments(read_metrics(run.run_dir))) + 1
    logger.log(segment_row(run.recipe, run.state.step, number, start, run.resumed_from))


def main(argv: list[str] | None = None) -> int:
    from launcher.core.ranklog import rank_main

    return rank_main(
        argv,
        __doc__.splitlines()[0],
        lambda run_dir, args: train(run_dir, restart_resume(args.resume), args.force_resume),
        (("--resume",), dict(default=None, help="auto, or a checkpoint directory")),
        (("--force-resume",), dict(action="store_true")),
    )


if __name__ == "__main__":
    from launcher.core.ranklog import exit_rank

    exit_rank(main())
