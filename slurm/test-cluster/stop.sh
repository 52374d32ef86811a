#!/usr/bin/env bash
# Stop the local SLURM test cluster started by start.sh: cancel all jobs, stop
# slurmctld and both slurmd, remove leftover slurmstepd of this cluster, and stop
# munged if start.sh started it.  Safe to run when nothing is running.
#
#   FTLAUNCH_SLURM_STATE   state dir used by start.sh (default /tmp/ftlaunch-slurm)
#   --keep-munge           leave munged running (used by start.sh on restart)
set -uo pipefail

STATE="${FTLAUNCH_SLURM_STATE:-/tmp/ftlaunch-slurm}"
KEEP_MUNGE=0
[ "${1:-}" = "--keep-munge" ] && KEEP_MUNGE=1

log() { echo "stop.sh: $*"; }
[ "$(id -u)" -eq 0 ] || { echo "stop.sh: error: must run as root" >&2; exit 1; }

# pid from a pid file, only if it is alive and runs the expected program
pid_of() {
    local f="$1" prog="$2" pid
    [ -s "$f" ] || return 1
    pid="$(cat "$f" 2>/dev/null)"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    case "$(readlink "/proc/$pid/exe" 2>/dev/null)" in *"$prog"*) echo "$pid" ;; *) return 1 ;; esac
}

pids=()
p="$(pid_of "$STATE/slurmctld.pid" slurmctld)" && pids+=("$p")
for n in node1 node2; do
    p="$(pid_of "$STATE/slurmd-$n.pid" slurmd)" && pids+=("$p")
done

running() {  # alive and not a zombie
    local st
    st="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
    case "$st" in Z*) return 1 ;; esac
}

wait_gone() {  # wait_gone SECONDS PID...
    local deadline=$((SECONDS + $1)) p alive
    shift
    while :; do
        alive=0
        for p in "$@"; do running "$p" && alive=1; done
        [ "$alive" = 0 ] && return 0
        [ "$SECONDS" -ge "$deadline" ] && return 1
        sleep 0.5
    done
}

if pid_of "$STATE/slurmctld.pid" slurmctld >/dev/null; then
    jobs="$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u)"
    if [ -n "$jobs" ]; then
        log "cancelling jobs: ${jobs//$'\n'/ }"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null
        deadline=$((SECONDS + 20))
        while [ -n "$(timeout 10 squeue -h -o %A 2>/dev/null)" ] && [ "$SECONDS" -lt "$deadline" ]; do
            sleep 0.5
        done
    fi
    timeout 10 scontrol shutdown >/dev/null 2>&1
fi

if [ "${#pids[@]}" -gt 0 ]; then
    if ! wait_gone 15 "${pids[@]}"; then
        kill -TERM "${pids[@]}" 2>/dev/null
        wait_gone 10 "${pids[@]}" || { kill -KILL "${pids[@]}" 2>/dev/null; wait_gone 5 "${pids[@]}"; }
    fi
fi

# Fallback: slurmstepd processes of this cluster (they keep the slurmd log in
# $STATE/log open) and everything below them.
stepds=()
for d in /proc/[0-9]*; do
    case "$(readlink "$d/exe" 2>/dev/null)" in *slurmstepd*) ;; *) continue ;; esac
    for fd in "$d"/fd/*; do
        case "$(readlink "$fd" 2>/dev/null)" in "$STATE"/*) stepds+=("${d#/proc/}"); break ;; esac
    done
done
if [ "${#stepds[@]}" -gt 0 ]; then
    victims=("${stepds[@]}")
    frontier=("${stepds[@]}")
    while [ "${#frontier[@]}" -gt 0 ]; do
        mapfile -t frontier < <(ps -e -o pid=,ppid= | awk -v s=" ${frontier[*]} " 'index(s, " " $2 " ") {print $1}')
        victims+=("${frontier[@]}")
    done
    log "killing leftover slurmstepd and their children: ${victims[*]}"
    kill -KILL "${victims[@]}" 2>/dev/null
fi

if [ "$KEEP_MUNGE" = 0 ] && p="$(pid_of "$STATE/munged.pid" munged)"; then
    kill -TERM "$p" 2>/dev/null
    wait_gone 10 "$p" || kill -KILL "$p" 2>/dev/null
    rm -f "$STATE/munged.pid"
fi

rm -f "$STATE/slurmctld.pid" "$STATE"/slurmd-*.pid
log "stopped (state dir $STATE kept for logs)"
