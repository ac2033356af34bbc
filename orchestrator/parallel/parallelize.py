"""parallelize(model, dims): apply expert and tensor parallelism to a built model, from outside its code.

Expert parallelism (ep > 1):
- Every PEER layer becomes a DimShardedPEER holding d/ep columns of U and V (marked as DeepSpeed
  expert parameters). Build the model under `model.peer.defer_expert_tables()` and the tables are
  built here column slice by column slice, so the full table never exists on a rank; a model
  built eagerly is sliced (tests).
- Every DeepSpeed MoE layer re-initialises its local experts as the global experts it holds, so
  that expert e starts with the same weights whatever ep is.

Tensor parallelism (tp > 1, orchestrator/parallel/tensor_parallel.py): attention and dense MLPs
Megatron-style, PEER tables split along d over tp (and over ep inside each tp slice:
TensorParallelPEER, d/(tp*ep) columns per rank), DeepSpeed MoE experts tp-sharded; embeddings,
norms, gates and routing replicated. Every shard is a slice of the single-process weights.

Pipeline parallelism (pp > 1, orchestrator/parallel/pipeline.py) comes first: the model becomes
this rank's stage, a DeepSpeed PipelineModule holding contiguous blocks, and expert and tensor
parallelism then apply to that stage's layers (the stage's tp ranks are a tp group of the same mesh:
rank = (pp_rank * dp + dp_rank) * tp + tp_rank). Its engine is built by orchestrator/engine/pipeline.build_pipeline_deepspeed
(deepspeed.initialize takes the module's own grid; it refuses an mpu beside a PipelineModule).

Call it on every rank, after torch.distributed is initialised and before deepspeed.initialize
(with mpu=dims.grid() when tp > 1; for pp > 1 see above).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from model.moe import MoEFeedForward
from model.peer import PEER
from orchestrator.parallel.dims import ParallelDims
from orchestrator.parallel.expert_parallel import DimShardedPEER
from orchestrator.parallel.shards import declare_child_names, declare_storage_order


def parallelize(model: nn.Module, dims: ParallelDims) -> nn.Module:
    model = _parallelize(model, dims)
    # Checkpoints: PEER tables are split along d (columns) by ep and tp, so their files hold them
    # column-major, whatever this run's layout (orchestrator/parallel/shards.py).
    for module in model.modules():
        if isinstance(module, PEER):
            for table in (module.expert_down, module.expert_up):
                declare_storage_order(table, "weight", (1, 0))
    return model


def _parallelize(model: nn.Module, dims: ParallelDims) -> nn.Module:
    if dims.pp > 1:
        # Pipeline first (orchestrator/parallel/pipeline.py): this rank keeps its stage's layers,
        # and the steps below apply to those. DeepSpeed MoE layers would otherwise make their
        # expert groups without the pipeline grid (spanning stages): make them here, on every
        # rank (collective; the full model tells every rank alike whether there are MoE layers).
        from orchestrator.parallel.pipeline import to_pipeline

        if any(isinstance(m, MoEFeedForward) for m in model.modules()):
            dims.expert_groups()
        model = to_pipeline(model, dims)
    if dims.ep == 1 and dims.tp == 1:
        for module in model.modules():
            if isinstance(module, PEER) and module.expert_down.weight.is_meta:
                raise ValueError("PEER tables are deferred (meta) but ep=tp=1: build the model eagerly")
        return model
    has_moe = any(isinstance(m, MoEFeedForward) for m in model.modules())
    ep_group = None
    if dims.ep > 1 or (has_moe and dims.tp > 1):
        # DeepSpeed MoE with an mpu needs its expert groups made with that mpu (expert tensor
        # parallelism, see tensor_parallel._tensor_parallel_experts); made here, before
        # deepspeed.initialize, so that the layers find them instead of making their own.
        ep_group, _ = dims.expert_groups()
    ep_rank = dist.get_rank(ep_group) if ep_group is not None else 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoEFeedForward):
                if child.ep_size != dims.ep:
                    raise ValueError(f"MoE layer {name} was built with ep_size={child.ep_size}, dims say ep={dims.ep}")
                child.reset_local_experts(ep_rank)
                # Checkpoints: local expert j is global expert ep_rank * L + j (DeepSpeed's placement).
                local = len(child.local_experts())
                declare_child_names(child.moe.deepspeed_moe.experts.deepspeed_experts,
                                    {str(j): str(ep_rank * local + j) for j in range(local)})
            elif dims.tp == 1 and isinstance(child, PEER) and not isinstance(child, DimShardedPEER):
                setattr(parent, name, DimShardedPEER.from_peer(child, ep_group, dims.expert_group_name))
    if dims.tp > 1:
        from orchestrator.parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, dims.tp_group(), ep_group if dims.ep > 1 else None, dims.expert_group_name)
    for module in model.modules():
        if isinstance(module, DimShardedPEER):
            # The trainer feeds every rank batches of one shape, [micro_batch_size, seq_len]
            # (orchestrator/data.py): no all_gather of token counts in each forward.
            module.equal_token_counts = True
    return model


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters marked as DeepSpeed expert parameters (sharded over the ep group)."""
    from deepspeed.moe.utils import is_moe_param

    return [p for p in model.parameters() if is_moe_param(p)]
