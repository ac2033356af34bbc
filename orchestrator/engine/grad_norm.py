"""The one global gradient norm of the engines, and clipping with it.

Every parameter of a layout is one of four kinds, read from marks the parallel wrappers set:

    replicated      the same tensor and the same gradient on every rank of its tp / ep group
    expert shard    `is_moe_param` (DeepSpeed's mark): PEER U/V columns under ep, MoE experts;
                    a rank holds 1/ep of the numbers, the ep group together holds them all
    tp shard        `tensor_model_parallel` (orchestrator/parallel/tensor_parallel.py)
    expert x tp     PEER tables under ep x tp: split over both groups

The squared norm of the whole model is a sum over numbers, each counted once. A rank sums the
squares of its own gradients by kind; a kind sharded over a group is summed over that group (ep,
then tp for the kinds sharded over tp); a replicated kind is already complete on this rank and is
not summed over any group it is replicated on (that would count it ep or tp times). Pipeline
stages hold disjoint layers, so the stage totals are summed over the pipe group; the last stage's
copy of a tied embedding (`ds_pipe_replicated`) is skipped, as DeepSpeed sums the two copies'
gradients before the step. Data-parallel replicas hold the same averaged gradients: no dp sum.

Why the trainer computes it and not DeepSpeed (without ZeRO): DeepSpeed's ZeRO-0 clipping
(deepspeed.runtime.utils.clip_grad_norm_) averages per-rank norms over the expert group, which
is wrong once experts are sharded, and it drops the value. With ZeRO 1/2 the averaged gradients
exist only as DeepSpeed's flat partitions inside its optimizer; it counts each partition once,
clips there and reports the norm, and the engines return that value (see docs/engine.md).

The arithmetic is float64 on the device from float32 per-kind norms: float32 -> float64 squares
are exact, so the value equals the one the trainer computed before through Python floats, and no
host synchronisation happens until someone reads the value (a log line).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _kind(param) -> tuple[bool, bool]:
    from deepspeed.moe.utils import is_moe_param

    from orchestrator.parallel.tensor_parallel import is_tensor_parallel

    return is_moe_param(param), is_tensor_parallel(param)


def global_grad_norm(params, *, device, ep_group=None, tp_group=None, pipe_group=None) -> torch.Tensor:
    """L2 norm of the gradients of the whole model (0-dim float64 on `device`, the same value on
    every rank). Collective over each group given (None: that axis has degree 1)."""
    buckets: dict[tuple[bool, bool], list] = {}
    for p in params:
        if p.grad is None or getattr(p, "ds_pipe_replicated", False):
            continue
        buckets.setdefault(_kind(p), []).append(p.grad.detach())

    def squares(expert: bool, sharded: bool) -> torch.Tensor:
        grads = buckets.get((expert, sharded))
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=device)
        return torch.nn.utils.get_total_norm(grads).to(device=device, dtype=torch.float64).square()

    # [expert, not tp-sharded], [expert, tp-sharded]: summed over the ep group first.
    expert_sq = torch.stack([squares(True, False), squares(True, True)])
    if ep_group is not None:
        dist.all_reduce(expert_sq, group=ep_group)
    tp_sq = squares(False, True) + expert_sq[1]
    if tp_group is not None:
        dist.all_reduce(tp_sq, group=tp_group)
    total = squares(False, False) + expert_sq[0] + tp_sq
    if pipe_group is not None:
        dist.all_reduce(total, group=pipe_group)
    return total.sqrt()


def clip_gradients(params, max_norm: float, norm: torch.Tensor) -> None:
    """Scale every gradient by min(1, max_norm / (norm + 1e-6)) (torch's and DeepSpeed's rule),
    with the float32 value of the norm, as torch.nn.utils.clip_grad_norm_ would use."""
    grads = [p for p in params if p.grad is not None]
    torch.nn.utils.clip_grads_with_norm_(grads, max_norm, norm.float())
