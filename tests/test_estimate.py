"""launcher/host/estimate.py: model states per GPU follow ftlaunch's fp32 layouts (written out here
from bench/zero_memory.py's measured bytes; DeepSpeed's estimator, called directly, for CPU RAM and
DDP), LoRA lowers the estimate, and the recommendation moves from DDP to sharding/offload as models
outgrow the GPU."""

from __future__ import annotations

import json

import pytest
import torch

from launcher.core.errors import UserError
from launcher.host import estimate
from launcher.host.estimate import RunShape

GIB = 2**30


def deepspeed_zero2(params: int, gpus: int, nodes: int, offload: bool) -> int:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs(
        params, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=offload
    )[1]


def rows_by_key(rows):
    return {(row.stage, row.offload): row for row in rows}


def test_known_parameter_counts_match_the_architectures():
    """KNOWN_MODELS = a meta-device model from each config + its own (untied) lm_head."""
    from transformers import T5Config, T5ForConditionalGeneration

    for name, dims in estimate.FLAN_T5_CONFIGS.items():
        config = T5Config(
            vocab_size=estimate.FLAN_T5_VOCAB,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            **dims,
        )
        with torch.device("meta"):
            model = T5ForConditionalGeneration(config)
        unique = {id(p): p.numel() for p in model.parameters()}
        counted = sum(unique.values())
        if model.lm_head.weight is model.shared.weight:
            counted += model.lm_head.weight.numel()
        assert counted == estimate.KNOWN_MODELS[name], name
    assert estimate.parameter_count("flan-t5-base") == 247_577_856
    assert estimate.parameter_count("google/flan-t5-xxl") == 11_135_332_352


# stage3_max_live_parameters in accelerate_configs/deepspeed/zero_stage3.json and
# zero_stage3_offload.json (ZeRO-3 keeps up to this many gathered weights from forward to backward).
MAX_LIVE = 1_000_000_000


def fp32_layout_bytes(stage: int, offload: str, psi: int, trainable: int, largest: int, n: int) -> float:
    """Bytes per GPU of ftlaunch's layouts (bf16 off, torch_autocast on: fp32 everywhere), written
    from the byte counts measured by bench/zero_memory.py (DDP 16Ψ + reducer buckets, ZeRO-1/2
    12.02Ψ, ZeRO-3 10.02Ψ at 2 ranks) and DeepSpeed's code, not from launcher/host/estimate.py."""
    t = trainable
    if stage == 0:  # weights, gradients, reducer buckets, two Adam moments
        return 4 * psi + 4 * t + 4 * t + 8 * t
    layer_gradient = 4 * largest
    if stage in (1, 2):  # the whole fp32 module on each rank; gradient + master + moments partitioned
        if offload == "optimizer":
            return 4 * psi + layer_gradient
        return 4 * psi + (4 + 4 + 8) * t / n + max(layer_gradient, 4 * t / n)
    backward = 4 * min(psi, MAX_LIVE) + layer_gradient  # gathered fp32 weights kept to backward
    if offload == "full":
        return backward
    if offload == "optimizer":
        return 4 * psi / n + backward
    return 4 * psi / n + (4 + 4 + 8) * t / n + max(backward, 4 * t / n)


@pytest.mark.parametrize("model", ["flan-t5-base", "flan-t5-xl"])
@pytest.mark.parametrize("gpus,nodes", [(1, 1), (4, 1), (8, 2)])
@pytest.mark.parametrize("lora", [False, True])
def test_model_states_follow_ftlaunchs_fp32_layouts(model, gpus, nodes, lora):
    """Not DeepSpeed's estimator on the GPU (it assumes 16-bit weights and gradients; ftlaunch
    renders bf16 off), but its CPU RAM figures (offloaded states are fp32 under any precision)
    and, for DDP, its 20Ψ (the same bytes)."""
    spec = estimate.model_spec(model)
    psi, largest = spec.params, spec.largest_layer
    assert largest == estimate.FLAN_T5_VOCAB * spec.d_model  # the embedding is T5's largest layer
    shape = RunShape(gpus=gpus, nodes=nodes, lora=lora)
    trainable = shape.trainable_params(spec)
    rows = rows_by_key(estimate.estimate_model(model, shape))
    n = gpus * nodes
    for key, row in rows.items():
        expected = fp32_layout_bytes(*key, psi, trainable, largest, n)
        assert row.model_states_gib * GIB == pytest.approx(expected, rel=1e-6), key
    if not lora:
        assert rows[(0, "none")].model_states_gib * GIB == pytest.approx(deepspeed_zero2(psi, 1, 1, False))
        cpu = {
            (2, "optimizer"): deepspeed_zero2_cpu(psi, gpus, nodes, True),
            (3, "optimizer"): deepspeed_zero3_cpu(psi, largest, gpus, nodes, True, False),
            (3, "full"): deepspeed_zero3_cpu(psi, largest, gpus, nodes, True, True),
        }
        for key, expected in cpu.items():
            assert rows[key].cpu_gib * GIB == pytest.approx(expected, rel=1e-6), key
    # Below ZeRO-3 every rank loads the whole fp32 model on the CPU first, a LoRA run's frozen
    # base included: DeepSpeed's CPU figure without offload, for all Ψ (with offload, at least that)
    loading = deepspeed_zero2_cpu(psi, gpus, nodes, False)
    for stage in (0, 1, 2):
        assert rows[(stage, "none")].cpu_gib * GIB == pytest.approx(loading, rel=1e-6), stage
    for stage in (1, 2):
        offloaded = max(loading, deepspeed_zero2_cpu(trainable, gpus, nodes, True))
        assert rows[(stage, "optimizer")].cpu_gib * GIB == pytest.approx(offloaded, rel=1e-6), stage


def test_flan_t5_base_zero3_on_two_ranks_by_hand():
    """Ψ = 247,577,856, largest layer 32128 x 768 = 24,674,304: ZeRO-3 holds 2Ψ of weight
    partitions + 8Ψ of gradient, master and moment partitions, and in backward 4Ψ of gathered
    weights (Ψ < 1e9) + 4 x 24,674,304 of the embedding's gradient = 3,564,787,200 bytes."""
    rows = rows_by_key(estimate.estimate_model("flan-t5-base", RunShape(gpus=2)))
    assert rows[(3, "none")].model_states_gib * GIB == pytest.approx(3_564_787_200, abs=1)


def deepspeed_zero2_cpu(params: int, gpus: int, nodes: int, offload: bool) -> int:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs(
        params, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=offload
    )[0]


def deepspeed_zero3_cpu(
    params: int, largest: int, gpus: int, nodes: int, offload: bool, offload_params: bool
) -> int:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    return estimate_zero3_model_states_mem_needs(
        params,
        largest,
        num_gpus_per_node=gpus,
        num_nodes=nodes,
        cpu_offload=offload,
        cpu_offload_params=offload_params,
        zero_init=True,
    )[0]


def test_zero3_over_ddp_at_two_ranks():
    """ZeRO paper: 16Ψ/N of partitioned states, half of DDP's at two ranks; as rendered ZeRO-3
    adds the larger of backward's gathered fp32 weights (capped at stage3_max_live_parameters =
    1e9) + one layer's gradient and the step's gradient copy 4Ψ/2: for flan-t5-xl (Ψ = 2.85e9)
    the step's 2Ψ = 5.7e9 bytes beats 4e9 + 4L = 4.26e9, so (10Ψ + 2Ψ) / 20Ψ = 0.6."""
    spec = estimate.model_spec("flan-t5-xl")
    psi, largest = spec.params, spec.largest_layer
    rows = rows_by_key(estimate.estimate_model("flan-t5-xl", RunShape(gpus=2)))
    ratio = rows[(3, "none")].model_states_gib / rows[(0, "none")].model_states_gib
    assert 4 * MAX_LIVE + 4 * largest < 2 * psi
    assert ratio == pytest.approx(0.6, rel=1e-9)


def test_lora_lowers_the_estimate():
    full = rows_by_key(estimate.estimate_model("flan-t5-xl", RunShape()))
    lora = rows_by_key(estimate.estimate_model("flan-t5-xl", RunShape(lora=True)))
    for key in full:
        assert lora[key].model_states_gib <= full[key].model_states_gib, key
        if key[1] == "none":  # with optimizer offload both hold the fp32 weights only: equal
            assert lora[key].model_states_gib < full[key].model_states_gib, key
    spec = estimate.model_spec("flan-t5-xl")
    assert 0 < estimate.lora_trainable_params(spec) < spec.params * 0.01


def test_lora_count_matches_peft():
    from launcher.core.recipe import LoraSection
    from launcher.rank.model import apply_lora, build_tiny_t5

    model = apply_lora(build_tiny_t5(1000), LoraSection())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate.lora_trainable_params(estimate.model_spec("tiny-t5")) == trainable


def test_recommend_small_model_big_gpu_is_ddp():
    row = estimate.recommend(estimate.estimate_model("flan-t5-small", RunShape()), gpu_mem_gib=80)
    assert (row.stage, row.offload) == (0, "none")


def test_recommend_xxl_on_80gib_needs_sharding_or_offload():
    row = estimate.recommend(estimate.estimate_model("flan-t5-xxl", RunShape()), gpu_mem_gib=80)
    assert row.stage > 0 and row.offload != "none"
    assert row.total_gib <= 80 * (1 - estimate.HEADROOM)
    eight = estimate.recommend(estimate.estimate_model("flan-t5-xxl", RunShape(gpus=8)), gpu_mem_gib=80)
    assert eight.stage >= 2


def test_nothing_fits_is_a_user_error():
    with pytest.raises(UserError, match="nothing fits"):
        estimate.recommend(estimate.estimate_model("flan-t5-xxl", RunShape(micro_batch=64)), gpu_mem_gib=16)


def test_unknown_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown model"):
        estimate.parameter_count("some-org/unknown-model")
    with pytest.raises(UserError, match="config.json"):
        estimate.parameter_count(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(
        UserError, match=r"is a LoRA adapter, not a whole model; estimate its base model with --lora"
    ):
        estimate.parameter_count(str(tmp_path))


def test_local_directory_counts_like_the_built_model(tmp_path):
    """A saved tiny-t5 (own lm_head) read back from its directory: config -> meta model (+ lm_head)."""
    from launcher.rank.model import build_tiny_t5

    model = build_tiny_t5(1000)
    model.save_pretrained(str(tmp_path / "m"))
    expected = sum({id(p): p.numel() for p in model.parameters()}.values())
    assert estimate.parameter_count(str(tmp_path / "m")) == expected == estimate.parameter_count("tiny-t5")
    # config only (no weights), as FLAN-T5's config.json says it: tie_word_embeddings false = own lm_head
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    assert estimate.parameter_count(str(tmp_path / "c")) == expected


def test_tables_render():
    text = estimate.render_table(estimate.estimate_model("flan-t5-base", RunShape(gpus=2)), gpu_mem_gib=24)
    assert "recommended" in text and "ZeRO-3 + offload full" in text and "`--zero 3 --offload full`" in text
    many = estimate.render_models_table(estimate.expand_models(estimate.ALL_MODELS), gpu_mem_gib=80)
    assert all(name in many for name in estimate.KNOWN_MODELS)
    row, line = estimate.zero_auto("flan-t5-large", 40.0, RunShape(gpus=2))
    assert row.flags in estimate.render_table(
        estimate.estimate_model("flan-t5-large", RunShape(gpus=2)), 40.0
    )
    assert "--zero auto" in line


def test_gradient_checkpointing_keeps_one_input_per_layer_and_one_layer_in_full():
    """The checkpointed formula of launcher/host/estimate.py's docstring, by hand for a small shape,
    and the table shows the run's case and the other one."""
    from launcher.core.model_facts import ModelFacts
    from launcher.host.estimate import RunShape, activation_bytes, estimate_rows, render_table

    spec = ModelFacts(
        "x",
        "known",
        d_model=8,
        d_ff=16,
        num_heads=2,
        num_layers=3,
        num_decoder_layers=2,
        vocab_size=50,
        counted=(1000, 100),  # parameters, largest layer
    )
    b, s, t, h, f, a, v = 2, 10, 4, 8, 16, 2, 50
    encoder = b * s * (22 * h + 11 * f + 5 * a * s)
    decoder = b * t * (37 * h + 11 * f + 5 * a * (t + s)) + b * s * 4 * h
    logits = 10 * b * t * v
    plain = RunShape(micro_batch=b, source_len=s, target_len=t)
    checkpointed = RunShape(micro_batch=b, source_len=s, target_len=t, gradient_checkpointing=True)
    assert activation_bytes(spec, plain) == 3 * encoder + 2 * decoder + logits
    kept = 3 * 4 * b * s * h + 2 * 4 * b * t * h + b * s * 4 * h
    assert activation_bytes(spec, checkpointed) == kept + max(encoder, decoder) + logits
    rows = estimate_rows(spec, checkpointed)
    assert rows[0].activations_gib * GIB == activation_bytes(spec, checkpointed)
    assert rows[0].other_activations_gib * GIB == activation_bytes(spec, plain)
    table = render_table(rows, 80.0, checkpointing=True)
    assert "total without gradient checkpointing" in table and "with gradient checkpointing (see" in table


def test_zero_auto_counts_on_gradient_checkpointing(tmp_path):
    """flan-t5-large, micro batch 8 on 2 x 24 GiB: its 12 GiB of activations push the run to a
    sharded stage; with checkpointing (about 1 GiB) plain DDP fits."""
    from launcher.host.estimate import RunShape, zero_auto

    plain, _ = zero_auto("google/flan-t5-large", 24.0, RunShape(gpus=2, micro_batch=8))
    checkpointed, _ = zero_auto(
        "google/flan-t5-large", 24.0, RunShape(gpus=2, micro_batch=8, gradient_checkpointing=True)
    )
    assert plain.stage > 0 and checkpointed.stage == 0, (plain.label, checkpointed.label)
    assert checkpointed.activations_gib < plain.activations_gib / 5


@pytest.mark.parametrize(("offload", "stage"), [("optimizer", 2), ("full", 3), ("none", 0)])
def test_zero_auto_keeps_the_users_offload_and_picks_the_stage(tmp_path, offload, stage):
    """--zero auto --offload X: the smallest stage (in PREFERENCE order) that fits with that offload.
    Before, the offload was checked against DDP (the recipe's zero 0) and refused."""
    from conftest import run_cli_in_process

    from launcher.core.recipe_loading import read_run_recipe

    out = tmp_path / "run"
    result = run_cli_in_process(
        "full", "--gpus", "2", "--model", "tiny-t5", "--data", "sample", "--zero", "auto",
        "--offload", offload, "--gpu-mem", "80", "--dry-run", "--output", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    launch = read_run_recipe(out).launch
    assert (launch.zero, launch.offload) == (stage, offload)
    tiny = estimate.estimate_model("tiny-t5", RunShape(gpus=2))
    assert estimate.recommend(tiny, 80.0, offload=offload).stage == stage


def test_conflicting_sharding_flags_blame_the_flags_not_the_recipe_file(tmp_path):
    from conftest import run_cli_in_process

    common = ("full", "--cpu", "--gpus", "2", "--model", "tiny-t5", "--data", "sample", "--dry-run")
    for flags, start in (
        (("--zero", "0", "--offload", "optimizer"), "error: --offload: launch.offload needs sharding"),
        (("--fsdp", "--zero", "2"), "error: --zero, --fsdp: launch.fsdp (--fsdp) and launch.zero=2"),
    ):
        result = run_cli_in_process(*common, *flags, "--output", str(tmp_path / "r"))
        assert result.returncode == 2 and result.stderr.startswith(start), result.stderr
        assert "recipes/full.yaml" not in result.stderr and not (tmp_path / "r").exists()


def test_adafactor_drops_adams_moments_under_ddp_and_keeps_one_flat_moment_under_zero():
    """train.optimizer=adafactor: DDP's 20 bytes per parameter less Adam's 8 (the factored
    moments are negligible); under ZeRO (flat partitions, unfactored) one fp32 moment instead of
    Adam's two, partitioned over the ranks, on the GPU or in CPU RAM with optimizer offload; no
    FSDP2 rows (the recipe refuses FSDP2 with it)."""
    from launcher.host.estimate import ADAFACTOR_FLAT_BYTES, ADAM_MOMENT_BYTES, estimate_model

    key = lambda r: (r.stage, r.offload, r.fsdp)  # noqa: E731
    adam = {key(r): r for r in estimate_model("google/flan-t5-base", RunShape(gpus=2), fsdp=True)}
    rows = {
        key(r): r
        for r in estimate_model("google/flan-t5-base", RunShape(gpus=2, optimizer="adafactor"), fsdp=True)
    }
    assert set(rows) == {k for k in adam if not k[2]}
    params = estimate.model_spec("google/flan-t5-base").params
    saved = (adam[(0, "none", False)].model_states_gib - rows[(0, "none", False)].model_states_gib) * GIB
    assert saved == pytest.approx(ADAM_MOMENT_BYTES * params, rel=1e-9)
    per_rank = (ADAM_MOMENT_BYTES - ADAFACTOR_FLAT_BYTES) * params / 2
    for stage in (1, 2, 3):
        saved = (
            adam[(stage, "none", False)].model_states_gib - rows[(stage, "none", False)].model_states_gib
        ) * GIB
        assert saved == pytest.approx(per_rank, rel=1e-6), stage
        offloaded = adam[(stage, "optimizer", False)], rows[(stage, "optimizer", False)]
        assert offloaded[0].model_states_gib == offloaded[1].model_states_gib
        assert (offloaded[0].cpu_gib - offloaded[1].cpu_gib) * GIB == pytest.approx(2 * per_rank, rel=1e-6)


def test_the_table_says_when_zero3_is_not_worth_it():
    """A smaller stage fits: the table says ZeRO-3 would only cost speed; when only ZeRO-3 (or
    nothing) fits, it does not."""
    from launcher.host.estimate import ZERO3_NOT_WORTH_IT, estimate_model, render_table

    rows = estimate_model("google/flan-t5-base", RunShape(gpus=2))
    assert ZERO3_NOT_WORTH_IT in render_table(rows, 80.0)
    from launcher.host.estimate import recommend

    xxl = estimate_model("google/flan-t5-xxl", RunShape(gpus=8, micro_batch=1))
    only_zero3 = [m for m in range(8, 200) if getattr(recommend_or_none(recommend, xxl, m), "stage", 0) == 3]
    assert only_zero3, "some memory size needs ZeRO-3 for flan-t5-xxl on 8 GPUs"
    assert ZERO3_NOT_WORTH_IT not in render_table(xxl, float(only_zero3[0]))


def recommend_or_none(recommend, rows, gpu_mem):
    try:
        return recommend(rows, float(gpu_mem))
    except UserError:
        return None
