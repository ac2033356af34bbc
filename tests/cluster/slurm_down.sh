#!/usr/bin/env bash
# Stop the daemons tests/cluster/slurm_up.sh started, by the pids they recorded (never by name).
# Jobs still queued are cancelled first. State and configuration stay for the next slurm_up.sh.
set -uo pipefail
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_slurm_lib.sh"  # stop, slurm_common_conf

STATE=${PEERLAB_SLURM_STATE:-/var/lib/peerlab-slurm}

[ "$(id -u)" = 0 ] || { echo "slurm_down: needs root" >&2; exit 3; }
command -v scancel >/dev/null 2>&1 && scancel --quiet --full -u root >/dev/null 2>&1 || true


stop "$STATE/slurmd.pid" slurmd
stop "$STATE/slurmctld.pid" slurmctld
stop "$STATE/slurmdbd.pid" slurmdbd
stop "$STATE/mysql/mariadb.pid" mariadbd
stop /run/munge/munged.pid munged
exit 0
