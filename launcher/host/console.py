"""What ``ftlaunch full|lora|eval`` print before launching: the run summary and the command line.

Rendering (render.py) writes files for the ranks; this module only formats what a person reads.
"""

from __future__ import annotations

from pathlib import Path

from launcher.core.recipe import Recipe
from launcher.core.rundir import RunDir


def run_summary(recipe: Recipe, run_dir: Path, notes: tuple[tuple[str, str], ...] = ()) -> str:
    """The short dry-run summary: world size, effective batch, stage, precision, paths."""
    launch, train = recipe.launch, recipe.train
    strategy = "DDP" if launch.zero == 0 else f"DeepSpeed ZeRO-{launch.zero}"
    if launch.fsdp:
        strategy = "PyTorch FSDP2 (fully_shard)"
    if launch.offload != "none":
        strategy += f" (offload {launch.offload} to CPU)"
    device = "CPU ranks (gloo)" if launch.cpu else "GPU ranks (nccl)"
    rows = [
        ("method", f"{train.method} fine-tuning of {recipe.model.name} on {recipe.data.dataset}"),
        ("world size", f"{launch.world_size} = {launch.gpus} per node x {launch.nodes} node(s), {device}"),
        (
            "effective batch",
            f"{recipe.effective_batch_size()} = micro batch {train.micro_batch_size} x accumulation "
            f"{train.grad_accum} x world size {launch.world_size}"
            if not train.micro_batch_tokens
            else f"up to {train.micro_batch_tokens * train.grad_accum * launch.world_size:,} padded tokens "
            f"= token budget {train.micro_batch_tokens:,} x accumulation {train.grad_accum} x world size "
            f"{launch.world_size} (train.micro_batch_tokens replaces train.micro_batch_size)",
        ),
        ("strategy", strategy),
        ("precision", recipe.model.precision),
        (
            "compile",
            (
                "torch.compile (inductor), batches padded to length buckets"
                if recipe.compiles
                else "off (eager)"
            )
            + (" (train.compile=auto)" if train.compile == "auto" else ""),
        ),
        *(
            [
                (
                    "main node",
                    f"{launch.main_address or '$SLURM_JOB_NODELIST[0]'}:"
                    f"{launch.main_port or '20000 + $SLURM_JOB_ID % 20000'}",
                )
            ]
            if launch.nodes > 1
            else []
        ),
        ("run dir", str(run_dir)),
        ("command", str(RunDir(run_dir).command_sh)),
        *notes,
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def command_line(run_dir: Path) -> str:
    """The launch line of the run's command.sh, as the user would type it (``$ accelerate launch ...``)."""
    last = RunDir(run_dir).command_sh.read_text().strip().split("\n")[-1]  # a path may hold U+2028
    return "$ " + last.removeprefix("exec ")
