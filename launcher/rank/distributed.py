"""The Accelerator every rank builds, and the few cross-rank helpers the loop needs.

On CPU ranks the process group must be gloo: without it, Accelerate on a CPU-only host counts
one process per rank while DeepSpeed shards across all of them, so data is not sharded and
gathers are wrong (see docs/ARCHITECTURE.md, "Pitfalls"). DDP on several CPU ranks needs ``cpu=True`` as well, or
Accelerate does not wrap the model in DDP.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    InitProcessGroupKwargs,
    ProjectConfiguration,
)

from launcher.core.atomic import write_text_atomic
from launcher.core.errors import UserError
from launcher.core.recipe import Recipe
from launcher.core.rundir import RunDir

# How long a rank waits in one collective before the job fails. A dead peer ends the job at once
# anyway (torchrun sees it exit); this bounds a hung peer, and the barriers in which every other
# rank waits while rank 0 alone writes final/, merges an adapter or prunes old checkpoints: an
# xl/xxl model on a slow filesystem needs many minutes there. Set FTLAUNCH_COLLECTIVE_TIMEOUT_MINUTES.
COLLECTIVE_TIMEOUT_ENV = "FTLAUNCH_COLLECTIVE_TIMEOUT_MINUTES"
DEFAULT_COLLECTIVE_TIMEOUT_MINUTES = 60.0


def collective_timeout() -> timedelta:
    """The process-group timeout: FTLAUNCH_COLLECTIVE_TIMEOUT_MINUTES if set (and positive), else 60 minutes."""
    try:
        minutes = float(os.environ.get(COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT_MINUTES))
    except ValueError:
        minutes = DEFAULT_COLLECTIVE_TIMEOUT_MINUTES
    return timedelta(minutes=minutes if minutes > 0 else DEFAULT_COLLECTIVE_TIMEOUT_MINUTES)


COLLECTIVE_TIMEOUT = collective_timeout()


def runs_on_cpu(recipe: Recipe) -> bool:
    """CPU ranks only when asked for (--cpu); a GPU run without a usable GPU is an error."""
    if recipe.launch.cpu:
        return True
    require_cuda()
    return False


def cuda_problem() -> str | None:
    """Why this process cannot use CUDA (None when it can), in words a user can act on."""
    if torch.cuda.is_available():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "CUDA_VISIBLE_DEVICES unset"
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build; {seen}"
    try:
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 - the driver's own reason is the useful part
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot start CUDA: {str(exc).splitlines()[0]}; {seen}"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU; {seen}"


def require_cuda() -> None:
    """Without this check a GPU job on a node without a usable GPU (an srun step without GPUs,
    a driver mismatch) would run on CPU ranks, orders of magnitude slower, and say nothing."""
    problem = cuda_problem()
    if problem:
        raise UserError(
            f"no usable GPU on {os.uname().nodename} (rank {os.environ.get('RANK', '0')}): {problem}; "
            "pass --cpu to run on CPU ranks on purpose"
        )


def autocast_dtype(recipe: Recipe) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[recipe.model.precision]


def precision_autocast(recipe: Recipe, device: torch.device):
    """The recipe's autocast for code outside a prepared forward (generation), under every
    strategy: Accelerate's ``autocast()`` is a null context under DeepSpeed."""
    dtype = autocast_dtype(recipe)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def keep_deepspeed_from_importing_mlflow(log_with: list[str] | None) -> None:
    """``import deepspeed`` imports mlflow when it is installed (for DeepSpeed's autotuner, which
    ftlaunch never runs): ~1.4 s of every rank's start, and Accelerate imports DeepSpeed in every
    rank, DDP too (``unwrap_model``). A rank that does not report to MLflow marks it absent, as if
    not installed; one that does (``--report-to mlflow``) imports it as usual."""
    if "mlflow" not in (log_with or []) and "mlflow" not in sys.modules and "deepspeed" not in sys.modules:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # import mlflow -> ImportError


def build_accelerator(
    recipe: Recipe, run_dir: Path | None = None, log_with: list[str] | None = None
) -> Accelerator:
    """The rank's Accelerator; ``log_with`` (train.report_to) writes its local files under RUN/trackers/."""
    keep_deepspeed_from_importing_mlflow(log_with)
    cpu = runs_on_cpu(recipe)
    # Only a launched group (torchrun sets WORLD_SIZE) gets a process group; one process runs plain.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or recipe.launch.zero > 0
    handlers = [InitProcessGroupKwargs(backend="gloo" if cpu else "nccl", timeout=COLLECTIVE_TIMEOUT)]
    kwargs = dict(
        kwargs_handlers=handlers if distributed else [],
        # The loop steps the scheduler once per optimizer step itself (see train.py).
        step_scheduler_with_optimizer=False,
        project_config=ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(RunDir(run_dir).trackers)
        )
        if run_dir is not None
        else None,
        log_with=log_with or None,
        dataloader_config=dataloader_config(cpu),
    )
    if recipe.launch.zero:
        # Precision and clipping come from the rendered deepspeed.json (accumulation too: the
        # same value here keeps Accelerate from warning about a mismatch).
        return Accelerator(gradient_accumulation_steps=recipe.train.grad_accum, **kwargs)
    from launcher.rank.fsdp import fsdp_plugin

    plugin = fsdp_plugin(cpu) if recipe.launch.fsdp and distributed else None
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=recipe.model.mixed_precision,
        gradient_accumulation_steps=recipe.train.grad_accum,
        fsdp_plugin=plugin,
        **kwargs,
    )
    if plugin is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # Accelerate turns FSDP on for GPU-like process groups only and silently trains CPU ranks
        # with DDP; FSDP2's fully_shard itself runs on CPU ranks over gloo.
        # Both shared states, as Accelerate does for GPU ranks: every later AcceleratorState()
        # copies the PartialState's type over its own.
        from accelerate.state import PartialState

        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    if plugin is not None and not uses_fsdp(accelerator):
        raise RuntimeError(f"--fsdp asked for, but Accelerate set up {accelerator.distributed_type}")
    return accelerator


def check_shared_run_dir(accelerator: Accelerator, run_dir: Path) -> None:
    """Every rank sees the run directory rank 0 writes to. README asks for one shared directory
    on every node; a different or node-local ``--output`` on another node would train to the end
    with that node's checkpoint shards in its own folder, leaving checkpoints no resume can load.
    Rank 0 writes a fresh token, every rank reads it back, and all of them stop with the same line
    (naming the ranks that did not see it) before anything else is written."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list, gather_object

    check = RunDir(run_dir).shared_check
    token = None
    if accelerator.is_main_process:
        token = uuid.uuid4().hex
        check.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(check, token)
    # after rank 0's write (also a barrier): its token and its run directory
    token, main_dir = broadcast_object_list([token, str(run_dir)])
    try:
        seen = check.read_text() == token
    except OSError:
        seen = False
    everyone = gather_object([(accelerator.process_index, socket.gethostname(), str(run_dir), seen)])
    blind = [f"rank {rank} (host {host}, --output {own})" for rank, host, own, ok in everyone if not ok]
    if blind:
        raise UserError(
            f"{', '.join(blind)} cannot see the run directory {main_dir} that rank 0 writes to: --output "
            "must be one shared directory, at the same path, on every node"
        )


def dataloader_config(cpu: bool) -> DataLoaderConfiguration:
    """GPU ranks copy each (pinned, see loaders.pins_memory) batch with ``non_blocking=True``:
    Accelerate's default is a synchronous copy, a host wait for the GPU every micro-batch."""
    return DataLoaderConfiguration(non_blocking=not cpu)


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def uses_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def zero_stage(accelerator: Accelerator) -> int:
    if not uses_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def print_main(accelerator: Accelerator, text: str) -> None:
    """Print once per job on the console (Accelerate's print is once per node: noisy in multi-node logs)."""
    if accelerator.is_main_process:
        from launcher.core.ranklog import console_print

        console_print(text)


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank if the flag is set on any rank (one tiny all-reduce)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def sum_over_ranks(accelerator: Accelerator, values: list) -> list[float]:
    """Sum numbers (Python or device tensors) over all ranks with one all-reduce."""
    dtype = torch.float64 if accelerator.device.type == "cpu" else torch.float32
    tensor = torch.stack([torch.as_tensor(value, device=accelerator.device).to(dtype) for value in values])
    if accelerator.num_processes > 1:
        tensor = accelerator.reduce(tensor, reduction="sum")
    return tensor.tolist()


@contextlib.contextmanager
def without_zero3_init():
    """A context in which ``from_pretrained`` builds a whole, unsharded model.

    transformers shards every model it builds while a ZeRO-3 config is registered (its
    ``is_deepspeed_zero3_enabled``). Accelerate's ``zero3_init_context_manager(enable=False)``
    does not clear that registration, so a model loaded "unsharded" came out with empty
    weights; hide the registration for the duration instead.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
