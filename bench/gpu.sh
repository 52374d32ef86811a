#!/usr/bin/env bash
# The prepared GPU benchmark for ONE H100/H200 with no network: finishes in under 8 minutes.
#
#   OUT=/some/dir bash bench/gpu.sh [--cli full:DDP,...] [--measure DDP,...] [--archs base,large]
#   bash bench/gpu.sh --tiny --out /tmp/x        # the same script on CPU ranks (tests/test_bench.py)
#
# 1. installs the carried wheels (.whl/*.whl: copy ../shared/wheels/gpu-py312/*.whl there and carry
#    .whl) into /tmp/ftlaunch-site, and reports a version conflict as a conflict;
# 2. runs bench/gpu_bench.py: the real CLI (ftlaunch full/lora --gpus 1; DDP, ZeRO-2, ZeRO-3, ZeRO-3 +
#    optimizer offload) on a FLAN-T5-base-shaped model (random init, no download), then the
#    throughput / MFU / memory measurements; it rewrites its results after every part, kills a
#    part that hangs (its whole process tree) and stops at the time budget;
# 3. prints the summary table.
#
# Results: the folder named by $OUT when it is set (then nothing is written in the working tree),
# else --out DIR, else bench/results/gpu-<date>/. Always these five files, flat (the device tool
# brings back at most 8 files, at most 2 folders deep): summary.md, results.json, logs.txt,
# env.txt, reports.md.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET_S=${GPU_SH_BUDGET_S:-470}   # the whole script, install included (the device run: 8 minutes)
export GPU_SH_COMMAND="bash bench/gpu.sh $*"
TINY=0
OUT_DIR=${OUT:-}
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=1; ARGS+=("$1") ;;
    --out) OUT_DIR=$2; shift ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
# The CPU rehearsal runs more parts than fit 470 s on 2 busy cores (each a fresh Python process).
[ "$TINY" = 1 ] && [ -z "${GPU_SH_BUDGET_S:-}" ] && BUDGET_S=700
[ -n "$OUT_DIR" ] || OUT_DIR="bench/results/gpu-$(date +%Y-%m-%d)"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
ENV_TXT="$OUT_DIR/env.txt"
PYTHON=${PYTHON:-python3}
# command.sh runs `accelerate launch`: the console scripts of the Python that runs the benchmark first.
PY_BIN=$("$PYTHON" -c 'import os, sys; print(os.path.dirname(sys.executable))' 2> /dev/null) && export PATH="$PY_BIN:$PATH"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1  # nothing, not even __pycache__, lands in the working tree
: > "$ENV_TXT"

# 1. Wheels for what the GPU image lacks (no network, no dependency resolution: --no-deps).
SITE=/tmp/ftlaunch-site
SITE_ARGS=()
if [ "$TINY" = 0 ] && compgen -G ".whl/*.whl" > /dev/null; then
  {
    echo "===== wheels carried in .whl/ ====="
    ls -1 .whl/*.whl
    echo "===== $PYTHON -m pip install --no-index --no-deps --target $SITE ====="
  } >> "$ENV_TXT"
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      .whl/*.whl >> "$ENV_TXT" 2>&1; then
    echo "installed" >> "$ENV_TXT"
  else
    echo "gpu.sh: installing the carried wheels failed (see env.txt); going on with what the image has" | tee -a "$ENV_TXT" >&2
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  SITE_ARGS=(--site "$SITE")
elif [ "$TINY" = 0 ]; then
  echo "gpu.sh: no .whl/*.whl carried: deepspeed, datasets, pydantic, rouge_score ... will be missing" | tee -a "$ENV_TXT" >&2
fi
if [ "$TINY" = 0 ]; then
  { echo "===== nvidia-smi ====="; nvidia-smi 2>&1 || echo "nvidia-smi failed"; echo "===== nproc: $(nproc)"; } >> "$ENV_TXT"
fi

# 2. The benchmark. Its own deadline is the budget minus what the install took; `timeout` only
#    backs it up (SIGTERM: the driver kills its current part, writes its results and exits).
RUN_MARKER=$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')
LEFT=$(( BUDGET_S - SECONDS - 15 ))
[ "$LEFT" -gt 60 ] || LEFT=60
FTLAUNCH_BENCH_RUN=$RUN_MARKER timeout -k 20 $(( LEFT + 10 )) "$PYTHON" bench/gpu_bench.py --out "$OUT_DIR" \
  --budget-s "$LEFT" "${SITE_ARGS[@]}" "${ARGS[@]}"
CODE=$?
"$PYTHON" bench/gpu_bench.py --sweep "$RUN_MARKER" 2> /dev/null  # nothing of the run may keep the GPU

# 3. The summary, on stdout too.
echo
echo "==================== summary ($OUT_DIR/summary.md) ===================="
cat "$OUT_DIR/summary.md" 2> /dev/null || echo "gpu.sh: no summary was written (exit $CODE)"
echo "gpu.sh: exit $CODE after ${SECONDS} s; files: $(ls "$OUT_DIR" | tr '\n' ' ')"
exit "$CODE"
