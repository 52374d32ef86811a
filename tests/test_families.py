"""Other seq2seq families: what ftlaunch derives from a model (LoRA targets, layer classes, fp16
rule, decoder start), in-process on tiny configs; and tiny random BART and mT5 models (tokenizers
trained in tiny_families.py) fine-tuned full and LoRA under DDP and ZeRO-3 through the real CLI.

References: PEFT's own target table where it knows the family, transformers' class names, and for
the runs a plain forward pass of the reloaded final model (transformers/PEFT) for the loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl, run_cli_harness
from tiny_families import SAMPLE, save_tiny_families

from launcher.core.errors import UserError
from launcher.core.families import (
    T5_MODULE_NAMES,
    block_class_names,
    check_decoder_start,
    is_t5_family,
    module_names,
    resolve_lora_targets,
)


def tiny_config(model_type: str):
    from transformers import AutoConfig

    shape = {
        "t5": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")
        | dict(decoder_start_token_id=0),  # T5 v1.1 checkpoints carry it; T5Config has no default
        "mt5": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
        "umt5": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
        "bart": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64),
        "mbart": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64),
        "pegasus": dict(
            d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64
        ),
    }[model_type]
    heads = {} if "t5" in model_type else dict(encoder_attention_heads=2, decoder_attention_heads=2)
    return AutoConfig.for_model(model_type, vocab_size=128, **shape, **heads)


def tiny_model(model_type: str):
    from transformers import AutoModelForSeq2SeqLM

    torch.manual_seed(0)
    return AutoModelForSeq2SeqLM.from_config(tiny_config(model_type))


# model_type (t5 here is T5 v1.1's gated layout) -> (query/value targets, layer classes)
FAMILIES = {
    "t5": (["q", "v"], ["T5Block"]),
    "mt5": (["q", "v"], ["MT5Block"]),
    "umt5": (["q", "v"], ["UMT5Block"]),
    "bart": (["q_proj", "v_proj"], ["BartEncoderLayer", "BartDecoderLayer"]),
    "mbart": (["q_proj", "v_proj"], ["MBartEncoderLayer", "MBartDecoderLayer"]),
    "pegasus": (["q_proj", "v_proj"], ["PegasusEncoderLayer", "PegasusDecoderLayer"]),
}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_lora_targets_and_layer_classes_are_read_from_the_model(model_type):
    from peft import get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TABLE

    from launcher.core.recipe import LoraSection
    from launcher.rank.model import lora_config

    targets, layers = FAMILIES[model_type]
    model = tiny_model(model_type)
    derived = resolve_lora_targets(module_names(model), None, model_type)
    assert derived == targets
    if model_type in PEFT_TABLE:  # PEFT's own table, where it has the family
        assert sorted(derived) == sorted(PEFT_TABLE[model_type])
    assert block_class_names(model) == layers
    # LoRA lands on the query and value projection of every attention (encoder self, decoder self
    # and cross): 2 x (encoder layers + 2 x decoder layers) adapted linears.
    peft_model = get_peft_model(model, lora_config(LoraSection(), derived))
    adapted = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
    assert len(adapted) == 2 * (2 + 2 * 2), adapted
    assert {name.rsplit(".", 1)[-1] for name in adapted} == set(targets)
    assert block_class_names(peft_model) == layers


def test_static_t5_module_names_match_real_t5_skeletons():
    """The launcher checks T5 LoRA targets against a name list to avoid importing transformers."""
    from transformers import AutoModelForSeq2SeqLM, T5Config

    from launcher.rank.model import TINY_T5_CONFIG

    for config in (T5Config(vocab_size=1000, **TINY_T5_CONFIG), T5Config(vocab_size=1000, num_layers=2)):
        with torch.device("meta"):
            names = module_names(AutoModelForSeq2SeqLM.from_config(config))
        assert {n for n in names.leaves if not n.isdigit()} <= T5_MODULE_NAMES.leaves
        assert names.attention == T5_MODULE_NAMES.attention


def test_one_rule_and_one_message_for_lora_targets_on_the_host_and_the_ranks(tmp_path):
    """launch.check_lora_targets (before a launch) and model.apply_lora (on the ranks) refuse the
    same wrong target with the same message, naming the model's own attention projections."""
    from launcher.core.recipe import Recipe
    from launcher.host.launch import check_lora_targets
    from launcher.rank.model import apply_lora

    model = tiny_model("bart")
    model.save_pretrained(tmp_path)
    recipe = Recipe.model_validate(
        {
            "model": {"name": str(tmp_path)},
            "train": {"method": "lora"},
            "lora": {"target_modules": ["q", "v"]},
        }
    )
    with pytest.raises(UserError) as host:
        check_lora_targets(recipe, tmp_path)
    with pytest.raises(UserError) as rank:
        apply_lora(model, recipe.lora, recipe.model.name)
    assert str(host.value) == str(rank.value)
    message = str(host.value)
    assert (
        "['q', 'v']" in message and "q_proj" in message and "v_proj" in message and str(tmp_path) in message
    )
    # Named explicitly, targets are kept as given (here: every attention projection).
    everything = recipe.lora.model_copy(update={"target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"]})
    assert (
        resolve_lora_targets(module_names(model), everything.target_modules, "bart")
        == everything.target_modules
    )


def test_t5s_listed_adaptable_and_shared_layers_are_the_models_own():
    """T5_MODULE_NAMES (the host's list, no transformers import) against a real T5's modules:
    linear/embedding layers are adaptable, the token embedding is reached as shared and embed_tokens."""
    from transformers import AutoModelForSeq2SeqLM, T5Config

    from launcher.core.families import TINY_T5_CONFIG

    for config in (T5Config(vocab_size=1000, **TINY_T5_CONFIG), T5Config(vocab_size=1000, num_layers=2)):
        with torch.device("meta"):
            names = module_names(AutoModelForSeq2SeqLM.from_config(config))
        assert names.adaptable <= T5_MODULE_NAMES.adaptable and names.adaptable & {"q", "wo", "lm_head"}
        assert not names.adaptable & {"layer_norm", "DenseReluDense", "SelfAttention", "block"}
        assert names.aliased == T5_MODULE_NAMES.aliased == {"shared", "embed_tokens"}


@pytest.mark.parametrize(
    ("lora", "words"),
    [
        (
            {"target_modules": ["layer_norm"]},
            ["['layer_norm'] name layers of", "cannot adapt", "wi_0, wi_1, wo"],
        ),
        ({"target_modules": ["DenseReluDense"]}, ["['DenseReluDense']", "cannot adapt"]),
        ({"target_modules": ["shared"]}, ["['shared'] name a layer", "under several names", "never trains"]),
        # tiny-t5: q is 64 x (4 heads x 16) = 64 x 64, v the same
        (
            {"r": 65},
            ["lora.r=65 is above the size of every layer", "the largest: q, 64", "lora.r=64 or less"],
        ),
        # relative_attention_bias: 32 buckets x 4 heads: rank 4 at most
        ({"target_modules": ["relative_attention_bias"], "r": 5}, ["relative_attention_bias, 4", "lora.r=4"]),
    ],
)
def test_lora_targets_it_cannot_train_are_refused_alike_on_the_host_and_the_ranks(lora, words):
    """Before: accepted by --dry-run and the host check, then every rank crashed (PEFT refuses the
    layer type; an adapter on `shared` never gets a gradient) or trained a rank no layer can use."""
    from launcher.core.recipe import Recipe
    from launcher.host.launch import check_lora_targets
    from launcher.rank.model import apply_lora, build_tiny_t5

    recipe = Recipe.model_validate({"model": {"name": "tiny-t5"}, "train": {"method": "lora"}, "lora": lora})
    with pytest.raises(UserError) as host:
        check_lora_targets(recipe, None)
    with pytest.raises(UserError) as rank:
        apply_lora(build_tiny_t5(100), recipe.lora, recipe.model.name)
    assert str(host.value) == str(rank.value)
    for word in words:
        assert word in str(host.value), str(host.value)


def test_a_rank_one_target_can_use_is_kept():
    from launcher.core.recipe import Recipe
    from launcher.rank.model import apply_lora, build_tiny_t5

    lora = {"target_modules": ["q", "relative_attention_bias"], "r": 32}  # q (64 x 64) uses rank 32
    recipe = Recipe.model_validate({"model": {"name": "tiny-t5"}, "train": {"method": "lora"}, "lora": lora})
    assert apply_lora(build_tiny_t5(100), recipe.lora, "tiny-t5").peft_config["default"].r == 32


def test_a_model_without_query_and_value_names_needs_explicit_targets():
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wq, self.wv = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    holder = torch.nn.Module()
    holder.attn = Attention()
    with pytest.raises(UserError, match=r"cannot tell .* \(its attention layers have wq, wv\)"):
        resolve_lora_targets(module_names(holder), None, "custom")


@pytest.mark.parametrize(
    ("model_type", "name", "t5"),
    [("t5", "x", True), ("mt5", "x", True), ("umt5", "x", True), ("bart", "t5-like-name", False)]
    + [
        (None, "google/mt5-small", True),
        (None, "google/t5-v1_1-base", True),
        (None, "facebook/bart-base", False),
    ],
)
def test_t5_family_is_recognised_by_model_type_then_by_name(model_type, name, t5):
    assert is_t5_family(model_type, name) is t5


def test_fp16_is_refused_for_a_local_mt5_and_allowed_for_bart(tmp_path):
    from launcher.core.recipe_loading import build_recipe

    for model_type in ("mt5", "bart"):
        tiny_config(model_type).save_pretrained(tmp_path / model_type)
    with pytest.raises(UserError, match="overflows T5-family"):
        build_recipe({"model": {"name": str(tmp_path / "mt5"), "precision": "fp16"}}, "test")
    assert build_recipe({"model": {"name": str(tmp_path / "bart"), "precision": "fp16"}}, "test")


def test_decoder_start_comes_from_the_model_and_its_absence_is_refused():
    for model_type in FAMILIES:
        check_decoder_start(tiny_model(model_type), model_type)  # each family's own rule works
    model = tiny_model("t5")
    model.config.decoder_start_token_id = None
    with pytest.raises(UserError, match="decoder_start_token_id"):
        check_decoder_start(model, "broken-t5")


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
    from launcher.core.recipe import Recipe
    from launcher.rank.model import build_model

    tiny_model("bart").save_pretrained(tmp_path)
    recipe = Recipe.model_validate({"model": {"name": str(tmp_path)}})
    assert build_model(recipe, 128).get_input_embeddings().num_embeddings == 128
    with pytest.raises(UserError, match="the tokenizer has 500 tokens but model .* embeds only 128"):
        build_model(recipe, 500)


# ---------------------------------------------------------------- fine-tuning runs (2 CPU ranks)


@pytest.fixture(scope="module")
def tiny_family_dirs(tmp_path_factory) -> dict[str, Path]:
    return save_tiny_families(tmp_path_factory.mktemp("families"))


def family_run(model_dir: Path, method: str, zero: int, out: Path, *extra: str) -> None:
    """A 2-rank fine-tune of a tiny family model (its ranks from the rank harness,
    tests/rankharness.py: what the run computes and reports)."""
    result = run_cli_harness(
        method,
        "--cpu",
        "--gpus",
        "2",
        "--zero",
        str(zero),
        "--model",
        str(model_dir),
        "--data",
        "sample",
        "--output",
        str(out),
        *("--set", "model.precision=fp32", "--set", "data.train_limit=16"),
        *("--set", "data.validation_limit=8", "--set", "data.max_source_length=128"),
        *("--set", "data.max_target_length=32", "--set", "train.micro_batch_size=4"),
        *("--set", "train.max_steps=2", "--set", "train.log_every=1", "--set", "train.lr=1e-2"),
        *("--set", "eval.limit=4", "--set", "eval.max_new_tokens=8", "--set", "eval.batch_size=4"),
        *extra,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def reference_val_loss(model, tokenizer, rows: list[dict], prompt: str) -> float:
    """Token-weighted cross-entropy, one example at a time, the model shifting its own labels."""
    model.eval()
    total = tokens = 0.0
    with torch.no_grad():
        for row in rows:
            source = tokenizer(
                prompt.replace("{dialogue}", row["dialogue"]),
                max_length=128,
                truncation=True,
                return_tensors="pt",
            )
            labels = tokenizer(
                text_target=row["summary"], max_length=32, truncation=True, return_tensors="pt"
            )["input_ids"]
            logits = model(**source, labels=labels).logits
            total += torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="sum").item()
            tokens += labels.numel()
    return total / tokens


def check_run(run_dir: Path, model_dir: Path, method: str, prompt: str) -> None:
    """final/ reloads in plain transformers/PEFT and gives the run's final validation loss; the
    report compares the original and the fine-tuned model."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    final = run_dir / "final"
    if method == "full":
        model = AutoModelForSeq2SeqLM.from_pretrained(str(final))
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(str(model_dir)), str(final))
        targets = json.loads((final / "adapter_config.json").read_text())["target_modules"]
        base_type = json.loads((model_dir / "config.json").read_text())["model_type"]
        assert sorted(targets) == sorted(FAMILIES[base_type][0])
    rows = [json.loads(line) for line in (SAMPLE / "validation.jsonl").read_text().splitlines()][:8]
    expected = reference_val_loss(model, AutoTokenizer.from_pretrained(str(model_dir)), rows, prompt)
    final_loss = [row for row in read_jsonl(run_dir / "metrics.jsonl") if row.get("final")][-1]["val_loss"]
    assert final_loss == pytest.approx(expected, rel=1e-4)
    report = (run_dir / "report" / "report.md").read_text()
    scores = json.loads((run_dir / "report" / "rouge.json").read_text())
    assert set(scores) == {"original", "finetuned"} and scores["finetuned"]["n"] == 4
    assert "| finetuned vs original |" in report


BART_PROMPT = "{dialogue}"  # BART-style models take the text itself, no task prefix
DEFAULT_PROMPT = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "method", "zero"), [("bart", "full", 0), ("bart", "lora", 3), ("mt5", "full", 3)]
)
def test_tiny_family_fine_tunes_and_reports(tmp_path, tiny_family_dirs, family, method, zero):
    prompt = BART_PROMPT if family == "bart" else DEFAULT_PROMPT
    model_dir = tiny_family_dirs[family]
    family_run(model_dir, method, zero, tmp_path / "run", "--set", f"data.prompt={prompt}")
    check_run(tmp_path / "run", model_dir, method, prompt)
