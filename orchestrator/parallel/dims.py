"""Parallel degrees with named axes and the process groups behind them.

    dp  data-parallel degree: every rank is its own data-parallel rank (dp = world, tp = pp = 1)
    ep  expert-parallel degree: consecutive groups of ep ranks split every sparse layer's experts
        (PEER: columns of U and V; DeepSpeed MoE: whole experts); divides dp
    edp expert-data-parallel degree dp / ep: ranks holding the same expert shard, which average
        its gradients (ranks r, r + ep, r + 2 ep, ...)

The groups are DeepSpeed's (deepspeed.utils.groups, named f"ep_size_{ep}"), so that PEER tables
and DeepSpeed MoE experts share one layout and ZeRO reduces and partitions expert parameters over
the expert-data-parallel group.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    ep: int = 1
    tp: int = 1
    pp: int = 1

    @classmethod
    def from_config(cls, parallel) -> "ParallelDims":
        return cls(dp=parallel.dp, ep=parallel.ep, tp=parallel.tp, pp=parallel.pp)

    @property
    def expert_group_name(self) -> str:
        return f"ep_size_{self.ep}"

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    def expert_groups(self):
        """(ep_group, edp_group) of this rank, created through DeepSpeed on first use (collective:
        every rank must call it). Needs torch.distributed initialised."""
        from deepspeed.utils import groups

        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(self.ep)
        return (groups._get_expert_parallel_group(self.expert_group_name),
                groups._get_expert_data_parallel_group(self.expert_group_name))
