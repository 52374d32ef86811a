"""The embedded tiny-t5 and model helpers, in-process (no launch)."""

from __future__ import annotations

import torch
from transformers import AutoModelForSeq2SeqLM

from launcher.rank.model import build_tiny_t5, set_dropout


def test_tiny_t5_is_the_same_everywhere_and_leaves_the_global_rng_alone():
    torch.manual_seed(7)
    before = torch.get_rng_state()
    first, second = build_tiny_t5(1000), build_tiny_t5(1000)
    assert torch.equal(torch.get_rng_state(), before)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_tiny_t5_has_its_own_lm_head_like_flan_t5(tmp_path):
    model = build_tiny_t5(1000).eval()
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, decoder_input_ids=ids).logits,
            reloaded(input_ids=ids, decoder_input_ids=ids).logits,
        )


def test_zero_dropout_makes_training_mode_deterministic():
    model = build_tiny_t5(1000).train()
    set_dropout(model, 0.0)
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.no_grad():
        first = model(input_ids=ids, decoder_input_ids=ids).logits
        second = model(input_ids=ids, decoder_input_ids=ids).logits
    assert torch.equal(first, second)
    assert model.config.dropout_rate == 0.0


def test_loading_a_checkpoint_with_its_own_lm_head_keeps_embeddings_tied(tmp_path):
    from launcher.core.recipe import Recipe
    from launcher.rank.model import load_base_model

    original = build_tiny_t5(1000).eval()
    original.save_pretrained(tmp_path)
    recipe = Recipe.model_validate({"model": {"name": str(tmp_path)}})
    loaded = load_base_model(recipe, 1000).eval()
    assert loaded.encoder.embed_tokens.weight is loaded.shared.weight
    assert loaded.decoder.embed_tokens.weight is loaded.shared.weight
    assert loaded.lm_head.weight is not loaded.shared.weight
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in original.parameters())
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.no_grad():
        assert torch.equal(
            original(input_ids=ids, decoder_input_ids=ids).logits,
            loaded(input_ids=ids, decoder_input_ids=ids).logits,
        )


def test_the_recipes_generation_controls_change_what_generate_does():
    """eval.min_new_tokens and eval.no_repeat_ngram_size reach generate(): the random tiny model,
    greedy, repeats tokens and stops early without them and obeys both with them."""
    from transformers import AutoTokenizer

    from launcher.core.paths import TINY_TOKENIZER_DIR
    from launcher.core.recipe_loading import build_recipe

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    model = build_tiny_t5(len(tokenizer)).eval()
    inputs = tokenizer(
        ["#Person1#: Hi, how are you?", "#Person2#: Fine, thanks."], return_tensors="pt", padding=True
    )

    def new_tokens(**eval_keys) -> list[list[int]]:
        recipe = build_recipe(
            {"model": {"name": "tiny-t5"}, "eval": {"max_new_tokens": 12, **eval_keys}}, "test"
        )
        output = model.generate(**inputs, **recipe.eval.generation())
        special = {tokenizer.pad_token_id, tokenizer.eos_token_id}
        return [[t for t in row.tolist()[1:] if t not in special] for row in output]

    def repeats(rows: list[list[int]]) -> bool:
        return any(len(set(row)) < len(row) for row in rows)

    plain = new_tokens()
    assert repeats(plain) or min(map(len, plain)) < 6  # what the controls are there to prevent
    controlled = new_tokens(min_new_tokens=6, no_repeat_ngram_size=1)
    assert not repeats(controlled) and min(map(len, controlled)) >= 6, controlled


def test_gradient_checkpointing_recomputes_each_block_in_backward():
    """train.gradient_checkpointing=true: full and LoRA models start every T5 block's forward a
    second time during backward (the recomputation), and give the same gradients."""
    from transformers import AutoTokenizer

    from launcher.core.paths import TINY_TOKENIZER_DIR
    from launcher.core.recipe_loading import build_recipe
    from launcher.rank.model import build_model, checkpointed_layers

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    batch = tokenizer(["#Person1#: Hi there."], return_tensors="pt")
    labels = tokenizer(text_target=["A greeting."], return_tensors="pt").input_ids

    def gradients(method: str, checkpointing: bool) -> tuple[dict, int]:
        raw = {"model": {"name": "tiny-t5", "dropout": 0.0}, "train": {"method": method}}
        raw["train"]["gradient_checkpointing"] = checkpointing
        torch.manual_seed(0)  # LoRA's A matrices are random: the same for both models
        model = build_model(build_recipe(raw, "test"), len(tokenizer)).train()
        assert bool(checkpointed_layers(model)) == checkpointing
        # A pre-hook on each block's first sub-layer: transformers checkpoints the block's forward
        # (hooks on the block itself stay outside), and torch stops a recomputation as soon as it
        # has the tensors backward needs, so a hook at the end of a layer may not run again.
        calls = []
        for module in model.modules():
            if type(module).__name__ == "T5LayerSelfAttention":
                module.register_forward_pre_hook(lambda *args: calls.append(1))
        model(**batch, labels=labels, use_cache=False).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return grads, len(calls)

    for method in ("full", "lora"):
        plain, plain_calls = gradients(method, False)
        recomputed, calls = gradients(method, True)
        assert calls == 2 * plain_calls > 0, method
        assert plain.keys() == recomputed.keys()
        for name in plain:
            # The same operations, but the recomputed graph may sum a gradient's terms in another
            # order: each entry is a dot product over at most width x tokens (~1,000) terms, whose
            # fp32 rounding error is bounded by n x u (u = 6e-8) of their magnitude, ~6e-5.
            scale = plain[name].abs().max().item()
            torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=1e-4 * scale + 1e-12)


def test_loading_flan_t5_layout_prints_no_false_missing_report(tmp_path, capsys, caplog):
    """The input embeddings are tied after loading, so transformers' load report would call them
    "MISSING ... newly initialized" on every load of a FLAN-T5 checkpoint (our final/ included):
    it is held back, and nothing is reported for a complete checkpoint."""
    from launcher.core.recipe import Recipe
    from launcher.rank.model import load_base_model

    build_tiny_t5(1000).save_pretrained(tmp_path)
    load_base_model(Recipe.model_validate({"model": {"name": str(tmp_path)}}), 1000)
    shown = capsys.readouterr().out + capsys.readouterr().err + caplog.text
    assert "LOAD REPORT" not in shown and "MISSING" not in shown and "newly initialized" not in shown


def test_a_checkpoint_without_a_weight_is_reported_in_one_line(tmp_path, capsys):
    """What is really missing is still said, naming the weight."""
    from safetensors.torch import load_file, save_file

    from launcher.core.recipe import Recipe
    from launcher.rank.model import load_base_model

    build_tiny_t5(1000).save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["decoder.final_layer_norm.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    load_base_model(Recipe.model_validate({"model": {"name": str(tmp_path)}}), 1000)
    out = capsys.readouterr().out
    assert (
        f"warning: model {tmp_path}: 1 weight(s) not in the checkpoint, newly initialized: "
        "decoder.final_layer_norm.weight" in out
    )
