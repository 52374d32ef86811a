"""Models and tokenizers: hub ids and local paths, the embedded tiny-t5, LoRA through PEFT.

Any seq2seq family loads through the Auto classes; what differs per family (LoRA targets, layer
classes, precision, decoder start) is read from the model by ``launcher.core.families``.

``tiny-t5`` is a small random-init T5 built from a config with FLAN-T5's layout (gated-GELU
feed-forward, unscaled decoder outputs, its own ``lm_head`` untied from the embedding) and a
tokenizer shipped in the package. Its weights come from a fixed seed, so every rank and every
invocation builds the same model without downloading anything.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from launcher.core.errors import UserError
from launcher.core.families import (
    TINY_T5_CONFIG,
    check_decoder_start,
    check_lora_rank,
    module_names,
    resolve_lora_targets,
)
from launcher.core.paths import TINY_TOKENIZER_DIR, check_hub_id, is_local_reference, shadowed_hub_id
from launcher.core.recipe import EMBEDDED_MODEL, LoraSection, Recipe

TINY_T5_SEED = 1234


def load_tokenizer(recipe: Recipe):
    from transformers import AutoTokenizer

    name = recipe.model.tokenizer or recipe.model.name
    if name == EMBEDDED_MODEL:
        return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    tokenizer = from_pretrained_or_explain(AutoTokenizer.from_pretrained, name, "tokenizer")
    if tokenizer.pad_token_id is None:  # batches are padded; seq2seq tokenizers (T5, BART, ...) have one
        raise UserError(
            f"tokenizer {name} has no pad token; pass a seq2seq model's tokenizer with model.tokenizer"
        )
    return tokenizer


def build_tiny_t5(vocab_size: int):
    """The embedded model: same weights everywhere (seeded, without touching the global RNG)."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=vocab_size, **TINY_T5_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_T5_SEED)
        model = T5ForConditionalGeneration(config)
        # FLAN-T5's own lm_head (built from a config, transformers 5 ties it to the embedding).
        model.lm_head.weight = torch.nn.Parameter(
            torch.randn(vocab_size, config.d_model) * config.d_model**-0.5
        )
    model.config.tie_word_embeddings = False  # a later tie_weights() must not tie it back
    return model


def has_own_lm_head(config) -> bool:
    """FLAN-T5 / T5 v1.1 checkpoints carry an lm_head of their own.

    transformers 5 forces T5's ``tie_word_embeddings`` to True and records the saved "False" as
    ``scale_decoder_outputs=False`` (PR #42815); loading then ties lm_head to the embedding unless
    it can see that both tensors differ, which it cannot under ZeRO-3, where weights arrive
    sharded: the checkpoint's lm_head was silently dropped.
    """
    return getattr(config, "scale_decoder_outputs", True) is False


def tie_input_embeddings(model) -> None:
    """Encoder and decoder read the shared embedding (what tie_word_embeddings did, minus lm_head)."""
    for stack in (getattr(model, "encoder", None), getattr(model, "decoder", None)):
        if stack is not None and getattr(stack, "embed_tokens", None) is not None:
            stack.embed_tokens.weight = model.shared.weight


def load_base_model(recipe: Recipe, vocab_size: int):
    """The pretrained (or embedded) seq2seq model, in fp32: autocast does the bf16 math."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    if recipe.model.name == EMBEDDED_MODEL:
        return build_tiny_t5(vocab_size)
    config = from_pretrained_or_explain(AutoConfig.from_pretrained, recipe.model.name, "model")
    own_lm_head = has_own_lm_head(config) and hasattr(config, "tie_word_embeddings")
    if own_lm_head:
        config.tie_word_embeddings = False  # nothing is tied while loading: lm_head keeps its weights
    with own_load_report():
        model, info = from_pretrained_or_explain(
            AutoModelForSeq2SeqLM.from_pretrained,
            recipe.model.name,
            "model",
            config=config,
            dtype=torch.float32,
            output_loading_info=True,
        )
    tied = set()
    if own_lm_head:
        tie_input_embeddings(model)
        tied = {f"{stack}.embed_tokens.weight" for stack in ("encoder", "decoder")}
    report_load(
        recipe.model.name, set(info.get("missing_keys", ())) - tied, set(info.get("unexpected_keys", ()))
    )
    return model


@contextmanager
def own_load_report():
    """Hold back transformers' load report: with the input embeddings tied by ``tie_input_embeddings``
    after loading (not by transformers, which would tie lm_head too), it would list them as
    "MISSING ... newly initialized" on every load of a FLAN-T5 checkpoint, which is false and reads
    as a broken model. ``report_load`` says what is really missing instead."""
    import logging

    class NoLoadReport(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "LOAD REPORT" not in str(record.msg)

    logger = logging.getLogger("transformers.modeling_utils")
    quiet = NoLoadReport()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def report_load(name: str, missing: set[str], unexpected: set[str]) -> None:
    """One line for weights a checkpoint lacks (newly initialized) or has beyond the model (from the
    first rank only: every rank loads the same files)."""
    from launcher.core.ranklog import console_print

    if os.environ.get("RANK", "0") != "0":
        return
    for keys, what in (
        (missing, "not in the checkpoint, newly initialized"),
        (unexpected, "in the checkpoint but not in the model, ignored"),
    ):
        if keys:
            shown = ", ".join(sorted(keys)[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            console_print(f"warning: model {name}: {len(keys)} weight(s) {what}: {shown}")


def from_pretrained_or_explain(loader, name: str, what: str, **kwargs):
    """Call a ``from_pretrained``; a missing path or an unreachable hub becomes a UserError."""
    if is_local_reference(name) and not Path(name).expanduser().exists():
        raise UserError(
            f"{what} path {name} does not exist{shadowed_hub_id(name)}; pass a directory written by "
            "save_pretrained, a hub id, or tiny-t5"
        )
    if not is_local_reference(name):
        check_hub_id(name, what)  # the hub client's own check, as one line
    try:
        return loader(str(Path(name).expanduser()) if is_local_reference(name) else name, **kwargs)
    except OSError as exc:
        raise UserError(
            f"cannot load {what} {name!r} ({str(exc).splitlines()[0][:160]}); without network, download it "
            "elsewhere (huggingface-cli download) and pass --model /path/to/it"
        ) from None


def lora_config(lora: LoraSection, targets: list[str]):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.SEQ_2_SEQ_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        target_modules=targets,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
    )


def apply_lora(model: torch.nn.Module, lora: LoraSection, model_label: str = "this model"):
    """PEFT's LoRA on the recipe's targets, or on the model's attention query and value
    projections when the recipe names none (families.resolve_lora_targets)."""
    from peft import get_peft_model

    names = module_names(model)
    targets = resolve_lora_targets(names, lora.target_modules, model_label)
    check_lora_rank(names, targets, lora.r, model_label)
    return get_peft_model(model, lora_config(lora, targets))


def set_dropout(model: torch.nn.Module, rate: float) -> None:
    """Every dropout layer of the model (and its config, so a saved model keeps it)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = rate
        elif isinstance(getattr(module, "dropout", None), float):  # functional dropout (T5 attention)
            module.dropout = rate
    for key in ("dropout_rate", "dropout"):
        if hasattr(model.config, key):
            setattr(model.config, key, rate)


def check_vocabulary(model: torch.nn.Module, vocab_size: int, model_label: str) -> None:
    """A tokenizer with more tokens than the model embeds fails at the first unknown id, mid-run."""
    rows = model.get_input_embeddings().num_embeddings
    if vocab_size > rows:
        raise UserError(
            f"the tokenizer has {vocab_size} tokens but model {model_label} embeds only {rows}; "
            "use the model's own tokenizer (model.tokenizer)"
        )


def build_model(recipe: Recipe, vocab_size: int):
    model = load_base_model(recipe, vocab_size)
    check_decoder_start(model, recipe.model.name)
    check_vocabulary(model, vocab_size, recipe.model.name)
    if recipe.model.dropout is not None:
        set_dropout(model, recipe.model.dropout)
    if recipe.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if recipe.train.method == "lora":
        model = apply_lora(model, recipe.lora, recipe.model.name)
    return model


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """transformers' own switch, with torch's non-reentrant checkpoint: it needs no input that
    requires grad (LoRA's frozen embeddings would otherwise give no gradient to the adapters)
    and works with DDP's hooks, ZeRO-3's parameter gathers and FSDP2. Recomputation repeats
    the same operations, so the numbers stay the same (dropout replays its RNG state)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x: the new name
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def checkpointed_layers(model: torch.nn.Module) -> int:
    """How many layer stacks recompute their activations (what the run reports, read from the
    model rather than the recipe)."""
    return sum(bool(getattr(module, "gradient_checkpointing", False)) for module in model.modules())


def use_tanh_gelu_kernel(model: torch.nn.Module) -> int:
    """Swap ``gelu_new`` (FLAN-T5's gated-GELU: 8 elementwise kernels per call) for the one-kernel
    ``gelu(approximate="tanh")``: the same tanh formula, equal up to fp32 rounding (a few ulp).

    Module instances are swapped, the config is left alone: ``feed_forward_proj: gated-gelu``
    is what FLAN-T5 users and every other library expect in a saved ``config.json`` (transformers
    derives ``dense_act_fn = "gelu_new"`` from it on every load anyway). Returns how many were
    swapped.
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
                swapped += 1
    return swapped


def dora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """PEFT LoRA layers with a DoRA magnitude (from the recipe or from a loaded adapter's config)."""
    return [module for module in model.modules() if getattr(module, "lora_magnitude_vector", None)]


def gather_dora_layers_whole(model: torch.nn.Module) -> int:
    """ZeRO-3 with DoRA: gather each DoRA layer's parameters as one unit (DeepSpeed's leaf modules).

    ZeRO-3 gathers a module's own parameters only while that module's ``forward`` runs, but
    DoRA's forward reads the frozen base weight (for the column norms) and ``lora_A.weight``'s
    shape from the parent LoRA layer, outside their owners' forwards: partitioned there, they
    are empty and the first forward fails. A leaf module is gathered whole on entry, which is
    what DoRA needs (each layer's weights are gathered anyway when it runs).

    A leaf's parameters are released by a backward hook that, when no input of the layer needs
    a gradient, fires as soon as its output's gradient is known: before autograd has added the
    adapters' gradients, which then meet an empty weight. With LoRA nothing below the first layer
    trains, so the embedding output is made to need a gradient (transformers'
    ``enable_input_require_grads``): the hooks then fire after the layer's backward. Returns how
    many layers were marked; call before ``accelerator.prepare``.
    """
    from deepspeed.utils import set_z3_leaf_module

    layers = dora_layers(model)
    for layer in layers:
        set_z3_leaf_module(layer, True)
    if layers:
        model.enable_input_require_grads()
    return len(layers)


def store_frozen_linear_weights(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """LoRA under autocast: keep the frozen weights of linear layers in the autocast dtype.

    Autocast casts an fp32 weight to bf16 on every use and caches the cast only for weights
    that require a gradient, so a frozen fp32 base is re-cast in every forward (and backward).
    Rounding once gives the same bf16 values autocast computes each time, so the matmuls are
    bit-identical. Only ``nn.Linear`` weights and biases whose every owner is a linear layer
    change: embeddings and layer norms are not autocast ops (a bf16 weight there would change
    their outputs' dtype), and a weight tied to an embedding stays fp32. Trainable (adapter)
    weights stay fp32. Returns how many tensors were converted.
    """
    owners: dict[int, set[bool]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(isinstance(module, torch.nn.Linear))
    converted = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        for param in module.parameters(recurse=False):
            if param.requires_grad or param.dtype == dtype or owners[id(param)] != {True}:
                continue
            param.data = param.data.to(dtype)
            converted += 1
    return converted


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total); ZeRO-3 shards report their full size through ``ds_numel``."""
    trainable = total = 0
    for param in model.parameters():
        count = getattr(param, "ds_numel", param.numel())
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def load_for_inference(name: str, adapter: str | None, vocab_size: int, recipe: Recipe):
    """A model to generate with: a base (or fine-tuned full) model, optionally with a LoRA adapter.

    It computes what training's model computed in the run's own evaluations: the same one-kernel
    tanh GELU (``use_tanh_gelu_kernel``). Equal in fp32, the two GELUs round differently under bf16
    autocast, and ``ftlaunch eval``/``summarize`` of final/ would not reproduce the run's predictions.
    """
    base_recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"name": name})})
    model = load_base_model(base_recipe, vocab_size)
    use_tanh_gelu_kernel(model)
    if adapter:
        from peft import PeftModel

        if not Path(adapter).is_dir():
            raise UserError(f"adapter {adapter} is not a directory; pass the final/ folder of a LoRA run")
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()
