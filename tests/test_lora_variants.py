"""PEFT's LoRA variants as recipe keys: rank-stabilized scaling (``lora.use_rslora``) and DoRA
(``lora.use_dora``), under DDP, ZeRO-3 and FSDP2.

References are independent of ftlaunch's code: the scaling is the formula of the rsLoRA paper
(alpha / sqrt(r)), DoRA's initial magnitude is each output row's norm of the base weight read from
the saved model file, a trained adapter is reloaded with PEFT on the base directory and scored with
a plain one-example-at-a-time loss, and ZeRO-3 / FSDP2 runs are compared with the DDP run.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl, run_cli, run_cli_harness, save_tiny_t5
from safetensors.torch import load_file

from launcher.core.recipe import LoraSection

SAMPLE = Path(__file__).resolve().parents[1] / "launcher" / "assets" / "sample"
ADAPTER = "final/adapter_model.safetensors"
# fp32 runs that differ only in summation order (another strategy) end this close, relative to
# how far training moved (tests/test_real_model.py measures < 1e-5 and uses the same bound).
SAME = 1e-4


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [module for module in model.modules() if hasattr(module, "lora_A") and module.lora_A]


def tiny_with_adapter(lora: LoraSection) -> torch.nn.Module:
    from launcher.rank.model import apply_lora, build_tiny_t5

    return apply_lora(build_tiny_t5(1000), lora)


@pytest.mark.parametrize(("rslora", "expected"), [(False, 8 / 16), (True, 8 / math.sqrt(16))])
def test_rslora_scales_the_update_by_alpha_over_the_root_of_r(rslora, expected):
    layers = lora_layers(tiny_with_adapter(LoraSection(r=16, alpha=8, use_rslora=rslora)))
    assert layers and all(layer.scaling["default"] == pytest.approx(expected) for layer in layers)


def test_dora_magnitude_starts_at_each_output_rows_norm_and_the_estimate_counts_it():
    from launcher.core.model_facts import lora_trainable_params
    from launcher.host.estimate import model_spec

    model = tiny_with_adapter(LoraSection(use_dora=True))
    layers = lora_layers(model)
    assert layers
    for layer in layers:
        weight = layer.get_base_layer().weight.detach()
        magnitude = layer.lora_magnitude_vector["default"].weight.detach()
        assert torch.allclose(magnitude, torch.linalg.vector_norm(weight, dim=1), rtol=1e-6)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plain = sum(p.numel() for p in tiny_with_adapter(LoraSection()).parameters() if p.requires_grad)
    rows = sum(layer.get_base_layer().out_features for layer in layers)
    assert trainable == plain + rows
    assert lora_trainable_params(model_spec("tiny-t5"), dora=True) == trainable


def test_a_checkpoint_does_not_continue_as_another_lora_variant():
    from launcher.core.fingerprint import lora_fingerprint
    from launcher.core.recipe import Recipe

    def fingerprint(**lora) -> str:
        return lora_fingerprint(Recipe.model_validate({"train": {"method": "lora"}, "lora": lora}))

    # checkpoints written before these keys existed keep their fingerprint
    assert fingerprint() == "r=32 alpha=32 targets=query+value"
    assert len({fingerprint(), fingerprint(use_dora=True), fingerprint(use_rslora=True)}) == 3


# ---------------------------------------------------------------- DoRA runs on 2 CPU ranks

STRATEGIES = {"ddp": (), "zero3": ("--zero", "3"), "fsdp": ("--fsdp",)}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_tiny_t5(tmp_path_factory.mktemp("base") / "tiny-t5")


# fp32, constant lr, no clipping, no dropout: the strategies differ only in summation order
DORA_FINE_TUNE = (
    "lora.use_dora=true",
    "model.precision=fp32",
    "model.dropout=0.0",
    "train.lr=1e-2",
    "train.scheduler=constant",
    "train.max_grad_norm=null",
    "train.max_steps=4",
    "train.log_every=1",
    "train.checkpoint_every=null",
    "eval.compare_original=false",
    "eval.limit=8",
)


def sets(overrides: tuple[str, ...]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


@pytest.fixture(scope="module")
def dora_runs(tmp_path_factory, base_dir) -> dict[str, Path]:
    """The same DoRA fine-tune (fp32, constant lr, no clipping, no dropout) under each strategy;
    only the ZeRO-3 run generates (its generation gathers each DoRA layer whole)."""
    out = tmp_path_factory.mktemp("dora")
    runs = {}
    for name, flags in STRATEGIES.items():
        runs[name] = out / name
        generates = "true" if name == "zero3" else "false"
        result = run_cli_harness(
            *("lora", "--cpu", "--gpus", "2", *flags, "--model", str(base_dir), "--data", "sample"),
            *(
                "--output",
                str(runs[name]),
                *sets(DORA_FINE_TUNE),
                "--set",
                f"eval.after_training={generates}",
            ),
        )
        assert result.returncode == 0, name + result.stdout[-3000:] + result.stderr[-6000:]
    return runs


def step_losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row]


def initial_adapter_values(base_dir: Path, keys) -> dict[str, torch.Tensor]:
    """What training starts from, where it is known without ftlaunch: lora_B is zero and DoRA's
    magnitude is the base weight's row norms (lora_A is random and left out)."""
    base = load_file(str(base_dir / "model.safetensors"))
    initial = {}
    for key in keys:
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        weight = base[f"{module}.weight"]
        if key.endswith("lora_B.weight"):
            initial[key] = torch.zeros(weight.shape[0], 32)
        elif key.endswith("lora_magnitude_vector"):
            initial[key] = torch.linalg.vector_norm(weight, dim=1)
    return initial


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero3", "fsdp"])
def test_dora_trains_under_zero3_and_fsdp2_as_under_ddp(dora_runs, base_dir, strategy):
    ours, theirs = load_file(str(dora_runs[strategy] / ADAPTER)), load_file(str(dora_runs["ddp"] / ADAPTER))
    assert set(ours) == set(theirs)
    initial = initial_adapter_values(base_dir, theirs)
    assert any("magnitude" in key for key in initial) and any("lora_B" in key for key in initial)
    moved = sum(((theirs[k] - initial[k]).double() ** 2).sum() for k in initial)
    gap = sum(((ours[k] - theirs[k]).double() ** 2).sum() for k in initial)
    magnitudes = [k for k in initial if "magnitude" in k]
    assert sum((theirs[k] - initial[k]).abs().sum() for k in magnitudes) > 0, "the magnitudes did not train"
    assert float((gap / moved).sqrt()) < SAME
    reference = step_losses(dora_runs["ddp"])
    for ours_loss, theirs_loss in zip(step_losses(dora_runs[strategy]), reference, strict=True):
        assert abs(ours_loss - theirs_loss) <= SAME * abs(reference[0] - theirs_loss) + 1e-6 * theirs_loss


@pytest.mark.slow
def test_dora_adapter_reloads_with_peft_and_gives_the_reported_validation_loss(dora_runs, base_dir):
    from peft import PeftModel
    from test_training import reference_val_loss
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    run_dir = dora_runs["zero3"]
    model = PeftModel.from_pretrained(
        AutoModelForSeq2SeqLM.from_pretrained(str(base_dir)), str(run_dir / "final")
    )
    assert model.peft_config["default"].use_dora
    expected = reference_val_loss(
        model, AutoTokenizer.from_pretrained(str(base_dir)), read_jsonl(SAMPLE / "validation.jsonl")
    )
    reported = [row for row in read_jsonl(run_dir / "metrics.jsonl") if row.get("final")][-1]["val_loss"]
    assert reported == pytest.approx(expected, rel=1e-4)
    assert "| method | DoRA |" in (run_dir / "final" / "README.md").read_text()


@pytest.mark.slow
def test_eval_of_a_dora_adapter_under_zero3_gives_the_runs_own_predictions(dora_runs, base_dir, tmp_path):
    """``ftlaunch eval --zero 3`` loads the adapter whole, then DeepSpeed partitions it: the DoRA
    layers must be gathered whole there too (evaluation.evaluate_standalone)."""
    run_dir = dora_runs["zero3"]
    out = tmp_path / "eval"
    result = run_cli(
        "eval", "--cpu", "--gpus", "2", "--zero", "3", "--model", str(base_dir), "--adapter", str(run_dir / "final"),
        "--data", "sample", "--limit", "8", "--set", "model.precision=fp32", "--output", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ours = {row["id"]: row["prediction"] for row in read_jsonl(out / "predictions.jsonl")}
    theirs = {
        row["id"]: row["prediction"]
        for row in read_jsonl(run_dir / "eval" / "finetuned" / "predictions.jsonl")
    }
    assert len(theirs) == 8 and ours == theirs
