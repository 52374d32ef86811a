#!/usr/bin/env bash
# Full fine-tuning (every weight) of FLAN-T5 with ftlaunch across SLURM nodes: one launcher per node,
# --gpus ranks per node, preemption-safe (checkpoint, requeue, resume). Submit from the repo root
# with ftlaunch's environment active (sbatch passes it on); arguments go to `ftlaunch full`:
#
#   sbatch slurm/full.sh                                    # 2 nodes x 8 GPUs, recipes/full.yaml
#   sbatch --nodes=4 --gres=gpu:4 slurm/full.sh --zero 3
#   FTLAUNCH_OUTPUT=runs/my-run sbatch slurm/full.sh --set train.epochs=3
#   sbatch --nodes=2 slurm/full.sh --model tiny-t5 --data sample --cpu --gpus 1   # smoke test
#
# Environment: FTLAUNCH_OUTPUT (run dir, default runs/full-slurm-<job id>), FTLAUNCH_RECIPE,
# FTLAUNCH_GPUS_PER_NODE, FTLAUNCH_VENV, FTLAUNCH_SETUP, FTLAUNCH_MAX_REQUEUES: see slurm/README.md.
#
#SBATCH --job-name=ftlaunch-full
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

FTLAUNCH_METHOD=full
# sbatch runs a copy of this script from its spool directory: find slurm/common.sh from the
# submit directory (the repo root), or FTLAUNCH_REPO.
FTLAUNCH_REPO="${FTLAUNCH_REPO:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}"
if [ ! -f "$FTLAUNCH_REPO/slurm/common.sh" ]; then
    echo "error: $FTLAUNCH_REPO/slurm/common.sh not found: submit from the ftlaunch repo root or set FTLAUNCH_REPO" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$FTLAUNCH_REPO/slurm/common.sh" "$@"
