"""cluster.local.run_local with real processes and gloo: one process in this one, two through
torch elastic's agent, a failing rank, a user-error exit code, Ctrl-C and SIGTERM.

Launches that may hang if the launcher is wrong (a failing rank, signals) run in a subprocess with
a timeout, so a bug fails the test instead of blocking the suite. On 2 CPU cores a 2-process launch
takes about 2 s from a process that has imported torch and 3-5 s from a fresh launcher, mostly
each spawned worker importing torch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.env import DistEnv, select_backend
from cluster.local import LaunchError, LaunchInterrupted, free_port, run_local
from tests.cluster import _local_workers as workers

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 90  # generous: a healthy launch here takes seconds; only a hang reaches it

# Runs one launch the way launch.py does and reports a LaunchError as JSON: argv = entry point
# name in tests.cluster._local_workers, nproc_per_node, output directory.
LAUNCHER = """
import json, sys
from cluster.local import LaunchError, run_local
from tests.cluster import _local_workers as workers

if __name__ == "__main__":
    entry, nproc, out = getattr(workers, sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    try:
        run_local(entry, (out,), nproc, run_id="test")
    except LaunchError as exc:
        with open(out + "/launch_error.json", "w") as f:
            json.dump({"type": type(exc).__name__, "message": str(exc), "exit_code": exc.exit_code,
                       "rank": exc.rank}, f)
        sys.exit(exc.exit_code)
"""


def _launcher_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _start_launcher(entry: str, nproc: int, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, entry, str(nproc), str(out)],
        cwd=out, env=_launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _run_launcher(entry: str, nproc: int, out: Path) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHER, entry, str(nproc), str(out)],
        cwd=out, env=_launcher_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
    )
    error_file = out / "launch_error.json"
    return proc, json.loads(error_file.read_text()) if error_file.exists() else {}


def _describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"


def _alive(pid: int) -> bool:
    """True while pid runs; a zombie (exited, not yet reaped by its new parent) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


# --- one process ------------------------------------------------------------------------------


def test_one_process_runs_here_with_a_world_of_one(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "1")  # an exported port is replaced, then restored
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # as inside an outer torchrun
    before = dict(os.environ)

    run_local(workers.report_world, (str(tmp_path),), 1, run_id="one")

    seen = json.loads((tmp_path / "rank0.json").read_text())
    assert seen["pid"] == os.getpid(), "one process must run in the caller, not a child"
    assert (seen["rank"], seen["local_rank"], seen["world_size"], seen["local_world_size"]) == (0, 0, 1, 1)
    assert (seen["dist_rank"], seen["dist_world_size"], seen["sum"]) == (0, 1, 1.0)
    assert seen["master_addr"] == "127.0.0.1" and seen["group_rank"] == "0"
    assert dict(os.environ) == before


def test_one_process_exceptions_propagate_unchanged():
    # In-process, run_local is a plain call: launch.py sees the real exception or exit code.
    before = dict(os.environ)
    with pytest.raises(ValueError, match="boom"):
        run_local(_raise_boom, (), 1, run_id="one")
    with pytest.raises(SystemExit) as exited:
        run_local(_exit, (2,), 1, run_id="one")
    assert exited.value.code == 2
    assert dict(os.environ) == before


def _raise_boom() -> None:
    raise ValueError("boom")


def _exit(code: int) -> None:
    sys.exit(code)


def test_unpicklable_entrypoint_is_refused_before_anything_starts():
    with pytest.raises(TypeError, match="module-level function"):
        run_local(lambda: None, (), 2, run_id="x")
    with pytest.raises(ValueError, match="nproc_per_node=0"):
        run_local(_raise_boom, (), 0, run_id="x")


# --- two processes ----------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_all_reduce_through_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before, sigint_before = dict(os.environ), signal.getsignal(signal.SIGINT)

    run_local(workers.report_world, (str(tmp_path),), 2, run_id="two")

    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, result in enumerate(seen):
        assert (result["rank"], result["local_rank"], result["dist_rank"]) == (rank, rank, rank)
        assert (result["world_size"], result["local_world_size"], result["dist_world_size"]) == (2, 2, 2)
        assert result["sum"] == 3.0  # (0 + 1) + (1 + 1)
        assert result["pid"] != os.getpid() and result["master_addr"] == "127.0.0.1"
    assert seen[0]["pid"] != seen[1]["pid"]
    assert dict(os.environ) == before  # TORCHELASTIC_SIGNALS_TO_HANDLE etc. put back
    assert signal.getsignal(signal.SIGINT) is sigint_before  # torch elastic's handler removed


@pytest.mark.slow
def test_log_dir_keeps_per_rank_logs_and_prefixes_the_console(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_local(workers.report_world, (str(tmp_path),), 2, run_id="logged", log_dir=tmp_path / "logs")

    console = capfd.readouterr().out
    for rank in (0, 1):
        assert f"[rank{rank}]: rank {rank} of 2: sum 3.0" in console, console
        (log,) = (tmp_path / "logs").glob(f"logged_*/attempt_0/{rank}/stdout.log")
        assert log.read_text() == f"rank {rank} of 2: sum 3.0\n"


@pytest.mark.slow
def test_failing_rank_fails_the_run_with_its_traceback(tmp_path):
    started = time.monotonic()
    proc, error = _run_launcher("fail_on_rank1", 2, tmp_path)
    elapsed = time.monotonic() - started

    assert proc.returncode == 1, _describe(proc)
    assert error["type"] == "LaunchError" and error["rank"] == 1 and error["exit_code"] == 1
    message = error["message"]
    assert message.startswith("rank 1 exited with code 1"), message
    assert "ValueError: boom" in message and "_local_workers.py" in message, message
    # Rank 0 was blocked in all_reduce; the run ended because the agent stopped it, well before
    # the subprocess timeout (gloo's own timeout is 30 minutes).
    assert elapsed < LAUNCH_TIMEOUT_S


@pytest.mark.slow
def test_worker_exit_code_reaches_the_caller(tmp_path):
    proc, error = _run_launcher("exit2_on_rank1", 2, tmp_path)

    assert proc.returncode == 2, _describe(proc)
    assert error["exit_code"] == 2 and error["rank"] == 1, error
    assert "exited with code 2" in error["message"]
    assert "made-up user error" in proc.stderr  # the worker's own message reaches the console


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_to_launcher_stops_every_worker(tmp_path, signum):
    launcher = _start_launcher("write_pid_and_sleep", 2, tmp_path)
    try:
        pid_files = [tmp_path / "pid0.txt", tmp_path / "pid1.txt"]
        started = _wait_until(lambda: all(f.exists() for f in pid_files) or launcher.poll() is not None,
                              LAUNCH_TIMEOUT_S)
        assert started and launcher.poll() is None, "workers did not start: " + str(launcher.communicate())
        pids = [int(f.read_text()) for f in pid_files]
        assert all(_alive(pid) for pid in pids)

        launcher.send_signal(signum)
        stdout, stderr = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()

    assert launcher.returncode != 0, stderr
    if signum == signal.SIGINT:
        assert launcher.returncode == -signal.SIGINT and "KeyboardInterrupt" in stderr, stderr
    else:
        assert launcher.returncode == 128 + signal.SIGTERM, stderr
        error = json.loads((tmp_path / "launch_error.json").read_text())
        assert error["type"] == "LaunchInterrupted" and "SIGTERM" in error["message"]
    assert _wait_until(lambda: not any(_alive(pid) for pid in pids), 10), \
        f"workers still running after the launcher exited: {[p for p in pids if _alive(p)]}"


# --- environment ------------------------------------------------------------------------------


def test_dist_env_reads_what_a_launcher_exports():
    env = DistEnv.from_environ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                                "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert env == DistEnv(rank=3, local_rank=1, world_size=4, local_world_size=2,
                          master_addr="10.0.0.1", master_port=29500)
    assert not env.is_rank0


def test_dist_env_refuses_missing_or_inconsistent_values():
    with pytest.raises(RuntimeError, match="LOCAL_RANK, LOCAL_WORLD_SIZE not set"):
        DistEnv.from_environ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    with pytest.raises(RuntimeError, match="RANK=2 outside"):
        DistEnv.from_environ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
                              "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    with pytest.raises(RuntimeError, match="MASTER_PORT='x' is not an integer"):
        DistEnv.from_environ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                              "MASTER_ADDR": "h", "MASTER_PORT": "x"})


def test_launch_errors_carry_an_exit_code():
    assert issubclass(LaunchInterrupted, LaunchError) and issubclass(LaunchError, RuntimeError)
    error = LaunchError("rank 1 exited with code 2", exit_code=2, rank=1)
    assert (error.exit_code, error.rank, str(error)) == (2, 1, "rank 1 exited with code 2")


def test_select_backend_and_free_port():
    assert select_backend(use_cuda=True) == "nccl" and select_backend(use_cuda=False) == "gloo"
    port = free_port()
    assert 0 < port < 65536
