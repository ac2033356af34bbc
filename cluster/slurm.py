"""Run one training function as a Slurm batch job, through submitit.

    job = submit(train_main, cfg_dict, cluster, job_name="run1", folder="runs/run1/slurm")
    code = follow(job)          # optional: stream rank 0's log until the job ends

Knows nothing of models: it is handed a function, its config dict and the `cluster` section of
that config (a plain dict: nodes, nproc_per_node, gpus_per_node, partition, ...).

Placement. One Slurm task per process: --nodes=nodes, --ntasks-per-node=nproc_per_node,
--gpus-per-node, --cpus-per-task, --mem, --partition, --account, --qos, --constraint,
--exclusive, --time and free-form extra options. Inside the job every task reads its ranks from
Slurm (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the job's first node as MASTER_ADDR, a port
derived from the job id), exports RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE /
MASTER_ADDR / MASTER_PORT (read by cluster.env.DistEnv; the process group starts with env://)
and calls the function.

Preemption and time limits (one place, DESIGN principle 8). Slurm sends USR2 `signal_delay_s`
before the time limit and, with preempt_send_user_signal, when a job is preempted. During
training the trainer's own USR2/SIGTERM handler takes precedence over the one submitit installs:
every rank finishes its step, they save one checkpoint together and the function exits with
`requeue_exit_code` (75). Then, on global rank 0 only, `SlurmTask` requeues the job with
`scontrol requeue` (so a time limit is handled like a preemption); the other ranks just exit 0.
The requeued job runs the same pickled task, which resumes from the latest checkpoint (and the
same MLflow run, whose id is in it). SLURM_RESTART_COUNT counts the requeues: at
`max_requeues` rank 0 does not requeue again, marks the job not requeueable (so a preemption
cancels instead of requeueing) and fails it with a message that says how to resume. A USR2 that
arrives outside training (start-up, after the save) reaches submitit's handler, which calls
`SlurmTask.checkpoint()` and requeues the same task: it too resumes from the latest checkpoint.
Any other exit or exception is an error: the job fails, is not requeued, and submitit records
the error for `follow`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

# Slurm job states after which nothing more happens to a job (sacct's names).
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE")
# Rendezvous ports derived from the job id: [_PORT_BASE, _PORT_BASE + _PORT_SPAN).
_PORT_BASE, _PORT_SPAN = 20000, 20000


class SlurmError(RuntimeError):
    """A request that cannot be submitted. `str()` is one line naming the problem and the fix."""


class RequeueLimitReached(RuntimeError):
    """The job was stopped by a signal after a complete checkpoint once more than allowed."""


# ----------------------------------------------------------------------------- submission side


def sbatch_parameters(cluster: Mapping[str, Any], job_name: str, setup: Sequence[str] = ()) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (its raw sbatch names) for this `cluster` section."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": cluster["nodes"],
        "ntasks_per_node": cluster["nproc_per_node"],
        "time": cluster["time_min"],
        "signal_delay_s": cluster["signal_delay_s"],
        "setup": list(setup) + list(cluster.get("setup") or []),
        # A task that fails stops the step: its peers would otherwise wait in a collective.
        # Ranks that stop on a signal exit 0 (only rank 0 reports 75), so this never cuts a save.
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    if cluster.get("gpus_per_node"):
        params["gpus_per_node"] = cluster["gpus_per_node"]
    for key in ("cpus_per_task", "partition", "account", "qos", "constraint"):
        if cluster.get(key) is not None:
            params[key] = cluster[key]
    if cluster.get("mem_gb") is not None:
        params["mem"] = f"{int(cluster['mem_gb'])}GB"
    if cluster.get("exclusive"):
        params["exclusive"] = True
    # --requeue: this job may be requeued (preemption, node failure) even where the cluster's
    # JobRequeue default says no; cluster.requeue=false asks for --no-requeue: such a job fails.
    extra: dict[str, Any] = {"requeue": True} if cluster.get("requeue", True) else {"no_requeue": True}
    for option in cluster.get("extra_sbatch") or []:
        name, sep, value = option.lstrip("-").partition("=")
        extra[name.replace("-", "_")] = value if sep else True
    params["additional_parameters"] = extra
    return params


def sbatch_script(cluster: Mapping[str, Any], job_name: str, folder: str | Path,
                  setup: Sequence[str] = (), array_size: Optional[int] = None) -> str:
    """The batch script submitit would submit (for dry runs and the pre-submission test)."""
    from compat import SUBMITIT_ENTRY_MODULE, make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m", SUBMITIT_ENTRY_MODULE, shlex.quote(str(folder))])
    params = sbatch_parameters(cluster, job_name, setup)
    if array_size and array_size > 1:
        params["map_count"] = array_size
    return make_sbatch_string(command=command, folder=folder, **params)


def preflight(cluster: Mapping[str, Any], job_name: str, folder: str | Path, setup: Sequence[str] = ()) -> None:
    """Everything Slurm would refuse, found before submitting: no Slurm commands here, an unknown
    partition, a request the scheduler rejects (`sbatch --test-only`). Raises SlurmError."""
    missing = [c for c in ("sbatch", "srun", "sacct", "scontrol", "sinfo") if shutil.which(c) is None]
    if missing:
        raise SlurmError(f"cluster.kind='slurm': {', '.join(missing)} not found on this machine's PATH; "
                         "fix: run from a Slurm login node (Debian: apt-get install slurm-client), or use cluster=local")
    partition = cluster.get("partition")
    if partition is not None:
        names = _partitions()
        if partition not in names:
            raise SlurmError(f"cluster.partition={partition!r}: no such Slurm partition; "
                             f"fix: use one of {', '.join(names) or '(sinfo lists none)'} (sinfo shows them)")
    script = sbatch_script(cluster, job_name, folder, setup)
    proc = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        reason = _last_error_line(proc.stderr or proc.stdout)
        raise SlurmError(f"cluster: Slurm rejects this request ({reason}); fix: ask for what the partition's "
                         "nodes have (cluster.nodes, nproc_per_node, gpus_per_node, cpus_per_task, mem_gb, "
                         "time_min, constraint; `sinfo -o '%P %D %c %m %G %l'` shows it) or pick another "
                         "cluster.partition")


def submit(fn: Callable[..., Any], args: tuple, cluster: Mapping[str, Any], *, job_name: str,
           folder: str | Path, requeue_exit_code: int, setup: Sequence[str] = ()):
    """Submit one job; returns submitit's SlurmJob. Raises SlurmError when sbatch refuses."""
    return submit_array(fn, [args], cluster, job_name=job_name, folder=folder,
                        requeue_exit_code=requeue_exit_code, setup=setup)[0]


def submit_array(fn: Callable[..., Any], args_list: Sequence[tuple], cluster: Mapping[str, Any], *,
                 job_name: str, folder: str | Path, requeue_exit_code: int, setup: Sequence[str] = ()) -> list:
    """Submit one job per args tuple, as one job array when there are several (same resources)."""
    import submitit

    folder = Path(folder).resolve()
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=int(cluster["max_requeues"]))
    executor.update_parameters(**sbatch_parameters(cluster, job_name, setup))
    tasks = [SlurmTask(fn, tuple(args), requeue_exit_code, int(cluster["max_requeues"]),
                       network_interface=cluster.get("network_interface"), requeue=cluster.get("requeue", True))
             for args in args_list]
    try:
        if len(tasks) == 1:
            return [executor.submit(tasks[0])]
        jobs = []
        with executor.batch():
            for task in tasks:
                jobs.append(executor.submit(task))
        return jobs
    except (subprocess.CalledProcessError, submitit.core.utils.FailedSubmissionError) as exc:
        text = getattr(exc, "output", None) or getattr(exc, "stderr", None) or str(exc)
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        raise SlurmError(f"cluster: sbatch refused the job ({_last_error_line(str(text))}); nothing was "
                         "submitted; fix: check the cluster.* request against `sinfo`") from None


def log_paths(job) -> tuple[Path, Path]:
    """Rank 0's stdout and stderr files of a submitit job (appended across requeues)."""
    from submitit.core.utils import JobPaths

    paths = JobPaths(job.paths.folder, job_id=job.job_id, task_id=0)
    return paths.stdout, paths.stderr


def job_state(job_id: str) -> tuple[str, str]:
    """(state, exit code 'N:S') of a job from Slurm's accounting; ('UNKNOWN', '') before it shows."""
    try:
        proc = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "JobID,State,ExitCode"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "UNKNOWN", ""
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[0] == job_id:
            return parts[1].split()[0] if parts[1] else "UNKNOWN", parts[2]
    return "UNKNOWN", ""


def exit_status(state: str, exit_code: str) -> int:
    """A shell exit status for a finished job: 0 when it completed, its own code otherwise."""
    if state == "COMPLETED":
        return 0
    code = exit_code.split(":")[0]
    return int(code) if code.isdigit() and int(code) > 0 else 1


def job_error(job) -> str:
    """The error submitit recorded for a failed job (rank 0's traceback's last line), or ''."""
    down = failed_nodes_message(job.job_id)
    if down:
        return down  # a node failure: what the surviving ranks recorded is only its consequence
    path = job.paths.result_pickle
    if not path.exists():
        return ""
    try:
        from submitit.core.utils import pickle_load

        outcome, payload = pickle_load(path)
    except Exception:
        return ""
    if outcome != "error":
        return ""
    lines = [ln for ln in str(payload).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def wait(jobs: Sequence, poll_s: float = 2.0, stream: bool = True, out=None, err=None) -> list[tuple[str, str]]:
    """Wait until every job reaches a final state, streaming rank 0's log of the first job when
    `stream`; returns [(state, exit code)] per job. Requeued jobs are followed through their
    restarts (their log files are appended to)."""
    out, err = out or sys.stdout, err or sys.stderr
    followers = []
    if stream and jobs:
        stdout, stderr = log_paths(jobs[0])
        followers = [_Follower(stdout, out), _Follower(stderr, err)]
    results: dict[int, tuple[str, str]] = {}
    last: dict[int, str] = {}
    while True:
        for f in followers:
            f.pump()
        for i, job in enumerate(jobs):
            if i in results:
                continue
            state, code = job_state(job.job_id)
            if state != last.get(i) and not stream:
                print(f"job {job.job_id}: {state}", file=out, flush=True)
            last[i] = state
            if state in FINAL_STATES and not being_requeued(job.job_id, state):
                results[i] = (state, code)
        if len(results) == len(jobs):
            break
        time.sleep(poll_s)
    time.sleep(0.5)
    for f in followers:
        f.pump()
    return [results[i] for i in range(len(jobs))]


class _Follower:
    """Copies what is appended to a file to a stream (`tail -f`)."""

    def __init__(self, path: Path, stream) -> None:
        self.path, self.stream, self.pos = Path(path), stream, 0

    def pump(self) -> None:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                f.seek(self.pos)
                text = f.read()
                self.pos = f.tell()
        except FileNotFoundError:
            return
        if text:
            self.stream.write(text)
            self.stream.flush()


def _partitions() -> list[str]:
    proc = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=30)
    return sorted({p.strip() for p in proc.stdout.split() if p.strip()})


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    useful = [ln for ln in lines if "error" in ln.lower() or "failure" in ln.lower()] or lines
    return (useful[-1] if useful else "no message").replace("sbatch: error: ", "")


# ----------------------------------------------------------------------------- inside the job


def slurm_dist_env(network_interface: Optional[str] = None) -> dict[str, str]:
    """The torch.distributed variables of this Slurm task, from Slurm's own environment.

    Ranks, sizes and the job's host names come from submitit's public TorchDistributedEnvironment
    (not exported as is: it would also narrow CUDA_VISIBLE_DEVICES to one GPU, while the trainer
    picks cuda:LOCAL_RANK). Two choices are ours, for multi-node jobs (cluster/rendezvous.py):
    MASTER_ADDR is the first node's *address* (its name may resolve to loopback), and the port is
    derived from the job id (the same on every rank and after a requeue without any exchange;
    two jobs on the same nodes collide only if their ids differ by a multiple of _PORT_SPAN).
    Returns the variables plus GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME on several nodes."""
    if "SLURM_JOB_ID" not in os.environ or "SLURM_PROCID" not in os.environ:
        raise RuntimeError("not inside a Slurm task: SLURM_JOB_ID / SLURM_PROCID are not set")
    from submitit.helpers import TorchDistributedEnvironment

    dist_env = TorchDistributedEnvironment()
    job_id = int(os.environ["SLURM_JOB_ID"])
    hostnames = _hostnames()
    out = {
        "RANK": str(dist_env.rank),
        "LOCAL_RANK": str(dist_env.local_rank),
        "WORLD_SIZE": str(dist_env.world_size),
        "LOCAL_WORLD_SIZE": str(max(1, dist_env.local_world_size)),
        "MASTER_PORT": str(_PORT_BASE + job_id % _PORT_SPAN),
    }
    if len(hostnames) <= 1:
        out["MASTER_ADDR"] = "127.0.0.1"  # every rank is on this node; no name resolution needed
        return out
    from cluster.rendezvous import RendezvousError, interface_environ, is_loopback, resolve_host, route_source

    master = resolve_host(hostnames[0])
    if is_loopback(master):
        if int(os.environ.get("SLURM_NODEID", "0")) != 0:
            raise RendezvousError(f"node {hostnames[0]} (the job's first node) resolves to {master} on "
                                  f"{socket.gethostname()}; fix: make node names resolve to their addresses on "
                                  "the network the nodes share (/etc/hosts or DNS)", False)
        # This is the first node and it calls itself loopback: its address is the one it would
        # use to reach the second node.
        master = route_source(resolve_host(hostnames[1]))
    out["MASTER_ADDR"] = master
    out.update(interface_environ(master, network_interface)[1])
    return out


def _hostnames() -> list[str]:
    from submitit import JobEnvironment

    return list(JobEnvironment().hostnames)


def _job_id(env: Mapping[str, str]) -> str:
    """The id scontrol takes for this job: ARRAYJOB_TASK for an array element."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


class SlurmTask:
    """What each Slurm task runs: sets the distributed environment, calls fn(*args), and turns a
    signal stop (exit `requeue_exit_code`) into a requeue of the job on rank 0."""

    def __init__(self, fn: Callable[..., Any], args: tuple, requeue_exit_code: int, max_requeues: int,
                 network_interface: Optional[str] = None, requeue: bool = True):
        self.fn, self.args = fn, args
        self.requeue_exit_code, self.max_requeues = requeue_exit_code, max_requeues
        self.network_interface, self.requeue = network_interface, requeue

    def __call__(self) -> None:
        os.environ.update(slurm_dist_env(self.network_interface))
        rank = int(os.environ["RANK"])
        _print_placement(rank)
        try:
            self.fn(*self.args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if code == 0:
                return None
            if code == self.requeue_exit_code:
                if rank == 0:
                    self._requeue_or_stop()
                return None  # the other ranks just exit; rank 0 requeues
            if code < 0:
                raise  # submitit's own exit after it requeued (sys.exit(-1))
            raise RuntimeError(f"rank {rank} exited with code {code}; its log above says why "
                               "(the job is not requeued)") from None
        return None

    def checkpoint(self) -> Any:
        """submitit's hook for a USR2 outside training: requeue the same task, which resumes from
        the latest complete checkpoint."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)

    def _requeue_or_stop(self) -> None:
        env = os.environ
        job_id = _job_id(env)
        restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
        if not self.requeue:
            message = (f"job {job_id} stopped by a signal after a complete checkpoint; not requeued "
                       "(cluster.requeue=false); fix: submit the same command again to resume from the checkpoint")
            print(f"error: {message}", file=sys.stderr, flush=True)
            raise RequeueLimitReached(message)
        if restarts >= self.max_requeues:
            # Not requeueable any more, so that a preemption in progress cancels instead.
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "Requeue=0"], capture_output=True, timeout=60)
            message = (f"job {job_id} stopped by a signal after a complete checkpoint, but it was already "
                       f"requeued {restarts} times (cluster.max_requeues={self.max_requeues}); not requeued; "
                       "fix: submit the same command again to resume from the checkpoint, or raise "
                       "cluster.max_requeues")
            print(f"error: {message}", file=sys.stderr, flush=True)
            raise RequeueLimitReached(message)
        proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            print(f"slurm: checkpoint complete; requeued job {job_id} (requeue {restarts + 1} of at most "
                  f"{self.max_requeues}); it resumes from this checkpoint", flush=True)
        else:
            # A preemption by requeue is requeued by Slurm itself; say so for any other case.
            print(f"slurm: scontrol requeue {job_id} failed ({_last_error_line(proc.stderr)}); a preempted "
                  "job is requeued by Slurm itself, otherwise submit the same command again to resume",
                  file=sys.stderr, flush=True)
        sys.stdout.flush()
        sys.exit(self.requeue_exit_code)


def _print_placement(rank: int) -> None:
    """Rank 0's log (which the launcher streams) says which node holds which ranks and where they
    meet; every rank's own log (<run dir>/slurm/<job>_<rank>_log.out) says where it runs."""
    env = os.environ
    iface = env.get("GLOO_SOCKET_IFNAME")
    where = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}" + (f" over {iface}" if iface else "")
    print(f"slurm: rank {rank} (local rank {env['LOCAL_RANK']}) on {socket.gethostname()}, rendezvous {where}",
          flush=True)
    if rank == 0 and env.get("SLURM_TASKS_PER_NODE"):
        from cluster.rendezvous import expand_tasks_per_node, placement

        hosts = _hostnames()
        print(f"slurm: job {_job_id(env)}: {env['WORLD_SIZE']} ranks on {len(hosts)} node(s): "
              f"{placement(hosts, expand_tasks_per_node(env['SLURM_TASKS_PER_NODE']))}", flush=True)


def failed_nodes_message(job_id: str) -> str:
    """For a job hit by a node failure: 'node node1 failed (DOWN*: Not responding)' for each node of
    the job with a down event since the job started (Slurm's accounting keeps node events, so this
    holds after the node came back), else ''."""
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""

    rows = [r.split("|") for r in run("sacct", "-j", job_id.split("_")[0], "-X", "-n", "-P", "-o",
                                      "NodeList,Start,State").split()]
    rows = [r for r in rows if len(r) == 3 and r[2] == "NODE_FAIL"]
    if not rows:
        return ""
    nodelist, started, _ = rows[-1]
    failed = []
    for line in run("sacctmgr", "-n", "-P", "show", "event", f"nodes={nodelist}", f"start={started}",
                    "format=NodeName,State,Reason").splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[0] and "DOWN" in parts[1] and parts[0] not in {f.split()[1] for f in failed}:
            failed.append(f"node {parts[0]} failed ({parts[1]}: {parts[2] or 'no reason given'})")
    return "; ".join(failed) or f"a node of {nodelist} failed (NODE_FAIL)"


def being_requeued(job_id: str, state: str) -> bool:
    """True while Slurm requeues a job that accounting already shows ended: a node failure of a
    requeueable job is recorded as NODE_FAIL, then the job goes back to PENDING (same id) and runs
    again; a launcher that stopped following at NODE_FAIL would report a job that is not over."""
    if state != "NODE_FAIL":
        return False
    info = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    fields = dict(f.split("=", 1) for f in info.split() if "=" in f)
    return fields.get("Requeue") == "1" and fields.get("JobState") not in FINAL_STATES
