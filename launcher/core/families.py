"""Seq2seq model families (T5, T5 v1.1, mT5, umT5, BART, mBART, Pegasus): the facts ftlaunch needs
about a model, read from the model itself instead of assumed from T5.

- LoRA targets: the attention query and value projections, found among the linear layers of the
  model's attention modules (T5: ``q``, ``v``; BART, mBART, Pegasus: ``q_proj``, ``v_proj``).
  PEFT's own table covers only some families (no umT5, mBART or Pegasus), so they are derived.
- Block classes: the repeated encoder/decoder layers, the unit FSDP wraps and shards.
- Precision: T5-family models overflow in fp16.
- Decoder start: labels must shift into decoder inputs, which needs the model's start token.

Nothing here imports transformers at module level: the launcher checks a recipe on the host
without paying for that import (tiny-t5 and local T5 directories use ``T5_MODULE_NAMES``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.core.errors import UserError

# model_type values of the T5 family (config.json), and how their hub ids are usually spelled.
T5_FAMILY_TYPES = frozenset({"t5", "mt5", "umt5", "longt5", "switch_transformers"})
# Attention projection names of the query and the value, per naming scheme, in lookup order.
QUERY_VALUE_NAMES = (("q", "v"), ("q_proj", "v_proj"), ("query", "value"))


@dataclass(frozen=True)
class ModuleNames:
    """What a LoRA target can name: the last name part of every module (what PEFT matches), and
    the linear layers inside the attention modules, for messages and for deriving targets."""

    leaves: frozenset[str]
    attention: tuple[str, ...]
    # leaf names whose every module is a layer PEFT's LoRA adapts (linear, embedding, convolution)
    adaptable: frozenset[str]
    # leaf names of a module (or embedding weight) the model also reaches under another leaf name
    # (T5's token embedding: shared, embed_tokens): PEFT would wrap one name only, and the forward
    # may use the other
    aliased: frozenset[str]
    # the smallest side (min of in and out features) of each adaptable leaf's layers, when known:
    # a LoRA rank above it adds parameters and no expressive power
    smallest_side: dict[str, int] = field(default_factory=dict, compare=False)


# The embedded tiny model (`tiny-t5`): FLAN-T5's layout at toy size. Here, not in model.py, so the
# launcher's disk and bucket checks read it without importing torch.
TINY_T5_CONFIG: dict[str, Any] = dict(
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.1,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,  # FLAN-T5: decoder outputs are not rescaled, lm_head is its own matrix
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)

# T5 (and FLAN-T5, T5 v1.1) module names: enough to check LoRA targets without importing
# transformers, which would add seconds to every dry run and job start.
T5_MODULE_NAMES = ModuleNames(
    leaves=frozenset(
        {
            "shared",
            "encoder",
            "decoder",
            "embed_tokens",
            "block",
            "layer",
            "SelfAttention",
            "EncDecAttention",
            "q",
            "k",
            "v",
            "o",
            "relative_attention_bias",
            "layer_norm",
            "DenseReluDense",
            "wi",
            "wi_0",
            "wi_1",
            "wo",
            "act",
            "dropout",
            "final_layer_norm",
            "lm_head",
            "0",
            "1",
            "2",
        }
    ),
    attention=("q", "k", "v", "o"),
    adaptable=frozenset(
        {
            "q",
            "k",
            "v",
            "o",
            "wi",
            "wi_0",
            "wi_1",
            "wo",
            "lm_head",
            "relative_attention_bias",
            "shared",
            "embed_tokens",
        }
    ),
    aliased=frozenset({"shared", "embed_tokens"}),
)


def is_t5_family(model_type: str | None, name: str) -> bool:
    """T5-family models (T5, FLAN-T5, T5 v1.1, mT5, umT5, LongT5) overflow in fp16: recognised by
    a config's model_type, else (a hub id without a local config) by name."""
    if model_type is not None:
        return model_type.lower() in T5_FAMILY_TYPES
    return "t5" in name.lower()


def is_attention(module) -> bool:
    return type(module).__name__.endswith("Attention")


def module_names(model) -> ModuleNames:
    """The ModuleNames of a built (or meta-device) model; PEFT wrappers are looked through."""
    import torch

    adaptable_types = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    by_leaf: dict[str, list] = {}
    leaves_of: dict[int, set[str]] = {}  # a module, or a weight tied between modules: its leaf names
    for name, module in model.named_modules(remove_duplicate=False):
        if not name:
            continue
        module = getattr(module, "base_layer", module)  # a PEFT wrapper: the layer it adapts
        leaf = name.rsplit(".", 1)[-1]
        by_leaf.setdefault(leaf, []).append(module)
        # token embeddings tied across modules (transformers 5: T5's shared and embed_tokens are two
        # modules of one weight) count as one; an lm_head tied to them is called itself: adaptable
        embedding = isinstance(module, torch.nn.Embedding)
        leaves_of.setdefault(id(module.weight) if embedding else id(module), set()).add(leaf)
    attention: list[str] = []
    for module in model.modules():
        if is_attention(module):
            for name, child in module.named_children():
                linear = isinstance(getattr(child, "base_layer", child), torch.nn.Linear)
                if linear and name not in attention:
                    attention.append(name)
    adaptable = {
        leaf
        for leaf, modules in by_leaf.items()
        if all(isinstance(m, adaptable_types) or type(m).__name__ == "Conv1D" for m in modules)
    }
    aliased = {leaf for leaves in leaves_of.values() if len(leaves) > 1 for leaf in leaves}
    smallest = {
        leaf: min(side(m) for m in by_leaf[leaf]) for leaf in adaptable if all(side(m) for m in by_leaf[leaf])
    }
    return ModuleNames(
        frozenset(by_leaf), tuple(attention), frozenset(adaptable), frozenset(aliased), smallest
    )


def side(module) -> int:
    """The smaller of a linear or embedding layer's two sizes (0 for other layers); under ZeRO-3's
    ``zero.Init`` the real shape is ``ds_shape`` (``weight`` is an empty placeholder)."""
    weight = getattr(module, "weight", None)
    shape = getattr(weight, "ds_shape", getattr(weight, "shape", ()))
    return min(shape) if len(shape) == 2 else 0


def skeleton(config_dir: Path):
    """The model of a local directory on the meta device: its structure, no weights, no memory.
    A config.json transformers refuses (a value of the wrong type that modelfiles.py does not
    check, e.g. a BART ``dropout`` of ``"x"``) is one line naming the field."""
    import torch
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    try:
        config = AutoConfig.from_pretrained(str(config_dir))
        with torch.device("meta"):
            return AutoModelForSeq2SeqLM.from_config(config)
    except (OSError, ValueError, TypeError, StrictDataclassError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()][:2]
        reason = " ".join(lines).split(" Errors:")[0][:240]
        raise UserError(f"model {config_dir}: cannot read its config.json ({reason})") from None


def estimate_targets(targets: list[str] | None) -> tuple[str, ...]:
    """LoRA targets for a parameter estimate made without the model: the recipe's, or T5's names
    for the query and value projections (their shapes are the same in every family)."""
    return tuple(targets) if targets else QUERY_VALUE_NAMES[0]


def resolve_lora_targets(names: ModuleNames, targets: list[str] | None, model_label: str) -> list[str]:
    """The LoRA targets of a run: the recipe's ``lora.target_modules`` when given (each must name a
    module), else the attention query and value projections. The one rule (and message) for both
    the launcher's early check and the ranks' ``apply_lora``."""
    has = f"its attention layers have {', '.join(names.attention) or 'no linear projections'}"
    if targets is None:
        for query, value in QUERY_VALUE_NAMES:
            if query in names.attention and value in names.attention:
                return [query, value]
        raise UserError(
            f"lora.target_modules: cannot tell the attention query and value projections of "
            f"{model_label} ({has}); name them with --set lora.target_modules=[...]"
        )
    missing = [target for target in targets if target not in names.leaves]
    if missing:
        raise UserError(
            f"lora.target_modules {missing} name no module of {model_label}; {has} "
            "(or set lora.target_modules=null for its query and value projections)"
        )
    other = [target for target in targets if target not in names.adaptable]
    if other:
        layers = sorted(names.adaptable - names.aliased)
        raise UserError(
            f"lora.target_modules {other} name layers of {model_label} that LoRA cannot adapt (PEFT "
            f"adapts linear, embedding and convolution layers); its adaptable layers: {', '.join(layers)}"
        )
    shared = [target for target in targets if target in names.aliased]
    if shared:
        raise UserError(
            f"lora.target_modules {shared} name a layer {model_label} uses under several names (the "
            f"shared token embedding: {', '.join(sorted(names.aliased))}): PEFT would adapt it under one "
            "name and the model would go on using the other, so the adapter never trains; leave it out"
        )
    return list(targets)


def check_lora_rank(names: ModuleNames, targets: list[str], rank: int, model_label: str) -> None:
    """A LoRA rank above the smaller side of every target layer adds parameters and no expressive
    power (the update of an n x m layer has rank at most min(n, m)). One target that still gains
    (q at r=32 beside a 32 x 12 relative_attention_bias) keeps the rank useful."""
    sides = {target: names.smallest_side[target] for target in targets if target in names.smallest_side}
    if len(sides) == len(targets) and sides and rank > max(sides.values()):
        target = max(sides, key=sides.get)
        raise UserError(
            f"lora.r={rank} is above the size of every layer it adapts in {model_label} (the largest: "
            f"{target}, {sides[target]} on its smaller side): an adapter of rank r adds r x (in + out) "
            f"parameters but its update cannot exceed that rank; use lora.r={sides[target]} or less"
        )


def block_class_names(model) -> list[str]:
    """Class names of the model's repeated encoder/decoder layers (T5: ``T5Block``; BART:
    ``BartEncoderLayer``, ``BartDecoderLayer``): the unit FSDP auto-wraps.

    A layer stack is a ModuleList of modules of one class that hold an attention module. The
    model's ``_no_split_modules`` names them where it exists (mBART's also lists its attention,
    which is not a layer, Pegasus has none); the stacks found in the model decide.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers: list[str] = []
    for module in base.modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child).__name__ for child in module}
        if len(classes) == 1 and any(is_attention(m) for m in module[0].modules()):
            name = classes.pop()
            if name not in layers:
                layers.append(name)
    declared = set(getattr(base, "_no_split_modules", None) or ())
    return [name for name in layers if name in declared] or layers  # in model order: encoder first


def check_decoder_start(model, model_label: str) -> None:
    """Training shifts labels right into decoder inputs with the model's own rule (T5: start
    token = pad; BART: eos; mBART: the language code at the end of the labels). A model whose
    config cannot do that fails here, not inside the first step."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prepare = getattr(base, "prepare_decoder_input_ids_from_labels", None)
    if prepare is None:
        raise UserError(
            f"model {model_label} is not an encoder-decoder (seq2seq) model; ftlaunch trains those"
        )
    eos = getattr(base.config, "eos_token_id", None)
    probe = torch.tensor([[5, eos if isinstance(eos, int) else 1]])
    try:
        prepare(labels=probe)
    except (ValueError, TypeError, AttributeError) as exc:
        raise UserError(
            f"model {model_label} cannot build decoder inputs ({str(exc).splitlines()[0][:160]}); "
            "set decoder_start_token_id in its config.json (T5: the pad id; BART: the eos id)"
        ) from None
