"""The optimizer of a run: torch AdamW on its fastest path for the device, built in one place.

Why not torch.optim.AdamW's default: on CPU it takes the single-tensor path, one Python-level
loop of about ten ops per parameter tensor, each a full pass over the tensor. For a 1024^2-expert
PEER layer (268 M numbers in U and V) that measured 1.98 s per step against 0.15 s for
`fused=True`, which does the whole update in one pass over (param, grad, m, v)
(bench/RESULTS.md). Fused AdamW is the same algorithm (decoupled weight decay, bias correction);
its results differ from the single-tensor path only in the last bits of floating-point rounding
(tests/unit/test_optim.py states the tolerance).
"""

from __future__ import annotations

import torch

from orchestrator.config import OptimConfig


def adamw_kwargs(o: OptimConfig, params) -> dict:
    """fused where torch has a fused kernel for every parameter's device and dtype, else foreach."""
    devices = {p.device.type for group in params for p in (group["params"] if isinstance(group, dict) else [group])}
    fused = devices <= {"cpu", "cuda"}
    return {"fused": True} if fused else {"foreach": True}


def build_optimizer(param_groups: list[dict], o: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over `param_groups` (orchestrator/engine.param_groups) with the run's settings."""
    return torch.optim.AdamW(param_groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             weight_decay=o.weight_decay, **adamw_kwargs(o, param_groups))
