"""The training loop on CPU ranks (gloo), through the real CLI, on the embedded tiny model.

References are independent of the loop: validation loss is recomputed here with a plain
PyTorch forward pass over the reloaded final model; equivalence and resume compare two runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    DIALOGSUM,
    TINY_ONE_EPOCH,
    UNIGRAM_TOKENIZER,
    assert_same_final_weights,
    needs_dialogsum,
    read_jsonl,
    run_cli,
    run_cli_harness,
    tiny_args,
)
from safetensors.torch import load_file

from launcher.core.ranklog import rank_log_path
from launcher.rank.compiling import bucket_count

pytestmark = pytest.mark.slow

PROMPT = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "
SAMPLE = Path(__file__).resolve().parents[1] / "launcher" / "assets" / "sample"


def train_args(method: str, out: Path, *extra: str, gpus: int = 2, zero: int = 0) -> list[str]:
    return [*tiny_args(method, *extra, gpus=gpus, zero=zero), "--output", str(out)]


def train(method: str, out: Path, *extra: str, gpus: int = 2, zero: int = 0) -> list[dict]:
    """A run through the rank harness (tests/rankharness.py): what training computes."""
    result = run_cli_harness(*train_args(method, out, *extra, gpus=gpus, zero=zero))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return read_jsonl(out / "metrics.jsonl")


@pytest.fixture
def trained(trained_run):
    """trained(name, method, *extra, gpus=2, zero=0) -> (run dir, metrics): each distinct run is
    trained once per test session (conftest.trained_run, through the rank harness) and read by
    every test that checks something of it (runs are never modified by the tests that share
    them). ``name`` only says which run a test means."""

    def get(name: str, method: str, *extra: str, gpus: int = 2, zero: int = 0) -> tuple[Path, list[dict]]:
        run_dir = trained_run(*tiny_args(method, *extra, gpus=gpus, zero=zero))
        return run_dir, read_jsonl(run_dir / "metrics.jsonl")

    return get


def losses(metrics: list[dict]) -> list[float]:
    return [row["loss"] for row in metrics if "loss" in row]


def final_val_loss(metrics: list[dict]) -> float:
    return [row for row in metrics if row.get("final")][-1]["val_loss"]


# ---------------------------------------------------------------- independent references


def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SAMPLE.parent / "tiny_t5_tokenizer"))


def reference_val_loss(
    model, tokenizer, rows: list[dict], max_source: int = 512, max_target: int = 128
) -> float:
    """Token-weighted cross-entropy, one example at a time (no padding, no batching tricks)."""
    model.eval()
    total = tokens = 0.0
    with torch.no_grad():
        for row in rows:
            source = tokenizer(
                PROMPT.replace("{dialogue}", row["dialogue"]),
                max_length=max_source,
                truncation=True,
                return_tensors="pt",
            )
            labels = tokenizer(
                text_target=row["summary"], max_length=max_target, truncation=True, return_tensors="pt"
            )["input_ids"]
            logits = model(**source, labels=labels).logits
            total += torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="sum").item()
            tokens += labels.numel()
    return total / tokens


def reload_final(run_dir: Path, method: str):
    from transformers import AutoModelForSeq2SeqLM

    from launcher.rank.model import build_tiny_t5

    if method == "full":
        return AutoModelForSeq2SeqLM.from_pretrained(str(run_dir / "final"))
    from peft import PeftModel

    return PeftModel.from_pretrained(build_tiny_t5(1000), str(run_dir / "final"))


# ---------------------------------------------------------------- tests


def trained_two_epochs(trained, method: str, zero: int) -> tuple[Path, list[dict]]:
    """Two epochs of the sample data: 16 optimizer steps, a checkpoint of the last one."""
    lr = "2e-3" if method == "full" else "1e-2"
    return trained(
        f"{method}-zero{zero}", method, "--set", "train.epochs=2", "--set", f"train.lr={lr}", zero=zero
    )


@pytest.mark.parametrize(
    "method,zero", [("full", 0), ("full", 2), ("full", 3), ("lora", 0), ("lora", 2), ("lora", 3)]
)
def test_trains_saves_and_reloads(trained, method, zero):
    run_dir, metrics = trained_two_epochs(trained, method, zero)
    curve = losses(metrics)
    assert len(curve) == 16  # 64 examples / (4 per rank x 2 ranks) x 2 epochs
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.05, curve
    if method == "lora":
        adapter = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
        assert adapter and all(t.numel() > 0 for t in adapter.values())
        assert any("lora_B" in key and t.abs().sum() > 0 for key, t in adapter.items())
    model = reload_final(run_dir, method)
    rows = [json.loads(line) for line in (SAMPLE / "validation.jsonl").read_text().splitlines()]
    expected = reference_val_loss(model, tiny_tokenizer(), rows)
    assert final_val_loss(metrics) == pytest.approx(expected, rel=1e-4)


ONE_EPOCH = TINY_ONE_EPOCH
COMPILE = ("--set", "train.compile=true")


def two_ranks_one_epoch(trained) -> tuple[Path, list[dict]]:
    """DDP, 2 ranks x micro batch 4, one epoch: 8 optimizer steps, a checkpoint of the last one."""
    return trained("ddp-one-epoch", "full", *ONE_EPOCH, gpus=2)


def one_rank_one_epoch(trained) -> tuple[Path, list[dict]]:
    """The same batches on 1 rank: micro batch 4 x accumulation 2."""
    return trained("one-rank-accum2", "full", *ONE_EPOCH, "--set", "train.grad_accum=2", gpus=1)


def test_two_ranks_equal_one_rank_with_accumulation(trained):
    """2 ranks x micro batch 4 == 1 rank x accumulation 2 x micro batch 4, step for step."""
    two_ranks = losses(two_ranks_one_epoch(trained)[1])
    one_rank = losses(one_rank_one_epoch(trained)[1])
    assert len(two_ranks) == len(one_rank) == 8
    assert two_ranks == pytest.approx(one_rank, rel=1e-5, abs=1e-6)
    zero2 = losses(trained("zero2-one-epoch", "full", *ONE_EPOCH, gpus=2, zero=2)[1])
    assert zero2 == pytest.approx(two_ranks, rel=1e-4, abs=1e-5)


# A token budget of 1000 padded tokens: the sample's micro-batches then hold 1 to 6 dialogues
# (sources of 69..470 tokens, targets of 14..54), so steps differ in size and in token count;
# 2 micro-batches per step make 9 steps per epoch (a stop request, checked every 10 steps, then
# lands mid-epoch).
BUDGET = ("--set", "train.micro_batch_tokens=1000")


def test_token_budget_two_ranks_equal_one_rank_with_accumulation(trained):
    """The same budget on 2 ranks and on 1 rank x accumulation 2: the same micro-batches form every
    step (launcher/rank/data.py), and the token-weighted objective makes micro-batches of different
    sizes count by their tokens, so the runs agree step for step and in their final weights to
    float32 round-off (the gradient all-reduce adds two partial sums where 1 rank accumulates
    them: a few ulps per step, far inside rel 1e-5)."""
    two_dir, two_ranks = trained("ddp-budget", "full", *ONE_EPOCH, *BUDGET, gpus=2)
    one_dir, one_rank = trained(
        "one-rank-budget-accum2", "full", *ONE_EPOCH, *BUDGET, "--set", "train.grad_accum=2", gpus=1
    )
    samples = [row["samples_per_s"] * row["elapsed_s"] for row in two_ranks if "loss" in row]
    assert len(set(round(n) for n in samples)) > 1, "every step had as many dialogues: no budget"
    assert len(losses(two_ranks)) == len(losses(one_rank)) > 8  # smaller steps than 8 x 4 dialogues
    assert losses(two_ranks) == pytest.approx(losses(one_rank), rel=1e-5, abs=1e-6)
    assert_same_final_weights(two_dir, one_dir)


@pytest.mark.parametrize("zero,eager_run", [(0, "ddp-one-epoch"), (2, "zero2-one-epoch")])
def test_compiled_run_matches_eager_run(trained, zero, eager_run):
    """train.compile=true on 2 CPU ranks (Accelerate's torch.compile with inductor; batches padded
    to length buckets) trains, saves final/ and follows the eager run step for step.

    Tolerance: both runs are fp32 and compute the same sums; inductor fuses kernels and reorders
    fp32 reductions, and the bucket padding changes matmul shapes (masked positions add exact
    zeros), so the runs differ only by rounding, the same kind of difference as ZeRO-2's
    reordered gradient reduction against DDP: the bound test_two_ranks_equal_one_rank_with_
    accumulation uses for that, rel=1e-4 (8 steps of lr 2e-3 amplify ulp-level differences
    of ~1e-7 by far less than 1e3). Recompilation is bounded: at most one graph per distinct
    (source, target) batch shape the run met, and those are bucket lengths (a handful)."""
    eager = losses(trained(eager_run, "full", *ONE_EPOCH, gpus=2, zero=zero)[1])
    run_dir, metrics = trained(f"compiled-zero{zero}", "full", *ONE_EPOCH, *COMPILE, gpus=2, zero=zero)
    assert len(losses(metrics)) == len(eager) == 8
    assert losses(metrics) == pytest.approx(eager, rel=1e-4, abs=1e-5)
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert "dynamo_config" in (run_dir / "accelerate.yaml").read_text()
    final = [row for row in metrics if row.get("final")][-1]
    assert 1 <= final["compiled_graphs"] <= final["batch_shapes"] <= bucket_count(512, 128)


# The pid in each rank log's first line (launcher.core.ranklog.start).
RANK_HEADER = re.compile(r"^===== ftlaunch rank (\d+) \(.*?pid (\d+)\) started", re.M)


def rank_pids(run_dir: Path) -> list[int]:
    """The running ranks' pids, from their logs' newest header line: ranks forked by the rank
    harness have no command line of their own to be found by."""
    pids: dict[int, int] = {}
    for log in rank_log_path(run_dir, 0).parent.glob("rank*.log"):
        for rank, pid in RANK_HEADER.findall(log.read_text(errors="replace")):
            pids[int(rank)] = int(pid)
    return list(pids.values())


def interrupt_after(
    run_dir: Path, args: list[str], step: int, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `ftlaunch ARGS` with its ranks in the rank harness (tests/rankharness.py), send SIGUSR1
    to the ranks once `step` is logged; the finished run's result (its output in stdout).

    The signal goes to the ranks themselves, not to the supervisor: stopping is what the ranks do
    (launcher.rank.stopping: checkpoint, INTERRUPTED, exit 3), which forked ranks do as launched
    ones do. Forwarding a signal from the supervisor to the ranks is tests/test_faults.py's."""
    metrics = run_dir / "metrics.jsonl"
    finished = threading.Event()

    def watch() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not finished.is_set():
            if metrics.is_file() and len(losses(read_jsonl(metrics))) >= step:
                for pid in rank_pids(run_dir):
                    os.kill(pid, signal.SIGUSR1)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = run_cli_harness(*args, env=env)
    finally:
        finished.set()
        watcher.join()
    return subprocess.CompletedProcess(args, result.returncode, result.stdout + result.stderr, "")


def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path):
    """SIGUSR1 (SLURM's preemption signal) to every rank under ZeRO-2, with token-budget
    micro-batches (whose packing differs from epoch to epoch); the resumed run is the
    uninterrupted one. DDP's resume (fixed-size micro-batches) after a stop request and after a
    crash: test_faults. Both runs, the interrupted one and its resume, have their ranks from the
    rank harness: the subject is what the ranks checkpoint and resume (the signal goes to the
    ranks, which stop by themselves: see interrupt_after), not the launch."""
    zero = 2
    common = (
        *("--set", "train.epochs=6", "--set", "train.lr=2e-3", "--set", "train.checkpoint_every=1000"),
        *BUDGET,
    )
    reference = train("full", tmp_path / "reference", *common, zero=zero)
    total = len(losses(reference))
    # The logged epoch rises every step and is whole exactly at each epoch's last step (epochs the
    # budget packs into different numbers of micro-batches: test_batching's logged-epoch test).
    epochs = [row["epoch"] for row in reference if "loss" in row]
    assert epochs == sorted(set(epochs)), epochs
    assert [epoch for epoch in epochs if epoch == int(epoch)] == [1, 2, 3, 4, 5, 6], epochs

    run_dir = tmp_path / "interrupted"
    args = train_args("full", run_dir, *common, zero=zero)
    stopped = interrupt_after(run_dir, args, step=5)
    assert stopped.returncode != 0, stopped.stdout[-3000:]
    assert (run_dir / "INTERRUPTED").is_file(), stopped.stdout[-3000:]
    saved_step = int((run_dir / "INTERRUPTED").read_text().strip().split("_")[1])
    assert 5 <= saved_step < total, "the run finished before the signal: make it longer"
    state = json.loads((run_dir / "checkpoints" / f"step_{saved_step}" / "ftlaunch_state.json").read_text())
    assert state["micro_batch_tokens"] == 1000
    assert saved_step % (total // 6) and state["batches_in_epoch"] > 0, "resume from mid-epoch"

    resumed = run_cli_harness(*args, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert not (run_dir / "INTERRUPTED").exists()
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [row["step"] for row in metrics if "loss" in row] == list(range(1, total + 1))
    assert losses(metrics) == pytest.approx(losses(reference), rel=1e-5, abs=1e-6)
    assert final_val_loss(metrics) == pytest.approx(final_val_loss(reference), rel=1e-5)
    assert_same_final_weights(run_dir, tmp_path / "reference")


def test_resume_refuses_a_world_size_that_cannot_keep_the_step(trained):
    """A checkpoint continues on other ranks only where a whole accumulation keeps its
    micro-batches per step (2 -> 3 ranks cannot: tests/test_faults.py resumes DDP 2 -> 1,
    tests/test_portable_resume.py ZeRO and FSDP2 on other ranks and strategies), a DDP or a sharded
    ZeRO-2 checkpoint alike. Both refusals touch nothing."""
    cases = (
        (two_ranks_one_epoch(trained)[0], dict(gpus=3), "3 rank(s) cannot keep that"),
        (
            trained("zero2-one-epoch", "full", *ONE_EPOCH, gpus=2, zero=2)[0],
            dict(gpus=3, zero=2),
            "3 rank(s) cannot keep that",
        ),
    )
    for run_dir, shape, words in cases:
        before = {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")}
        result = run_cli(*train_args("full", run_dir, *ONE_EPOCH, **shape), "--resume", "auto")
        assert result.returncode == 2, result.stderr[-3000:]
        assert words in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")} == before, (
            "the refusal touched the run"
        )


def test_lora_changes_only_adapter_weights(trained):
    from launcher.rank.model import build_tiny_t5

    run_dir, _ = trained_two_epochs(trained, "lora", 0)
    last = (run_dir / "checkpoints" / "latest").read_text().strip()  # the final step's checkpoint
    assert last == "step_16"
    state = load_file(str(run_dir / "checkpoints" / last / "model.safetensors"))
    base = build_tiny_t5(1000).state_dict()
    lora_keys = [key for key in state if "lora_" in key]
    assert lora_keys and any(state[key].abs().sum() > 0 for key in lora_keys if "lora_B" in key)
    compared = 0
    for key, value in state.items():
        if "lora_" in key:
            continue
        plain = key.replace("base_model.model.", "").replace(".base_layer", "")
        # Frozen linear weights are held (and checkpointed) in bf16 under bf16 autocast: the
        # values autocast computed with (train.prepare_model_for_training), unchanged.
        assert value.dtype in (torch.float32, torch.bfloat16), plain
        assert torch.equal(value, base[plain].to(value.dtype)), f"base weight {plain} changed"
        compared += 1
    assert compared >= len(base) - 2  # every base weight (tied copies may be saved once)


def test_full_finetune_keeps_untied_lm_head_through_save_and_reload(trained):
    """FLAN-T5 has its own lm_head; transformers 5 ties T5's by default (docs/ARCHITECTURE.md, "Pitfalls")."""
    from transformers import AutoModelForSeq2SeqLM

    from launcher.rank.model import build_tiny_t5

    run_dir, _ = one_rank_one_epoch(trained)
    expected_model = build_tiny_t5(1000)
    last = (run_dir / "checkpoints" / "latest").read_text().strip()  # the final step's checkpoint
    assert last == "step_8"
    state = load_file(str(run_dir / "checkpoints" / last / "model.safetensors"))
    expected_model.load_state_dict(state, strict=False)
    expected_model.lm_head.weight.data.copy_(state["lm_head.weight"])
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(str(run_dir / "final")).eval()
    assert reloaded.lm_head.weight.data_ptr() != reloaded.shared.weight.data_ptr()
    assert not torch.equal(reloaded.lm_head.weight, reloaded.shared.weight)
    tokenizer = tiny_tokenizer()
    inputs = tokenizer(["#Person1#: Hello, how are you?\n#Person2#: Fine, thanks."], return_tensors="pt")
    decoder = torch.tensor([[0, 5, 9, 13]])
    with torch.no_grad():
        expected = expected_model.eval()(**inputs, decoder_input_ids=decoder).logits
        got = reloaded(**inputs, decoder_input_ids=decoder).logits
    assert torch.equal(expected, got)


@needs_dialogsum()
@pytest.mark.skipif(not UNIGRAM_TOKENIZER.is_dir(), reason=f"tokenizer not found at {UNIGRAM_TOKENIZER}")
def test_real_dialogsum_validation_loss_drops(tmp_path):
    """A small T5 (tiny-t5 layout, 8k DialogSum tokenizer) for a fixed short budget on real data."""
    from transformers import AutoTokenizer

    from launcher.rank.model import build_tiny_t5

    run_dir = tmp_path / "run"
    result = run_cli_harness(
        "full",
        "--cpu",
        "--gpus",
        "2",
        "--model",
        "tiny-t5",
        "--data",
        str(DIALOGSUM),
        "--output",
        str(run_dir),
        "--set",
        f"model.tokenizer={UNIGRAM_TOKENIZER}",
        "--set",
        "model.precision=fp32",
        "--set",
        "data.train_limit=768",
        "--set",
        "data.validation_limit=64",
        "--set",
        "data.max_source_length=256",
        "--set",
        "data.max_target_length=64",
        "--set",
        "train.micro_batch_size=8",
        "--set",
        "train.lr=3e-3",
        "--set",
        "train.max_steps=40",
        "--set",
        "train.log_every=5",
        "--set",
        "eval.after_training=false",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    tokenizer = AutoTokenizer.from_pretrained(str(UNIGRAM_TOKENIZER))
    rows = read_jsonl(DIALOGSUM / "validation.jsonl")[:64]
    initial = reference_val_loss(build_tiny_t5(len(tokenizer)), tokenizer, rows, 256, 64)
    final = final_val_loss(read_jsonl(run_dir / "metrics.jsonl"))
    assert final < initial - 1.0, (initial, final)
    assert math.isfinite(final)
