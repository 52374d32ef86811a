"""train.compile without training: the rendered switch (accelerate.yaml's dynamo_config, and the
environment DeepSpeed ranks need) and the length buckets, whose padding must not change the loss.
The compiled 2-rank runs themselves are in test_training.py (slow)."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import run_cli_in_process

from launcher.rank.compiling import BucketCollator, bucket_count, bucket_length
from launcher.rank.loaders import build_collator
from launcher.rank.model import build_tiny_t5
from launcher.rank.train import summed_cross_entropy


def rendered(tmp_path, *args: str) -> tuple[dict, str]:
    run_dir = tmp_path / "run"
    result = run_cli_in_process(
        "full", "--model", "tiny-t5", "--data", "sample", *args, "--dry-run", "--output", str(run_dir)
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load((run_dir / "accelerate.yaml").read_text()), (run_dir / "command.sh").read_text()


@pytest.mark.parametrize(
    "args,compiles",
    [
        (("--gpus", "2"), True),  # auto: GPU ranks compile
        (("--gpus", "2", "--cpu"), False),  # auto: CPU ranks do not
        (("--gpus", "2", "--cpu", "--set", "train.compile=true"), True),
        (("--gpus", "2", "--set", "train.compile=false"), False),
        (("--gpus", "2", "--zero", "3"), False),  # auto: ZeRO-3 and FSDP2 stay eager (refused below)
        (("--gpus", "2", "--fsdp"), False),
    ],
)
def test_compile_renders_accelerate_dynamo_config(tmp_path, args, compiles):
    config, command = rendered(tmp_path, *args)
    if compiles:
        assert config["dynamo_config"]["dynamo_backend"] == "INDUCTOR"
    else:
        assert "dynamo_config" not in config
    assert "ACCELERATE_DYNAMO_BACKEND" not in command  # accelerate launch passes it on for DDP / FSDP


def test_compile_under_deepspeed_exports_the_dynamo_settings(tmp_path):
    """accelerate's DeepSpeed launch path drops dynamo_config: command.sh exports what the ranks read."""
    config, command = rendered(tmp_path, "--gpus", "2", "--cpu", "--zero", "2", "--set", "train.compile=true")
    assert config["dynamo_config"]["dynamo_backend"] == "INDUCTOR"
    assert "export ACCELERATE_DYNAMO_BACKEND=INDUCTOR" in command


def test_bucket_lengths():
    assert [bucket_length(n, 64, 512) for n in (1, 64, 65, 500, 512)] == [64, 64, 128, 512, 512]
    assert bucket_length(70, 64, 100) == 100  # capped at the recipe's maximum
    assert bucket_length(120, 64, 100) == 120  # never shorter than the batch (cannot happen: truncation)
    assert bucket_count(512, 128) == 64


def test_bucket_padding_leaves_the_loss_unchanged():
    """A batch padded to its buckets gives the same summed cross-entropy and target-token count
    as the same batch padded to its longest example (fp32: equal up to reduction-order rounding,
    a few float32 ulps of a sum of ~100 terms of size ~7, so rel=1e-6)."""
    from transformers import AutoTokenizer

    from launcher.core.paths import TINY_TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    model = build_tiny_t5(len(tokenizer)).eval()
    generator = torch.Generator().manual_seed(0)
    features = [
        {
            "input_ids": torch.randint(3, 900, (s,), generator=generator).tolist(),
            "attention_mask": [1] * s,
            "labels": torch.randint(3, 900, (t,), generator=generator).tolist(),
        }
        for s, t in ((70, 9), (33, 21), (5, 3))
    ]
    plain = build_collator(tokenizer, False, model)
    bucketed = BucketCollator(plain, tokenizer.pad_token_id, 512, 128)
    a, b = plain(features), bucketed(features)
    assert a["input_ids"].shape == (3, 70) and b["input_ids"].shape == (3, 128)
    assert a["labels"].shape == (3, 21) and b["labels"].shape == (3, 32)
    assert bucketed.shapes == {(128, 32)}
    with torch.no_grad():
        loss_a, count_a = summed_cross_entropy(model, a)
        loss_b, count_b = summed_cross_entropy(model, b)
    assert count_a == count_b == 33
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-6)


@pytest.mark.parametrize("strategy,says", [(("--zero", "3"), "with --zero 3"), (("--fsdp",), "with --fsdp")])
def test_compile_under_zero3_and_fsdp_is_refused_in_one_line(tmp_path, strategy, says):
    result = run_cli_in_process(
        "full",
        "--cpu",
        "--gpus",
        "2",
        *strategy,
        "--model",
        "tiny-t5",
        "--data",
        "sample",
        "--set",
        "train.compile=true",
        "--dry-run",
        "--output",
        str(tmp_path / "run"),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"train.compile=true {says}" in result.stderr and "--zero 2 or DDP" in result.stderr
    assert not (tmp_path / "run").exists()


def test_report_states_the_compile_counts(tmp_path):
    """The final metrics line's compile counts reach report.md (runs without compile: no line)."""
    import json

    from launcher.results.report import write_run_report

    (tmp_path / "eval" / "finetuned").mkdir(parents=True)
    scores = {"rouge1": 0.35, "rouge2": 0.15, "rougeL": 0.3, "rougeLsum": 0.3, "n": 2}
    (tmp_path / "eval" / "finetuned" / "rouge.json").write_text(json.dumps(scores))
    rows = [
        {"step": 1, "loss": 7.4},
        {"step": 1, "val_loss": 7.2, "final": True, "compiled_graphs": 4, "batch_shapes": 7},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = (write_run_report(tmp_path) / "report.md").read_text()
    assert "torch.compile: 4 graph(s) compiled on rank 0 for 7 batch shape(s)" in report


def test_dora_stays_eager_under_auto_and_compiling_it_is_refused(tmp_path):
    """DoRA's layers break the compiled graph inside every adapted attention (58 graphs for 5
    batch shapes, the recompile limit hit): auto keeps it eager on GPU ranks, true is refused."""
    common = ("lora", "--gpus", "2", "--model", "tiny-t5", "--data", "sample", "--dry-run")
    dora = ("--set", "lora.use_dora=true")
    for extra, compiles in (((), True), (dora, False)):
        out = tmp_path / f"auto{len(extra)}"
        result = run_cli_in_process(*common, *extra, "--output", str(out))
        assert result.returncode == 0, result.stderr
        assert ("dynamo_config" in yaml.safe_load((out / "accelerate.yaml").read_text())) is compiles
    refused = run_cli_in_process(
        *common, *dora, "--set", "train.compile=true", "--output", str(tmp_path / "on")
    )
    assert refused.returncode == 2 and "train.compile=true with lora.use_dora" in refused.stderr
    assert not (tmp_path / "on").exists()
