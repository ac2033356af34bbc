"""Several nodes for real, on one machine: two network namespaces as two hosts
(tests/cluster/slurm2_up.sh: node1 10.250.77.11 and node2 10.250.77.12 on a private bridge,
each a real slurmd with its own hostname and /etc/hosts).

- a 2-node x 2-task Slurm job (dp=4, and dp=4 with ep=2 inside it: two replicas of two-way expert parallelism) equals the one-host 4-process run;
- a torchrun-style launch, once per host (cluster.nodes=2, node_rank, master_addr, master_port;
  no Slurm), equals it too; a host that never arrives fails the other within join_timeout_s;
- a 2-node job preempted by the high partition (USR2 to every rank on both nodes) saves once,
  is requeued and ends with the uninterrupted run's losses;
- a node failure (every process of node1's namespace SIGKILLed: slurmd, the batch shell, ranks 0
  and 1) requeues the job, which resumes from its last complete checkpoint with the same losses;
  with cluster.requeue=false the job fails with one line naming node1.

The cluster comes up once for this module (about 5 s) and is removed at the end. Without root or
network namespaces the tests are skipped with the reason; under CI (CI set) they fail instead.
Losses are compared with == : fp32 on CPU, the same data order, and 4 ranks in the same order
(node i holds ranks 2i, 2i+1 like the one-host run's local ranks), so the gloo reductions add
the same numbers in the same order; a resume restores every input of the next step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY, describe, launch, read_metrics, train_losses

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
STATE = os.environ.get("PEERLAB_SLURM2_STATE", "/var/lib/peerlab-slurm2")
SLURM_CONF = f"{STATE}/etc/slurm.conf"
STEPS = 30
COMMON = TINY + ["trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=4",
                 f"trainer.max_steps={STEPS}", f"optim.decay_steps={STEPS}", "optim.warmup_steps=2",
                 "checkpoint.keep_last=0", "checkpoint.every_steps=10", "tracking.enabled=false"]
FOUR = ["cluster.nproc_per_node=4", "parallel.dp=4"]
TWO_BY_TWO = ["cluster.nodes=2", "cluster.nproc_per_node=2", "parallel.dp=4"]
EP = ["model.ffn=moe", "parallel.dp=4", "parallel.ep=2", "trainer.max_steps=8", "optim.decay_steps=8"]
SLURM = ["cluster=slurm", "cluster.time_min=10", "cluster.signal_delay_s=60", "cluster.wait=true",
         "cluster.collective_timeout_s=60"]
JOB_TIMEOUT_S = 400


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
            "PYTHONUNBUFFERED": "1", "SLURM_CONF": SLURM_CONF, **extra}


def _sh(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def two_nodes():
    """Bring the two-node cluster up (slurm2_up.sh), and remove it after the module."""
    reason = None
    installed = lambda: shutil.which("sbatch") and shutil.which("mariadbd")  # noqa: E731
    if os.geteuid() != 0:
        reason = "needs root for network namespaces and the Slurm daemons (tests/cluster/slurm2_up.sh)"
    elif not installed():
        # A fresh machine (CI): install the packages as tests/cluster/test_slurm.py's cluster would.
        got = _sh(str(HERE / "slurm_up.sh"), "--install-only", timeout=900)
        if got.returncode == 3:
            reason = got.stderr.strip().splitlines()[-1]
        elif got.returncode != 0 or not installed():
            pytest.fail(f"slurm_up.sh --install-only failed (exit {got.returncode}):\n{got.stdout}\n{got.stderr}")
    if reason is None:
        up = _sh(str(HERE / "slurm2_up.sh"), timeout=300)
        if up.returncode == 3:
            reason = up.stderr.strip().splitlines()[-1]
        elif up.returncode != 0:
            pytest.fail(f"slurm2_up.sh failed (exit {up.returncode}):\n{up.stdout}\n{up.stderr}")
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"multi-node tests cannot run on CI: {reason}")
        pytest.skip(f"multi-node tests skipped: {reason}")
    try:
        yield
    finally:
        _sh(str(HERE / "slurm2_down.sh"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    """The one-host runs every multi-node run must reproduce: 4 gloo processes, dp=4 ("dp4") and
    dp=4 x ep=2 ("ep"); each run once, when a test first asks for it."""
    runs = {"dp4": FOUR, "ep": FOUR + EP}
    cache: dict[str, dict[int, float]] = {}

    class References:
        def __getitem__(self, name: str) -> dict[int, float]:
            if name not in cache:
                root = tmp_path_factory.mktemp(f"ref_{name}")
                proc = launch(COMMON + runs[name] + [f"run.root={root}", f"data.cache_dir={data_cache}"], cwd=root)
                assert proc.returncode == 0, describe(proc)
                cache[name] = train_losses(root / "default")
            return cache[name]

    return References()


def _slurm_args(tmp_path: Path, data_cache: Path, extra=()) -> list[str]:
    return COMMON + TWO_BY_TWO + SLURM + list(extra) + [f"run.root={tmp_path}/runs", f"data.cache_dir={data_cache}"]


def _scontrol(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, env=_env()).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=JOB_TIMEOUT_S)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _wait_steps(run_dir: Path, steps: int, proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait until metrics.jsonl holds `steps` lines; the Slurm job id."""
    path = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and sum(1 for _ in path.open()) >= steps:
            return next((run_dir / "slurm").glob("*_submission.sh")).name.replace("_submission.sh", "")
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"{path} never reached {steps} lines:\n{describe(_finish(proc))}")


def _error_lines(stderr: str) -> list[str]:
    """stderr without torch's C++ warnings ('[W...] [c10d] The hostname of the client socket cannot
    be retrieved': the store's reverse lookup of a bridge address, logged by torch itself)."""
    return [ln for ln in stderr.strip().splitlines() if not ln.startswith("[W")]


def _node_state(node: str) -> str:
    return subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True, text=True,
                          env=_env()).stdout.strip()


def test_two_node_job_equals_one_host(two_nodes, tmp_path, data_cache, reference):
    proc = launch(_slurm_args(tmp_path, data_cache), cwd=tmp_path, timeout=JOB_TIMEOUT_S, extra_env=_env())
    assert proc.returncode == 0, describe(proc)
    assert "COMPLETED" in proc.stdout
    assert "4 ranks on 2 node(s): node1 ranks 0-1, node2 ranks 2-3" in proc.stdout, "the placement is printed"
    assert "rendezvous 10.250.77.11:" in proc.stdout and "over mneth" in proc.stdout, "first node's address"
    logs = sorted(p.name for p in (tmp_path / "runs" / "default" / "slurm").glob("*_log.out"))
    assert len(logs) == 4, f"one log per rank: {logs}"
    assert train_losses(tmp_path / "runs" / "default") == reference["dp4"]


def test_two_node_expert_parallel_equals_one_host(two_nodes, tmp_path, data_cache, reference):
    proc = launch(_slurm_args(tmp_path, data_cache, EP), cwd=tmp_path, timeout=JOB_TIMEOUT_S, extra_env=_env())
    assert proc.returncode == 0, describe(proc)
    assert "world=4 dp=4 ep=2" in proc.stdout, proc.stdout[-3000:]
    assert train_losses(tmp_path / "runs" / "default") == reference["ep"]


def _in_node(ns: str, command: list[str]) -> list[str]:
    """`command` on one host as the nodes' slurmd see it: that node's network namespace, its own
    hostname and its /etc/hosts (as slurm2_up.sh starts them)."""
    node = "node" + ns[-1]
    return ["nsenter", f"--net=/run/netns/{ns}", "--", "unshare", "--uts", "--mount", "--propagation", "private",
            "--", "sh", "-c", f'mount --bind {STATE}/etc/hosts /etc/hosts && hostname {node} && exec "$0" "$@"',
            *command]


def _host(ns: str, args: list[str], cwd: Path) -> subprocess.Popen:
    """launch.py on one host (no Slurm)."""
    return subprocess.Popen(_in_node(ns, [sys.executable, str(ROOT / "launch.py"), *args]), cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_torchrun_style_two_hosts_equal_one_host(two_nodes, tmp_path, data_cache, reference):
    args = COMMON + TWO_BY_TWO + ["cluster.master_addr=10.250.77.11", "cluster.master_port=29511",
                                  "cluster.join_timeout_s=60", f"run.root={tmp_path}/runs", f"data.cache_dir={data_cache}"]
    first = _host("mn1", args + ["cluster.node_rank=0"], tmp_path)
    second = _host("mn2", args + ["cluster.node_rank=1"], tmp_path)
    results = [_finish(p) for p in (first, second)]
    for result in results:
        assert result.returncode == 0, describe(result)
    assert "node_rank 0 of 2" in results[0].stdout and "ranks 0-1" in results[0].stdout
    assert "node_rank 1 of 2" in results[1].stdout and "ranks 2-3" in results[1].stdout
    assert "over mneth" in results[1].stdout and "on node2" in results[1].stdout, "the interface routed to master_addr, not loopback"
    assert train_losses(tmp_path / "runs" / "default") == reference["dp4"]


def test_torchrun_style_missing_host_fails_within_join_timeout(two_nodes, tmp_path, data_cache):
    args = COMMON + TWO_BY_TWO + ["cluster.master_addr=10.250.77.11", "cluster.master_port=29512",
                                  "cluster.join_timeout_s=10", f"run.root={tmp_path}/runs", f"data.cache_dir={data_cache}"]
    started = time.monotonic()
    result = _finish(_host("mn1", args + ["cluster.node_rank=0"], tmp_path))
    took = time.monotonic() - started
    assert result.returncode == 1, describe(result)
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and "cluster.join_timeout_s=10: node_rank 1 of cluster.nodes=2 never joined" in lines[0], lines
    print(f"\nmissing host: node_rank 0 failed {took:.1f} s after start (join_timeout_s=10)")
    # The other way round: node_rank 1 alone finds no rendezvous, one line, within the timeout.
    result = _finish(_host("mn2", args + ["cluster.node_rank=1"], tmp_path))
    lines = _error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and "no rendezvous at 10.250.77.11:29512" in lines[0], lines


@pytest.mark.parametrize("extra,expected", [
    (["cluster.node_rank=2", "cluster.master_addr=10.250.77.11"], "cluster.node_rank=2: outside [0, cluster.nodes=2)"),
    (["cluster.node_rank=0", "cluster.master_addr=10.250.77.12"], "cluster.master_addr=10.250.77.12: not an address of this host"),
    (["cluster.node_rank=0", "cluster.master_addr=10.250.77.11", "cluster.master_port=29513"], "cluster.master_port=29513: already in use"),
])
def test_torchrun_style_bad_input_is_one_line(two_nodes, tmp_path, data_cache, extra, expected):
    args = COMMON + TWO_BY_TWO + ["cluster.join_timeout_s=5", f"run.root={tmp_path}/runs",
                                  f"data.cache_dir={data_cache}"] + extra
    blocker = None
    if "cluster.master_port=29513" in extra:  # something already listens on the port in node1
        blocker = subprocess.Popen(_in_node("mn1", [sys.executable, "-c", "import socket,time; s=socket.socket(); "
                                                    "s.bind(('',29513)); s.listen(); time.sleep(60)"]))
        time.sleep(1)
    try:
        result = _finish(_host("mn1", args, tmp_path))
    finally:
        if blocker:
            blocker.kill()
    lines = _error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and expected in lines[0] and "fix:" in lines[0], lines


def test_more_nodes_than_the_partition_has_is_refused(two_nodes, tmp_path, data_cache):
    proc = launch(_slurm_args(tmp_path, data_cache, ["cluster.nodes=3", "parallel.dp=6", "trainer.eval_batches=6"]), cwd=tmp_path,
                  extra_env=_env())
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Slurm rejects this request" in lines[0], describe(proc)


def test_preempted_two_node_job_is_requeued_and_resumes(two_nodes, tmp_path, data_cache, reference):
    proc = _start(_slurm_args(tmp_path, data_cache), tmp_path)
    run_dir = tmp_path / "runs" / "default"
    job = _wait_steps(run_dir, 5, proc)
    # A high-partition job that needs both nodes: Slurm sends USR2 to every rank, then requeues.
    subprocess.run(["sbatch", "-p", "high", "-N", "2", "-n", "4", "-o", "/dev/null", "--wrap", "sleep 2"],
                   check=True, capture_output=True, env=_env())
    result = _finish(proc)
    assert result.returncode == 0, describe(result)
    assert "requeued job" in result.stdout and "resumed from step_" in result.stdout, describe(result)
    assert int(_scontrol(job).get("Restarts", "0")) == 1
    assert "stopped by a signal after step" in result.stdout, "one collective save, then the stop"
    assert train_losses(run_dir) == reference["dp4"]


def _kill_node1_during(tmp_path: Path, data_cache: Path, extra=()):
    """Start a 2-node job, SIGKILL every process of node1's namespace after step 13 (a checkpoint
    at step 10 exists), bring node1 back once Slurm marked it down; the finished launcher and
    the measured times."""
    proc = _start(_slurm_args(tmp_path, data_cache, extra), tmp_path)
    run_dir = tmp_path / "runs" / "default"
    job = _wait_steps(run_dir, 13, proc)
    killed = time.monotonic()
    assert _sh(str(HERE / "slurm2_down.sh"), "kill", "1").returncode == 0
    times = {}
    deadline = killed + 120
    while time.monotonic() < deadline and ("survivors_exit" not in times or "node_down" not in times):
        pids = subprocess.run(["ip", "netns", "pids", "mn2"], capture_output=True, text=True).stdout.split()
        python = [p for p in pids if "python" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]\
            if pids else []
        if not python and "survivors_exit" not in times:
            times["survivors_exit"] = time.monotonic() - killed
        if "down" in _node_state("node1") and "node_down" not in times:
            times["node_down"] = time.monotonic() - killed
        time.sleep(0.2)
    assert "node_down" in times, f"node1 never went down: {_node_state('node1')}"
    state = _scontrol(job)
    times["job_state_at_down"] = state.get("JobState", "?")
    up = _sh(str(HERE / "slurm2_up.sh"))
    assert up.returncode == 0, up.stderr
    result = _finish(proc)
    times["launcher_exit"] = time.monotonic() - killed
    return job, result, times, run_dir


def test_node_failure_requeues_and_resumes_exactly(two_nodes, tmp_path, data_cache, reference):
    job, result, times, run_dir = _kill_node1_during(tmp_path, data_cache)
    print(f"\nnode failure with requeue: {times}")
    assert result.returncode == 0, describe(result)
    assert "resumed from step_00000010" in result.stdout, describe(result)
    assert int(_scontrol(job).get("Restarts", "0")) == 1
    assert times["survivors_exit"] < 60, f"survivors outlived cluster.collective_timeout_s: {times}"
    assert train_losses(run_dir) == reference["dp4"]


def test_node_failure_without_requeue_names_the_node(two_nodes, tmp_path, data_cache):
    job, result, times, _ = _kill_node1_during(tmp_path, data_cache, ["cluster.requeue=false"])
    print(f"\nnode failure without requeue: {times}")
    assert result.returncode == 1, describe(result)
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"job {job}: NODE_FAIL") and "node node1 failed" in lines[-1], describe(result)
    assert int(_scontrol(job).get("Restarts", "0")) == 0
