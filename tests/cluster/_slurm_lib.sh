# Shared by the one-node and two-node test clusters (slurm_up/down.sh, slurm2_up/down.sh); sourced.

# stop <pid file> <name>: TERM, wait up to 10 s, then KILL; remove the pid file.
stop() {
    local file=$1 name=$2 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
        echo "$(basename "$0" .sh): stopped $name ($pid)"
    fi
    rm -f "$file"
}

# The slurm.conf lines both clusters share (docs/platform.md): no cgroups on these machines, fast
# scheduling and requeue, real preemption by partition priority with the job's signal sent first.
slurm_common_conf() {
    cat <<'CONF'
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1
ReturnToService=2
CONF
}
