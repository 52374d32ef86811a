#!/usr/bin/env bash
# Rendered by ftlaunch: ftlaunch full --gpus 4 --dry-run --output <RUN>
# Run it on every node (one launcher per node); each starts its node's ranks.
set -euo pipefail
# Only the ranks handle SIGUSR1 (checkpoint and exit); the launcher ignores it.
trap '' USR1
exec accelerate launch --config_file <RUN>/accelerate.yaml -m launcher.rank.train --run-dir <RUN>
