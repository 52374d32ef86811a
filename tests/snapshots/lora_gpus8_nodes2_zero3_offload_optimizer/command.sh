#!/usr/bin/env bash
# Rendered by ftlaunch: ftlaunch lora --gpus 8 --nodes 2 --zero 3 --offload optimizer --dry-run --output <RUN>
# Run it on every node (one launcher per node); each starts its node's ranks.
set -euo pipefail
# Only the ranks handle SIGUSR1 (checkpoint and exit); the launcher ignores it.
trap '' USR1
# ZeRO-Offload: the optimizer steps on the CPU; 8 local rank(s) share this node's cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / 8 > 1 ? $(nproc) / 8 : 1 ))}"
main_address="${FTLAUNCH_MAIN_ADDRESS:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:?multi-node runs need --main-address or a SLURM allocation}" | head -n 1)}"
exec accelerate launch --config_file <RUN>/accelerate.yaml --machine_rank "${FTLAUNCH_MACHINE_RANK:-${SLURM_NODEID:-0}}" --main_process_ip "$main_address" --main_process_port "${FTLAUNCH_MAIN_PORT:-$((20000 + ${SLURM_JOB_ID:-9500} % 20000))}" -m launcher.train --run-dir <RUN>
