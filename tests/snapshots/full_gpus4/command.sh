#!/usr/bin/env bash
# Rendered by ftlaunch: ftlaunch full --gpus 4 --dry-run --output <RUN>
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
exec accelerate launch --config_file <RUN>/accelerate.yaml -m launcher.rank.train --run-dir <RUN>
