"""What ftlaunch knows about a model before loading it: family, dimensions, vocabulary, parameter
count and a fingerprint of the configuration it was read from, for the embedded ``tiny-t5``, the
known FLAN-T5 sizes and a local model directory (its config.json). One cached answer per
reference, read by the estimate, the disk-space check, the rendered DeepSpeed/FSDP settings and
the pre-launch checks, so they cannot disagree about a model.

Nothing here imports torch at module import: the launcher asks before every launch. Only a local
directory of a family whose layout is not written out below (BART, Pegasus, umT5, ...) is counted
on a meta-device skeleton (``families.skeleton``), which imports transformers when asked.

The parameter count is one rule: every distinct parameter tensor once. T5's shared token
embedding counts once (the encoder's and decoder's ``embed_tokens`` are the same tensor); the
``lm_head`` counts when it is its own matrix (FLAN-T5, tiny-t5, mT5: ``tie_word_embeddings:
false``, or a checkpoint that stores ``lm_head.weight``) and not when it is tied to the embedding.
Buffers are not parameters. ``t5_parameters`` writes the rule out for the T5 layout;
tests/test_model_facts.py checks it against ``sum(p.numel() for p in model.parameters())``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.core.errors import UserError
from launcher.core.families import TINY_T5_CONFIG
from launcher.core.jsonl import is_whole
from launcher.core.paths import TINY_TOKENIZER_DIR
from launcher.core.recipe import EMBEDDED_MODEL, local_model_config

FLAN_T5_VOCAB = 32128
# google/flan-t5-*: config.json values (gated-GELU, own lm_head: tie_word_embeddings false).
FLAN_T5_CONFIGS: dict[str, dict[str, int]] = {
    "google/flan-t5-small": dict(
        d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6
    ),
    "google/flan-t5-base": dict(
        d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12
    ),
    "google/flan-t5-large": dict(
        d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24, num_heads=16
    ),
    "google/flan-t5-xl": dict(
        d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32
    ),
    "google/flan-t5-xxl": dict(
        d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64
    ),
}
# model_type values whose layout t5_parameters writes out (umT5 has a position bias per layer,
# LongT5 and Switch Transformers other blocks: they are counted on a skeleton).
T5_LAYOUT_TYPES = frozenset({"t5", "mt5"})
# The config keys each dimension goes by, per naming scheme (T5, BART/Pegasus, others).
DIMENSION_KEYS = {
    "d_model": ("d_model", "hidden_size"),
    "d_ff": ("d_ff", "intermediate_size", "ffn_dim", "encoder_ffn_dim"),
    "num_layers": ("num_layers", "encoder_layers", "num_hidden_layers"),
    "num_decoder_layers": ("num_decoder_layers", "decoder_layers", "num_layers", "num_hidden_layers"),
    "num_heads": ("num_heads", "num_attention_heads", "encoder_attention_heads"),
    "d_kv": ("d_kv",),
    "vocab_size": ("vocab_size",),
}
# model_type values that AutoModelForSeq2SeqLM loads as text-to-text models: transformers'
# MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES less its speech and audio models. Written out because
# importing that table costs seconds on every launch; tests/test_model_and_split_checks.py keeps
# it inside transformers' table.
SEQ2SEQ_TYPES = frozenset(
    {
        "t5",
        "mt5",
        "umt5",
        "longt5",
        "switch_transformers",
        "bart",
        "mbart",
        "pegasus",
        "pegasus_x",
        "bigbird_pegasus",
        "blenderbot",
        "blenderbot-small",
        "encoder-decoder",
        "fsmt",
        "led",
        "m2m_100",
        "marian",
        "mvp",
        "nllb-moe",
        "plbart",
        "prophetnet",
        "t5gemma",
        "t5gemma2",
    }
)
SUPPORTED_FAMILIES = "T5, FLAN-T5, mT5, umT5, BART, mBART, Pegasus or another AutoModelForSeq2SeqLM family"
# config.json values that are sizes in every family that has them: a whole number >= 1 (or null).
SIZE_KEYS = tuple(
    dict.fromkeys(
        [
            *(name for names in DIMENSION_KEYS.values() for name in names),
            "decoder_ffn_dim",
            "decoder_attention_heads",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
            "max_position_embeddings",
        ]
    )
)
TOKEN_ID_KEYS = ("pad_token_id", "eos_token_id", "bos_token_id", "decoder_start_token_id")


def is_token_id(value: Any, many: bool = False) -> bool:
    """A token id (a whole number >= 0), or with ``many`` also a list of them (eos_token_id)."""
    if many and isinstance(value, list):
        return bool(value) and all(is_token_id(item) for item in value)
    return is_whole(value, 0)


def config_value_problem(config: dict[str, Any]) -> str | None:
    """A size or token id of the wrong type in a config.json (a hand edit, another tool's file):
    transformers' strict config classes, or the parameter count, would fail on it later."""
    for key in SIZE_KEYS:
        value = config.get(key)
        if value is not None and not is_whole(value, 1):
            return f"{key} is {value!r}, not a whole number of at least 1"
    for key in TOKEN_ID_KEYS:
        value = config.get(key)
        if value is not None and not is_token_id(value, many=key == "eos_token_id"):
            return f"{key} is {value!r}, not a token id (a whole number of at least 0)"
    return None


def model_type_problem(config: dict[str, Any]) -> str | None:
    """Why a config.json is no model ftlaunch can fine-tune (None: an encoder-decoder family)."""
    model_type = config.get("model_type")
    if model_type is None:
        return "has no model_type (a folder written by save_pretrained has one)"
    if not isinstance(model_type, str) or model_type not in SEQ2SEQ_TYPES:
        return (
            f"has model_type {model_type!r}, not an encoder-decoder model ftlaunch can fine-tune "
            f"({SUPPORTED_FAMILIES})"
        )
    return None


@dataclass(frozen=True)
class ModelFacts:
    """A model as far as it is known without loading it (None: not known)."""

    name: str  # the reference, FLAN-T5 names spelled in full (``google/flan-t5-base``)
    source: str  # "embedded" (tiny-t5), "known" (a FLAN-T5 size), "local" (a directory), "hub"
    family: str | None = None  # config.json's model_type ("t5" for tiny-t5 and FLAN-T5)
    d_model: int | None = None
    d_ff: int | None = None
    num_layers: int | None = None
    num_decoder_layers: int | None = None
    num_heads: int | None = None
    d_kv: int | None = None
    vocab_size: int | None = None
    fingerprint: str | None = None  # sha256 of the configuration values read
    config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # (parameters, largest layer) when the T5 arithmetic gives them; else counted on first use
    # from ``directory``'s meta-device skeleton (so asking for d_model never imports torch).
    counted: tuple[int, int] | None = field(default=None, compare=False, repr=False)
    directory: Path | None = field(default=None, compare=False, repr=False)

    @property
    def known_t5(self) -> bool:
        """tiny-t5 or a FLAN-T5 size: T5 blocks, known without any file."""
        return self.source in ("embedded", "known")

    @functools.cached_property
    def counts(self) -> tuple[int | None, int | None]:
        if self.counted is not None:
            return self.counted
        if self.directory is not None:
            return skeleton_counts(self.directory)
        return None, None

    @property
    def params(self) -> int | None:
        """Every distinct parameter tensor once (the module docstring); None for an unknown hub id."""
        return self.counts[0]

    @property
    def largest_layer(self) -> int | None:
        """The most parameters owned directly by one module (what ZeRO-3 gathers whole)."""
        return self.counts[1]


def canonical_name(model: str) -> str:
    """``flan-t5-base`` -> ``google/flan-t5-base``; anything else unchanged."""
    if model in FLAN_T5_CONFIGS:
        return model
    if f"google/{model}" in FLAN_T5_CONFIGS:
        return f"google/{model}"
    return model


def t5_parameters(dims: dict[str, Any], vocab: int, gated: bool = True, own_lm_head: bool = True) -> int:
    """Parameters of a T5-layout model from its config values: the shared embedding once, its own
    ``lm_head`` when it has one; per layer the attention projections (q, k, v, o), the feed-forward
    matrices (wi_0, wi_1, wo when gated, else wi, wo) and one layer-norm weight per sub-layer; one
    relative position bias in each stack's first layer and a final layer norm per stack."""
    d, f, heads = dims["d_model"], dims["d_ff"], dims["num_heads"]
    layers = dims["num_layers"]
    decoder_layers = dims.get("num_decoder_layers") or layers
    inner = heads * (dims.get("d_kv") or d // heads)
    bias = dims.get("relative_attention_num_buckets", 32) * heads
    attention, feed_forward = 4 * d * inner, (3 if gated else 2) * d * f
    encoder = layers * (attention + feed_forward + 2 * d) + bias + d
    decoder = decoder_layers * (2 * attention + feed_forward + 3 * d) + bias + d
    return (2 if own_lm_head else 1) * vocab * d + encoder + decoder


def t5_largest_layer(dims: dict[str, Any], vocab: int) -> int:
    """The embedding (and lm_head), a feed-forward matrix or an attention projection."""
    d, heads = dims["d_model"], dims["num_heads"]
    inner = heads * (dims.get("d_kv") or d // heads)
    return max(vocab * d, d * dims["d_ff"], d * inner)


def config_fingerprint(values: dict[str, Any]) -> str:
    """What identifies the configuration facts were read from (not the weights: fingerprint.py)."""
    return "sha256:" + hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def t5_facts(
    name: str, source: str, dims: dict[str, Any], vocab: int, gated: bool, own_head: bool, family: str = "t5"
) -> ModelFacts:
    values = {**dims, "vocab_size": vocab}
    return ModelFacts(
        name=name,
        source=source,
        family=family,
        d_model=dims["d_model"],
        d_ff=dims["d_ff"],
        num_layers=dims["num_layers"],
        num_decoder_layers=dims.get("num_decoder_layers") or dims["num_layers"],
        num_heads=dims["num_heads"],
        d_kv=dims.get("d_kv"),
        vocab_size=vocab,
        fingerprint=config_fingerprint(values),
        config=values,
        counted=(t5_parameters(dims, vocab, gated, own_head), t5_largest_layer(dims, vocab)),
    )


def tiny_vocab() -> int:
    return len(json.loads((TINY_TOKENIZER_DIR / "tokenizer.json").read_text())["model"]["vocab"])


def checkpoint_keys(directory: Path) -> set[str] | None:
    """Tensor names of a saved model (safetensors headers, read as JSON: no torch), or None when
    no safetensors weights are there."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text()).get("weight_map", {}))
    single = directory / "model.safetensors"
    if not single.is_file():
        return None
    with single.open("rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    return {key for key in header if key != "__metadata__"}


def dimensions(config: dict[str, Any]) -> dict[str, int | None]:
    found = {}
    for key, names in DIMENSION_KEYS.items():
        found[key] = next((config[n] for n in names if config.get(n)), None)
    return found


def local_facts(name: str, directory: Path) -> ModelFacts:
    config = local_model_config(str(directory))
    family = config.get("model_type")
    needed = ("d_model", "d_ff", "num_layers", "num_heads", "vocab_size")
    if family in T5_LAYOUT_TYPES and all(isinstance(config.get(key), int) for key in needed):
        keys = checkpoint_keys(directory)
        # A config-built T5 ties lm_head to the embedding (transformers 5); a FLAN-T5-style
        # checkpoint stores its own, and a config without weights says so with tie_word_embeddings.
        own_head = (
            ("lm_head.weight" in keys) if keys is not None else config.get("tie_word_embeddings") is False
        )
        gated = str(config.get("feed_forward_proj", "relu")).startswith("gated")
        return t5_facts(name, "local", config, config["vocab_size"], gated, own_head, family)
    return ModelFacts(
        name=name,
        source="local",
        family=family,
        fingerprint=config_fingerprint(config),
        config=config,
        directory=directory,
        **dimensions(config),
    )


def skeleton_counts(directory: Path) -> tuple[int, int]:
    """(parameters, largest layer) of another family, counted on its meta-device model."""
    from launcher.core.families import skeleton

    model = skeleton(directory)
    unique = {id(p): p for p in model.parameters()}
    params = sum(p.numel() for p in unique.values())
    head, shared = getattr(model, "lm_head", None), getattr(model, "shared", None)
    if head is not None and shared is not None and head.weight is shared.weight:
        keys = checkpoint_keys(directory)
        raw = local_model_config(str(directory))
        if ("lm_head.weight" in keys) if keys is not None else raw.get("tie_word_embeddings") is False:
            params += head.weight.numel()  # its own matrix in the checkpoint, tied in the skeleton
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return params, largest


def model_facts(reference: str) -> ModelFacts:
    """The facts of ``reference``: ``tiny-t5``, a FLAN-T5 name (``flan-t5-base`` or
    ``google/flan-t5-base``), a local directory with config.json, or (nothing known) a hub id.

    Cached per process; a local directory's answer is read again when its config.json or weight
    index changes (a test, or a user, may write another model into the same folder).
    """
    directory = Path(reference).expanduser()
    stamp = tuple(
        file_stamp(directory / name)
        for name in ("config.json", "model.safetensors", "model.safetensors.index.json")
    )
    return cached_facts(reference, stamp)


def file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


@functools.cache
def cached_facts(reference: str, _stamp: tuple) -> ModelFacts:
    if reference == EMBEDDED_MODEL:
        return t5_facts(reference, "embedded", TINY_T5_CONFIG, tiny_vocab(), gated=True, own_head=True)
    name = canonical_name(reference)
    if name in FLAN_T5_CONFIGS:
        return t5_facts(name, "known", FLAN_T5_CONFIGS[name], FLAN_T5_VOCAB, gated=True, own_head=True)
    directory = Path(reference).expanduser()
    if directory.is_dir() and (directory / "config.json").is_file():
        return local_facts(reference, directory)
    return ModelFacts(name=reference, source="hub")


def lora_trainable_params(
    spec: ModelFacts, r: int = 32, targets: Sequence[str] = ("q", "v"), dora: bool = False
) -> int:
    """LoRA parameters PEFT adds to a T5: r x (in + out) per targeted projection (the dimensions of
    ``spec``), and with DoRA one magnitude per output row.

    Attention blocks: one per encoder layer, two per decoder layer (self, cross). q/k/v map
    d_model -> heads x d_kv, o maps back; wi_0/wi_1/wo are the feed-forward matrices.
    """
    if spec.d_model is None or spec.num_layers is None:
        raise UserError(f"cannot count LoRA parameters of {spec.name}: its architecture is unknown")
    h = spec.d_model
    inner = (spec.num_heads or 1) * (spec.d_kv or h // (spec.num_heads or 1))
    f = spec.d_ff or 4 * h
    # (in, out) of each projection
    per_attention = {"q": (h, inner), "k": (h, inner), "v": (h, inner), "o": (inner, h)}
    per_ffn = {"wi_0": (h, f), "wi_1": (h, f), "wo": (f, h), "wi": (h, f)}
    # BART, mBART, Pegasus name the same matrices q_proj, k_proj, v_proj, out_proj, fc1, fc2.
    per_attention |= {f"{name}_proj": sides for name, sides in per_attention.items() if name != "o"}
    per_attention["out_proj"] = (inner, h)
    per_ffn |= {"fc1": (h, f), "fc2": (f, h)}
    attention_blocks = spec.num_layers + 2 * (spec.num_decoder_layers or spec.num_layers)
    ffn_blocks = spec.num_layers + (spec.num_decoder_layers or spec.num_layers)
    total = 0
    for target in targets:
        if target in per_attention:
            (inputs, outputs), blocks = per_attention[target], attention_blocks
        elif target in per_ffn:
            (inputs, outputs), blocks = per_ffn[target], ffn_blocks
        else:
            known = ", ".join([*per_attention, *per_ffn])
            raise UserError(
                f"lora.target_modules {list(targets)} names {target!r}, no projection of {spec.name} "
                f"(projections: {known}); set lora.target_modules to some of them, or null for the "
                "family's default"
            )
        total += (r * (inputs + outputs) + (outputs if dora else 0)) * blocks
    return total
