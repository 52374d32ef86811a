"""Memory estimates per GPU for every ZeRO stage and offload: which strategy fits a model.

Pure functions, no CLI. Model states per GPU follow the layouts ftlaunch's rendered configs
produce, not DeepSpeed's estimator: the estimator assumes 16-bit weights and gradients, while
ftlaunch renders DeepSpeed with bf16 off and ``torch_autocast`` on (``deepspeed.json``), i.e.
DDP's numerics: fp32 weights, fp32 gradients, fp32 master copy. Ψ = parameters, T = trainable
ones (Ψ under full fine-tuning, LoRA's adapters otherwise), N = GPUs per node x nodes, L = the
largest layer's parameters, bytes per GPU:

- DDP: fp32 weights 4Ψ + fp32 gradients 4T + AdamW's two fp32 moments 8T + DDP's reducer
  buckets 4T (C++-owned) = 4Ψ + 16T (bench/zero_memory.py measures 16Ψ without the buckets);
- ZeRO-1 and ZeRO-2: the whole fp32 module on every rank 4Ψ + gradient partitions 4T/N
  (``averaged_gradients``: both stages reduce into partitions during backward in DeepSpeed 0.19)
  + fp32 master partitions 4T/N (``single_partition_of_fp32_groups``, a clone even of fp32
  weights) + AdamW 8T/N = 4Ψ + 16T/N; plus the larger transient of one layer's full fp32
  gradient before its copy into the reduce bucket (4L) and the step's flat copy of the
  gradient partition (4T/N, ``flatten_dense_tensors_aligned`` in ``stage_1_and_2.step``);
- ZeRO-3: fp32 parameter partitions 4Ψ/N (``ds_tensor``) + gradient partitions 4T/N
  (``grad_partitions_flat_buffer``) + fp32 master 4T/N + AdamW 8T/N = 4Ψ/N + 16T/N (20Ψ/N
  measured exactly, bench/results/checkpointing_memory.md); plus the larger of the backward's
  transient, the gathered fp32 weights 4·min(Ψ, ``stage3_max_live_parameters``) (with
  ``stage3_max_reuse_distance`` 1e9, as rendered, every gathered weight stays until backward
  has used it: ``PartitionedParameterCoordinator.__params_to_release``) + one layer's full fp32
  gradient 4L before its reduce-scatter, and the step's flat copy of the gradient partition
  4T/N (``stage3._prepare_fp32_grad_for_sub_group``);
- optimizer offload moves the gradient partitions, master copy and moments to CPU RAM (the
  transient layer gradient stays), full offload also the parameter partitions. CPU RAM per node
  comes from DeepSpeed's estimator, which is still right there: offloaded states are fp32 under
  any precision (16 bytes per parameter with its 1.5x buffer factor); below ZeRO-3 it is at
  least the load of the whole fp32 model by every rank of the node, a LoRA run's frozen base
  included (its figure without offload, for all parameters).

Adafactor replaces AdamW's 8T by one fp32 moment per parameter under ZeRO (4T/N) and ~0 under
DDP (``adafactor_state_bytes``).

Activations (bf16 autocast, no activation checkpointing), bytes per micro-batch of b examples,
source length s, target length t, d_model h, d_ff f, heads a, vocab V, L_e / L_d layers; after
Korthikanti et al. 2022 ("Reducing Activation Recomputation", 11h + 5as per token for
self-attention), with T5's gated-GELU feed-forward (3h + 11f per token) and fp32 residual-stream
norms (4h per norm):

    encoder layer:  b·s·(22h + 11f + 5·a·s)
    decoder layer:  b·t·(37h + 11f + 5·a·(t + s)) + b·s·4h     (self + cross attention, K/V of the encoder output)
    logits + loss:  10·b·t·V                                    (bf16 logits, fp32 copy, fp32 gradient)
    activations = L_e·encoder + L_d·decoder + logits

With gradient checkpointing (``train.gradient_checkpointing``) each layer keeps only its input
(the fp32 residual stream, 4 bytes per element) and one layer at a time is recomputed in full:

    checkpointed:   L_e·4·b·s·h + L_d·4·b·t·h + b·s·4h + max(encoder layer, decoder layer) + logits

With a token budget (``train.micro_batch_tokens``, ``--micro-batch-tokens``) b is the number of
examples of the longest source and target that the budget holds, rounded up: the budget bounds
a micro-batch's padded tokens, and the longest sequences cost the most per token (the attention
terms grow with s and t).

It is an estimate (±30%); the recommendation keeps a margin (``HEADROOM``) for the CUDA
context, allocator fragmentation and temporary buffers.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from launcher.core.errors import UserError
from launcher.core.model_facts import FLAN_T5_CONFIGS, ModelFacts, model_facts
from launcher.core.model_facts import (
    FLAN_T5_VOCAB as FLAN_T5_VOCAB,  # the CLI, tests and bench read them here
)
from launcher.core.model_facts import canonical_name as canonical_name
from launcher.core.model_facts import lora_trainable_params as lora_trainable_params
from launcher.core.paths import is_local_reference

GIB = 2**30
HEADROOM = 0.15  # fraction of GPU memory kept free
ALL_MODELS = "flan-t5-all"
# The known FLAN-T5 sizes and their parameters (model_facts.py: the one place they are written).
KNOWN_MODELS: dict[str, int] = {name: model_facts(name).params for name in FLAN_T5_CONFIGS}

OFFLOADS = ("none", "optimizer", "full")
# Rows in table order; ``recommend`` prefers no offload at the smallest stage that fits, then
# the least offload (CPU offload costs more speed than one more ZeRO stage on the GPUs). ZeRO-1 +
# offload comes last: ZeRO-2 + offload moves the same optimizer traffic and holds less, so it
# never loses to it.
ROW_ORDER = (
    (0, "none"),
    (1, "none"),
    (1, "optimizer"),
    (2, "none"),
    (2, "optimizer"),
    (3, "none"),
    (3, "optimizer"),
    (3, "full"),
)
PREFERENCE = (
    (0, "none"),
    (1, "none"),
    (2, "none"),
    (3, "none"),
    (2, "optimizer"),
    (3, "optimizer"),
    (3, "full"),
    (1, "optimizer"),
)


# ---------------------------------------------------------------- models


def expand_models(model: str) -> list[str]:
    """``flan-t5-all`` (or ``all``) -> every known FLAN-T5 size; anything else -> [model]."""
    if model in (ALL_MODELS, "all", "google/flan-t5-all"):
        return list(KNOWN_MODELS)
    return [model]


def model_spec(model: str) -> ModelFacts:
    """The facts of a known FLAN-T5 name, ``tiny-t5``, or a local directory (its config, no weights),
    refused where the parameters cannot be counted."""
    path = Path(model).expanduser()
    if is_local_reference(model) and not path.exists():
        raise UserError(
            f"--model {model} does not exist; pass a directory written by save_pretrained, tiny-t5, "
            f"or one of {', '.join(KNOWN_MODELS)}"
        )
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise UserError(
            f"model {model} is a LoRA adapter, not a whole model; estimate its base model with --lora "
            "(--model BASE --lora)"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(
            f"model {model} has no config.json; pass a directory written by save_pretrained, "
            f"tiny-t5, or one of {', '.join(KNOWN_MODELS)}"
        )
    if path.is_dir():
        from launcher.core.modelfiles import check_model_files

        check_model_files(path, "--model")  # the index and safetensors headers are read
    facts = model_facts(model)
    if facts.params is None:
        raise UserError(
            f"unknown model {model!r} for an estimate (no download): use one of "
            f"{', '.join(KNOWN_MODELS)}, {ALL_MODELS}, tiny-t5, or a local directory with config.json"
        )
    return facts


def parameter_count(model: str) -> int:
    """Parameters of a known name, tiny-t5, or a local model directory (UserError otherwise)."""
    return model_spec(model).params


# ---------------------------------------------------------------- estimates


@dataclass(frozen=True)
class EstimateRow:
    stage: int  # 0 = DDP, 1-3 = ZeRO stage
    offload: str  # none | optimizer | full
    model_states_gib: float  # per GPU: parameters + gradients + optimizer state + ZeRO's transients
    activations_gib: float  # per GPU, one micro-batch (0 when the architecture is unknown)
    cpu_gib: float  # CPU RAM per node (DeepSpeed's estimator; offloaded states, buffers)
    world_size: int = 1
    fsdp: bool = False  # PyTorch FSDP2 (--fsdp) instead of DDP / ZeRO; stage is then 0
    other_activations_gib: float = 0.0  # the activations with gradient checkpointing toggled (shown beside)

    @property
    def total_gib(self) -> float:
        return self.model_states_gib + self.activations_gib

    @property
    def label(self) -> str:
        if self.fsdp:
            return "FSDP2" + (" + offload full" if self.offload == "full" else "")
        name = "DDP" if self.stage == 0 else f"ZeRO-{self.stage}"
        return name if self.offload == "none" else f"{name} + offload {self.offload}"

    @property
    def flags(self) -> str:
        """The ftlaunch flags that select this row."""
        if self.fsdp:
            return "--fsdp" + (" --offload full" if self.offload == "full" else "")
        return f"--zero {self.stage}" + (f" --offload {self.offload}" if self.offload != "none" else "")

    def fits(self, gpu_mem_gib: float, headroom: float = HEADROOM) -> bool:
        return self.total_gib <= gpu_mem_gib * (1.0 - headroom)


@dataclass(frozen=True)
class RunShape:
    """The run an estimate is for: where it runs, what it trains, what one micro-batch holds."""

    gpus: int = 1  # per node
    nodes: int = 1
    lora: bool = False
    micro_batch: int = 8
    source_len: int = 512
    target_len: int = 128
    lora_r: int = 32
    lora_targets: Sequence[str] = ("q", "v")
    lora_dora: bool = False  # lora.use_dora: one trainable magnitude per adapted output row
    gradient_checkpointing: bool = False  # activations recomputed per layer (train.gradient_checkpointing)
    optimizer: str = "adamw"  # train.optimizer: adamw | adafactor (DDP and ZeRO, not FSDP2)
    micro_batch_tokens: int | None = None  # the token budget micro_batch was derived from, if any

    def trainable_params(self, spec: ModelFacts) -> int:
        if not self.lora:
            return spec.params
        return lora_trainable_params(spec, self.lora_r, self.lora_targets, self.lora_dora)

    def describe(self) -> str:
        kind = "DoRA" if self.lora_dora else "LoRA"
        method = (
            f"{kind} r={self.lora_r} on {','.join(self.lora_targets)}" if self.lora else "full fine-tuning"
        )
        budget = f" (token budget {self.micro_batch_tokens})" if self.micro_batch_tokens else ""
        checkpointing = ", gradient checkpointing" if self.gradient_checkpointing else ""
        checkpointing += ", Adafactor" if self.optimizer == "adafactor" else ""
        return (
            f"{self.gpus} GPU(s) x {self.nodes} node(s), micro batch {self.micro_batch}{budget}, "
            f"{self.source_len}/{self.target_len} tokens, {method}{checkpointing}"
        )


def budget_micro_batch(tokens: int, source_len: int, target_len: int) -> int:
    """Examples per micro-batch for the activation estimate under a token budget: the budget
    filled with examples of the longest source and target (up: a part example still costs)."""
    return max(1, -(-tokens // (source_len + target_len)))


# Adam's two fp32 moments per trainable parameter. Adafactor keeps no first moment and, under DDP,
# a row and a column of second moments per matrix (for flan-t5-base under 0.2% of Adam's bytes:
# counted as 0). Under ZeRO it steps flat 1-D partitions, which it cannot factor: one fp32 second
# moment per parameter, partitioned like Adam's moments (launcher/rank/train.py ``adafactor``).
ADAM_MOMENT_BYTES = 8
ADAFACTOR_FLAT_BYTES = 4


def activation_bytes(spec: ModelFacts, shape: RunShape, checkpointing: bool | None = None) -> int:
    """The activation formulas of the module docstring (bytes per GPU, one micro-batch), with or
    without gradient checkpointing (default: the shape's); 0 when the architecture is unknown."""
    if not (spec.d_model and spec.num_layers):
        return 0
    checkpointing = shape.gradient_checkpointing if checkpointing is None else checkpointing
    b, s, t, h = shape.micro_batch, shape.source_len, shape.target_len, spec.d_model
    f = spec.d_ff or int(2.5 * h)
    a = spec.num_heads or max(1, h // 64)
    v = spec.vocab_size or FLAN_T5_VOCAB
    decoder_layers = spec.num_decoder_layers or spec.num_layers
    encoder = b * s * (22 * h + 11 * f + 5 * a * s)
    decoder = b * t * (37 * h + 11 * f + 5 * a * (t + s)) + b * s * 4 * h
    logits = 10 * b * t * v
    if checkpointing:
        inputs = spec.num_layers * 4 * b * s * h + decoder_layers * 4 * b * t * h + b * s * 4 * h
        return inputs + max(encoder, decoder) + logits
    return spec.num_layers * encoder + decoder_layers * decoder + logits


def deepspeed_estimators():
    """DeepSpeed's ZeRO-2 and ZeRO-3 estimators. They need no accelerator: DeepSpeed is told so
    before its import, instead of probing for one and printing a warning on the console."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


def _zero2(params: int, gpus: int, nodes: int, offload: bool) -> tuple[int, int]:
    """(cpu bytes, gpu bytes) from DeepSpeed's stage 1/2 estimator."""
    estimate_zero2_model_states_mem_needs, _ = deepspeed_estimators()
    return estimate_zero2_model_states_mem_needs(
        params, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=offload
    )


def _zero3(params: int, largest_layer: int, gpus: int, nodes: int, offload: str) -> tuple[int, int]:
    _, estimate_zero3_model_states_mem_needs = deepspeed_estimators()

    cpu, gpu, _largest = estimate_zero3_model_states_mem_needs(
        params,
        largest_layer,
        num_gpus_per_node=gpus,
        num_nodes=nodes,
        cpu_offload=offload != "none",
        cpu_offload_params=offload == "full",
        zero_init=True,
    )
    return cpu, gpu


@functools.cache
def zero3_max_live_parameters(offload: str = "none") -> int:
    """``stage3_max_live_parameters`` as rendered (the ZeRO-3 templates in accelerate_configs/)."""
    from launcher.core.paths import project_dir

    name = "zero_stage3_offload.json" if offload == "full" else "zero_stage3.json"
    config = json.loads((project_dir("accelerate_configs") / "deepspeed" / name).read_text())
    return int(config["zero_optimization"]["stage3_max_live_parameters"])


FP32 = 4  # bytes: ftlaunch keeps weights, gradients, master copy and moments in fp32 everywhere
ADAMW_STATE_BYTES = 8 + 4 + 4  # ZeRO, per trainable parameter: two moments, master copy, gradient partition


def model_state_bytes(
    stage: int,
    offload: str,
    *,
    params: int,
    gpus: int,
    nodes: int,
    trainable: int | None = None,
    largest_layer: int | None = None,
) -> tuple[int, int]:
    """(gpu bytes per GPU, cpu bytes per node) of parameters + gradients + optimizer state, with
    the largest transient of backward / step (the module docstring's formulas)."""
    world = gpus * nodes
    trainable = params if trainable is None else trainable
    frozen = params - trainable
    largest = largest_layer if largest_layer is not None else params // 10
    layer_gradient = FP32 * largest  # a gathered / whole layer's fp32 gradient before its reduction
    step_copy = FP32 * trainable // world  # the step's flat copy of the gradient partition
    # CPU RAM per node below ZeRO-3: every rank first loads the whole fp32 model on the CPU, frozen
    # weights of a LoRA run included (DeepSpeed's figure without offload, for all Ψ), or holds its
    # offloaded states (DeepSpeed's figure with offload, for the T trained parameters)
    loading, _ = _zero2(params, gpus, nodes, False)
    if stage == 0:
        # weights 4Ψ + gradients 4T + DDP's reducer buckets 4T + AdamW 8T (no master copy)
        return FP32 * params + (FP32 + FP32 + ADAM_MOMENT_BYTES) * trainable, loading
    if stage in (1, 2):
        cpu = max(loading, _zero2(trainable, gpus, nodes, offload != "none")[0])
        weights = FP32 * params  # the fp32 module, whole, on every rank
        if offload != "none":
            return weights + layer_gradient, cpu
        partitions = ADAMW_STATE_BYTES * trainable // world
        return weights + partitions + max(layer_gradient, step_copy), cpu
    cpu, _ = _zero3(trainable, largest, gpus, nodes, offload)
    gathered = FP32 * min(params, zero3_max_live_parameters(offload))  # kept forward -> backward
    if offload == "full":
        return gathered + layer_gradient, cpu + FP32 * frozen // nodes
    weights = FP32 * params // world
    if offload == "optimizer":
        return weights + gathered + layer_gradient, cpu
    partitions = ADAMW_STATE_BYTES * trainable // world
    return weights + partitions + max(gathered + layer_gradient, step_copy), cpu


def fsdp_state_bytes(
    offload: str, *, params: int, gpus: int, nodes: int, trainable: int, largest_layer: int
) -> tuple[int, int]:
    """(gpu bytes per GPU, cpu bytes per node) under FSDP2 as ftlaunch runs it.

    fp32 everything (weights, gradients and reductions; autocast does the bf16 math): trainable
    parameters 4 + 4 + 8 (Adam) = 16 bytes and frozen ones 4 bytes, sharded over all N ranks, plus
    the gathered fp32 weights of two units at a time (the current one and the prefetched next;
    the largest module bounds a unit). ``--offload full`` keeps the shards in CPU RAM.
    """
    world = gpus * nodes
    shards = (16 * trainable + 4 * (params - trainable)) // world
    gathered = 2 * 4 * largest_layer
    if offload == "full":
        return gathered, shards * gpus
    return shards + gathered, 0


GENERIC_ADVICE = "use more GPUs, gradient checkpointing, LoRA, or a smaller micro batch"


class NothingFits(UserError):
    """No candidate row fits: the message says the smallest; ``zero_auto`` adds the advice that
    applies to the run (``fit_advice``)."""

    def __init__(self, summary: str, advice: str = GENERIC_ADVICE):
        super().__init__(f"{summary}; {advice}")
        self.summary = summary


def recommend_fsdp(
    rows: Iterable[EstimateRow], gpu_mem_gib: float, headroom: float = HEADROOM
) -> EstimateRow:
    """``--fsdp --zero auto``: FSDP2 without offload when it fits, else with ``--offload full``."""
    candidates = [row for row in rows if row.fsdp]
    for row in candidates:
        if row.fits(gpu_mem_gib, headroom):
            return row
    raise NothingFits(
        f"FSDP2 does not fit in {gpu_mem_gib:g} GiB per GPU (with {headroom:.0%} headroom) even with "
        f"--offload full ({candidates[-1].total_gib:.1f} GiB)"
    )


def adafactor_state_bytes(
    stage: int, offload: str, gpu: int, cpu: int, trainable: int, shape: RunShape
) -> tuple[int, int]:
    """(gpu, cpu) bytes with Adafactor in place of Adam's moments (counted in ``gpu``, or in
    ``cpu`` per node under optimizer offload): DDP keeps ~0 bytes of factored moments, ZeRO one
    unfactored fp32 moment per parameter, partitioned over the ranks."""
    world = shape.gpus * shape.nodes
    if stage == 0:
        return gpu - ADAM_MOMENT_BYTES * trainable, cpu
    saved = (ADAM_MOMENT_BYTES - ADAFACTOR_FLAT_BYTES) * trainable // world
    if offload == "none":
        return gpu - saved, cpu
    return gpu, cpu - saved * shape.gpus


def estimate_rows(spec: ModelFacts, shape: RunShape, fsdp: bool = False) -> list[EstimateRow]:
    """Per-GPU memory for every stage x offload (ROW_ORDER), then FSDP2's rows when ``fsdp``."""
    if shape.gpus < 1 or shape.nodes < 1:
        raise UserError("--gpus and --nodes must be at least 1")
    states = dict(
        params=spec.params,
        gpus=shape.gpus,
        nodes=shape.nodes,
        trainable=shape.trainable_params(spec),
        largest_layer=spec.largest_layer,
    )
    activations = activation_bytes(spec, shape) / GIB
    other = activation_bytes(spec, shape, not shape.gradient_checkpointing) / GIB
    world = shape.gpus * shape.nodes
    adafactor = shape.optimizer == "adafactor"
    if adafactor:  # DDP: factored moments (~0 bytes); ZeRO: flat v partitions (no FSDP2 rows)
        fsdp = False
    rows = []
    for stage, offload in ROW_ORDER:
        gpu, cpu = model_state_bytes(stage, offload, **states)
        if adafactor:
            gpu, cpu = adafactor_state_bytes(stage, offload, gpu, cpu, states["trainable"], shape)
        rows.append(EstimateRow(stage, offload, gpu / GIB, activations, cpu / GIB, world, False, other))
    for offload in ("none", "full") if fsdp else ():
        gpu, cpu = fsdp_state_bytes(offload, **states)
        rows.append(EstimateRow(0, offload, gpu / GIB, activations, cpu / GIB, world, True, other))
    return rows


def estimate_model(model: str, shape: RunShape, fsdp: bool = False) -> list[EstimateRow]:
    """``estimate_rows`` for a model reference (known name, tiny-t5 or a local directory)."""
    return estimate_rows(model_spec(model), shape, fsdp)


def recommend(
    rows: Iterable[EstimateRow], gpu_mem_gib: float, headroom: float = HEADROOM, offload: str | None = None
) -> EstimateRow:
    """The smallest stage that fits without offload, else the least offload (then smallest stage)
    that fits in ``gpu_mem_gib`` x (1 - headroom), in ``PREFERENCE`` order; UserError when nothing fits.
    ``offload``: the user's own --offload, kept (the smallest stage that fits with it)."""
    by_key = {
        (row.stage, row.offload): row for row in rows if not row.fsdp and offload in (None, row.offload)
    }
    for key in PREFERENCE:
        row = by_key.get(key)
        if row is not None and row.fits(gpu_mem_gib, headroom):
            return row
    smallest = min(by_key.values(), key=lambda row: row.total_gib)
    kept = f" with --offload {offload}" if offload else ""
    raise NothingFits(  # FSDP2's rows are not candidates here (recommend_fsdp, with --fsdp)
        f"nothing fits{kept} in {gpu_mem_gib:g} GiB per GPU (with {headroom:.0%} headroom): the smallest "
        f"ZeRO/DDP choice is {smallest.label} at {smallest.total_gib:.1f} GiB"
    )


@dataclass(frozen=True)
class FitQuestion:
    """A run that nothing fits, and the memory it must fit in: what ``fit_advice`` tries changes on."""

    spec: ModelFacts
    shape: RunShape
    gpu_mem_gib: float
    fsdp: bool
    offload: str | None
    headroom: float

    def pick(
        self, changed: RunShape, on_fsdp: bool | None = None, any_offload: bool = False
    ) -> EstimateRow | None:
        """What ``--zero auto`` (or ``--fsdp``'s auto) would pick for the changed run; None when
        nothing fits. The user's --offload is kept unless ``any_offload``."""
        on_fsdp = self.fsdp if on_fsdp is None else on_fsdp
        kept = None if any_offload else self.offload
        rows = [
            row
            for row in estimate_rows(self.spec, changed, on_fsdp)
            if not row.fsdp or kept in (None, row.offload)
        ]
        if on_fsdp and not any(row.fsdp for row in rows):
            return None
        try:
            return (
                recommend_fsdp(rows, self.gpu_mem_gib, self.headroom)
                if on_fsdp
                else recommend(rows, self.gpu_mem_gib, self.headroom, kept)
            )
        except UserError:
            return None

    def smallest(self, changed: RunShape) -> float:
        """The least memory any choice of this engine (and the user's --offload) needs for the changed run."""
        rows = [row for row in estimate_rows(self.spec, changed, self.fsdp) if row.fsdp == self.fsdp]
        return min(row.total_gib for row in rows if self.fsdp or self.offload in (None, row.offload))


@dataclass(frozen=True)
class Change:
    """One change to offer: ``row`` is what it would run as when it fits; ``helps`` says whether
    it is worth naming as using less memory when it does not."""

    text: str
    row: EstimateRow | None
    helps: bool = True


def checkpointing_change(question: FitQuestion) -> Change | None:
    """Gradient checkpointing, where it is off: only a layer's inputs are kept for backward."""
    shape = question.shape
    if shape.gradient_checkpointing:
        return None
    return Change(
        "--set train.gradient_checkpointing=true", question.pick(replace(shape, gradient_checkpointing=True))
    )


def offload_change(question: FitQuestion) -> Change | None:
    """Another ZeRO offload than the user's --offload: the one ``--zero auto`` would pick without it."""
    if question.offload is None or question.fsdp:
        return None
    row = question.pick(question.shape, any_offload=True)
    return Change(f"--offload {row.offload if row else 'full'}", row, helps=False)


def engine_change(question: FitQuestion) -> Change | None:
    """The other sharding engine (FSDP2 or DeepSpeed); FSDP2 takes neither Adafactor nor an
    optimizer-only offload."""
    if question.shape.optimizer == "adafactor" or question.offload == "optimizer":
        return None
    text = "without --fsdp" if question.fsdp else "--fsdp"
    return Change(text, question.pick(question.shape, on_fsdp=not question.fsdp), helps=False)


def more_gpus_change(question: FitQuestion) -> Change | None:
    """The fewest GPUs (the run's times a power of two, up to 64) that fit; else more GPUs only
    where they shrink the estimate (a whole model on every rank does not)."""
    shape = question.shape
    for factor in (2, 4, 8, 16, 32, 64):
        row = question.pick(replace(shape, nodes=shape.nodes * factor))
        if row is not None:
            return Change(f"{shape.gpus * shape.nodes * factor} GPUs in all", row)
    shrinks = question.smallest(replace(shape, nodes=shape.nodes * 64)) < 0.99 * question.smallest(shape)
    return Change("more GPUs", None, helps=shrinks)


def lora_change(question: FitQuestion) -> Change | None:
    """LoRA instead of full fine-tuning: the base model's gradients and optimizer state go."""
    if question.shape.lora:
        return None
    return Change("LoRA (ftlaunch lora)", question.pick(replace(question.shape, lora=True)))


def micro_batch_change(question: FitQuestion) -> Change | None:
    """The largest smaller micro batch (or token budget, in whole examples) that fits."""
    shape = question.shape
    if shape.micro_batch <= 1:
        return None
    key = "train.micro_batch_tokens" if shape.micro_batch_tokens else "train.micro_batch_size"
    tokens = shape.source_len + shape.target_len
    for size in range(shape.micro_batch - 1, 0, -1):
        row = question.pick(replace(shape, micro_batch=size, micro_batch_tokens=None))
        if row is not None:
            value = size * tokens if shape.micro_batch_tokens else size
            return Change(f"--set {key}={value}", row)
    return Change(f"a smaller {key}", None)


# The changes fit_advice tries, in the order it names them.
CHANGES = (
    checkpointing_change,
    offload_change,
    engine_change,
    more_gpus_change,
    lora_change,
    micro_batch_change,
)


def fit_advice(
    spec: ModelFacts,
    shape: RunShape,
    gpu_mem_gib: float,
    fsdp: bool = False,
    offload: str | None = None,
    headroom: float = HEADROOM,
) -> str:
    """What to change when nothing fits, for this run only: first the single changes whose
    estimate fits (with what ``--zero auto`` would then pick), then the others that use less
    memory. Gradient checkpointing where it is off, another offload where one was given, FSDP2
    or DeepSpeed (the other engine), more GPUs where they shrink the estimate, LoRA for full
    fine-tuning, a smaller micro batch or token budget."""
    question = FitQuestion(spec, shape, gpu_mem_gib, fsdp, offload, headroom)
    changes = [change for propose in CHANGES if (change := propose(question)) is not None]
    return advice_line(changes)


def advice_line(changes: list[Change]) -> str:
    """The changes that fit (each with its pick), then those that only use less memory."""
    fits = [f"{c.text} ({c.row.label} at {c.row.total_gib:.1f} GiB)" for c in changes if c.row is not None]
    less = [c.text for c in changes if c.row is None and c.helps]
    parts = []
    if fits:
        parts.append("would fit: " + ", ".join(fits))
    if less:
        parts.append(("also less memory: " if fits else "less memory: ") + ", ".join(less))
    return "; ".join(parts) or "nothing ftlaunch can change fits this model in that memory"


def zero_auto(
    model: str, gpu_mem_gib: float, shape: RunShape, fsdp: bool = False, offload: str | None = None
) -> tuple[EstimateRow, str]:
    """For ``--zero auto``: the recommended row and one line for the dry-run summary. With
    ``--fsdp`` the sharding engine is chosen: auto decides the offload only; with ``--offload``
    the offload is chosen: auto decides the stage only."""
    spec = model_spec(model)
    rows = estimate_rows(spec, shape, fsdp)
    try:
        row = recommend_fsdp(rows, gpu_mem_gib) if fsdp else recommend(rows, gpu_mem_gib, offload=offload)
    except NothingFits as exc:
        raise NothingFits(exc.summary, fit_advice(spec, shape, gpu_mem_gib, fsdp, offload)) from None
    choice = "FSDP2 with the least offload" if fsdp else "the smallest stage"
    return row, (
        f"{row.label} (--zero auto: {choice} that fits {gpu_mem_gib:g} GiB per GPU; "
        f"estimated {row.total_gib:.1f} GiB = {row.model_states_gib:.1f} model states + "
        f"{row.activations_gib:.1f} activations)"
    )


def detect_gpu_mem_gib() -> float | None:
    """Memory of the first visible GPU, or None without one."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / GIB
    except Exception:  # noqa: BLE001 - no usable CUDA: the caller picks a default
        return None
    return None


# ---------------------------------------------------------------- tables


# Shown when a smaller stage fits: ZeRO-3's memory saving costs speed that is not needed then.
ZERO3_NOT_WORTH_IT = (
    "ZeRO-3 is not worth it here: a smaller stage fits, and ZeRO-3 gathers every layer's weights in "
    "each forward and backward (one H200, flan-t5-base: 0.30x DDP's tokens/s, 225 host syncs per step; "
    "bench/results/gpu.md). Use it when nothing smaller fits."
)


# What the "model states" column counts (the module docstring has the formulas and sources).
MODEL_STATES_FOOTNOTE = (
    "Model states = ftlaunch's fp32 layouts (weights, gradients, master copy, optimizer moments; "
    "DDP 4Ψ + 16T, ZeRO-1/2 4Ψ + 16T/N, ZeRO-3 4Ψ/N + 16T/N, FSDP2 fp32 shards) plus the largest "
    "transient: ZeRO-3's gathered fp32 weights 4·min(Ψ, stage3_max_live_parameters) + one layer's "
    "gradient, or the step's gradient copy (Ψ parameters, T trainable, N ranks; see launcher/host/estimate.py)."
)


def _gib(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def render_table(
    rows: Sequence[EstimateRow],
    gpu_mem_gib: float,
    headroom: float = HEADROOM,
    title: str | None = None,
    checkpointing: bool = False,
    spec: ModelFacts | None = None,
    shape: RunShape | None = None,
) -> str:
    """A markdown table of every row, the recommended one marked; when nothing fits, what would
    (``fit_advice``, given the model's ``spec`` and the run's ``shape``)."""
    try:
        best: EstimateRow | None = recommend(rows, gpu_mem_gib, headroom)
    except UserError:
        best = None
    world = rows[0].world_size if rows else 1
    other = "without" if checkpointing else "with"
    lines = [title] if title else []
    lines += [
        f"| strategy | flags | model states / GPU (GiB) | activations / GPU (GiB) | total / GPU (GiB) | "
        f"CPU RAM / node (GiB) | fits {gpu_mem_gib:g} GiB | total {other} gradient checkpointing (GiB) |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for row in rows:
        fits = "yes" if row.fits(gpu_mem_gib, headroom) else "no"
        if row is best:
            fits += " **<- recommended**"
        lines.append(
            f"| {row.label} | `{row.flags}` | {_gib(row.model_states_gib)} | {_gib(row.activations_gib)} | "
            f"{_gib(row.total_gib)} | {_gib(row.cpu_gib)} | {fits} | "
            f"{_gib(row.model_states_gib + row.other_activations_gib)} |"
        )
    usable = gpu_mem_gib * (1 - headroom)
    lines.append("")
    lines.append(
        f"World size {world}; 'fits' = total <= {usable:.1f} GiB ({1 - headroom:.0%} of {gpu_mem_gib:g} GiB). "
        f"Activations: bf16 autocast, {'with' if checkpointing else 'no'} gradient checkpointing "
        "(see launcher/host/estimate.py)."
    )
    lines.append(MODEL_STATES_FOOTNOTE)
    fsdp_fit = next((row for row in rows if row.fsdp and row.fits(gpu_mem_gib, headroom)), None)
    if best is None and fsdp_fit is not None:
        lines.append(f"No ZeRO/DDP choice fits; {fsdp_fit.label} does (`{fsdp_fit.flags}`).")
    elif best is None:
        advice = fit_advice(spec, shape, gpu_mem_gib, headroom=headroom) if spec and shape else GENERIC_ADVICE
        lines.append(f"Nothing fits: {advice}.")
    elif best.stage < 3 and not best.fsdp:
        lines.append(ZERO3_NOT_WORTH_IT)
    return "\n".join(lines)


def render_models_table(
    models: Sequence[str] | None = None,
    gpu_mem_gib: float = 80.0,
    shape: RunShape | None = None,
    headroom: float = HEADROOM,
) -> str:
    """One line per model (default: every FLAN-T5 size): totals per stage and the recommendation."""
    models = list(models or KNOWN_MODELS)
    shape = shape or RunShape()
    lines = [
        f"| model | parameters | trainable | DDP | ZeRO-1 | ZeRO-2 | ZeRO-3 | ZeRO-3 + offload full | "
        f"recommended for {gpu_mem_gib:g} GiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for model in models:
        spec = model_spec(model)
        rows = estimate_rows(spec, shape)
        by_key = {(r.stage, r.offload): r for r in rows}
        try:
            best = recommend(rows, gpu_mem_gib, headroom)
            choice = f"{best.label} ({_gib(best.total_gib)} GiB)"
        except UserError:
            choice = "nothing fits"
        cells = [
            _gib(by_key[key].total_gib)
            for key in ((0, "none"), (1, "none"), (2, "none"), (3, "none"), (3, "full"))
        ]
        lines.append(
            f"| {spec.name} | {spec.params / 1e6:,.0f}M | {shape.trainable_params(spec) / 1e6:,.1f}M | "
            + " | ".join(cells)
            + f" | {choice} |"
        )
    lines.append("")
    lines.append(f"Total GiB per GPU (model states + activations), {shape.describe()}.")
    return "\n".join(lines)
