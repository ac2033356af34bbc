"""orchestrator/optim.py: the fused AdamW is torch's AdamW, to rounding."""

from __future__ import annotations

import torch

from orchestrator.config import OptimConfig
from orchestrator.optim import build_optimizer


def test_fused_adamw_matches_the_single_tensor_path():
    o = OptimConfig(lr=1e-2, min_lr_ratio=0.1, warmup_steps=0, decay_steps=None, weight_decay=0.1, beta1=0.9,
                    beta2=0.95, eps=1e-8, grad_clip=1.0)
    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(64, 8)), torch.nn.Parameter(torch.randn(8))]
    new = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    ref_opt = torch.optim.AdamW([{"params": ref[:1]}, {"params": ref[1:], "weight_decay": 0.0}], lr=o.lr,
                                betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay, foreach=False)
    new_opt = build_optimizer([{"params": new[:1]}, {"params": new[1:], "weight_decay": 0.0}], o)
    assert new_opt.defaults["fused"] is True
    for step in range(5):
        grads = [torch.randn_like(p) for p in ref]
        for ps, opt in ((ref, ref_opt), (new, new_opt)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    # The fused kernel computes the same update with a different operation order: fp32
    # rounding differences of a few ulp per step on values of order 1.
    for a, b in zip(ref, new):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
