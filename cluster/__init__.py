"""Where training processes run. Knows nothing of models: it is handed a function and its args.

- cluster.local.run_local: N processes on this machine (in-process for N == 1, else torch
  elastic's agent, as `torchrun --standalone`).
- cluster.env.DistEnv: the rank / world / rendezvous variables a launcher exported, read once.
"""

from cluster.env import DistEnv, select_backend
from cluster.local import LaunchError, LaunchInterrupted, free_port, run_local

__all__ = [
    "DistEnv",
    "LaunchError",
    "LaunchInterrupted",
    "free_port",
    "run_local",
    "select_backend",
]
