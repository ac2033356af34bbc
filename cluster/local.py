"""Run one training function on N processes of this machine.

    run_local(train_main, (cfg,), nproc_per_node=2, run_id="exp1")

N == 1 calls the function in this process (no process start; debuggers and tracebacks work as
usual). N > 1 hands it to torch elastic's agent exactly as `torchrun --standalone` does: a c10d
rendezvous on 127.0.0.1 port 0 (the agent's TCP store binds a free port itself, so concurrent
local runs cannot collide), spawned workers, no restarts. The agent exports RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT to each worker; read them with
cluster.env.DistEnv and initialise the process group with init_method="env://".

A failed worker fails the run with LaunchError (rank, exit code, the worker's own traceback);
Ctrl-C stops every worker and raises KeyboardInterrupt; SIGTERM/SIGHUP/SIGQUIT stop every worker
and raise LaunchInterrupted (exit_code 128 + signal number).
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import pickle
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCALHOST = "127.0.0.1"

# The launcher signals torch elastic turns into SignalException (its default list); it installs
# handlers for them and never puts the old ones back, so run_local does.
_FORWARDED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
_SIGNALS_KEY = "TORCHELASTIC_SIGNALS_TO_HANDLE"
_SAVE_MARKERS_KEY = "PEERLAB_SAVE_MARKERS"  # where workers mark a save in progress (_GracefulStop)

class LaunchError(RuntimeError):
    """A worker failed, so the run failed. `str()` names the rank, exit code and root cause.

    exit_code follows the shell convention and can be passed to sys.exit(): the worker's own code
    (1 for an uncaught exception, 2 for the project's user errors, ...), or 128 + N when the
    worker was killed by signal N.
    """

    def __init__(
        self,
        message: str,
        *,
        exit_code: int,
        rank: int | None = None,
        signal_name: str | None = None,
        root_cause: str = "",
    ):
        super().__init__(message)
        self.exit_code = exit_code
        self.rank = rank
        self.signal_name = signal_name
        self.root_cause = root_cause


class LaunchInterrupted(LaunchError):
    """The launcher got SIGTERM, SIGHUP or SIGQUIT; every worker was stopped with that signal."""


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that was free a moment ago (the OS picks it; another process may take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def run_local(
    entrypoint: Callable[..., Any],
    args: tuple,
    nproc_per_node: int,
    *,
    run_id: str,
    log_dir: str | os.PathLike[str] | None = None,
    shutdown_timeout_s: int = 30,
    hosts: Any = None,
    save_limit_s: int = 600,
    save_markers_dir: str | None = None,
) -> None:
    """Run entrypoint(*args) on nproc_per_node local processes; return when all have finished.

    hosts: a cluster.rendezvous.HostSpec for a launch over several hosts, started once per host
    like torchrun --nnodes/--node-rank/--master-addr/--master-port (torch's static rendezvous;
    global rank = node_rank x nproc_per_node + local rank). Before it every host checks in
    (cluster.rendezvous.join): a host that never arrives fails the others within join_timeout_s
    with one line naming it; a bad address or a port in use fails with exit code 2.

    entrypoint must be a module-level function and args picklable (workers are spawned, so they
    import the function by name; the check is made for one process too, so a run that works with
    one process does not break at two). Its return value is discarded.

    log_dir: None sends every worker's stdout/stderr straight to this console (inherited file
    descriptors: no delay, a terminal stays a terminal). A directory additionally keeps per-rank
    logs under <log_dir>/<run_id>_<random>/attempt_0/<rank>/{stdout,stderr}.log and prefixes the
    console copy with "[rank<N>]: ". Ignored for one process.

    shutdown_timeout_s: after Ctrl-C or SIGTERM, how long workers get to exit after the same
    signal is forwarded to them before they are SIGKILLed (a worker that saves a checkpoint on
    SIGTERM needs this long).

    save_markers_dir, save_limit_s: a SIGTERM never cuts a save in progress. Workers find the
    folder in PEERLAB_SAVE_MARKERS and keep a file `saving_rank_<N>` there while they save; when
    shutdown_timeout_s has passed and such a file exists, the kill waits for the save, at most
    save_limit_s more (a save stuck longer has met its collective timeout). Workers that exit
    with 75 after their save (a complete checkpoint) make this raise LaunchError with exit code 75.
    """
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node={nproc_per_node}: must be at least 1")
    if not run_id:
        raise ValueError("run_id must be non-empty: it names the rendezvous and the log directory")
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # A spawned worker re-imports the launching script as __mp_main__; without the guard
        # that import would launch again (multiprocessing then fails with a long, vaguer error).
        raise RuntimeError(
            "run_local was called while a spawned worker imported the launching script; "
            "call it under `if __name__ == \"__main__\":`"
        )
    _check_picklable(entrypoint, args)
    if nproc_per_node == 1 and hosts is None:
        _run_in_process(entrypoint, tuple(args))
    else:
        _run_elastic(
            entrypoint,
            tuple(args),
            nproc_per_node,
            run_id=run_id,
            log_dir=None if log_dir is None else str(log_dir),
            shutdown_timeout_s=shutdown_timeout_s,
            hosts=hosts,
            save_limit_s=save_limit_s,
            save_markers_dir=save_markers_dir,
        )


# ---------------------------------------------------------------------------------------------
# One process: call the function here.


def _run_in_process(entrypoint: Callable[..., Any], args: tuple) -> None:
    # A fresh port and 127.0.0.1 every time, whatever MASTER_ADDR/MASTER_PORT the shell exported:
    # a world of one on this machine needs nothing else, the multi-process path ignores them too
    # (the agent picks its own port, like torchrun --standalone), and a fixed exported port would
    # make two local runs at once collide.
    values = {
        "MASTER_ADDR": LOCALHOST,
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "GROUP_RANK": "0",
        # Inherited from an outer torchrun this would make env:// wait for an agent store.
        "TORCHELASTIC_USE_AGENT_STORE": None,
    }
    with _patched_environ(values):
        # Exceptions, SystemExit and KeyboardInterrupt propagate unchanged: this is a plain call.
        entrypoint(*args)


# ---------------------------------------------------------------------------------------------
# Several processes: torch elastic's agent.


def _run_elastic(
    entrypoint: Callable[..., Any],
    args: tuple,
    nproc_per_node: int,
    *,
    run_id: str,
    log_dir: str | None,
    shutdown_timeout_s: int,
    hosts: Any = None,
    save_limit_s: int = 600,
    save_markers_dir: str | None = None,
) -> None:
    # The agent makes <log_dir>/<run_id>_<random>/ from it: keep it one plain path component.
    run_id = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)
    # Imported here: `import cluster` stays cheap for code that only needs DistEnv.
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    rdzv, host_environ = _rendezvous_settings(hosts, nproc_per_node)
    children_before = set(multiprocessing.active_children())
    saved_handlers = _signal_handlers()
    started = time.time()
    stop = _GracefulStop(children_before, shutdown_timeout_s, save_limit_s, save_markers_dir)
    try:
        stop.install()
        with (
            _scratch_dir(log_dir) as root,
            # torch elastic exports TORCHELASTIC_SIGNALS_TO_HANDLE into this process too.
            _patched_environ({**_worker_environ(nproc_per_node), **host_environ,
                              _SIGNALS_KEY: os.environ.get(_SIGNALS_KEY), _SAVE_MARKERS_KEY: save_markers_dir}),
            _quiet_duplicate_failure_log(),
        ):
            config = LaunchConfig(
                nproc_per_node=nproc_per_node,
                run_id=run_id,
                **rdzv,
                max_restarts=0,
                start_method="spawn",
                monitor_interval=0.1,
                logs_specs=DefaultLogsSpecs(
                    log_dir=root,  # error.json files always land here; stdout/stderr only if tee
                    tee=Std.ALL if log_dir is not None else Std.NONE,
                ),
                log_line_prefix_template="[rank${rank}]: " if log_dir is not None else None,
                # SIGTERM is _GracefulStop's: the agent's own shutdown would kill a save in progress.
                signals_to_handle=",".join(name for name in _FORWARDED_SIGNALS if name != "SIGTERM"),
                shutdown_timeout=shutdown_timeout_s,
            )
            try:
                elastic_launch(config, _worker_main)(entrypoint, args)
            except ChildFailedError as failed:
                error = _launch_error(failed, root, run_id, started, log_dir,
                                      rank_offset=hosts.node_rank * nproc_per_node if hosts else 0)
                raise (stop.outcome(error, nproc_per_node) if stop.signum is not None else error) from None
            except SignalException as signalled:
                if signalled.sigval == signal.SIGINT:
                    raise KeyboardInterrupt from None
                raise LaunchInterrupted(
                    f"launcher got {signalled.sigval.name}; stopped all {nproc_per_node} workers",
                    exit_code=128 + int(signalled.sigval),
                    signal_name=signalled.sigval.name,
                ) from None
    finally:
        # The agent stops its workers on every path it knows; a second Ctrl-C during that
        # shutdown, or a KeyboardInterrupt before its handlers were installed, can cut it short.
        _kill_leftover_children(children_before)
        _restore_signal_handlers(saved_handlers)


def _rendezvous_settings(hosts: Any, nproc_per_node: int) -> tuple[dict[str, Any], dict[str, str]]:
    """LaunchConfig's rendezvous arguments and the workers' extra variables. One host: a c10d
    rendezvous on 127.0.0.1 port 0 (torchrun --standalone). Several: every host checked in
    (cluster/rendezvous.py), then torch's static rendezvous on master_addr:master_port, as torchrun
    does with --node-rank. A host that cannot meet the others raises LaunchError (exit code 2
    for bad input, printed here because launch.py prints nothing for 2; 1 for a missing host)."""
    if hosts is None:
        return {"min_nodes": 1, "max_nodes": 1, "rdzv_backend": "c10d", "rdzv_endpoint": f"{LOCALHOST}:0",
                # becomes the workers' MASTER_ADDR; no hostname lookup
                "local_addr": LOCALHOST}, {}
    from cluster.rendezvous import RendezvousError, prepare_hosts

    try:
        environ = prepare_hosts(hosts)
    except RendezvousError as exc:
        if exc.user_error:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        raise LaunchError(str(exc), exit_code=2 if exc.user_error else 1) from None
    first = hosts.node_rank * nproc_per_node
    print(f"node_rank {hosts.node_rank} of {hosts.nnodes} on {socket.gethostname()}: ranks {first}-"
          f"{first + nproc_per_node - 1}, rendezvous {hosts.master_addr}:{hosts.master_port} over "
          f"{environ['GLOO_SOCKET_IFNAME']}", flush=True)
    return {"min_nodes": hosts.nnodes, "max_nodes": hosts.nnodes, "rdzv_backend": "static",
            "rdzv_endpoint": f"{hosts.master_addr}:{hosts.master_port}",
            "rdzv_configs": {"rank": hosts.node_rank, "timeout": int(hosts.join_timeout_s)}}, environ


def _worker_main(entrypoint: Callable[..., Any], args: tuple) -> None:
    """Body of each spawned worker (torch wraps it in errors.record, which writes error.json)."""
    # Workers write into a pipe or file more often than a terminal: line buffering keeps ranks'
    # lines whole and loses nothing when the agent kills a worker.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    entrypoint(*args)
    # Nothing is returned: the agent would pickle the value back through a queue.


def _worker_environ(nproc_per_node: int) -> dict[str, str | None]:
    values: dict[str, str | None] = {}
    if "OMP_NUM_THREADS" not in os.environ:
        # Like torchrun, do not let N processes each start one thread per core; unlike torchrun
        # (which sets 1), give each worker its share of the cores this process may use.
        num_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        values["OMP_NUM_THREADS"] = str(max(1, (num_cpus or 1) // nproc_per_node))
    return values


@contextlib.contextmanager
def _scratch_dir(log_dir: str | None) -> Iterator[str]:
    """The agent's log root: the user's log_dir, else a temporary one that holds only the
    error.json files (torch would otherwise leave a torchelastic_* directory in /tmp)."""
    if log_dir is not None:
        os.makedirs(log_dir, exist_ok=True)
        yield log_dir
        return
    with tempfile.TemporaryDirectory(prefix="peer_launch_") as tmp:
        yield tmp


# ---------------------------------------------------------------------------------------------
# Turning the agent's ChildFailedError into one readable LaunchError.


@dataclass
class _RecordedError:
    rank: int
    text: str  # traceback when recorded, else the exception's one-line message
    written_at: float  # mtime of error.json: finer than the whole seconds torch stores inside


def _launch_error(
    failed: Any, root: str, run_id: str, started: float, log_dir: str | None, rank_offset: int = 0
) -> LaunchError:
    """Root cause: the rank the agent saw fail first. When that rank recorded an exception, the
    earliest error.json of the run wins instead (a rank that raised and then lingered in exit
    handlers can be overtaken by a peer whose collective broke because of it)."""
    rank, failure = failed.get_first_failure()
    recorded = _recorded_errors(root, run_id, started, rank_offset)
    by_rank = {error.rank: error for error in recorded}

    exitcode = int(failure.exitcode)
    if rank in by_rank:
        first = min(recorded, key=lambda error: error.written_at)
        if first.rank != rank:
            rank, exitcode = first.rank, 1  # a worker that raised exits with 1 (torch spawn)

    signal_name = None
    if exitcode < 0:
        signal_name = _signal_name(-exitcode)
        exit_code = 128 - exitcode
        how = f"was killed by signal {signal_name}"
    else:
        exit_code = exitcode
        how = f"exited with code {exitcode}"

    if rank in by_rank:
        root_cause = _without_launcher_frames(by_rank[rank].text)
    elif signal_name is not None:
        root_cause = (
            f"no Python traceback: the process was killed by {signal_name}"
            + (" (out of memory is a common cause)" if signal_name == "SIGKILL" else "")
        )
    else:
        root_cause = (
            f"no Python traceback: the worker called sys.exit({exitcode}) or exited on its own; "
            "its console output says why"
        )

    lines = [f"rank {rank} {how}", root_cause.rstrip()]
    others = [error for error in recorded if error.rank != rank]
    for error in sorted(others, key=lambda error: error.rank):
        last_line = error.text.strip().splitlines()[-1] if error.text.strip() else "?"
        lines.append(f"rank {error.rank} also failed: {last_line}")
    if log_dir is not None:
        run_dirs = [d for d in Path(log_dir).glob(f"{run_id}_*") if _newer(d, started)]
        where = max(run_dirs, key=lambda d: d.stat().st_mtime) if run_dirs else Path(log_dir)
        lines.append(f"per-rank logs: {where}/attempt_0/<rank>/{{stdout,stderr}}.log")
    return LaunchError(
        "\n".join(lines),
        exit_code=exit_code,
        rank=rank,
        signal_name=signal_name,
        root_cause=root_cause,
    )


def _recorded_errors(root: str, run_id: str, started: float, rank_offset: int = 0) -> list[_RecordedError]:
    errors = []
    # <root>/<run_id>_<random>/attempt_<n>/<local_rank>/error.json; a reused log_dir may hold
    # older runs with the same run_id, hence the time filter. One node: local rank == rank.
    for path in Path(root).glob(f"{run_id}_*/attempt_*/*/error.json"):
        try:
            written_at = path.stat().st_mtime
            if not _newer(path, started) or not path.parent.name.isdigit():
                continue
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        errors.append(
            _RecordedError(rank_offset + int(path.parent.name), _error_text(data), written_at)
        )
    return errors


def _newer(path: Path, started: float) -> bool:
    try:
        return path.stat().st_mtime >= started - 1  # 1 s of slack for coarse file-system clocks
    except OSError:
        return False


def _error_text(data: Mapping[str, Any]) -> str:
    message = data.get("message", "")
    if isinstance(message, Mapping):
        extra = message.get("extraInfo", {})
        return str(extra.get("py_callstack") or message.get("message", ""))
    return str(message)


def _without_launcher_frames(text: str) -> str:
    """Drop the frames above the user's entrypoint (torch's record wrapper, _worker_main)."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("Traceback"):
        return text
    ours = [i for i, line in enumerate(lines) if line.startswith("  File ") and "in _worker_main" in line]
    if not ours:
        return text
    rest = ours[0] + 1
    while rest < len(lines) and lines[rest].startswith("    "):  # code and ^^^ lines of that frame
        rest += 1
    return "\n".join([lines[0], *lines[rest:]])


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# ---------------------------------------------------------------------------------------------
# Process-wide state the launch touches, and puts back.


def _check_picklable(entrypoint: Callable[..., Any], args: tuple) -> None:
    try:
        pickle.dumps((entrypoint, tuple(args)))
    except Exception as exc:  # pickle raises PicklingError, AttributeError, TypeError, ...
        raise TypeError(
            f"run_local needs a module-level function and picklable args, since workers are "
            f"spawned and import the function by name; got {entrypoint!r}: {exc}"
        ) from exc


@contextlib.contextmanager
def _patched_environ(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (None: unset) these variables, then restore exactly what was there."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _signal_handlers() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}  # torch elastic installs none off the main thread either
    return {
        signum: signal.getsignal(signum)
        for signum in (getattr(signal, name, None) for name in _FORWARDED_SIGNALS)
        if signum is not None
    }


def _restore_signal_handlers(saved: Mapping[int, Any]) -> None:
    for signum, handler in saved.items():
        if handler is not None:  # None: installed outside Python, cannot be put back
            signal.signal(signum, handler)


class _DropAgentFailureTraceback(logging.Filter):
    """The agent logs each worker failure with its traceback before run_local raises LaunchError
    with the same traceback; the copy is noise, and formatting it imports torch._dynamo (2 s)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno >= logging.ERROR and str(record.msg).startswith("failed (exitcode")
        )


class _DropTerminatingPeers(logging.Filter):
    """When one worker fails, torch's process context stops the others and warns "Terminating
    process N via signal SIGTERM" for each one still alive (a race with their own exit): the
    launcher's expected action, not news, and it would follow a user error's one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Terminating process")


@contextlib.contextmanager
def _quiet_duplicate_failure_log() -> Iterator[None]:
    quiet = {"torch.distributed.elastic.multiprocessing.api": _DropAgentFailureTraceback(),
             "torch.multiprocessing.spawn": _DropTerminatingPeers()}
    for name, flt in quiet.items():
        logging.getLogger(name).addFilter(flt)
    try:
        yield
    finally:
        for name, flt in quiet.items():
            logging.getLogger(name).removeFilter(flt)


class _GracefulStop:
    """SIGTERM to the launcher: forward it to every worker (they finish the step, save together and
    exit 75), give them `grace_s`, then SIGKILL whatever is left, except while a worker marks a save
    in progress in `markers_dir`: then wait for it (at most `save_limit_s` more), and give them
    `grace_s` again from its end to exit."""

    def __init__(self, children_before: set[Any], grace_s: float, save_limit_s: float, markers_dir: str | None):
        self.children_before, self.grace_s, self.save_limit_s = children_before, grace_s, save_limit_s
        self.markers_dir = markers_dir
        self.signum: int | None = None
        self.killed_after_s: float | None = None
        if markers_dir:
            os.makedirs(markers_dir, exist_ok=True)
            for stale in Path(markers_dir).glob("saving_rank_*"):  # left by a worker killed mid-save
                stale.unlink(missing_ok=True)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)

    def _workers(self) -> list[Any]:
        return [c for c in multiprocessing.active_children() if c not in self.children_before and c.is_alive()]

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            return  # a repeated SIGTERM changes nothing: the deadline stands
        self.signum, self.at = signum, time.monotonic()
        for child in self._workers():
            with contextlib.suppress(ProcessLookupError, OSError):
                os.kill(child.pid, signum)
        threading.Thread(target=self._kill_when_due, name="graceful-stop", daemon=True).start()

    def saving(self) -> bool:
        return bool(self.markers_dir) and any(Path(self.markers_dir).glob("saving_rank_*"))

    def _kill_when_due(self) -> None:
        last_busy = self.at  # the grace runs from the signal, and again from the end of a save (to exit)
        while True:
            workers = self._workers()
            if not workers:
                return
            now = time.monotonic()
            waited = now - self.at
            if self.saving():
                last_busy = now
            if waited >= self.grace_s + self.save_limit_s or now - last_busy >= self.grace_s:
                self.killed_after_s = waited
                for child in workers:
                    with contextlib.suppress(ProcessLookupError, OSError):
                        child.kill()
                return
            time.sleep(0.1)

    def outcome(self, error: LaunchError, nproc_per_node: int) -> LaunchError:
        """What the workers' ends mean once SIGTERM stopped them."""
        if error.exit_code == 75 and self.killed_after_s is None:
            return LaunchError("stopped by SIGTERM after a complete checkpoint", exit_code=75, rank=error.rank)
        name = signal.Signals(self.signum).name
        how = (f"; workers still running after {self.killed_after_s:.0f} s were killed (cluster.shutdown_grace_s="
               f"{self.grace_s:g})" if self.killed_after_s is not None else "")
        return LaunchInterrupted(f"launcher got {name}; stopped all {nproc_per_node} workers{how}",
                                 exit_code=128 + int(self.signum), signal_name=name)


def _kill_leftover_children(children_before: set[Any]) -> None:
    for child in multiprocessing.active_children():
        if child in children_before or not child.is_alive():
            continue
        with contextlib.suppress(ProcessLookupError, OSError):
            child.kill()
        child.join(timeout=5)
