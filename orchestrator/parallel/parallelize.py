"""parallelize(model, dims): apply expert parallelism to a built model, from outside its code.

- Every PEER layer becomes a DimShardedPEER holding d/ep columns of U and V (marked as DeepSpeed
  expert parameters). Build the model under `model.peer.defer_expert_tables()` and the tables are
  built here column slice by column slice, so the full table never exists on a rank; a model
  built eagerly is sliced (tests).
- Every DeepSpeed MoE layer re-initialises its local experts as the global experts it holds, so
  that expert e starts with the same weights whatever ep is.

Call it on every rank, after torch.distributed is initialised and before deepspeed.initialize.
"""

from __future__ import annotations

from torch import nn

from model.moe import MoEFeedForward
from model.peer import PEER
from orchestrator.parallel.dims import ParallelDims
from orchestrator.parallel.expert_parallel import DimShardedPEER


def parallelize(model: nn.Module, dims: ParallelDims) -> nn.Module:
    if dims.ep == 1:
        for module in model.modules():
            if isinstance(module, PEER) and module.expert_down.weight.is_meta:
                raise ValueError("PEER tables are deferred (meta) but ep=1: build the model eagerly")
        return model
    ep_group, _ = dims.expert_groups()
    import torch.distributed as dist

    ep_rank = dist.get_rank(ep_group)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PEER) and not isinstance(child, DimShardedPEER):
                setattr(parent, name, DimShardedPEER.from_peer(child, ep_group, dims.expert_group_name))
            elif isinstance(child, MoEFeedForward):
                if child.ep_size != dims.ep:
                    raise ValueError(f"MoE layer {name} was built with ep_size={child.ep_size}, dims say ep={dims.ep}")
                child.reset_local_experts(ep_rank)
    return model


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters marked as DeepSpeed expert parameters (sharded over the ep group)."""
    from deepspeed.moe.utils import is_moe_param

    return [p for p in model.parameters() if is_moe_param(p)]
