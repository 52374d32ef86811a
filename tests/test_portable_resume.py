"""Resuming elsewhere: a checkpoint written under one strategy and world size continues under
another (launcher/rank/portable.py), through the real CLI on CPU ranks forked by the rank harness
(tests/rankharness.py: training semantics, so no `accelerate launch`; the crash is the injected
fault inside a rank, whose exit code 1 the harness passes on as the real launch does).

Every run is the same fp32 fine-tune with dropout off (so 1 rank x accumulation 2 computes what 2
ranks compute), 2 epochs of 8 steps on 2 ranks x micro batch 4. A source run crashes while saving
step 8 (the fault injection of tests/test_faults.py), which leaves step_4; a copy of it is resumed
under another strategy or on other ranks and must end where an uninterrupted run ends.

References are independent of the conversion: an uninterrupted 2-rank DDP run (final weights,
losses) and, for the optimizer moments, the DDP source's own checkpoint at the same step.
Tolerances are those the suite already uses between strategies, which agree up to summation order
(tests/test_fsdp.py's SAME for weights, relative to how far training moved them; rel 1e-4 for
losses, as tests/test_training.py compares ZeRO-2 with DDP): a conversion that lost the moments
(AdamW restarted at step 4) or the step count misses them by orders of magnitude.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli_env, read_jsonl, run_cli_harness
from safetensors.torch import load_file
from test_fsdp import SAME, tiny_initial_weights, update_error

pytestmark = pytest.mark.slow

BASE = (
    "--cpu",
    "--model",
    "tiny-t5",
    "--data",
    "sample",
    "--set",
    "model.precision=fp32",
    "--set",
    "model.dropout=0.0",
    "--set",
    "eval.after_training=false",
    "--set",
    "train.micro_batch_size=4",
    "--set",
    "train.log_every=1",
    "--set",
    "train.epochs=2",
    "--set",
    "train.lr=2e-3",
    "--set",
    "train.checkpoint_every=4",
)
TOTAL_STEPS = 16  # 64 examples / (4 per rank x 2 ranks) = 8 steps per epoch
STRATEGY_FLAGS = {"ddp": (), "zero2": ("--zero", "2"), "zero3": ("--zero", "3"), "fsdp": ("--fsdp",)}


def args(run_dir: Path, strategy: str, gpus: int, method: str = "full") -> list[str]:
    # LoRA's own dropout too: 1 rank x accumulation 2 would draw other masks than 2 ranks.
    lora = ("--set", "lora.dropout=0.0") if method == "lora" else ()
    return [method, *BASE, *lora, "--gpus", str(gpus), *STRATEGY_FLAGS[strategy], "--output", str(run_dir)]


def losses(metrics: list[dict]) -> list[float]:
    return [row["loss"] for row in metrics if "loss" in row]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs(name, strategy, gpus, method, crash) -> run dir: each launched once per module.
    ``crash``: rank 1 raises while saving step 8 (exit 1), leaving step_4 as the newest checkpoint."""
    done: dict[tuple, Path] = {}

    def get(strategy: str, gpus: int = 2, method: str = "full", crash: bool = False) -> Path:
        key = (strategy, gpus, method, crash)
        if key not in done:
            run_dir = (
                tmp_path_factory.mktemp(f"{method}-{strategy}-{gpus}-{'crash' if crash else 'ok'}") / "run"
            )
            env = cli_env(FTLAUNCH_FAULT_RAISE_IN_SAVE="1:8") if crash else cli_env()
            result = run_cli_harness(*args(run_dir, strategy, gpus, method), env=env)
            output = result.stdout[-3000:] + result.stderr[-6000:]
            assert result.returncode == (1 if crash else 0), output
            if crash:
                assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_4", output
            done[key] = run_dir
        return done[key]

    return get


def resume_elsewhere(source: Path, target: Path, strategy: str, gpus: int, method: str = "full"):
    """A copy of the crashed source run, continued with --resume auto under ``strategy`` on ``gpus``."""
    shutil.copytree(source, target)
    result = run_cli_harness(*args(target, strategy, gpus, method), "--resume", "auto")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout + result.stderr


def assert_ends_like(run_dir: Path, reference: Path, file: str = "model.safetensors", initial=None) -> None:
    """Every step once, the reference's losses, and its final weights (up to summation order)."""
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [row["step"] for row in metrics if "loss" in row] == list(range(1, TOTAL_STEPS + 1))
    assert losses(metrics) == pytest.approx(
        losses(read_jsonl(reference / "metrics.jsonl")), rel=1e-4, abs=1e-5
    )
    ours = load_file(str(run_dir / "final" / file))
    theirs = load_file(str(reference / "final" / file))
    assert ours.keys() == theirs.keys()
    assert update_error(ours, theirs, initial if initial is not None else tiny_initial_weights()) < SAME


def test_zero3_on_two_ranks_continues_under_ddp_on_one_rank(runs, tmp_path):
    """(a) ZeRO-3 x 2 ranks, crashed after step_4 -> DDP x 1 rank: the launcher doubles the
    accumulation, says the checkpoint is converted, and the run ends as the uninterrupted one."""
    source = runs("zero3", crash=True)
    output = resume_elsewhere(source, tmp_path / "run", "ddp", 1)
    assert "train.grad_accum 1 -> 2 keeps its 2 micro-batches per optimizer step" in output
    assert (
        "checkpoint step_4 was written under ZeRO-3 on 2 rank(s); continuing under DDP on 1 rank(s) "
        "(converted per parameter)" in output
    )
    assert "resumed from" in output and "at step 4" in output
    assert not list((tmp_path / "run" / "checkpoints").glob(".portable-*")), (
        "the conversion's files stay behind"
    )
    assert_ends_like(tmp_path / "run", runs("ddp"))


def test_ddp_on_two_ranks_continues_under_zero3_on_one_rank(runs, tmp_path):
    """(b) The reverse: DDP x 2 ranks -> ZeRO-3 x 1 rank (DeepSpeed's per-parameter setters)."""
    output = resume_elsewhere(runs("ddp", crash=True), tmp_path / "run", "zero3", 1)
    assert "written under DDP on 2 rank(s); continuing under ZeRO-3 on 1 rank(s)" in output
    assert_ends_like(tmp_path / "run", runs("ddp"))


def test_zero2_continues_under_fsdp2_on_the_same_ranks(runs, tmp_path):
    """(c) ZeRO-2 x 2 ranks -> FSDP2 x 2 ranks (torch's distributed state-dict API): the same
    accumulation, so no accumulation line, only the conversion's."""
    output = resume_elsewhere(runs("zero2", crash=True), tmp_path / "run", "fsdp", 2)
    assert "written under ZeRO-2 on 2 rank(s); continuing under FSDP2 on 2 rank(s)" in output
    assert "train.grad_accum" not in output
    assert_ends_like(tmp_path / "run", runs("ddp"))


def test_a_converted_fsdp2_resume_after_the_original_is_scored(runs, tmp_path):
    """The original model is scored at the resume (before the checkpoint is loaded: the first
    evaluation of a run that had it off, or one whose eval settings changed). Generation under
    FSDP2 used to leave the output projection's unit unsharded, and the converted load then met a
    plain tensor (`got mixed torch.Tensor and DTensor`)."""
    run_dir = tmp_path / "run"
    shutil.copytree(runs("zero2", crash=True), run_dir)
    evaluating = (
        "--set",
        "eval.after_training=true",
        "--set",
        "eval.limit=4",
        "--set",
        "eval.max_new_tokens=8",
    )
    result = run_cli_harness(*args(run_dir, "fsdp", 2), *evaluating, "--resume", "auto")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "tiny-t5 (original)" in output and "continuing under FSDP2 on 2 rank(s)" in output
    assert_ends_like(run_dir, runs("ddp"))


def test_lora_zero3_continues_under_ddp(runs, tmp_path):
    """(e) LoRA: only the adapters (and their moments) move; the frozen base is the model's own.
    lora_B starts at zero, so its final value is how far training moved it."""
    output = resume_elsewhere(runs("zero3", method="lora", crash=True), tmp_path / "run", "ddp", 1, "lora")
    assert "written under ZeRO-3 on 2 rank(s); continuing under DDP on 1 rank(s)" in output
    reference = runs("ddp", method="lora")
    ours = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    theirs = load_file(str(reference / "final" / "adapter_model.safetensors"))
    moved = {k: v for k, v in theirs.items() if "lora_B" in k}
    assert moved and all(v.abs().sum() > 0 for v in moved.values())
    assert update_error(ours, moved, {k: torch.zeros_like(v) for k, v in moved.items()}) < SAME
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert losses(metrics) == pytest.approx(
        losses(read_jsonl(reference / "metrics.jsonl")), rel=1e-4, abs=1e-5
    )


@pytest.mark.parametrize("strategy", ["zero3", "zero2", "fsdp"])
def test_converted_moments_equal_the_originals_parameter_by_parameter(runs, strategy):
    """(f) A ZeRO or FSDP2 checkpoint read into the per-parameter layout: every parameter's weight,
    AdamW moments and step are those of the DDP run's checkpoint at the same step (the same
    arithmetic up to summation order: SAME, relative to each tensor); a ZeRO checkpoint's weights
    are also DeepSpeed's own zero_to_fp32 reconstruction, exactly."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from launcher.core import checkpoint as ckpt
    from launcher.core.recipe_loading import read_run_recipe
    from launcher.rank import portable
    from launcher.rank.model import build_model, load_tokenizer

    def read(run_dir: Path, workdir: Path) -> portable.Portable:
        checkpoint = run_dir / "checkpoints" / "step_4"
        saved = ckpt.read_state(checkpoint)
        recipe = read_run_recipe(run_dir)
        model = build_model(recipe, len(load_tokenizer(recipe)))
        workdir.mkdir()
        portable.convert(checkpoint, saved, workdir)
        return portable.read_checkpoint(checkpoint, saved, model, workdir), model

    source = runs(strategy, crash=True)
    ours, model = read(source, source.parent / "portable")
    theirs, _ = read(runs("ddp", crash=True), source.parent / "portable-ddp")
    exact = (
        get_fp32_state_dict_from_zero_checkpoint(str(source / "checkpoints" / "step_4"), tag="pytorch_model")
        if strategy.startswith("zero")
        else None
    )
    assert ours.step == theirs.step == 4
    checked = 0
    for names, param in portable.trainable(model):
        weight = portable.lookup(ours.weights, names).view(param.shape)
        if exact is not None:
            assert torch.equal(weight, portable.lookup(exact, names).float()), names[0]
        ddp_weight = portable.lookup(theirs.weights, names)
        assert ((weight - ddp_weight).norm() / ddp_weight.norm()) < SAME, names[0]
        mine, original = portable.lookup(ours.moments, names), portable.lookup(theirs.moments, names)
        assert mine.keys() == original.keys() == {"exp_avg", "exp_avg_sq"}, names[0]
        for key, value in original.items():
            gap = (mine[key].view(value.shape) - value).norm() / value.norm()
            assert gap < SAME, (names[0], key, float(gap))
        checked += 1
    assert checked == len(list(model.parameters()))


# (d) 2 -> 3 ranks needs a step of micro-batches that 3 ranks divide: 2 ranks x accumulation 3 = 6
# micro-batches of 4 (24 examples); 48 examples make 2 whole steps per epoch (no short last step,
# which 2 and 3 ranks would deal differently). Checkpoints every 3 steps; the crash while saving
# step 6 leaves step_3, mid-epoch.
SIX_PER_STEP = (
    "--set",
    "train.grad_accum=3",
    "--set",
    "data.train_limit=48",
    "--set",
    "train.epochs=5",
    "--set",
    "train.checkpoint_every=3",
)


def test_zero2_on_two_ranks_continues_on_three_with_the_accumulation_adjusted(tmp_path):
    """(d) ZeRO-2 x 2 ranks x accumulation 3 -> ZeRO-2 x 3 ranks: accumulation 2 keeps the 6
    micro-batches per step (said in one line); DeepSpeed cannot load its partitions on 3 ranks, so
    the checkpoint is converted; the run ends as the uninterrupted 2-rank DDP run."""
    reference = tmp_path / "reference"
    result = run_cli_harness(*args(reference, "ddp", 2), *SIX_PER_STEP)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    source = tmp_path / "source"
    result = run_cli_harness(
        *args(source, "zero2", 2), *SIX_PER_STEP, env=cli_env(FTLAUNCH_FAULT_RAISE_IN_SAVE="1:6")
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-6000:]
    assert (source / "checkpoints" / "latest").read_text().strip() == "step_3"
    result = run_cli_harness(*args(source, "zero2", 3), *SIX_PER_STEP, "--resume", "auto")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "train.grad_accum 3 -> 2 keeps its 6 micro-batches per optimizer step" in output
    assert "written under ZeRO-2 on 2 rank(s); continuing under ZeRO-2 on 3 rank(s)" in output
    assert "resumed from" in output and "at step 3" in output
    metrics = read_jsonl(source / "metrics.jsonl")
    assert [row["step"] for row in metrics if "loss" in row] == list(range(1, 11))
    assert losses(metrics) == pytest.approx(
        losses(read_jsonl(reference / "metrics.jsonl")), rel=1e-4, abs=1e-5
    )
    ours = load_file(str(source / "final" / "model.safetensors"))
    theirs = load_file(str(reference / "final" / "model.safetensors"))
    assert update_error(ours, theirs, tiny_initial_weights()) < SAME
