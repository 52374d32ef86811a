# shellcheck shell=bash
# Shared body of slurm/full.sh and slurm/lora.sh: sourced by them with FTLAUNCH_METHOD set
# (full | lora) and the job script's arguments, which are passed on to `ftlaunch`.
#
# What one job does (see slurm/README.md):
#   1. on the batch host, render the run once:
#        ftlaunch METHOD --nodes $SLURM_NNODES --gpus N --output RUN --resume auto "$@" --dry-run
#      and print the rendered accelerate.yaml / deepspeed.json / command.sh into the job log;
#   2. srun one launcher per node: `ftlaunch supervise RUN`, which runs RUN/command.sh (it takes its
#      machine rank from $SLURM_NODEID on each node, the main node from the job's node list, the port
#      from the job id) with per-rank logs in RUN/logs/ and a failure summary;
#   3. preemption / time limit: SLURM signals this batch shell (--signal=B:USR1@300); the
#      signal is forwarded to srun, which delivers it to every process of the job step; the
#      ranks checkpoint at the next optimizer step, write RUN/INTERRUPTED and exit; this shell
#      then requeues the job (`scontrol requeue`), which keeps its job id, so the requeued job
#      renders the same RUN with --resume auto and continues from that checkpoint.
#   A failure without the INTERRUPTED marker is never requeued: the job fails with its exit code.
#   Every requeue follows a checkpoint written by this run (progress), and at most
#   FTLAUNCH_MAX_REQUEUES (20) restarts happen.

set -uo pipefail

ftl_log() { echo "[ftlaunch-slurm $(date +%H:%M:%S)] $*"; }
ftl_die() { echo "[ftlaunch-slurm $(date +%H:%M:%S)] error: $1" >&2; exit "${2:-2}"; }

# ---------------------------------------------------------------- where we are
: "${FTLAUNCH_METHOD:?slurm/common.sh is sourced by slurm/full.sh or slurm/lora.sh}"
[ -n "${SLURM_JOB_ID:-}" ] || ftl_die "run this with sbatch (no SLURM_JOB_ID): sbatch slurm/${FTLAUNCH_METHOD}.sh [ftlaunch options]"
# Accept SLURM_NNODES from older/newer Slurm alike.
NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
RESTARTS="${SLURM_RESTART_COUNT:-0}"
MAX_REQUEUES="${FTLAUNCH_MAX_REQUEUES:-20}"

# Optional environment setup before ftlaunch is looked up (a venv, or any file to source).
if [ -n "${FTLAUNCH_VENV:-}" ]; then
    # shellcheck disable=SC1091
    . "$FTLAUNCH_VENV/bin/activate" || ftl_die "FTLAUNCH_VENV=$FTLAUNCH_VENV has no bin/activate"
fi
if [ -n "${FTLAUNCH_SETUP:-}" ]; then
    # shellcheck disable=SC1090
    . "$FTLAUNCH_SETUP" || ftl_die "sourcing FTLAUNCH_SETUP=$FTLAUNCH_SETUP failed"
fi
command -v ftlaunch >/dev/null ||
    ftl_die "ftlaunch is not on PATH: activate its environment before sbatch (sbatch passes your environment on), or set FTLAUNCH_VENV=/path/to/venv"

# ---------------------------------------------------------------- options
# GPUs (ranks) per node: FTLAUNCH_GPUS_PER_NODE, else what SLURM allocated on this node
# (--gres=gpu:N / --gpus-per-node=N), else 8. A --gpus among the job's arguments wins: it
# replaces this count (rendered once, and logged as the number of ranks that will run).
gpus_from_slurm() {
    local value="${SLURM_GPUS_ON_NODE:-}"
    if [ -z "$value" ] && [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then
        value="${SLURM_GPUS_PER_NODE##*:}"  # "8", "gpu:8" or "a100:8"
    fi
    case "$value" in '' | *[!0-9]* | 0) echo 8 ;; *) echo "$value" ;; esac
}
GPUS_PER_NODE="${FTLAUNCH_GPUS_PER_NODE:-$(gpus_from_slurm)}"

# The run directory must stay the same when the job is requeued: the job id does, so the
# default is runs/<method>-slurm-<job id> under the submit directory.
RUN="${FTLAUNCH_OUTPUT:-runs/${FTLAUNCH_METHOD}-slurm-${SLURM_JOB_ID}}"
DRY_RUN=0
CPU=0
JOB_ARGS=""
[ "$#" -gt 0 ] && JOB_ARGS="$(printf ' %q' "$@")"
# The job's arguments, checked; a requeued job drops --resume PATH (it must continue from the
# newest checkpoint: our --resume auto).
args=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --output) [ "$#" -ge 2 ] && RUN="$2"; args+=("$1" "${2:-}"); shift ;;  # ftlaunch takes the last one
        --output=*) RUN="${1#--output=}"; args+=("$1") ;;
        --dry-run) DRY_RUN=1 ;;  # added below in any case
        --gpus) if [ "$#" -ge 2 ]; then GPUS_PER_NODE="$2"; shift; else args+=("$1"); fi ;;  # ftlaunch refuses a bare --gpus
        --gpus=*) GPUS_PER_NODE="${1#--gpus=}" ;;
        --cpu) CPU=1; args+=("$1") ;;
        --nodes | --nodes=*)
            value="${1#--nodes}"; value="${value#=}"
            if [ -z "$value" ]; then value="${2:-}"; shift; fi
            [ "$value" = "$NNODES" ] ||
                ftl_die "--nodes $value but the job has $NNODES node(s): set the node count with sbatch --nodes=N" ;;
        --resume | --resume=*)
            if [ "$1" = --resume ]; then value="${2:-}"; shift; else value="${1#--resume=}"; fi
            if [ "$RESTARTS" -gt 0 ]; then
                [ "$value" = auto ] || ftl_log "restart ${RESTARTS}: ignoring --resume ${value}; continuing from the newest checkpoint (--resume auto)"
            else
                args+=(--resume "$value")
            fi ;;
        --overwrite)
            ftl_die "--overwrite: the job scripts always continue the run in the output dir (--resume auto, so that a requeued job resumes); delete $RUN or set another FTLAUNCH_OUTPUT" ;;
        *) args+=("$1") ;;
    esac
    shift
done
case "$RUN" in /*) ;; *) RUN="$PWD/$RUN" ;; esac

ftl_log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-?}) SLURM_RESTART_COUNT=${RESTARTS} on ${NNODES} node(s): ${SLURM_JOB_NODELIST:-?}"
per_node="${GPUS_PER_NODE} GPU(s) per node"
[ "$CPU" = 1 ] && per_node="${GPUS_PER_NODE} CPU rank(s) per node (--cpu)"
ftl_log "method ${FTLAUNCH_METHOD}, ${per_node}, run dir ${RUN}, cwd ${PWD}"

# ---------------------------------------------------------------- signals (batch shell)
# SLURM sends --signal=B:USR1@N to this shell only. It is forwarded to srun, which hands
# USR1 on to every process of the job step (the ranks checkpoint; the launchers ignore it).
# SIGTERM (scancel, preemption, time limit) is not forwarded as TERM: srun answers a TERM by
# SIGKILLing the tasks, so the ranks get USR1 instead (SLURM also TERMs the step itself).
STOP_SIGNAL=""
SIGNALS_SEEN=0
SRUN_PID=""
RESENDER_PID=""
RESEND_EVERY="${FTLAUNCH_SIGNAL_RESEND:-60}"
start_resender() {
    # Ranks that were still starting up (before their handler was installed) ignore USR1:
    # send it again every RESEND_EVERY seconds until srun is gone. Harmless after training.
    [ -n "$RESENDER_PID" ] && return
    (
        trap 'kill "$nap" 2>/dev/null; exit 0' TERM
        while :; do
            sleep "$RESEND_EVERY" & nap=$!
            wait "$nap"
            kill -USR1 "$SRUN_PID" 2>/dev/null || exit 0
        done
    ) &
    RESENDER_PID=$!
}
ENDED_BY=""  # cancel: a user's scancel; requeue: an outside `scontrol requeue` (SLURM requeues it)
why_ended() {  # why SLURM ends this job now, from `scontrol show job`: cancel, requeue, or nothing
    local info restarts
    info="$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null)" || return 0
    case "$info" in
        *"JobState=CANCELLED "*) echo cancel ;;
        *"JobState=COMPLETING Reason=None "*)  # preemption and the time limit give a Reason
            restarts="${info##*Restarts=}"
            restarts="${restarts%% *}"
            if [ "$restarts" -gt "$RESTARTS" ] 2>/dev/null; then echo requeue; else echo cancel; fi ;;
    esac
}
forward_stop() {
    local sig="$1"
    SIGNALS_SEEN=$((SIGNALS_SEEN + 1))
    STOP_SIGNAL="${STOP_SIGNAL:-$sig}"
    # SIGTERM also comes with preemption and the time limit (Reason=Preempted/TimeLimit): those
    # requeue. A user's own scancel ends the job; an outside `scontrol requeue` has SLURM requeue
    # it (its restart count is already up). The ranks checkpoint either way if SLURM's KillWait
    # leaves them the time.
    if [ "$sig" = TERM ] && [ -z "$ENDED_BY" ]; then
        ENDED_BY="$(why_ended)"
        case "$ENDED_BY" in
            cancel) ftl_log "job ${SLURM_JOB_ID} cancelled (scancel): it ends without a requeue" ;;
            requeue) ftl_log "job ${SLURM_JOB_ID} requeued by scontrol requeue: it resumes from the newest checkpoint" ;;
        esac
    fi
    if [ -n "$SRUN_PID" ]; then
        ftl_log "got SIG${sig}: forwarding USR1 to the ranks (srun pid ${SRUN_PID}); they checkpoint at the next optimizer step"
        kill -USR1 "$SRUN_PID" 2>/dev/null || true
        start_resender
    else
        ftl_log "got SIG${sig} before the ranks started"
    fi
}
trap 'forward_stop USR1' USR1
trap 'forward_stop TERM' TERM

# ---------------------------------------------------------------- render once
render=(ftlaunch "$FTLAUNCH_METHOD" --nodes "$NNODES" --gpus "$GPUS_PER_NODE" --output "$RUN" --resume auto)
[ -n "${FTLAUNCH_RECIPE:-}" ] && render+=(--recipe "$FTLAUNCH_RECIPE")
render+=(${args[@]+"${args[@]}"} --dry-run)  # the job's arguments come later: theirs win (--recipe, --resume)
ftl_log "render: ${render[*]}"
"${render[@]}"
rc=$?
[ "$rc" -eq 0 ] || ftl_die "rendering failed (exit $rc); nothing launched" "$rc"
for file in accelerate.yaml deepspeed.json command.sh; do
    if [ -f "$RUN/$file" ]; then
        echo "----- $RUN/$file"
        cat "$RUN/$file"
    fi
done
echo "-----"
if [ "$DRY_RUN" = 1 ]; then
    ftl_log "--dry-run: rendered only, nothing launched"
    exit 0
fi

requeue() {  # requeue REASON: continue this run in a requeued job (same job id, same RUN)
    if [ "$ENDED_BY" = cancel ]; then
        ftl_log "$1; the job was cancelled (scancel): not requeued. Continue it later with:"
        ftl_log "  FTLAUNCH_OUTPUT=$RUN sbatch --nodes=$NNODES slurm/${FTLAUNCH_METHOD}.sh${JOB_ARGS}"
        exit 3
    fi
    if [ "$ENDED_BY" = requeue ]; then
        ftl_log "$1; SLURM requeues job ${SLURM_JOB_ID} itself (scontrol requeue): it resumes from the newest checkpoint in $RUN/checkpoints"
        exit 0
    fi
    if [ "$RESTARTS" -ge "$MAX_REQUEUES" ]; then
        ftl_log "not requeueing: already restarted ${RESTARTS} times (FTLAUNCH_MAX_REQUEUES=${MAX_REQUEUES}); resume by hand:"
        ftl_log "  FTLAUNCH_OUTPUT=$RUN sbatch --nodes=$NNODES slurm/${FTLAUNCH_METHOD}.sh${JOB_ARGS}"
        exit 3
    fi
    ftl_log "$1: requeueing job ${SLURM_JOB_ID} (restart $((RESTARTS + 1))); it resumes from the newest checkpoint in $RUN/checkpoints"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        ftl_log "scontrol requeue failed (job not requeueable? submit with --requeue); resume by hand:"
        ftl_log "  FTLAUNCH_OUTPUT=$RUN sbatch --nodes=$NNODES slurm/${FTLAUNCH_METHOD}.sh${JOB_ARGS}"
        exit 3
    fi
    exit 0
}

if [ -n "$STOP_SIGNAL" ]; then
    # Nothing trained yet, so nothing to checkpoint; requeueing could loop (a --time shorter
    # than the --signal offset signals every run at once). Resubmit instead.
    ftl_log "stopped by SIG${STOP_SIGNAL} before launch (is --time shorter than the --signal=B:USR1@N offset?); not requeued"
    ftl_log "  resubmit: FTLAUNCH_OUTPUT=$RUN sbatch --nodes=$NNODES slurm/${FTLAUNCH_METHOD}.sh${JOB_ARGS}"
    exit 3
fi

# ---------------------------------------------------------------- launch: one launcher per node
# A marker left by an earlier interrupted run must not make a crash of this one look like a
# preemption (that would requeue a failing job forever).
rm -f "$RUN/INTERRUPTED"
latest_before="$(cat "$RUN/checkpoints/latest" 2>/dev/null || true)"

srun_args=(--kill-on-bad-exit=1 --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1)
# srun of Slurm >= 22.05 does not inherit sbatch's --cpus-per-task: without it the launcher
# and all its ranks would be bound to one CPU where task affinity/cgroups are enforced.
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
# In each task: ignore USR1 until ftlaunch's supervisor handles it; say where we are. The supervisor
# runs command.sh (which ignores USR1 in the launcher), keeps the launcher's and each rank's output
# in RUN/logs/, passes signals to the ranks and ends a failure with a summary instead of tracebacks.
task='trap "" USR1
echo "[ftlaunch-slurm] node ${SLURMD_NODENAME:-$(hostname)} SLURM_NODEID ${SLURM_NODEID} of ${SLURM_NNODES}: launching $0/command.sh"
exec ftlaunch supervise "$0"'
ftl_log "launch: srun ${srun_args[*]} ftlaunch supervise $RUN (runs $RUN/command.sh; logs in $RUN/logs/)"
srun "${srun_args[@]}" bash -c "$task" "$RUN" &
SRUN_PID=$!
# A signal that came while srun was starting: srun may not handle USR1 yet, send it later.
[ -n "$STOP_SIGNAL" ] && start_resender

# `wait` returns early (status > 128) when a trapped signal arrives: wait again until srun has
# really exited (bash keeps the status of a reaped background job for the next `wait PID`).
rc=""
while :; do
    seen=$SIGNALS_SEEN
    wait "$SRUN_PID"
    status=$?
    [ -n "$rc" ] && [ "$status" -eq 127 ] && break  # the status was collected before the trap ran
    rc=$status
    [ "$SIGNALS_SEEN" = "$seen" ] && break
done
if [ -n "$RESENDER_PID" ]; then
    kill "$RESENDER_PID" 2>/dev/null
    wait "$RESENDER_PID" 2>/dev/null
fi
ftl_log "srun exited with status $rc"

# ---------------------------------------------------------------- after the run
latest_after="$(cat "$RUN/checkpoints/latest" 2>/dev/null || true)"
if [ -f "$RUN/INTERRUPTED" ]; then
    requeue "ranks checkpointed on a stop signal ($(cat "$RUN/INTERRUPTED"))"
fi
if [ -n "$STOP_SIGNAL" ] && [ "$rc" -ne 0 ] && [ -n "$latest_after" ] && [ "$latest_after" != "$latest_before" ]; then
    # The ranks were stopped after writing a new checkpoint but the marker is missing (a rank
    # can be killed by --kill-on-bad-exit while the main rank writes it): still a preemption.
    requeue "stop signal and a new checkpoint ($latest_after)"
fi
if [ -n "$ENDED_BY" ]; then  # cancelled or requeued from outside: say so, not "training failed"
    requeue "the ranks stopped (srun status $rc; newest checkpoint: ${latest_after:-none})"
fi
if [ "$rc" -ne 0 ]; then
    if [ -n "$STOP_SIGNAL" ]; then
        ftl_log "stopped by SIG${STOP_SIGNAL} without a new checkpoint; not requeued"
    fi
    ftl_die "training failed (srun exit $rc); not requeued. Run dir: $RUN" "$rc"
fi
# srun may end with status 0 although SLURM killed the job step (scancel of a held job, a node
# gone): say done only for a finished run (final/, and the report unless eval.after_training is off).
if [ ! -d "$RUN/final" ] || { [ ! -f "$RUN/report/report.md" ] && ! grep -q '^  after_training: false$' "$RUN/recipe.yaml"; }; then
    ftl_log "the job step ended (srun status $rc) but $RUN is not finished (no final/ or report: stopped from outside?)"
    ftl_log "  newest checkpoint: ${latest_after:-none}; continue it with: FTLAUNCH_OUTPUT=$RUN sbatch --nodes=$NNODES slurm/${FTLAUNCH_METHOD}.sh${JOB_ARGS}"
    exit 1
fi
ftl_log "done: $RUN (final model in $RUN/final, ROUGE report in $RUN/report/report.md)"
exit 0
