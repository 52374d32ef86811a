"""A flan-t5-large-shaped model under ZeRO-3 with gradient checkpointing on 2 CPU ranks: it trains,
and its measured peak memory per rank against ``ftlaunch estimate`` (bench/checkpointing_memory.py,
reduced for CI to flan-t5-large's width with 2 layers per stack, 2 steps, one run whose ranks
come from the rank harness: see ``measured``).

What is measured: the most bytes held by live CPU tensors at once during the steps (the torch
profiler's allocation events: the CPU analog of CUDA's max_memory_allocated), max over ranks.

Issue 26 asks for that peak to be within 20 % of the estimate's ZeRO-3 row (launcher/host/estimate.py:
fp32 partitions 20Ψ/N, backward's gathered fp32 weights 4·min(Ψ, 1e9) and one layer's gradient,
the step's flat gradient copy, activations). The bench counts what the product runs (the fused
AdamW ``train.py`` builds with the rank's device) and replays the profiler's allocation events
by address, as it misses some frees (bench/checkpointing_memory.py ``Allocations``). On the
4-layer shape (bench/results/checkpointing_memory.md) the peak is 1.03x the estimate with
checkpointing and 1.06x without; the estimate and the measurement are independent (a formula
from the model's facts; allocation events inside the ranks).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from unittest import mock

import pytest
from test_bench import BENCH as BENCH_DIR  # bench/, which test_bench puts on sys.path
from test_bench import harness_run_measured

pytestmark = pytest.mark.slow

BENCH = BENCH_DIR / "checkpointing_memory.py"
GIB = 2**30


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    """One 2-rank ZeRO-3 run of the bench's worker with checkpointing (~1-2 min). The bench's own
    driver (``main``: the model, ftlaunch's render, the worker's `accelerate launch` command, the
    max over ranks) runs in this process; only the ranks come from the rank harness (forked from its
    preloaded forkserver, with the environment and arguments the launch would give them): the
    subject is what a rank holds while it trains, not the launch.

    The figures these tests read stay what they are under a real launch: the live-tensor peak is
    the torch profiler's allocation events, counted inside the rank from the profiler's start, and
    ``largest_live`` the sizes of the tensors alive after the steps; the libraries the forkserver
    preloaded hold no such tensors of this size, and a launched rank imports the same libraries
    before it measures. (The bench's RSS figures, not asserted here, subtract a baseline the rank
    reads after its imports, which the forkserver's pages are part of.)"""
    work = tmp_path_factory.mktemp("checkpointing-memory")
    argv = [
        str(BENCH),
        *("--layers", "2", "--steps", "2", "--micro-batch", "2", "--source-len", "128", "--target-len", "32"),
        *("--quick", "--json", "--work", str(work), "--timeout", "900"),
    ]
    import checkpointing_memory as bench

    stdout = io.StringIO()
    with (
        mock.patch.object(bench.bl, "run_measured", harness_run_measured(bench.bl.run_measured)),
        mock.patch.object(sys, "argv", argv),
        contextlib.redirect_stdout(stdout),
    ):
        bench.main()
    line = [row for row in stdout.getvalue().splitlines() if row.startswith("BENCH_RESULT ")][-1]
    payload = json.loads(line.removeprefix("BENCH_RESULT "))
    return payload["True"] | {"estimate_params": payload["params"]}


def test_large_shape_trains_two_steps_with_checkpointing_under_zero3(measured):
    """Both stacks recompute (transformers counts each checkpointed block: 2 + 2 here, plus
    the stacks), the 2 steps give finite losses, and the model states a rank holds after them
    are ftlaunch's fp32 ZeRO-3's 20 bytes per parameter / 2 ranks (flat fp32 partitions of
    weights, gradients, master copy, Adam's two moments; each tensor exactly Ψ/2 padded to
    DeepSpeed's alignment, so 1 % covers the padding)."""
    assert measured["checkpointed_stacks"] > 0
    assert len(measured["losses"]) == 2 and all(0 < loss < 1e4 for loss in measured["losses"])
    params = measured["params"]
    assert params == measured["estimate_params"]  # the estimate counts the model that trains
    flat = [line for line in measured["largest_live"][1:] if "(" in line]
    sizes = sorted((float(line.rsplit(": ", 1)[1].split()[0]) for line in flat), reverse=True)[:5]
    assert sum(sizes) * 2**20 == pytest.approx(20 * params / 2, rel=0.01), measured["largest_live"]
    # the peak includes those states, and the estimate's activations are a small part of it
    assert measured["tensors_train_peak"] > 20 * params / 2


def test_peak_per_rank_is_within_20_percent_of_the_estimate(measured):
    """Issue 26's bound: the estimate's term that can be off here is the one it has no exact
    model for (autocast's bf16 weight copies, counted as one layer's fp32 gradient), a few % of
    the peak at this shape; 20 % is the issue's own tolerance."""
    assert measured["tensors_train_peak"] == pytest.approx(measured["estimate_total"], rel=0.20)
