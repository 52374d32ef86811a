#!/usr/bin/env bash
# One task of a sweep's SLURM job array. `ftlaunch sweep full|lora ... --slurm` submits it (not meant
# for sbatch by hand) as `sbatch --array=0-(N-1)%K --nodes=M slurm/sweep.sh`; task i runs point i of
# SWEEP/sweep.json through slurm/common.sh, exactly as slurm/full.sh or slurm/lora.sh runs one run:
# render, one launcher per node, and on a stop signal a checkpoint, `scontrol requeue` of this task
# alone (its own job id) and a resume from its own run directory.
#
# Set by `ftlaunch sweep`: FTLAUNCH_METHOD (full | lora), FTLAUNCH_SWEEP (the sweep directory: the
# task's arguments are in SWEEP/slurm/<i>.args, NUL-separated), FTLAUNCH_REPO (the ftlaunch checkout).
# The task records how it stands in SWEEP/status/<i>.json for `ftlaunch report SWEEP`.
#
#SBATCH --job-name=ftlaunch-sweep
#SBATCH --ntasks-per-node=1
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append

: "${FTLAUNCH_SWEEP:?slurm/sweep.sh is submitted by ftlaunch sweep --slurm (FTLAUNCH_SWEEP is not set)}"
: "${FTLAUNCH_REPO:?slurm/sweep.sh is submitted by ftlaunch sweep --slurm (FTLAUNCH_REPO is not set)}"
: "${SLURM_ARRAY_TASK_ID:?slurm/sweep.sh runs as a job array task (submit it with ftlaunch sweep --slurm)}"

sweep_status() {  # sweep_status STATE EXIT_CODE: SWEEP/status/<i>.json, replaced in one rename
    local file="$FTLAUNCH_SWEEP/status/$SLURM_ARRAY_TASK_ID.json"
    mkdir -p "${file%/*}"
    printf '{"state": "%s", "exit_code": %s, "time": %s, "host": "%s", "job": "%s", "restarts": %s, "log": "%s"}\n' \
        "$1" "$2" "$(date +%s)" "$(hostname)" "${SLURM_JOB_ID:-}" "${SLURM_RESTART_COUNT:-0}" \
        "$FTLAUNCH_SWEEP/slurm/logs/${SLURM_ARRAY_JOB_ID:-}_${SLURM_ARRAY_TASK_ID}.out" >"$file.$$" &&
        mv -f "$file.$$" "$file"
}
sweep_status running null
trap 'sweep_status ended $?' EXIT

task_args=()
mapfile -d '' -t task_args <"$FTLAUNCH_SWEEP/slurm/$SLURM_ARRAY_TASK_ID.args" || exit 2
# shellcheck source=slurm/common.sh
source "$FTLAUNCH_REPO/slurm/common.sh" "${task_args[@]}"
