"""Every bench script runs in its quick/smoke mode (tiny sizes), so the benchmarks are known to
work before anyone spends machine time (or GPU time) on the real runs. The real-data ones skip
cleanly without ../shared (or $FTLAUNCH_SHARED_DIR)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import DIALOGSUM, REPO, UNIGRAM_TOKENIZER, cli_env

pytestmark = pytest.mark.slow
BENCH = REPO / "bench"


def needs_real_data():
    return pytest.mark.skipif(
        not (DIALOGSUM / "train.jsonl").is_file() or not (UNIGRAM_TOKENIZER / "tokenizer.json").is_file(),
        reason=f"real DialogSum / unigram tokenizer not found under {DIALOGSUM.parents[1]} (set FTLAUNCH_SHARED_DIR)")


def run_bench(*args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, env=env or cli_env(OMP_NUM_THREADS="1"))
    assert result.returncode == 0, f"{args}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}"
    return result


@needs_real_data()
def test_throughput_quick(tmp_path):
    out = tmp_path / "throughput.md"
    run_bench(BENCH / "throughput.py", "--quick", "--work", tmp_path / "work", "--out", out)
    text = out.read_text()
    for name in ("ftlaunch", "trainer_seed", "trainer_dynamic", "trainer_grouped", "plain_sorted"):
        assert f"| {name} |" in text
    assert "ftlaunch / plain_sorted" in text and "command:" in text and "versions:" in text


@needs_real_data()
def test_padding_quick(tmp_path):
    out = tmp_path / "padding.md"
    run_bench(BENCH / "padding.py", "--quick", "--out", out)
    text = out.read_text()
    assert "ftlaunch (LengthGroupedBatchSampler + collator, CPU)" in text
    efficiencies = [float(line.split("|")[2]) for line in text.splitlines()
                    if line.startswith("| ") and line.split("|")[2].strip().replace(".", "").isdigit()]
    assert efficiencies and all(0 < e <= 1 for e in efficiencies)


@needs_real_data()
def test_scaling_quick(tmp_path):
    out = tmp_path / "scaling.md"
    run_bench(BENCH / "scaling.py", "--quick", "--work", tmp_path / "work", "--out", out)
    text = out.read_text()
    assert "| train | 2 x 1 |" in text and "| generate | 2 x 1 |" in text and "efficiency" in text


def test_zero_memory_quick(tmp_path):
    """Needs no real data: 2 CPU ranks per stage, configs rendered by ftlaunch --dry-run."""
    out = tmp_path / "zero.md"
    run_bench(BENCH / "zero_memory.py", "--quick", "--work", tmp_path / "work", "--out", out)
    text = out.read_text()
    assert "| DDP |" in text and "| ZeRO-1 |" in text and "| ZeRO-2 |" in text and "| ZeRO-3 |" in text
    assert "| ZeRO-3 (buckets sized to the model) |" in text and "ZeRO-3 as rendered: per-rank model states" in text


def test_gpu_script_tiny_on_cpu(tmp_path):
    """bench/gpu.sh end to end on CPU ranks with tiny-t5: rendering, the three strategies, both
    methods, generation through the product's generate_predictions, the results folder."""
    out = tmp_path / "gpu"
    env = cli_env(OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--tiny", "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    data = json.loads((out / "results.json").read_text())
    assert {(r["strategy"], r["method"]) for r in data["train"]} == {
        (s, m) for s in ("DDP", "ZeRO-2", "ZeRO-3") for m in ("full", "lora")}
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in data["train"]), data["train"]
    assert data["generate"] and data["generate"][0]["dialogues"] == 12
    assert "| tiny-t5 | lora | ZeRO-3 |" in (out / "README.md").read_text()


def test_gpu_bench_flops_formula():
    """The MFU formula on a known case: flan-t5-base's matmul parameters and one example."""
    sys.path.insert(0, str(BENCH))
    import torch

    import gpu_bench

    with torch.device("meta"):
        model = gpu_bench.build_arch("google/flan-t5-base", "meta")
    enc, dec, dims = gpu_bench.flop_params(model)
    assert enc + dec + 32128 * 768 == 247_577_856  # + the shared embedding = all parameters
    flops = gpu_bench.step_flops([(200, 30)], enc, dec, dims, lora=False)
    expected = 6 * (enc * 200 + dec * 30) + 12 * 768 * (12 * 200**2 + 12 * 30**2 + 12 * 30 * 200)
    assert flops == expected
    assert gpu_bench.step_flops([(200, 30)], enc, dec, dims, lora=True) < flops


def test_scripts_skip_cleanly_without_shared(tmp_path):
    env = cli_env(FTLAUNCH_SHARED_DIR=str(tmp_path / "nowhere"))
    for script in ("throughput.py", "padding.py", "scaling.py"):
        result = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--out", str(tmp_path / "x.md")],
                                cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0 and "skipped" in result.stdout, (script, result.stdout, result.stderr)
        assert not (tmp_path / "x.md").exists()
