"""Continuing a checkpoint on a rank: which one ``--resume`` names and whether this run may load it
(core/checkpoint.py's checks), loading it (natively, or converted by rank/portable.py from another
strategy or number of ranks), and what the resumed run changes that is said rather than refused:
the best-so-far record (rank/best.py), the schedule, the precision, the label smoothing, a step
size that changed under --force-resume.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from launcher.core import checkpoint as ckpt
from launcher.core.auto_batch import AUTO_BATCH_ENV
from launcher.core.ranklog import RESTART_ENV
from launcher.core.rundir import RunDir
from launcher.rank import best
from launcher.rank.distributed import print_main
from launcher.rank.loaders import epoch_length
from launcher.rank.optimization import reapply_recipe_settings, recipe_group_settings
from launcher.rank.run import Run


def resume_point(run: Run, resume: str | None, force_resume: bool) -> tuple[Path, ckpt.TrainState] | None:
    """The checkpoint ``--resume`` names (if any) and its state, checked against this run's shape;
    nothing is loaded yet, so that a refused resume and the tracker runs come before the
    original model's evaluation."""
    checkpoint = ckpt.resolve_resume_on_main(run.accelerator, run.run_dir, resume)
    if run.accelerator.is_main_process:
        ckpt.remove_incomplete(run.run_dir)
    if checkpoint is None:
        if resume:
            print_main(run.accelerator, "no complete checkpoint found: starting from step 0")
        return None
    saved = ckpt.read_state(checkpoint)
    # the supervisor made the micro batch smaller (train.auto_find_batch_size): that change is accepted
    smaller_batch = os.environ.get(AUTO_BATCH_ENV) == "1"
    ckpt.check_compatible(saved, run.state, checkpoint, force_resume, accept_batch=smaller_batch)
    return checkpoint, saved


def restore(run: Run, checkpoint: Path, saved: ckpt.TrainState) -> None:
    """Load the checkpoint ``resume_point`` found: weights, optimizer, schedule, data position."""
    built = recipe_group_settings(run.optimizer)
    if ckpt.needs_conversion(saved, run.state):  # another strategy, or ZeRO on other ranks
        from launcher.rank.portable import restore_converted

        restore_converted(run, checkpoint, saved)
        print_main(run.accelerator, ckpt.describe_conversion(checkpoint, saved, run.state))
    else:
        run.accelerator.load_state(str(checkpoint))
    run.state.step, run.state.epoch, run.state.batches_in_epoch = (
        saved.step,
        saved.epoch,
        ckpt.resumed_position(saved, run.state),  # the same steps on another number of ranks
    )
    # the best-so-far record of train.best_metric continues too (unless it cannot: best.continued_record)
    record, note = best.continued_record(saved, run.recipe, run.run_dir)
    run.state.best_step, run.state.best_value = record.best_step, record.best_value
    run.state.evaluations_without_improvement = record.evaluations_without_improvement
    run.state.best_metric, run.state.best_measured = record.best_metric, record.best_measured
    print_main(run.accelerator, f"resumed from {checkpoint} at step {run.state.step}")
    for line in [note, *resumed_changes(saved, run.state), short_of_the_schedule(run)]:
        if line:
            print_main(run.accelerator, f"note: {line}")
    changed = reapply_recipe_settings(run.optimizer, run.scheduler, built)
    if changed:
        print_main(
            run.accelerator,
            f"resumed with the recipe's {', '.join(changed)} (the checkpoint's schedule position kept)",
        )
    # another run's checkpoint (--resume PATH into a new --output) is named by its path
    own = checkpoint.resolve().parent == RunDir(run.run_dir).checkpoints.resolve()
    run.resumed_from = checkpoint.name if own else str(checkpoint)


def short_of_the_schedule(run: Run) -> str | None:
    """A forced resume with another step size can run out of epochs before the schedule (sized
    for the whole run in the new steps) ends: say at which step it will stop, and why."""
    state, recipe = run.state, run.recipe
    last = state.step
    for epoch in range(state.epoch, recipe.train.epochs):
        left = epoch_length(epoch, run.batches_by_epoch) - (
            state.batches_in_epoch if epoch == state.epoch else 0
        )
        last += math.ceil(max(left, 0) / recipe.train.grad_accum)
    if last >= run.total_steps:
        return None
    return (
        f"the schedule was sized for {run.total_steps} steps of this shape, but train.epochs={recipe.train.epochs} "
        f"ends at step {last} (the steps before {state.step} were of another size): the learning rate "
        "will not reach its end; set train.max_steps to end it earlier, or resume with the checkpoint's batch"
    )


def resumed_changes(saved: ckpt.TrainState, current: ckpt.TrainState) -> list[str]:
    """What a resume changes without being refused, said once: the learning-rate schedule (its
    type, options, warm-up or length: the rate jumps to the new schedule's value at this step),
    the precision and the label smoothing (the training loss is another from this step on).
    Checkpoints of older versions did not record them."""
    changes = []
    if saved.schedule and saved.schedule != current.schedule:
        changes.append(
            f"the learning-rate schedule changed: {saved.schedule} -> {current.schedule}; "
            f"from step {saved.step + 1} the rate follows the new one"
        )
    if saved.precision and saved.precision != current.precision:
        changes.append(
            f"model.precision changed {saved.precision} -> {current.precision}: steps 1-{saved.step} "
            f"trained in {saved.precision}, the rest in {current.precision}"
        )
    if saved.label_smoothing is not None and saved.label_smoothing != current.label_smoothing:
        changes.append(
            f"train.label_smoothing changed {saved.label_smoothing} -> {current.label_smoothing}: "
            f"steps 1-{saved.step} trained with {saved.label_smoothing}, the rest with {current.label_smoothing}"
        )
    return changes


def past_the_end(run: Run) -> str:
    """A resume whose checkpoint lies past the recipe's end (a lowered train.max_steps or epochs):
    nothing is trained, and final/ is the checkpoint's model, not the step the recipe names."""
    step = run.state.step
    return (
        f"note: the checkpoint is at step {step}, past this recipe's {run.total_steps} optimizer steps: "
        f"no step is trained and final/ is the step-{step} model; for an earlier one, pass "
        f"--resume {RunDir(run.run_dir).checkpoints}/step_N"
    )


def restart_resume(resume: str | None) -> str | None:
    """A restart by the supervisor (launch.max_restarts) continues from the newest intact
    checkpoint, whatever --resume the first start had."""
    return "auto" if os.environ.get(RESTART_ENV) else resume
