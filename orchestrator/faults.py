"""A rank that dies or hangs mid-step: the whole job ends within cluster.collective_timeout_s, and
the one line it ends with names the rank that stopped.

Every collective waits at most cluster.collective_timeout_s for its peers (the process groups'
timeout, compat.py set_default_collective_timeout). Each rank records the last step
it finished in <run.dir>/heartbeat/rank_<N> (one small local write per step). When a collective
times out, the ranks still alive read those records: the rank(s) behind the others are the ones
that died or hang. The timed-out ranks then fail, and the launcher stops the rest (a hung rank
included: SIGKILL reaches a stopped process).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
from typing import Iterator, Optional

HEARTBEAT_DIR = "heartbeat"
# The messages a collective's timeout raises with: gloo, NCCL's watchdog, the c10d store.
_TIMEOUT_MARKS = ("Timed out waiting", "timed out", "Watchdog caught collective operation timeout",
                  "Connection closed by peer", "Connection reset by peer")


class Heartbeat:
    """This rank's progress record, and everyone's."""

    def __init__(self, run_dir: str, rank: int, world_size: int):
        self.folder = os.path.join(run_dir, HEARTBEAT_DIR)
        self.rank, self.world_size = rank, world_size
        os.makedirs(self.folder, exist_ok=True)

    def beat(self, step: int) -> None:
        """This rank finished `step` (written whole: a reader never sees half a number)."""
        path = os.path.join(self.folder, f"rank_{self.rank:05d}")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(str(step))
        os.replace(path + ".tmp", path)

    def steps(self) -> dict[int, Optional[int]]:
        out: dict[int, Optional[int]] = {}
        for rank in range(self.world_size):
            try:
                with open(os.path.join(self.folder, f"rank_{rank:05d}"), encoding="utf-8") as f:
                    out[rank] = int(f.read().strip() or -1)
            except (OSError, ValueError):
                out[rank] = None  # never finished a step
        return out


# The running trainer's heartbeat (one trainer per process), for the error path of train_main.
CURRENT: Optional[Heartbeat] = None


def is_collective_timeout(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, (RuntimeError, OSError)) and any(mark in text for mark in _TIMEOUT_MARKS)


def timeout_message(heartbeat: Optional[Heartbeat], timeout_s: int) -> str:
    """One line: which rank stopped, at which step, and what to do."""
    me = heartbeat.rank if heartbeat else int(os.environ.get("RANK", "0"))
    steps = heartbeat.steps() if heartbeat else {}
    known = {r: s for r, s in steps.items() if r != me}
    mine = steps.get(me)
    lowest = min((-1 if s is None else s) for s in known.values()) if known else None
    behind = sorted(r for r, s in known.items() if (-1 if s is None else s) == lowest) if known else []
    who = (f"rank {', '.join(map(str, behind))} stopped after step {lowest if lowest >= 0 else '(none)'}"
           if behind and lowest is not None and (mine is None or lowest < mine + 1) else "a peer rank stopped")
    return (f"cluster.collective_timeout_s={timeout_s}: rank {me} waited {timeout_s} s in a collective at step "
            f"{(mine or 0) + 1}: {who} (it died or hangs); fix: see that rank's log (<run.dir>/logs), then run "
            "the same command again to resume from the last complete checkpoint")


# ----------------------------------------------------------------------------- a save in progress


@contextlib.contextmanager
def save_in_progress(rank: int) -> Iterator[None]:
    """Mark this rank's save for the local launcher (cluster/local.py): after a SIGTERM, its
    cluster.shutdown_grace_s does not end while a marker exists. The folder comes from the
    launcher (PEERLAB_SAVE_MARKERS); without it (one process, Slurm) this does nothing."""
    folder = os.environ.get("PEERLAB_SAVE_MARKERS")
    if not folder:
        yield
        return
    marker = os.path.join(folder, f"saving_rank_{rank:05d}")
    with open(marker, "w", encoding="utf-8") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(marker)


# ----------------------------------------------------------------------------- out of memory
# What this process is doing, for the out-of-memory line: the trainer sets it at each phase.
PHASE = "start-up"


def is_out_of_memory(exc: BaseException) -> bool:
    """Python's MemoryError, torch's CPU allocator failing (a RuntimeError), CUDA's OutOfMemoryError."""
    text = str(exc)
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or (isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "CUDA out of memory" in text)))


def out_of_memory_message(exc: BaseException, phase: str, rank: int) -> str:
    """One line: where the memory ran out, how much was asked for, and what to change.

    Only an allocation that fails inside the process can be reported this way (a memory limit such
    as `ulimit -v`, a CUDA device, an allocator that refuses); the kernel's OOM killer sends SIGKILL
    instead, which the launcher reports as a kill by SIGKILL."""
    match = re.search(r"tried to allocate (\d+(?:\.\d+)?)\s*(bytes|[KMG]iB)", str(exc), re.IGNORECASE)
    if match:
        size = float(match.group(1)) * {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[match.group(2)]
        asked = f"an allocation of {size / 2**20:,.1f} MiB failed"
    else:
        asked = f"{type(exc).__name__} {' '.join(str(exc).split())[:160]}".strip()
    if phase == "data preparation":
        fix = "lower data.num_workers (each tokenizing process holds its own batch of documents) or use a machine with more memory"
    else:
        fix = ("see what each rank needs with `python -m orchestrator.plan <the same overrides>`, then lower "
               "trainer.micro_batch_size (a larger trainer.grad_accum_steps keeps the global batch), set "
               "trainer.activation_checkpointing=blocks, or raise parallel.zero_stage or parallel.ep")
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        asked += f" (this process's address-space limit, ulimit -v, is {limit / 2**30:.1f} GiB)"
    return f"out of memory on rank {rank} during {phase}: {asked}; fix: {fix}"
