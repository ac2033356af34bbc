"""Parallel degrees with named axes, the rank layout (mesh) and the process groups behind them.

    dp  data-parallel degree: replicas of the model that see different batches
    tp  tensor-parallel degree: ranks that split one layer's matrices (Megatron style)
    pp  pipeline-parallel degree: stages, each holding a contiguous slice of the blocks
    ep  expert-parallel degree: consecutive groups of ep data-parallel ranks split every sparse
        layer's experts (PEER: columns of U and V; DeepSpeed MoE: whole experts); divides dp
    edp expert-data-parallel degree dp / ep: data-parallel ranks holding the same expert shard,
        which average its gradients

world = pp x dp x tp. Rank layout (DeepSpeed's PipeModelDataParallelTopology, axes pipe, data,
model): tp is innermost, so the ranks of one tensor-parallel group are consecutive and stay inside
a node (tp's all-reduces are the most frequent and the largest per byte of compute); then dp (with
ep groups made of data-parallel ranks, as DeepSpeed builds them); pp outermost (stages exchange
only activations, the lightest traffic, so they may cross nodes):

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

The groups are DeepSpeed's: the grid (deepspeed.runtime.pipe.topology.PipelineParallelGrid) is the
`mpu` handed to deepspeed.initialize, so data-parallel reduction and ZeRO use the data-parallel
group, and expert groups come from deepspeed.utils.groups (named f"ep_size_{ep}"), so PEER tables
and DeepSpeed MoE experts share one layout and ZeRO reduces and partitions expert parameters over
the expert-data-parallel group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class MeshCoords(NamedTuple):
    pp: int
    dp: int
    tp: int


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
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def expert_group_name(self) -> str:
        return f"ep_size_{self.ep}"

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    def coords(self, rank: int) -> MeshCoords:
        """(pp_rank, dp_rank, tp_rank) of a global rank; the inverse of `rank_of`."""
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        return MeshCoords(pp=rank // (self.tp * self.dp), dp=dp_rank, tp=tp_rank)

    def rank_of(self, pp: int, dp: int, tp: int) -> int:
        return (pp * self.dp + dp) * self.tp + tp

    def layout(self) -> str:
        """One line per rank, printed at start: where each rank sits on the mesh."""
        lines = [f"mesh: world={self.world_size} = pp {self.pp} x dp {self.dp} x tp {self.tp} "
                 f"(ep {self.ep} within dp); rank = (pp_rank * dp + dp_rank) * tp + tp_rank"]
        for rank in range(self.world_size):
            c = self.coords(rank)
            lines.append(f"  rank {rank}: pp {c.pp}  dp {c.dp}  tp {c.tp}  ep {c.dp % self.ep}")
        return "\n".join(lines)

    def topology(self):
        """DeepSpeed's topology object for this layout (also what a PipelineModule takes)."""
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        return PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.tp, num_dp=self.dp)

    def grid(self):
        """The process groups of this layout as DeepSpeed's PipelineParallelGrid: the `mpu` for
        deepspeed.initialize (get_data_parallel_group, get_model_parallel_group = tp group,
        get_pipe_parallel_group, ...). Collective: every rank must call it; built once per process."""
        global _GRID
        if _GRID is None or _GRID[0] != self:
            from deepspeed.runtime.pipe.topology import PipelineParallelGrid

            _GRID = (self, PipelineParallelGrid(topology=self.topology()))
        return _GRID[1]

    def tp_group(self):
        """This rank's tensor-parallel group (tp consecutive ranks; the grid's slice group).
        Collective on first use (builds the grid)."""
        return self.grid().get_slice_parallel_group()

    def expert_groups(self):
        """(ep_group, edp_group) of this rank, created through DeepSpeed on first use (collective:
        every rank must call it). Needs torch.distributed initialised."""
        from compat import expert_groups

        return expert_groups(self.ep, self.expert_group_name, mpu=None if self.tp == 1 and self.pp == 1 else self.grid())


_GRID = None
