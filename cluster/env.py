"""The torch.distributed environment of one training process, as its launcher exported it.

Every launcher this project uses (cluster.local.run_local, torchrun, Slurm through submitit's
TorchDistributedEnvironment().export()) exports the same variables; the training process reads
them once, here, instead of poking at os.environ in several places.

Initialise the process group with init_method="env://" (torch's default, and what
deepspeed.init_distributed() does), not with a tcp:// URL built from master_addr/master_port:
under run_local with several processes, torch elastic's agent already hosts the TCP store on
MASTER_PORT and tells the workers so through TORCHELASTIC_USE_AGENT_STORE, which only the env://
rendezvous honours. A tcp:// URL would make rank 0 try to bind a port the agent already holds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

_REQUIRED = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job: its ranks, the sizes, and the rendezvous address."""

    rank: int
    """Global rank of this process, 0 <= rank < world_size."""
    local_rank: int
    """Rank among the processes of this node; picks the GPU on a GPU node."""
    world_size: int
    """Number of processes in the whole job."""
    local_world_size: int
    """Number of processes on this node."""
    master_addr: str
    """Host of the rendezvous store (rank 0's node, or the launcher agent's)."""
    master_port: int
    """TCP port of the rendezvous store."""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> DistEnv:
        """Read the six variables a launcher exports; a missing or bad one raises RuntimeError.

        There are no defaults on purpose: a process started outside a launcher should fail here
        with a message that says so, not train alone believing it is rank 0 of 1.
        """
        env = os.environ if environ is None else environ
        missing = [key for key in _REQUIRED if not env.get(key)]
        if missing:
            raise RuntimeError(
                f"torch.distributed environment is incomplete: {', '.join(missing)} not set; "
                "start training processes through cluster.run_local (or torchrun / Slurm), "
                "which export RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, "
                "MASTER_PORT"
            )
        dist_env = cls(
            rank=_int(env, "RANK"),
            local_rank=_int(env, "LOCAL_RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_world_size=_int(env, "LOCAL_WORLD_SIZE"),
            master_addr=env["MASTER_ADDR"],
            master_port=_int(env, "MASTER_PORT"),
        )
        dist_env._check()
        return dist_env

    @property
    def is_rank0(self) -> bool:
        """True on the one process that owns rank-0 side effects (logging, tracking)."""
        return self.rank == 0

    def _check(self) -> None:
        problems = []
        if not 0 <= self.rank < self.world_size:
            problems.append(f"RANK={self.rank} outside [0, WORLD_SIZE={self.world_size})")
        if not 0 <= self.local_rank < self.local_world_size:
            problems.append(
                f"LOCAL_RANK={self.local_rank} outside [0, LOCAL_WORLD_SIZE={self.local_world_size})"
            )
        if self.local_world_size > self.world_size:
            problems.append(
                f"LOCAL_WORLD_SIZE={self.local_world_size} > WORLD_SIZE={self.world_size}"
            )
        if not 0 < self.master_port < 65536:
            problems.append(f"MASTER_PORT={self.master_port} is not a TCP port")
        if problems:
            raise RuntimeError("inconsistent torch.distributed environment: " + "; ".join(problems))


def select_backend(use_cuda: bool) -> str:
    """The collective backend for this device: NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if use_cuda else "gloo"


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise RuntimeError(f"{key}={env[key]!r} is not an integer") from None
