#!/usr/bin/env bash
# Rendered by ftlaunch: ftlaunch lora --gpus 8 --nodes 2 --zero 3 --offload optimizer --dry-run --output <RUN>
# Run it on every node (one launcher per node); each starts its node's ranks.
set -euo pipefail
# This file belongs to the run in its --run-dir: a copied or moved run renders its own.
run_dir=<RUN>
here="$(cd "$(dirname "${BASH_SOURCE[0]:-$run_dir/command.sh}")" && pwd -P)"
if [ "$here" != "$(cd "$run_dir" 2>/dev/null && pwd -P)" ]; then
    echo "error: $here/command.sh belongs to the run in $run_dir; render one for this folder with the same ftlaunch command and --output $here --resume auto" >&2
    exit 2
fi
# Only the ranks handle SIGUSR1 (checkpoint and exit); the launcher ignores it.
trap '' USR1
# ZeRO-Offload: the optimizer steps on the CPU; 8 local rank(s) share this node's cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / 8 > 1 ? $(nproc) / 8 : 1 ))}"
machine_rank="${FTLAUNCH_MACHINE_RANK:-${SLURM_NODEID:-}}"
case "$machine_rank" in
    '') echo "error: no machine rank for this node: set FTLAUNCH_MACHINE_RANK=R (0..1) on each node, pass --machine-rank R to ftlaunch, or run under SLURM (srun sets SLURM_NODEID)" >&2; exit 2 ;;
    *[!0-9]*) echo "error: machine rank '$machine_rank' is not a number (0..1)" >&2; exit 2 ;;
esac
[ "$machine_rank" -lt 2 ] || { echo "error: machine rank $machine_rank is out of range for 2 nodes (0..1)" >&2; exit 2; }
main_address="${FTLAUNCH_MAIN_ADDRESS:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:?multi-node runs need --main-address or a SLURM allocation}" | head -n 1)}"
exec accelerate launch --config_file <RUN>/accelerate.yaml --machine_rank "$machine_rank" --main_process_ip "$main_address" --main_process_port "${FTLAUNCH_MAIN_PORT:-$((20000 + ${SLURM_JOB_ID:-9500} % 20000))}" -m launcher.rank.train --run-dir <RUN>
