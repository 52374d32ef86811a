#!/usr/bin/env bash
# Rendered by ftlaunch: ftlaunch full --zero 2 --gpus 2 --cpu --dry-run --output <RUN>
# Run it on every node (one launcher per node); each starts its node's ranks.
set -euo pipefail
# Only the ranks handle SIGUSR1 (checkpoint and exit); the launcher ignores it.
trap '' USR1
# --cpu: ranks are CPU processes (gloo); hide GPUs, real or announced by SLURM.
export CUDA_VISIBLE_DEVICES=""
exec accelerate launch --config_file <RUN>/accelerate.yaml -m launcher.rank.train --run-dir <RUN>
