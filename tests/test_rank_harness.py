"""The rank harness (tests/rankharness.py) against a real launch: the same recipe trained both ways
writes the same metrics, the same checkpoint files and bit-identical final weights.

ZeRO-2 is the recipe: DeepSpeed reads its whole configuration from the variables `accelerate
launch` sets (ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_CONFIG_FILE, ...), so a harness that
got the rank environment wrong would train another strategy (DDP: no ZeRO shard files in the
checkpoint) or another configuration (other numbers), not the same run.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_ONE_EPOCH, read_jsonl, tiny_args
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ZERO2 = tiny_args("full", *TINY_ONE_EPOCH, zero=2)  # test_training's ZeRO-2 run
TIMING = ("samples_per_s", "tokens_per_s", "elapsed_s")  # wall-clock: differs between any two runs


def without_timing(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key not in TIMING} for row in rows]


def test_harness_run_equals_a_real_launch(trained_run):
    real = trained_run(*ZERO2, real=True)
    forked = trained_run(*ZERO2)
    ours, theirs = read_jsonl(forked / "metrics.jsonl"), read_jsonl(real / "metrics.jsonl")
    assert len([row for row in theirs if "loss" in row]) == 8
    assert without_timing(ours) == without_timing(theirs)  # exact: the same computation
    files = sorted(str(path.relative_to(real)) for path in (real / "checkpoints").rglob("*"))
    assert any("zero_pp_rank_1" in name for name in files), files  # ZeRO-2 shards of 2 ranks
    assert sorted(str(path.relative_to(forked)) for path in (forked / "checkpoints").rglob("*")) == files
    mine, reference = (
        load_file(str(forked / "final" / "model.safetensors")),
        load_file(str(real / "final" / "model.safetensors")),
    )
    assert mine.keys() == reference.keys()
    assert all(torch.equal(mine[key], reference[key]) for key in mine)
    for name in ("recipe.yaml", "accelerate.yaml", "deepspeed.json"):
        assert (forked / name).read_text().replace(str(forked), "RUN") == (real / name).read_text().replace(
            str(real), "RUN"
        ), name
    assert "saved model to" in (forked / "logs" / "launcher.log").read_text()


def test_a_rank_whose_exit_hangs_ends_as_hung_with_its_stacks(tmp_path):
    """A forked rank that finished its work but hangs in its exit handlers (seen rarely under the
    harness) ends as HUNG after the grace period, with every thread's stack in its output, instead
    of holding the test for wait_all's 300 s; run_cli_harness then runs the command once more."""
    import time

    import rankharness

    output = tmp_path / "rank0.out"
    env = {"PATH": "/usr/bin:/bin", rankharness.EXIT_GRACE_ENV: "2"}
    rank = rankharness.context().Process(
        target=rankharness.rank_main, args=(env, ["-m", "harness_exit_hang"], str(output))
    )
    started = time.monotonic()
    rank.start()
    code = rankharness.wait_all([rank], timeout=120)
    assert code == rankharness.HUNG, output.read_text()
    assert time.monotonic() - started < 60  # the grace period, not wait_all's timeout
    text = output.read_text()
    assert "exit with code 0 still not done after 2 s" in text and "Thread" in text, text
    assert "harness_exit_hang" in text or "atexit" in text or "wait" in text, text  # where it hung
