"""A flan-t5-large-shaped model under ZeRO-3 with gradient checkpointing on 2 CPU ranks: it trains,
and its measured peak memory per rank against ``ftlaunch estimate`` (bench/checkpointing_memory.py,
reduced for CI to flan-t5-large's width with 2 layers per stack, 2 steps, one run whose ranks
come from the rank harness: see ``measured``).

What is measured: the most bytes held by live CPU tensors at once during the steps (the torch
profiler's allocation events: the CPU analog of CUDA's max_memory_allocated), max over ranks.

Issue 26 asks for that peak to be within 20 % of the estimate's ZeRO-3 row. It is not yet, and
the last test says so (strict xfail: it fails loudly once the estimate accounts for the rest, so
the marker comes off). The estimate now counts ftlaunch's fp32 ZeRO-3 as rendered: 20Ψ/N of
partitions (measured exactly below), backward's gathered fp32 weights 4·min(Ψ, 1e9) and one
layer's gradient (launcher/host/estimate.py). On the 4-layer shape (bench/results/checkpointing_memory.md)
that is 2.63 GiB against 3.86 GiB measured (1.47x): within the first step, about 1.0-1.3 x 10^9
bytes of backward's transient memory (5.5-7 bytes per parameter) are still unaccounted for, and
the profiler's live-tensor counter drifts (it sees no events inside DeepSpeed's optimizer step).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from unittest import mock

import pytest
import rankharness
from test_bench import BENCH as BENCH_DIR  # bench/, which test_bench puts on sys.path

pytestmark = pytest.mark.slow

BENCH = BENCH_DIR / "checkpointing_memory.py"
GIB = 2**30


def with_forked_ranks(run_measured):
    """benchlib.run_measured, but an `accelerate launch` command's ranks are forked by the rank
    harness (tests/rankharness.py) instead of started by a real launch; other commands run."""

    def run(command, env, timeout=900, **kwargs):
        if list(command[1:3]) != ["-m", "accelerate.commands.launch"]:
            return run_measured(command, env, timeout, **kwargs)
        import benchlib

        start = time.perf_counter()
        code, text = rankharness.accelerate_launch_ranks(list(command[3:]), env, timeout)
        return benchlib.RunRecord(list(command), code, time.perf_counter() - start, 0.0, 0.0, text, "")

    return run


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
        mock.patch.object(bench.bl, "run_measured", with_forked_ranks(bench.bl.run_measured)),
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


@pytest.mark.xfail(
    strict=True,
    reason="ftlaunch estimate's ZeRO-3 row (fp32 partitions + gathered weights + one layer's "
    "gradient) still misses ~5.5-7 bytes/parameter of backward's transients: see the module docstring",
)
def test_peak_per_rank_is_within_20_percent_of_the_estimate(measured):
    assert measured["tensors_train_peak"] == pytest.approx(measured["estimate_total"], rel=0.20)
