"""One source of model facts (launcher/core/model_facts.py) and one parameter-counting rule.

The rule is written out as arithmetic for the T5 layout (``t5_parameters``): it must count what
the models really hold, ``sum(p.numel())`` over their distinct parameters, for the embedded
tiny-t5 as built, a flan-t5-base-shaped T5 built on the meta device (FLAN-T5's checkpoint has its
own lm_head), a relu T5 with a tied lm_head and unequal stacks read from a config.json alone, and
an mT5 directory saved by save_pretrained (counted against the tensors it stored). Every caller
(estimate, disk space, rendering) answers from the same facts; asking a local directory for its
dimensions imports no torch on the launching host.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from tiny_families import save_tiny
from transformers import T5Config, T5ForConditionalGeneration

from launcher.core import diskspace
from launcher.core.model_facts import FLAN_T5_CONFIGS, FLAN_T5_VOCAB, model_facts, t5_parameters, tiny_vocab
from launcher.host import estimate, render


def distinct_parameters(model) -> int:
    return sum({id(p): p.numel() for p in model.parameters()}.values())


def with_own_head(model) -> int:
    """A T5 built from a config (transformers ties lm_head then) as its checkpoint holds it: own lm_head."""
    tied = model.lm_head.weight is model.shared.weight
    return distinct_parameters(model) + (model.lm_head.weight.numel() if tied else 0)


def stored_parameters(directory) -> int:
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())  # noqa: SIM118


def test_the_t5_arithmetic_counts_the_parameters_the_models_hold(tmp_path):
    from launcher.rank.model import build_tiny_t5

    assert model_facts("tiny-t5").params == distinct_parameters(build_tiny_t5(tiny_vocab()))

    config = T5Config(
        vocab_size=FLAN_T5_VOCAB, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        **FLAN_T5_CONFIGS["google/flan-t5-base"],
    )  # fmt: skip
    with torch.device("meta"):
        base = T5ForConditionalGeneration(config)
    assert model_facts("flan-t5-base").params == with_own_head(base) == 247_577_856

    # Original T5's layout: relu feed-forward (wi, wo), lm_head tied to the embedding; a decoder
    # deeper than the encoder. Only its config.json is on disk.
    relu = T5Config(
        vocab_size=500, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
        feed_forward_proj="relu", tie_word_embeddings=True,
    )  # fmt: skip
    relu.save_pretrained(tmp_path / "relu")
    with torch.device("meta"):
        tied = T5ForConditionalGeneration(relu)
    assert tied.lm_head.weight is tied.shared.weight
    assert model_facts(str(tmp_path / "relu")).params == distinct_parameters(tied)
    assert (
        t5_parameters({**relu.to_dict()}, 500, gated=False, own_lm_head=True)
        == distinct_parameters(tied) + 500 * 32
    )


def test_a_saved_mt5_counts_the_tensors_it_stored(tmp_path):
    directory = save_tiny("mt5", tmp_path / "mt5")
    facts = model_facts(str(directory))
    assert facts.family == "mt5" and facts.d_model == 32 and facts.num_decoder_layers == 2
    assert facts.params == stored_parameters(directory)


@pytest.mark.parametrize("reference", ["tiny-t5", "flan-t5-base", "google/flan-t5-xl", "mt5"])
def test_every_caller_answers_from_the_same_facts(tmp_path, reference):
    if reference == "mt5":
        reference = str(save_tiny("mt5", tmp_path / "mt5"))
    facts = model_facts(reference)
    spec = estimate.model_spec(reference)
    assert (spec.params, spec.largest_layer, spec.d_model, spec.vocab_size) == (
        facts.params, facts.largest_layer, facts.d_model, facts.vocab_size,
    )  # fmt: skip
    assert diskspace.total_parameters(reference) == facts.params
    assert render.model_hidden_size(reference) == facts.d_model
    assert (render.model_block_classes(reference) == "T5Block") == (facts.family == "t5")
    assert facts.fingerprint and facts.fingerprint.startswith("sha256:")
    assert model_facts(reference) is facts  # cached


def test_a_local_directory_of_another_family_is_described_without_torch(tmp_path):
    directory = save_tiny("bart", tmp_path / "bart")
    code = (
        "import sys\n"
        "from launcher.core.model_facts import model_facts\n"
        f"facts = model_facts({str(directory)!r})\n"
        "print(facts.family, facts.d_model, facts.num_layers, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["bart", "32", "2", "False"]
    # Its parameters come from a meta-device skeleton, counted by the same rule.
    from transformers import AutoModelForSeq2SeqLM

    loaded = AutoModelForSeq2SeqLM.from_pretrained(str(directory))
    assert model_facts(str(directory)).params == distinct_parameters(loaded)
    assert json.loads((directory / "config.json").read_text())["model_type"] == "bart"
