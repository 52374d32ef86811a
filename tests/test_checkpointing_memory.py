"""A flan-t5-large-shaped model under ZeRO-3 with gradient checkpointing on 2 CPU ranks: it trains,
and its measured peak memory per rank against ``ftlaunch estimate`` (bench/checkpointing_memory.py,
reduced for CI to flan-t5-large's width with 2 layers per stack, 2 steps, one launch).

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

import json
from pathlib import Path

import pytest
from conftest import cli_env
from test_bench import run_bench

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "bench" / "checkpointing_memory.py"
GIB = 2**30


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    """One 2-rank ZeRO-3 launch of the bench's worker with checkpointing (~1-2 min)."""
    work = tmp_path_factory.mktemp("checkpointing-memory")
    result = run_bench(
        BENCH,
        *("--layers", "2", "--steps", "2", "--micro-batch", "2", "--source-len", "128", "--target-len", "32"),
        *("--quick", "--json", "--work", work),
        env=cli_env(OMP_NUM_THREADS="1"),
    )
    line = [row for row in result.stdout.splitlines() if row.startswith("BENCH_RESULT ")][-1]
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
