#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for tests/cluster/test_slurm.py.
#
#   sudo tests/cluster/slurm_up.sh     # install if missing, configure, start, wait until idle
#   sudo tests/cluster/slurm_up.sh --install-only   # install if missing, nothing more
#   sudo tests/cluster/slurm_down.sh   # stop every daemon this script started (by pid)
#
# Installs Debian's slurmctld, slurmd, slurm-client, slurmdbd, munge and mariadb-server when
# missing (root and apt-get needed), writes /etc/slurm/slurm.conf and slurmdbd.conf for this machine
# (marked as ours; a slurm.conf that is not ours is never overwritten), and starts munged,
# mariadbd, slurmdbd, slurmctld and slurmd by hand (there is no systemd). Settings that were
# verified on this machine kind (docs/platform.md):
#   - no cgroups: proctrack/linuxproc, task/none, jobacct_gather/none; select/cons_tres by CPU;
#   - fast requeue: AuthInfo=cred_expire=5 and bf_interval=1,sched_interval=1 (else ~2 minutes);
#   - partitions `low` (default, GraceTime=10) and `high`; a high job preempts a low one by
#     requeue, and preempt_send_user_signal makes Slurm send the job's --signal (USR2) first;
#   - job accounting through slurmdbd + a socket-only MariaDB, so that sacct (and submitit,
#     which reads job states with sacct) works.
# State (slurmctld state, logs, pid files) lives in $PEERLAB_SLURM_STATE (default
# /var/lib/peerlab-slurm); it persists so job ids keep increasing and sacct never sees an old job
# under a new job's id. Exit codes: 0 up, 3 cannot run here (the message says why), 1 failed.
set -euo pipefail
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_slurm_lib.sh"  # stop, slurm_common_conf

STATE=${PEERLAB_SLURM_STATE:-/var/lib/peerlab-slurm}
MARK="# peer-lab test cluster (tests/cluster/slurm_up.sh)"
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf

cannot() { echo "slurm_up: cannot run here: $*" >&2; exit 3; }
die() { echo "slurm_up: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || cannot "needs root (it installs packages and starts daemons)"

need=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client slurmdbd:slurmdbd munged:munge mariadbd:mariadb-server; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || cannot "missing ${need[*]} and no apt-get to install them"
    echo "slurm_up: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || die "apt-get install ${need[*]} failed"
fi
# `slurm_up.sh --install-only`: the packages and nothing else (the two-node cluster, slurm2_up.sh,
# needs them but not this cluster).
[ "${1:-}" = "--install-only" ] && exit 0

if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    cannot "$CONF exists and was not written by this script; refusing to replace a real Slurm configuration"
fi

host=$(hostname -s)
mkdir -p "$STATE"/ctld "$STATE"/spool "$STATE"/log /etc/slurm /run/munge /run/mysqld
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Node topology from the machine itself; memory a little under what slurmd sees.
node=$(slurmd -C | head -1)
cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node")
mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
mem=$((mem * 9 / 10))

cat >"$CONF" <<EOF
$MARK
ClusterName=peerlab
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
$(slurm_common_conf)
KillWait=10
MinJobAge=300
InactiveLimit=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=low Nodes=$host Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=10 PreemptMode=REQUEUE
PartitionName=high Nodes=$host MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF

cat >"$DBD_CONF" <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=peerlab_slurm_acct
EOF
chmod 600 "$DBD_CONF"

# munge: its key comes with the package; it runs as user munge.
if ! alive /run/munge/munged.pid; then
    chown munge:munge /run/munge
    su -s /bin/sh munge -c "/usr/sbin/munged" || die "munged did not start"
fi

# MariaDB on its socket only; root connects through unix_socket authentication.
if ! alive "$STATE/mysql/mariadb.pid"; then
    mkdir -p "$STATE/mysql"
    chown mysql:mysql /run/mysqld "$STATE/mysql"
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null || die "mariadb-install-db failed"
    rm -f /run/mysqld/mysqld.sock
    mariadbd --user=mysql --skip-networking --socket=/run/mysqld/mysqld.sock \
        --pid-file="$STATE/mysql/mariadb.pid" --log-error="$STATE/mysql/mariadb.log" >/dev/null 2>&1 &
    for _ in $(seq 200); do mariadb-admin --socket=/run/mysqld/mysqld.sock ping >/dev/null 2>&1 && break; sleep 0.1; done
    mariadb-admin --socket=/run/mysqld/mysqld.sock ping >/dev/null 2>&1 || die "mariadbd did not start (see $STATE/mysql/mariadb.log)"
fi

if ! alive "$STATE/slurmdbd.pid"; then
    slurmdbd || die "slurmdbd did not start (see $STATE/log/slurmdbd.log)"
    for _ in $(seq 100); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.1; done
fi
sacctmgr -n list cluster format=cluster 2>/dev/null | grep -qw peerlab || sacctmgr -i add cluster peerlab >/dev/null

if ! alive "$STATE/slurmctld.pid"; then
    slurmctld || die "slurmctld did not start (see $STATE/log/slurmctld.log)"
else
    scontrol reconfigure >/dev/null 2>&1 || true
fi
if ! alive "$STATE/slurmd.pid"; then
    slurmd || die "slurmd did not start (see $STATE/log/slurmd.log)"
fi

for _ in $(seq 300); do
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null | head -1 || true)
    case "$state" in idle|mixed|allocated) break ;; esac
    case "$state" in down*|drain*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;; esac
    sleep 0.1
done
case "$state" in idle|mixed|allocated) ;; *) die "node $host is '$state', not idle (see $STATE/log/)" ;; esac
sacct -n -X -j 1 >/dev/null 2>&1 || die "sacct does not work (see $STATE/log/slurmdbd.log)"
echo "slurm_up: cluster peerlab up: node $host ($cpus CPUs) $state; partitions low (default), high"
