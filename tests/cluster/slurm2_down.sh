#!/usr/bin/env bash
# Stop and remove what tests/cluster/slurm2_up.sh made: every process of the two node namespaces
# (their slurmd and job steps), slurmctld, slurmdbd, mariadbd and munged by their pid files (never
# by name), the namespaces and the bridge. State (job ids, accounting) stays for the next bring-up.
#   sudo tests/cluster/slurm2_down.sh          # everything
#   sudo tests/cluster/slurm2_down.sh kill 1   # a node failure: SIGKILL every process of node1
set -uo pipefail
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_slurm_lib.sh"  # stop, slurm_common_conf

STATE=${PEERLAB_SLURM2_STATE:-/var/lib/peerlab-slurm2}
export SLURM_CONF=$STATE/etc/slurm.conf

[ "$(id -u)" = 0 ] || { echo "slurm2_down: needs root" >&2; exit 3; }

kill_node() {  # every process whose network namespace is mnN
    local pids
    pids=$(ip netns pids "mn$1" 2>/dev/null | tr '\n' ' ')
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
    rm -f "$STATE/run/slurmd.node$1.pid"
    return 0
}

if [ "${1:-}" = kill ]; then
    kill_node "$2"
    exit 0
fi

[ -f "$SLURM_CONF" ] && scancel --quiet --full -u root >/dev/null 2>&1 || true


for n in 1 2; do kill_node "$n"; done
stop "$STATE/run/slurmctld.pid" slurmctld
stop "$STATE/run/slurmdbd.pid" slurmdbd
stop "$STATE/mysql/mariadb.pid" mariadbd
stop "$STATE/munge/munged.pid" munged
for n in 1 2; do ip netns del "mn$n" 2>/dev/null; done
ip link del mnbr0 2>/dev/null
exit 0
