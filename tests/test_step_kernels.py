"""Fewer kernels per training step, same numbers (issue 23, point 3), checked in-process on tiny-t5.

Each change is compared with the unmodified HF path a user would run (``model(**batch,
labels=labels)``): ATen ops are counted with a ``TorchDispatchMode`` (deterministic), and host
reads of device values as ``aten._local_scalar_dense`` (what ``bool()``/``.item()`` of a tensor
dispatch to: on CUDA, a host sync).

Tolerances: fp32 comparisons use torch's float32 defaults (rtol 1.3e-6, atol 1e-5: a few ulp of
values of order 1-10), because two changes are exact only up to rounding: the one-kernel tanh GELU
differs from ``gelu_new``'s eight-kernel formula by at most a few ulp per element, and without the
KV cache the decoder's keys and values reach SDPA as strided views instead of the cache's
concatenated copies, which changes the summation order of the attention dot products (measured
here: 1.2e-6 on logits of magnitude ~3.6, i.e. ~5 ulp). The bf16 LoRA change is exact: autocast
rounds an fp32 weight to the same bf16 value whether it does so once or at every use.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from launcher.core.recipe import LoraSection
from launcher.core.recipe_loading import build_recipe, default_recipe_path, load_recipe
from launcher.rank import optimization, train
from launcher.rank.model import (
    apply_lora,
    build_tiny_t5,
    set_dropout,
    store_frozen_linear_weights,
    use_tanh_gelu_kernel,
)

VOCAB = 100


class OpCounter(TorchDispatchMode):
    """Counts every ATen op dispatched inside it (forward and autograd's backward alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

    def count(self, name: str) -> int:
        return sum(op == name for op in self.ops)


@pytest.fixture
def batch() -> dict:
    """Three padded sources (two with padding, so the padding mask cannot be dropped), labels with -100."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (3, 12), generator=generator)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 8:] = 0
    mask[1, 10:] = 0
    labels = torch.randint(2, VOCAB, (3, 5), generator=generator)
    labels[0, 3:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def with_decoder_inputs(model, batch: dict) -> dict:
    return {**batch, "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])}


def hf_loss(model, batch: dict) -> torch.Tensor:
    """The plain HF path: the model's own mean token cross-entropy."""
    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss


def product_loss(model, batch: dict) -> torch.Tensor:
    total, count = train.summed_cross_entropy(model, with_decoder_inputs(model, batch))
    return total / count


def counted(fn, *args) -> tuple[object, OpCounter]:
    counter = OpCounter()
    with counter:
        result = fn(*args)
    return result, counter


def tiny():
    """tiny-t5 in training mode without dropout (whose masks would differ between two runs)."""
    model = build_tiny_t5(VOCAB)
    set_dropout(model, 0.0)
    return model.train()


# ---------------------------------------------------------------- no KV cache, 4-D mask


def test_product_forward_builds_no_cache_and_reads_no_mask_value_on_the_host(batch):
    model = tiny()
    assert model.config._attn_implementation == "sdpa"  # transformers 5's default for T5
    reference, hf = counted(hf_loss, model, batch)
    loss, ours = counted(product_loss, model, batch)
    # transformers asks padding_mask.all() for the encoder's mask and the cross-attention's.
    assert hf.count("aten._local_scalar_dense") == 2
    assert ours.count("aten._local_scalar_dense") == 0
    # The decoder's cache: 2 layers x (self + cross) keys and values concatenated into it.
    assert hf.count("aten.cat") >= 8 and ours.count("aten.cat") == 0
    assert len(ours.ops) < len(hf.ops)
    torch.testing.assert_close(loss, reference)  # float32 defaults: see the module docstring


def test_four_d_mask_gives_sdpa_the_same_values_bit_for_bit(batch):
    """The mask's form alone changes nothing: same cache setting, 2-D vs 4-D mask, equal logits."""
    model = tiny().eval()
    inputs = with_decoder_inputs(model, batch)
    common = dict(
        input_ids=inputs["input_ids"], decoder_input_ids=inputs["decoder_input_ids"], use_cache=False
    )
    with torch.no_grad():
        two_d = model(attention_mask=inputs["attention_mask"], **common).logits
        four_d = model(attention_mask=train.padding_mask_4d(model, inputs["attention_mask"]), **common).logits
    assert torch.equal(two_d, four_d)


@pytest.mark.parametrize("family", ["bart", "mt5"])
def test_four_d_mask_is_exact_for_other_families(batch, family):
    """BART (and mBART, Pegasus: the same masking code) and mT5 read the 4-D mask the same way."""
    from tiny_families import FAMILIES

    model = FAMILIES[family][1](VOCAB).eval()
    inputs = with_decoder_inputs(model, batch)
    common = dict(
        input_ids=inputs["input_ids"], decoder_input_ids=inputs["decoder_input_ids"], use_cache=False
    )
    with torch.no_grad():
        two_d = model(attention_mask=inputs["attention_mask"], **common).logits
        four_d = model(attention_mask=train.padding_mask_4d(model, inputs["attention_mask"]), **common).logits
    assert torch.equal(two_d, four_d)


def test_other_attention_kernels_keep_the_two_d_mask(batch):
    model = tiny()
    model.config._attn_implementation = "eager"
    assert train.padding_mask_4d(model, batch["attention_mask"]) is batch["attention_mask"]


# ---------------------------------------------------------------- tanh GELU


def test_tanh_gelu_kernel_matches_gelu_new_within_a_few_ulp():
    from transformers.activations import GELUTanh, NewGELUActivation

    x = torch.linspace(-12, 12, 200_001)
    old, new = NewGELUActivation()(x), GELUTanh()(x)
    ulp = torch.nextafter(old.abs(), torch.tensor(float("inf"))) - old.abs()
    # Near gelu's zero crossing (x ~ 0) the ulp of the result is tiny while both formulas round
    # their inputs' terms at the scale of x: measure against the larger of the two scales.
    scale = torch.maximum(ulp, torch.nextafter(x.abs(), torch.tensor(float("inf"))) - x.abs())
    assert ((old - new).abs() / scale).max() <= 4


def test_tanh_gelu_swap_cuts_ops_and_keeps_the_loss(batch):
    model = tiny()
    swapped = copy.deepcopy(model)
    assert use_tanh_gelu_kernel(swapped) == 4  # 2 encoder + 2 decoder gated feed-forwards
    reference, before = counted(product_loss, model, batch)
    loss, after = counted(product_loss, swapped, batch)
    assert after.count("aten.gelu") == 4 and before.count("aten.gelu") == 0
    assert len(after.ops) <= len(before.ops) - 4 * 6  # gelu_new: pow, mul, add, mul, tanh, add, mul, mul
    torch.testing.assert_close(loss, reference)
    loss.backward()
    reference.backward()
    for (name, a), b in zip(swapped.named_parameters(), model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_under_bf16_autocast_the_tanh_kernel_is_as_accurate_as_gelu_new(batch):
    """Not bit-identical in bf16: gelu_new rounds each of its 8 ops to bf16, the kernel computes in
    fp32 and rounds once. Against the fp32 formula on the same bf16 inputs the kernel is no worse,
    and the loss moves by less than bf16's unit roundoff (2^-8 = 3.9e-3 relative; measured on
    tiny-t5: 4.2e-4). The KV-cache and mask changes stay bit-identical under bf16 too."""
    from transformers.activations import GELUTanh, NewGELUActivation

    x = torch.linspace(-8, 8, 20_001).bfloat16()
    exact = GELUTanh()(x.float()).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        errors = [(act(x).double() - exact).abs().max() for act in (NewGELUActivation(), GELUTanh())]
    assert errors[1] <= errors[0]
    model = tiny()
    swapped = copy.deepcopy(model)
    use_tanh_gelu_kernel(swapped)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference, same_model, ours = (
            hf_loss(model, batch),
            product_loss(model, batch),
            product_loss(swapped, batch),
        )
    assert torch.equal(same_model, reference)
    assert abs(ours.item() - reference.item()) < 2**-8 * reference.item()


def test_saved_config_keeps_flan_t5s_activation(tmp_path):
    """Users load final/ with any library: the config says gated-gelu as FLAN-T5's does."""
    from transformers import AutoModelForSeq2SeqLM
    from transformers.activations import NewGELUActivation

    model = tiny()
    use_tanh_gelu_kernel(model)
    model.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["feed_forward_proj"] == "gated-gelu"
    assert saved.get("dense_act_fn", "gelu_new") == "gelu_new"
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path))
    assert isinstance(reloaded.encoder.block[0].layer[1].DenseReluDense.act, NewGELUActivation)


# ---------------------------------------------------------------- LoRA: frozen base in bf16


def lora_model():
    return apply_lora(tiny(), LoraSection(r=4, alpha=8, dropout=0.0))


def bf16_step(model, batch: dict) -> tuple[torch.Tensor, OpCounter]:
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = product_loss(model, batch)
        loss.backward()
        return loss

    return counted(step)


def test_lora_frozen_linear_weights_in_bf16_give_the_same_step(batch, tmp_path):
    model = lora_model()
    bf16 = copy.deepcopy(model)
    converted = store_frozen_linear_weights(bf16, torch.bfloat16)
    assert converted > 0
    for name, param in bf16.named_parameters():
        linear_frozen = not param.requires_grad and ("lm_head" in name or name.endswith("base_layer.weight"))
        if param.requires_grad or "shared" in name or "layer_norm" in name or "relative_attention" in name:
            assert param.dtype == torch.float32, name  # adapters, embedding, norms, position bias
        elif linear_frozen:
            assert param.dtype == torch.bfloat16, name
    reference, before = bf16_step(model, batch)
    loss, after = bf16_step(bf16, batch)
    assert torch.equal(loss, reference)  # the same bf16 values reach every matmul
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, param in bf16.named_parameters():
        if param.requires_grad:
            assert torch.equal(param.grad, grads[name]), name
    assert after.count("aten._to_copy") < before.count("aten._to_copy")
    # The saved adapter: fp32, the same tensors as the unmodified model's.
    model.save_pretrained(str(tmp_path / "ref"))
    bf16.save_pretrained(str(tmp_path / "ours"))
    from safetensors.torch import load_file

    ref, ours = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ref", "ours"))
    assert ref.keys() == ours.keys() and ref
    for key in ref:
        assert ours[key].dtype == torch.float32 and torch.equal(ours[key], ref[key]), key


def test_an_embedding_tied_to_lm_head_stays_fp32():
    model = lora_model()
    base = model.get_base_model()
    base.lm_head.weight = base.shared.weight  # original T5: tied output projection
    store_frozen_linear_weights(model, torch.bfloat16)
    assert base.shared.weight.dtype == torch.float32


def recipe(method: str, precision: str = "bf16", **launch):
    raw = load_recipe(default_recipe_path(method)).model_dump(mode="json")
    raw["model"].update(name="tiny-t5", precision=precision)
    raw["data"]["dataset"] = "sample"
    raw["launch"].update(launch)
    return build_recipe(raw, "test")


@pytest.mark.parametrize(
    ("method", "precision", "distributed_type", "expected"),
    [
        ("lora", "bf16", "MULTI_CPU", True),
        ("lora", "bf16", "NO", True),
        ("lora", "fp32", "NO", False),  # no autocast: nothing would be re-cast
        ("full", "bf16", "NO", False),  # trainable weights: autocast caches their casts
        ("lora", "bf16", "DEEPSPEED", False),  # ZeRO: an fp32 module for torch_autocast, partitioned
        ("lora", "bf16", "FSDP", False),  # FSDP2 shards a block's parameters as one dtype
    ],
)
def test_frozen_bf16_only_for_lora_under_bf16_autocast_outside_deepspeed_and_fsdp(
    method, precision, distributed_type, expected
):
    from accelerate.utils import DistributedType

    run_recipe = recipe(method, precision)
    model = build_tiny_t5(VOCAB)
    if method == "lora":
        model = apply_lora(model, run_recipe.lora)
    accelerator = SimpleNamespace(distributed_type=DistributedType[distributed_type])
    changed = train.prepare_model_for_training(model, run_recipe, accelerator)
    assert changed["tanh_gelu"] == 4
    assert bool(changed["bf16_frozen"]) is expected
    assert any(p.dtype == torch.bfloat16 for p in model.parameters()) is expected


def test_dora_keeps_the_frozen_base_in_fp32():
    """DoRA's column norms read the base weight itself: rounding it to bf16 would move every norm."""
    from accelerate.utils import DistributedType

    run_recipe = recipe("lora")
    run_recipe.lora.use_dora = True
    model = apply_lora(build_tiny_t5(VOCAB), run_recipe.lora)
    accelerator = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    assert train.prepare_model_for_training(model, run_recipe, accelerator)["bf16_frozen"] == 0
    assert {p.dtype for p in model.parameters()} == {torch.float32}


# ---------------------------------------------------------------- fused AdamW on CUDA


def test_fused_adamw_on_cuda_and_cpu_ranks_under_every_strategy():
    model = build_tiny_t5(VOCAB)
    # Built on CPU tensors (the model moves to its device in accelerator.prepare); CPU has a fused
    # kernel too (torch >= 2.4), so the CUDA case builds anywhere.
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for run_recipe, device, fused in (
        (recipe("full"), cuda, True),
        (recipe("full", zero=3), cuda, True),
        (recipe("full"), cpu, True),
        (recipe("lora"), cpu, True),
        (recipe("full", zero=2), cpu, True),  # every strategy alike: see optimization.adamw_options
        (recipe("full", fsdp=True, gpus=2), cpu, True),
        (recipe("full"), None, None),  # no device known: torch's default
    ):
        optimizer = optimization.build_optimizer(model, run_recipe, device)
        assert optimizer.defaults["fused"] is fused, (run_recipe.launch, device)


def test_fused_adamw_cuts_the_optimizers_ops_to_one_per_group():
    model = tiny()
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    counts = {}
    for fused in (True, None):
        options = {"fused": True} if fused else {}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, **options)
        optimizer.step()  # the first step creates the state
        _, counter = counted(optimizer.step)
        counts[fused] = counter
    tensors = len(list(model.parameters()))
    assert counts[True].count("aten._fused_adamw_") == 1
    assert (
        counts[None].count("aten._local_scalar_dense") == tensors
    )  # the per-tensor loop reads each step count
    assert len(counts[True].ops) < len(counts[None].ops) / 5
