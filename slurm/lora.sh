#!/usr/bin/env bash
# LoRA fine-tuning (adapters on q and v) of FLAN-T5 with ftlaunch across SLURM nodes: one launcher per node,
# --gpus ranks per node, preemption-safe (checkpoint, requeue, resume). Submit from any directory
# (runs go under it) with ftlaunch's environment active (sbatch passes it on); arguments go to `ftlaunch lora`:
#
#   sbatch slurm/lora.sh                                    # 2 nodes x 8 GPUs, recipes/lora.yaml
#   sbatch --nodes=4 --gres=gpu:4 slurm/lora.sh --model google/flan-t5-base
#   FTLAUNCH_OUTPUT=runs/my-run sbatch slurm/lora.sh --set train.epochs=3
#   sbatch --nodes=2 slurm/lora.sh --model tiny-t5 --data sample --cpu --gpus 1   # smoke test
#
# Environment: FTLAUNCH_OUTPUT (run dir, default runs/lora-slurm-<job id>), FTLAUNCH_RECIPE,
# FTLAUNCH_GPUS_PER_NODE, FTLAUNCH_VENV, FTLAUNCH_SETUP, FTLAUNCH_MAX_REQUEUES: see slurm/README.md.
#
#SBATCH --job-name=ftlaunch-lora
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

FTLAUNCH_METHOD=lora
# sbatch runs a copy of this script from its spool directory: find slurm/common.sh beside the
# script that was submitted (scontrol knows its path), else in the submit directory, else in the
# installed ftlaunch (an editable install's checkout). FTLAUNCH_REPO=/path/to/ftlaunch overrides.
ftlaunch_common() {
    local dir python
    if [ -n "${FTLAUNCH_REPO:-}" ]; then echo "$FTLAUNCH_REPO/slurm/common.sh"; return; fi
    dir="$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=//p' | head -n 1)"
    for dir in "${dir%/*}" "${SLURM_SUBMIT_DIR:-.}/slurm" "$(dirname "$0")"; do
        if [ -f "$dir/common.sh" ]; then echo "$dir/common.sh"; return; fi
    done
    python="$(sed -n '1s/^#! *//p' "$(command -v ftlaunch 2>/dev/null)" 2>/dev/null)"
    dir="$(${python:-python3} -c 'from launcher.core.paths import PACKAGE_DIR; print(PACKAGE_DIR.parent)' 2>/dev/null)"
    echo "${dir:-?}/slurm/common.sh"
}
FTLAUNCH_COMMON="$(ftlaunch_common)"
if [ ! -f "$FTLAUNCH_COMMON" ]; then
    echo "error: slurm/common.sh of ftlaunch not found (tried ${FTLAUNCH_COMMON}): activate ftlaunch's environment before sbatch, or set FTLAUNCH_REPO=/path/to/ftlaunch" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$FTLAUNCH_COMMON" "$@"
