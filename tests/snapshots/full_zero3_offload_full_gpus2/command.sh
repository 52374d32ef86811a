#!/usr/bin/env bash
# Rendered by ftlaunch: ftlaunch full --zero 3 --offload full --gpus 2 --dry-run --output <RUN>
# Run it on every node (one launcher per node); each starts its node's ranks.
set -euo pipefail
# Only the ranks handle SIGUSR1 (checkpoint and exit); the launcher ignores it.
trap '' USR1
exec accelerate launch --config_file <RUN>/accelerate.yaml -m launcher.train --run-dir <RUN>
