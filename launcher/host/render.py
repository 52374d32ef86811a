"""Render a recipe into the files of a run: accelerate.yaml, deepspeed.json, command.sh.

The templates in ``accelerate_configs/`` stay readable and commented; rendering only replaces
the values the recipe decides (processes, machines, precision, micro batch, accumulation,
clipping, offload), so the rendered files agree with the recipe by construction and can be
read, diffed or launched by hand without ftlaunch.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launcher.core.atomic import write_text_atomic
from launcher.core.errors import UserError
from launcher.core.model_facts import model_facts
from launcher.core.paths import project_dir
from launcher.core.recipe import Recipe
from launcher.core.recipe_loading import dump_recipe
from launcher.core.rundir import RunDir

DEFAULT_PORT = 29500
# Multi-node values a job script cannot know before it runs: evaluated by bash on each node.
# The machine rank is never written into the run: one run directory (and one command.sh) serves
# every node, each with its own FTLAUNCH_MACHINE_RANK (``ftlaunch --machine-rank R`` sets it) or
# SLURM_NODEID. Without either, a node must not guess 0: two rank-0 nodes hang the rendezvous.
MACHINE_RANK_ENV = "FTLAUNCH_MACHINE_RANK"
MAIN_ADDRESS_FROM_ENV = (
    '"${FTLAUNCH_MAIN_ADDRESS:-$(scontrol show hostnames '
    '"${SLURM_JOB_NODELIST:?multi-node runs need --main-address or a SLURM allocation}" | head -n 1)}"'
)
MAIN_PORT_FROM_ENV = '"${FTLAUNCH_MAIN_PORT:-$((20000 + ${SLURM_JOB_ID:-9500} % 20000))}"'


EVAL_MODULE = "launcher.rank.evaluation"
TRAIN_MODULE = "launcher.rank.train"
SUMMARIZE_MODULE = "launcher.host.summarize"  # its ranks' entry lives beside the command


def rendered_module(run_dir: Path) -> str | None:
    """Which rank module a rendered run directory starts (``-m MODULE`` in its command.sh): tells a
    training run from an ``ftlaunch eval`` output, which share recipe.yaml and command.sh."""
    try:
        text = RunDir(run_dir).command_sh.read_text(errors="replace")
    except OSError:  # none yet (or unreadable): nothing rendered there
        return None
    match = re.search(r" -m (\S+) --run-dir ", text)
    return match.group(1) if match else None


@dataclass(frozen=True)
class RankEntry:
    """What command.sh starts on every rank: a module and its run options, and the ftlaunch
    command line it was rendered from (kept in command.sh as a comment)."""

    argv: list[str]
    module: str = TRAIN_MODULE  # EVAL_MODULE for `ftlaunch eval`, SUMMARIZE_MODULE for summarize
    resume: str | None = None
    force_resume: bool = False

    def rank_args(self, run_dir: Path) -> list[str]:
        """``python`` arguments of each rank (shell-quoted)."""
        args = ["-m", self.module, "--run-dir", shlex.quote(str(run_dir))]
        if self.resume:
            args += ["--resume", shlex.quote(self.resume)]
        if self.force_resume:
            args.append("--force-resume")
        return args


@dataclass
class RenderedRun:
    """The text of every file a run directory starts with."""

    recipe_yaml: str
    accelerate_yaml: str
    deepspeed_json: str | None
    command_sh: str

    def write(self, run_dir: Path) -> None:
        """Write (atomically, and only what changed): on a shared filesystem every node of a
        multi-node run renders the same files while the others may already be reading them."""
        run_dir.mkdir(parents=True, exist_ok=True)
        self.write_recipe_files(run_dir)
        write_if_changed(RunDir(run_dir).command_sh, self.command_sh, mode=0o755)

    def write_recipe_files(self, run_dir: Path) -> None:
        """recipe.yaml and the configs rendered from it, not command.sh (the launch line, which
        holds no recipe value): what a supervisor that changes the recipe rewrites."""
        run = RunDir(run_dir)
        write_if_changed(run.recipe_yaml, self.recipe_yaml)
        write_if_changed(run.accelerate_yaml, self.accelerate_yaml)
        ds_path = run.deepspeed_json
        if self.deepspeed_json is not None:
            write_if_changed(ds_path, self.deepspeed_json)
        elif ds_path.exists():
            ds_path.unlink()  # a re-render without ZeRO must not leave a stale config behind


def write_if_changed(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` by ``text`` in one rename (readers see the old or the new file, never half)."""
    if path.is_file() and path.read_text() == text:
        return
    write_text_atomic(path, text, mode=mode)


# ---------------------------------------------------------------- template choice


def accelerate_template_name(recipe: Recipe) -> str:
    launch = recipe.launch
    if launch.fsdp:
        return "fsdp.yaml"
    if launch.zero == 0:
        return "single_gpu.yaml" if launch.world_size == 1 else "multi_gpu.yaml"
    if launch.zero == 3 and launch.offload == "full":
        return "zero3_offload.yaml"
    return f"zero{launch.zero}.yaml"


def deepspeed_template_name(recipe: Recipe) -> str:
    if recipe.launch.zero == 3 and recipe.launch.offload == "full":
        return "zero_stage3_offload.json"
    return f"zero_stage{recipe.launch.zero}.json"


# ---------------------------------------------------------------- DeepSpeed JSON


def render_deepspeed_config(recipe: Recipe) -> dict[str, Any]:
    """DeepSpeed's JSON with every "auto" resolved from the recipe."""
    template = project_dir("accelerate_configs") / "deepspeed" / deepspeed_template_name(recipe)
    config = json.loads(template.read_text())
    train = recipe.train
    resolved = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": recipe.effective_batch_size(),
        # DeepSpeed reads 0 as "no clipping"; the loop never clips a second time under DeepSpeed.
        "gradient_clipping": train.max_grad_norm or 0.0,
    }
    config.update({key: value for key, value in resolved.items() if key in config})
    set_deepspeed_precision(config, recipe)
    if train.optimizer == "adafactor":  # a client optimizer outside DeepSpeed's tested list
        config["zero_allow_untested_optimizer"] = True
    fill_bucket_sizes(config["zero_optimization"], model_hidden_size(recipe.model.name))
    if recipe.launch.offload == "optimizer":
        config["zero_optimization"]["offload_optimizer"] = {
            "device": "cpu",
            "pin_memory": not recipe.launch.cpu,
        }
    if recipe.launch.cpu:
        for key in ("offload_optimizer", "offload_param"):
            if key in config["zero_optimization"]:
                config["zero_optimization"][key]["pin_memory"] = False  # no CUDA: nothing to pin
    leftover = [key for key, value in config.items() if value == "auto"]  # bucket sizes may stay "auto"
    if leftover:
        raise AssertionError(f"template {template.name} has unresolved auto keys: {leftover}")
    return config


def set_deepspeed_precision(config: dict[str, Any], recipe: Recipe) -> None:
    """Fill the templates' ``torch_autocast`` section: ZeRO trains with DDP's numerics.

    DeepSpeed's own ``bf16`` mode casts the module to bf16 and accumulates and reduces
    gradients in bf16, unlike DDP's fp32 weights under autocast. The templates therefore turn
    it off and use ``torch_autocast``: fp32 weights, the forward pass under ``torch.autocast``,
    and (empty ``lower_precision_safe_modules``, fp32 ``communication_data_type`` and
    ``grad_accum_dtype``) every gradient, reduction and accumulation in fp32. fp32 recipes
    drop the section: no autocast at all.
    """
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(recipe.model.precision)
    if dtype is None:
        config.pop("torch_autocast", None)
    else:
        config["torch_autocast"].update(enabled=True, dtype=dtype)


def model_hidden_size(name: str) -> int | None:
    """d_model of the model, when it can be known without downloading anything."""
    return model_facts(name).d_model


def fill_bucket_sizes(zero: dict[str, Any], hidden: int | None) -> None:
    """ZeRO communication buckets sized to the model (Hugging Face's rule for "auto").

    Fixed 5e7-element buckets cost ~95 MiB per rank whatever the model, and dominate small
    ones; d^2-sized buckets keep ZeRO-3 at its 16 bytes/parameter/world-size. When the width is
    unknown (a hub id not in our table), "auto" stays and Accelerate fills it from the model's
    config at prepare time.
    """
    if hidden is None:
        return
    sizes = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value


# ---------------------------------------------------------------- accelerate YAML


def set_yaml_value(text: str, key: str, value: Any) -> str:
    """Replace ``key: old  # comment`` with the new value, keeping indentation and comment."""
    pattern = re.compile(rf"^(\s*{re.escape(key)}:)[ \t]*([^#\n]*?)([ \t]*#.*)?$", re.MULTILINE)
    if not pattern.search(text):
        raise AssertionError(f"accelerate template has no key {key!r}")
    rendered = yaml.safe_dump(value, default_flow_style=True).strip()
    rendered = rendered.removesuffix("\n...").removesuffix("...").strip()
    return pattern.sub(lambda m: f"{m.group(1)} {rendered}{m.group(3) or ''}", text, count=1)


def render_accelerate_config(recipe: Recipe, run_dir: Path) -> str:
    template_name = accelerate_template_name(recipe)
    text = (project_dir("accelerate_configs") / template_name).read_text()
    launch = recipe.launch
    values: dict[str, Any] = {"num_processes": launch.world_size, "use_cpu": False}
    if launch.fsdp:
        values.update(fsdp_values(recipe))
    elif launch.zero == 0:
        values["mixed_precision"] = recipe.model.mixed_precision
        # One CPU process: accelerate runs it directly. Several CPU ranks: the DDP launcher
        # (torchrun) starts them and the loop builds a gloo process group on CPU.
        values["use_cpu"] = launch.cpu and launch.world_size == 1
    else:
        values["deepspeed_config_file"] = str(RunDir(run_dir).deepspeed_json.resolve())
    if template_name != "single_gpu.yaml":
        values.update(num_machines=launch.nodes, machine_rank=0)  # command.sh passes each node's own
        values["main_process_port"] = launch.main_port or DEFAULT_PORT
        values["main_process_ip"] = launch.main_address if launch.nodes > 1 else None
    for key, value in values.items():
        text = set_yaml_value(text, key, value)
    header = f"# Rendered by ftlaunch from accelerate_configs/{template_name} for this run.\n"
    return header + text + dynamo_yaml(recipe)


# Accelerate's TorchDynamoPlugin, as the ranks read it from the environment. `accelerate launch`
# turns accelerate.yaml's dynamo_config into these for DDP and FSDP ranks; its DeepSpeed launch path
# (accelerate 1.16: utils/launch.py prepare_deepspeed_cmd_env) drops them, so command.sh exports them.
DYNAMO_ENV = {
    "ACCELERATE_DYNAMO_BACKEND": "INDUCTOR",
    "ACCELERATE_DYNAMO_MODE": "default",
    "ACCELERATE_DYNAMO_USE_FULLGRAPH": "False",
    "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "False",
}


def dynamo_yaml(recipe: Recipe) -> str:
    """accelerate.yaml's dynamo_config when train.compile is on: Accelerate wraps the prepared model
    in torch.compile (inductor, default mode, graph breaks allowed, torch's automatic dynamic shapes:
    the first shape compiles static, a second makes the lengths that changed symbolic). Not
    ``dynamic: true`` from the start: with DDP's graph splitting (DDPOptimizer) it fails to compile
    in torch 2.13 ("'float' object has no attribute 'meta'", 2 CPU ranks)."""
    if not recipe.compiles:
        return ""
    return (
        "dynamo_config:          # train.compile: Accelerate applies torch.compile after wrapping the model\n"
        "  dynamo_backend: INDUCTOR\n"
        "  dynamo_mode: default\n"
        "  dynamo_use_fullgraph: false\n"
        "  dynamo_use_regional_compilation: false\n"
    )


def dynamo_env_lines(recipe: Recipe) -> list[str]:
    """DeepSpeed ranks get train.compile through the environment (see DYNAMO_ENV)."""
    if not (recipe.compiles and recipe.launch.zero):
        return []
    return [
        "# train.compile under DeepSpeed: accelerate's DeepSpeed launcher does not pass accelerate.yaml's",
        "# dynamo_config on; the ranks' Accelerator reads the same settings from these variables.",
        *(f"export {key}={value}" for key, value in DYNAMO_ENV.items()),
    ]


def fsdp_values(recipe: Recipe) -> dict[str, Any]:
    """The recipe's say in fsdp.yaml: autocast dtype, block class to wrap, parameter offload.

    The ranks always run FSDP's launcher path (``use_cpu: false``); CPU ranks hide the GPUs in
    command.sh and build a gloo group (``accelerate launch --cpu`` would start one process only).
    """
    return {
        "mixed_precision": recipe.model.mixed_precision,
        "fsdp_transformer_layer_cls_to_wrap": model_block_classes(recipe.model.name),
        "fsdp_offload_params": recipe.launch.offload == "full",
    }


def model_block_classes(name: str) -> str | None:
    """The model's repeated layers (T5Block for T5; BART's encoder and decoder layers), comma-separated
    as Accelerate reads them for FSDP auto-wrap. A local model directory is inspected on the meta
    device (``families.block_class_names``); the embedded model and FLAN-T5 names are T5; None for
    another hub id (Accelerate then reads ``_no_split_modules`` itself at prepare time)."""
    from launcher.core.families import block_class_names, skeleton

    facts = model_facts(name)
    if facts.known_t5:
        return "T5Block"
    if facts.source != "local":
        return None
    return ",".join(block_class_names(skeleton(Path(name).expanduser()))) or None


# ---------------------------------------------------------------- command.sh


def machine_rank_setup(nodes: int) -> str:
    """Bash that sets $machine_rank on each node, or stops with one line and exit code 2."""
    last = nodes - 1
    return "\n".join(
        [
            f'machine_rank="${{{MACHINE_RANK_ENV}:-${{SLURM_NODEID:-}}}}"',
            'case "$machine_rank" in',
            f"    '') echo \"error: no machine rank for this node: set {MACHINE_RANK_ENV}=R (0..{last}) on each "
            'node, pass --machine-rank R to ftlaunch, or run under SLURM (srun sets SLURM_NODEID)" >&2; exit 2 ;;',
            f"    *[!0-9]*) echo \"error: machine rank '$machine_rank' is not a number (0..{last})\" >&2; exit 2 ;;",
            "esac",
            f'[ "$machine_rank" -lt {nodes} ] || {{ echo "error: machine rank $machine_rank is out of range '
            f'for {nodes} nodes (0..{last})" >&2; exit 2; }}',
        ]
    )


def render_command(recipe: Recipe, run_dir: Path, entry: RankEntry) -> str:
    """The exact launch line; multi-node ranks take their machine rank from the node they run on."""
    run_dir = run_dir.resolve()
    launch_args = ["accelerate", "launch", "--config_file", shlex.quote(str(RunDir(run_dir).accelerate_yaml))]
    launch = recipe.launch
    setup: list[str] = []
    if launch.nodes > 1:
        setup.append(machine_rank_setup(launch.nodes))
        launch_args += ["--machine_rank", '"$machine_rank"']
        if not launch.main_address:
            setup.append(f"main_address={MAIN_ADDRESS_FROM_ENV}")  # an assignment: set -e stops on failure
            launch_args += ["--main_process_ip", '"$main_address"']
        if not launch.main_port:
            launch_args += ["--main_process_port", MAIN_PORT_FROM_ENV]
    invocation = shlex.join(entry.argv).replace("\n", "\n#   ")  # a newline in an argument stays a comment
    lines = [
        "#!/usr/bin/env bash",
        f"# Rendered by ftlaunch: {invocation}",
        "# Run it on every node (one launcher per node); each starts its node's ranks.",
        "set -euo pipefail",
        *own_run_dir_check(run_dir),
        "# Only the ranks handle SIGUSR1 (checkpoint and exit); the launcher ignores it.",
        "trap '' USR1",
    ]
    if recipe.launch.cpu:
        lines += [
            "# --cpu: ranks are CPU processes (gloo); hide GPUs, real or announced by SLURM.",
            'export CUDA_VISIBLE_DEVICES=""',
        ]
    lines += offload_thread_lines(recipe)
    lines += dynamo_env_lines(recipe)
    lines += setup
    lines.append("exec " + " ".join(launch_args + entry.rank_args(run_dir)))
    return "\n".join(lines) + "\n"


def own_run_dir_check(run_dir: Path) -> list[str]:
    """command.sh names its run directory by absolute path: run from a copied or moved run, it
    would train (and write logs) in the original. It stops instead, naming the command that
    renders the folder it is in."""
    quoted = shlex.quote(str(run_dir))
    return [
        "# This file belongs to the run in its --run-dir: a copied or moved run renders its own.",
        f"run_dir={quoted}",
        'here="$(cd "$(dirname "${BASH_SOURCE[0]:-$run_dir/command.sh}")" && pwd -P)"',
        'if [ "$here" != "$(cd "$run_dir" 2>/dev/null && pwd -P)" ]; then',
        '    echo "error: $here/command.sh belongs to the run in $run_dir; render one for this folder with the'
        ' same ftlaunch command and --output $here --resume auto" >&2',
        "    exit 2",
        "fi",
    ]


def offload_thread_lines(recipe: Recipe) -> list[str]:
    """ZeRO-Offload ranks step the optimizer on the CPU: give each its share of this node's cores.

    ``accelerate launch`` sets OMP_NUM_THREADS=1 for every rank when the variable is unset, which
    leaves a CPU optimizer one core per rank. ``nproc`` counts the cores this job may use (a SLURM
    task's --cpus-per-task); a value the user exported stays (the tests export 1).
    """
    if recipe.launch.offload == "none":
        return []
    ranks = recipe.launch.gpus
    return [
        f"# ZeRO-Offload: the optimizer steps on the CPU; {ranks} local rank(s) share this node's cores.",
        f'export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-$(( $(nproc) / {ranks} > 1 ? $(nproc) / {ranks} : 1 ))}}"',
    ]


def render_run(recipe: Recipe, run_dir: Path, entry: RankEntry) -> RenderedRun:
    deepspeed = render_deepspeed_config(recipe) if recipe.launch.zero else None
    return RenderedRun(
        recipe_yaml=dump_recipe(recipe),
        accelerate_yaml=render_accelerate_config(recipe, run_dir),
        deepspeed_json=json.dumps(deepspeed, indent=2) + "\n" if deepspeed is not None else None,
        command_sh=render_command(recipe, run_dir, entry),
    )


def rerender_recipe(recipe: Recipe, run_dir: Path) -> None:
    """Rewrite a run's recipe.yaml, accelerate.yaml and deepspeed.json for a changed recipe (the
    supervisor's smaller micro batch), through the same rendering as the first launch; command.sh
    stays as the user's command rendered it."""
    render_run(recipe, run_dir, RankEntry([])).write_recipe_files(run_dir)


def require_multinode_address(recipe: Recipe, env: dict[str, str]) -> None:
    """Launching (not rendering) several nodes needs to know where machine rank 0 is."""
    if recipe.launch.nodes > 1 and not recipe.launch.main_address and not env.get("SLURM_JOB_NODELIST"):
        raise UserError(
            "--nodes > 1 needs the address of the first node: pass --main-address HOST, "
            "or run inside a SLURM allocation (sbatch slurm/full.sh)"
        )
