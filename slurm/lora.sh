#!/usr/bin/env bash
# LoRA fine-tuning (adapters on q and v) of FLAN-T5 with ftlaunch across SLURM nodes: one launcher per node,
# --gpus ranks per node, preemption-safe (checkpoint, requeue, resume). Submit from the repo root
# with ftlaunch's environment active (sbatch passes it on); arguments go to `ftlaunch lora`:
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
# sbatch runs a copy of this script from its spool directory: find slurm/common.sh from the
# submit directory (the repo root), or FTLAUNCH_REPO.
FTLAUNCH_REPO="${FTLAUNCH_REPO:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}"
if [ ! -f "$FTLAUNCH_REPO/slurm/common.sh" ]; then
    echo "error: $FTLAUNCH_REPO/slurm/common.sh not found: submit from the ftlaunch repo root or set FTLAUNCH_REPO" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$FTLAUNCH_REPO/slurm/common.sh" "$@"
