#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for tests/cluster/test_multinode.py.
#
#   sudo tests/cluster/slurm2_up.sh     # configure, start, wait until both nodes are idle
#   sudo tests/cluster/slurm2_down.sh   # stop and remove everything this script made
#
# Two network namespaces mn1 and mn2 play the nodes node1 (10.250.77.11) and node2
# (10.250.77.12) on a bridge mnbr0 (10.250.77.1) with a private /24 that exists only on this
# machine: no default route and no forwarding, so nothing can leave it. Each node runs a real
# slurmd with its own hostname (a UTS namespace) and its own /etc/hosts (a bind mount in a
# mount namespace), so that a node's name resolves to its bridge address and not to loopback.
# slurmd is started with `nsenter --net` (not `ip netns exec`, which remounts /sys and hides the
# cgroup mounts slurmd looks for). slurmctld, slurmdbd, a socket+loopback MariaDB and munged run
# in the root namespace, each its own instance with its own ports and files under $STATE, so this
# cluster coexists with the single-node one (tests/cluster/slurm_up.sh) and stopping one never
# touches the other. SlurmdTimeout=6 makes a dead node DOWN (and its job requeued) in seconds.
# Run again after a node was killed: it restarts the missing slurmd (and nothing else).
# Exit codes: 0 up, 3 cannot run here (the message says why), 1 failed.
set -euo pipefail
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_slurm_lib.sh"  # stop, slurm_common_conf

STATE=${PEERLAB_SLURM2_STATE:-/var/lib/peerlab-slurm2}
NET=10.250.77
BRIDGE=mnbr0
CONF=$STATE/etc/slurm.conf
export SLURM_CONF=$CONF

cannot() { echo "slurm2_up: cannot run here: $*" >&2; exit 3; }
die() { echo "slurm2_up: $*" >&2; exit 1; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

[ "$(id -u)" = 0 ] || cannot "needs root (network namespaces, daemons)"
for cmd in ip nsenter unshare slurmctld slurmd slurmdbd sbatch munged mariadbd mariadb-install-db; do
    command -v "$cmd" >/dev/null 2>&1 || cannot "$cmd is not installed (tests/cluster/slurm_up.sh installs Slurm, munge and MariaDB)"
done
if ! ip netns list | grep -qw mn1; then
    ip netns add mnprobe 2>/dev/null || cannot "network namespaces are not allowed here (ip netns add failed)"
    ip netns del mnprobe
fi

host=$(hostname -s)
mkdir -p "$STATE"/etc "$STATE"/ctld "$STATE"/log "$STATE"/run "$STATE"/spool "$STATE"/munge "$STATE"/mysql

# ---- network: bridge + one veth per node namespace, addresses only on the bridge
if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
fi
for n in 1 2; do
    if ! ip netns list | grep -qw "mn$n"; then
        ip netns add "mn$n"
        ip link add "mnv$n" type veth peer name mneth netns "mn$n"
        ip link set "mnv$n" master "$BRIDGE" up
        ip -n "mn$n" addr add "$NET.1$n/24" dev mneth
        ip -n "mn$n" link set mneth up
        ip -n "mn$n" link set lo up
    fi
done
cat >"$STATE/etc/hosts" <<EOF
127.0.0.1 localhost
$NET.1 $host
$NET.11 node1
$NET.12 node2
EOF

# ---- munged with its own socket (one munged serves every namespace: a Unix socket is a path)
chown munge:munge "$STATE/munge"
chmod 755 "$STATE/munge"
if ! alive "$STATE/munge/munged.pid"; then
    su -s /bin/sh munge -c "/usr/sbin/munged --socket=$STATE/munge/munge.socket --pid-file=$STATE/munge/munged.pid \
        --log-file=$STATE/munge/munged.log --seed-file=$STATE/munge/munged.seed" || die "munged did not start"
fi

# ---- MariaDB for job accounting (submitit reads job states with sacct): loopback port, own datadir
DB_PORT=16306
if ! alive "$STATE/mysql/mariadb.pid"; then
    chown mysql:mysql "$STATE/mysql"
    if [ ! -d "$STATE/mysql/data/mysql" ]; then
        mkdir -p "$STATE/mysql/data" && chown mysql:mysql "$STATE/mysql/data"
        mariadb-install-db --user=mysql --datadir="$STATE/mysql/data" >/dev/null || die "mariadb-install-db failed"
        fresh_db=1
    fi
    mariadbd --no-defaults --user=mysql --datadir="$STATE/mysql/data" --bind-address=127.0.0.1 --port=$DB_PORT \
        --socket="$STATE/mysql/mysqld.sock" --pid-file="$STATE/mysql/mariadb.pid" \
        --log-error="$STATE/mysql/mariadb.log" >/dev/null 2>&1 &
    for _ in $(seq 200); do mariadb-admin --socket="$STATE/mysql/mysqld.sock" ping >/dev/null 2>&1 && break; sleep 0.1; done
    mariadb-admin --socket="$STATE/mysql/mysqld.sock" ping >/dev/null 2>&1 || die "mariadbd did not start (see $STATE/mysql/mariadb.log)"
    if [ "${fresh_db:-0}" = 1 ]; then
        mariadb --socket="$STATE/mysql/mysqld.sock" -e "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'peerlab';
            GRANT ALL ON peerlab2_acct.* TO 'slurm'@'127.0.0.1';" || die "cannot create the accounting user"
    fi
fi

cat >"$CONF" <<EOF
# peer-lab two-node test cluster (tests/cluster/slurm2_up.sh)
ClusterName=peerlab2
SlurmctldHost=$host($NET.1)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.%n.log
$(slurm_common_conf)
SlurmdParameters=config_overrides
SlurmdTimeout=6
MessageTimeout=5
KillWait=5
MinJobAge=300
InactiveLimit=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=16819
# For slurmdbd connections Slurm takes the munge socket from AccountingStoragePass.
AccountingStoragePass=$STATE/munge/munge.socket
JobCompType=jobcomp/none
NodeName=node1 NodeAddr=$NET.11 CPUs=2 RealMemory=2000 State=UNKNOWN
NodeName=node2 NodeAddr=$NET.12 CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=low Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=10 PreemptMode=REQUEUE
PartitionName=high Nodes=node[1-2] MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF

cat >"$STATE/etc/slurmdbd.conf" <<EOF
# peer-lab two-node test cluster (tests/cluster/slurm2_up.sh)
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=16819
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=peerlab
StorageLoc=peerlab2_acct
EOF
chmod 600 "$STATE/etc/slurmdbd.conf"

if ! alive "$STATE/run/slurmdbd.pid"; then
    slurmdbd || die "slurmdbd did not start (see $STATE/log/slurmdbd.log)"
    for _ in $(seq 100); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.1; done
fi
sacctmgr -n list cluster format=cluster 2>/dev/null | grep -qw peerlab2 || sacctmgr -i add cluster peerlab2 >/dev/null

if ! alive "$STATE/run/slurmctld.pid"; then
    slurmctld -f "$CONF" || die "slurmctld did not start (see $STATE/log/slurmctld.log)"
fi

for n in 1 2; do
    alive "$STATE/run/slurmd.node$n.pid" && continue
    # setsid + nohup: the node's daemon outlives this script; its namespaces live as long as it.
    setsid nsenter --net="/run/netns/mn$n" -- unshare --uts --mount --propagation private -- \
        sh -c "mount --bind $STATE/etc/hosts /etc/hosts && hostname node$n && exec slurmd -f $CONF -N node$n" \
        </dev/null >"$STATE/log/slurmd.node$n.start" 2>&1 || die "slurmd on node$n did not start"
done

for _ in $(seq 300); do
    states=$(sinfo -h -N -o "%N %T" 2>/dev/null | sort -u | awk '{print $2}' | sort -u | tr '\n' ' ')
    case "$states" in "idle "|"mixed "|"allocated "|"idle mixed "|"allocated idle "|"allocated mixed ") break ;; esac
    for n in 1 2; do
        case "$(sinfo -h -n node$n -o %T 2>/dev/null)" in down*|drain*) scontrol update nodename=node$n state=resume >/dev/null 2>&1 || true ;; esac
    done
    sleep 0.1
done
sinfo -h -N -o "%N %T" | grep -Evq " (idle|mixed|allocated)$" && die "nodes not idle: $(sinfo -h -N -o '%N %T' | tr '\n' ' ') (see $STATE/log/)"
sacct -n -X -j 1 >/dev/null 2>&1 || die "sacct does not work (see $STATE/log/slurmdbd.log)"
echo "slurm2_up: cluster peerlab2 up: node1 $NET.11, node2 $NET.12 ($(sinfo -h -N -o '%T' | sort -u | tr '\n' ' ')); SLURM_CONF=$CONF"
