#!/usr/bin/env bash
# Stop the daemons tests/cluster/slurm_up.sh started, by the pids they recorded (never by name).
# Jobs still queued are cancelled first. State and configuration stay for the next slurm_up.sh.
set -uo pipefail

STATE=${PEERLAB_SLURM_STATE:-/var/lib/peerlab-slurm}

[ "$(id -u)" = 0 ] || { echo "slurm_down: needs root" >&2; exit 3; }
command -v scancel >/dev/null 2>&1 && scancel --quiet --full -u root >/dev/null 2>&1 || true

stop() {  # stop <pid file> <name>: TERM, wait up to 10 s, then KILL
    local file=$1 name=$2 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
        echo "slurm_down: stopped $name ($pid)"
    fi
    rm -f "$file"
}

stop "$STATE/slurmd.pid" slurmd
stop "$STATE/slurmctld.pid" slurmctld
stop "$STATE/slurmdbd.pid" slurmdbd
stop "$STATE/mysql/mariadb.pid" mariadbd
stop /run/munge/munged.pid munged
exit 0
