"""The optimizer of a run: torch AdamW on its fastest path for the device, built in one place.

Why not torch.optim.AdamW's default: on CPU it takes the single-tensor path, one Python-level
loop of about ten ops per parameter tensor, each a full pass over the tensor. For a 1024^2-expert
PEER layer (268 M numbers in U and V) that measured 1977 ms per step against 154 ms for
`fused=True`, which does the whole update in one pass over (param, grad, m, v)
(bench/RESULTS.md, "A million experts"). Fused AdamW is the same algorithm (decoupled weight decay, bias correction);
its results differ from the single-tensor path only in the last bits of floating-point rounding
(tests/unit/test_optim.py states the tolerance).

`optim.expert_tables=row_sparse` keeps this AdamW for every parameter but the PEER expert tables,
which get a lazy row update instead (orchestrator/row_sparse_adamw.py; how it differs there).
"""

from __future__ import annotations

import torch

from orchestrator.config import OptimConfig


def adamw_kwargs(o: OptimConfig, params, zero_stage: int = 0) -> dict:
    """fused (one pass over param, grad and both moments) without ZeRO; the single-tensor path
    under ZeRO 1/2. Why: with ZeRO-1, ep=2 and clipping, the fused path's losses drifted from
    ep=1's by 1.3e-4 relative after 19 steps, against 1e-7 for the single-tensor path (the same
    two runs otherwise; tests/distributed/test_expert_parallel_training.py). The cause is not
    found yet; ZeRO partitions are flat buffers DeepSpeed steps itself, where the fused kernel's
    benefit is also smaller (one tensor per group)."""
    if zero_stage > 0:
        return {"foreach": False}
    devices = {p.device.type for group in params for p in (group["params"] if isinstance(group, dict) else [group])}
    return {"fused": True} if devices <= {"cpu", "cuda"} else {"foreach": True}


def build_optimizer(param_groups: list[dict], o: OptimConfig, zero_stage: int = 0, model=None,
                    dp_group=None, dp_size: int = 1) -> torch.optim.Optimizer:
    """AdamW over `param_groups` (orchestrator/engine.param_groups) with the run's settings.

    optim.expert_tables=row_sparse: the same AdamW, but the PEER tables of `model` get the lazy row
    update (orchestrator/row_sparse_adamw.py); dp_group/dp_size: where the retrieved rows are
    agreed (None: the default group)."""
    kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                  **adamw_kwargs(o, param_groups, zero_stage))
    if o.expert_tables == "row_sparse":
        if model is None:
            raise ValueError("optim.expert_tables=row_sparse needs the model (its PEER layers record the retrieved rows)")
        from orchestrator.row_sparse_adamw import build_row_sparse_adamw

        return build_row_sparse_adamw(param_groups, model, dp_group, dp_size, **kwargs)
    return torch.optim.AdamW(param_groups, **kwargs)
