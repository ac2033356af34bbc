"""Entry points that tests/cluster/test_local.py hands to run_local.

They live in a module of their own (not in the test file) so that spawned workers import them by
name, as they will import orchestrator.train.train_main; spawned processes get the parent's
sys.path, which holds the repository root under pytest and in the launcher scripts below.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from cluster.env import DistEnv, select_backend


def report_world(out_dir: str) -> None:
    """Join a gloo group through the environment, all-reduce rank + 1, write what this rank saw."""
    env = DistEnv.from_environ()
    dist.init_process_group(select_backend(use_cuda=False))
    try:
        total = torch.tensor([float(env.rank + 1)])
        dist.all_reduce(total)
        result = {
            "rank": env.rank,
            "local_rank": env.local_rank,
            "world_size": env.world_size,
            "local_world_size": env.local_world_size,
            "dist_rank": dist.get_rank(),
            "dist_world_size": dist.get_world_size(),
            "sum": total.item(),
            "pid": os.getpid(),
            "master_addr": env.master_addr,
            "group_rank": os.environ.get("GROUP_RANK"),
        }
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(result))
    print(f"rank {env.rank} of {env.world_size}: sum {result['sum']}")


def fail_on_rank1(out_dir: str) -> None:
    """Rank 1 raises; rank 0 waits in a collective that can never complete."""
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise ValueError("boom")
    dist.all_reduce(torch.ones(1))


def exit2_on_rank1(out_dir: str) -> None:
    """Rank 1 exits as the project does on a user error; rank 0 would run on for a minute."""
    if os.environ["RANK"] == "1":
        print("error: model.foo=1: made-up user error; fix: none", file=sys.stderr)
        sys.exit(2)
    time.sleep(60)


def write_pid_and_sleep(out_dir: str) -> None:
    """Announce this worker's pid, then idle until a signal ends it."""
    rank = os.environ["RANK"]
    partial = Path(out_dir, f".pid{rank}.partial")
    partial.write_text(str(os.getpid()))
    partial.rename(Path(out_dir, f"pid{rank}.txt"))  # whole file or none, for the polling test
    time.sleep(120)
