#!/usr/bin/env bash
# The prepared GPU benchmark for ONE H100/H200 (no network; finishes in under 8 minutes):
# FLAN-T5-base and -large architectures (random init, no download), bf16, full and LoRA,
# DDP vs ZeRO-2 vs ZeRO-3 on one GPU (tokens/s, MFU, peak memory), and generation throughput
# on 500 dialogues. Results: $OUT/README.md (table), results.json, logs.txt.
#
#   bash bench/gpu.sh                                  # -> bench/results/gpu-<date>/
#   bash bench/gpu.sh --out DIR --data DIR [--tokenizer DIR]   # real DialogSum if carried in
#   bash bench/gpu.sh --tiny --out /tmp/x              # CPU smoke run (tests/test_bench.py)
#
# Without --data, training and generation use synthetic dialogues of DialogSum-like lengths
# (shared/ is not carried to the GPU machine). Packages the GPU image lacks (deepspeed,
# datasets, pydantic, rouge_score, ...) come from wheels carried in .whl/ (copy
# ../shared/wheels/gpu-py312/*.whl there; .whl/ is git-ignored and must be carried explicitly).
set -euo pipefail
cd "$(dirname "$0")/.."

# 1. Wheels for what the GPU image lacks, installed into /tmp/site (no network, no deps).
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1 GPU_SH_ARGS="$*"

# 2. Fail in seconds, not minutes, when a package is missing.
python3 -c "import torch, transformers, accelerate, peft, deepspeed, datasets, pydantic, typer, rouge_score" || {
  echo "gpu.sh: a required package is missing: carry ../shared/wheels/gpu-py312/*.whl in .whl/" >&2; exit 3; }

TINY=0
for arg in "$@"; do [ "$arg" = "--tiny" ] && TINY=1; done
if [ "$TINY" = 0 ]; then
  python3 -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'; print('GPU:', torch.cuda.get_device_name(0))"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
fi

# 3. The measurement (bench/gpu_bench.py stops starting new parts after --budget-s, default 450 s).
exec timeout 470 python3 bench/gpu_bench.py "$@"
