"""The reference expert compute: PEER's Algorithm 1 written literally (He 2024).

Gathers [T, H, K, D] rows of U and of V; autograd keeps both for backward and nn.Embedding's
backward builds dense [N, D] gradients. Exact and readable; every fused backend is tested
against it. Legend as in model/kernels/__init__.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATION_FNS = {"relu": F.relu, "gelu": F.gelu}


def reference_expert_mix(x_TD, down_weight_ND, up_weight_ND, gates_THK, idx_THK, activation):
    u_THKD = F.embedding(idx_THK, down_weight_ND)
    v_THKD = F.embedding(idx_THK, up_weight_ND)
    hidden_THK = ACTIVATION_FNS[activation](torch.einsum("thkd,td->thk", u_THKD, x_TD))
    return torch.einsum("thk,thkd->td", gates_THK * hidden_THK, v_THKD)


# The two halves of the expert compute on their own, for the expert-parallel layer (a cross-rank
# sum of the dots comes between them; orchestrator/parallel/expert_parallel.py). M retrieved rows.


def reference_gathered_dot(x_TD, table_ND, idx_TM):
    """s[t, m] = table[idx[t, m]] . x[t], gathering [T, M, D] rows (kept for backward)."""
    return torch.einsum("tmd,td->tm", F.embedding(idx_TM, table_ND), x_TD)


def reference_weighted_gather_sum(w_TM, table_ND, idx_TM):
    """y[t] = sum_m w[t, m] table[idx[t, m]], gathering [T, M, D] rows (kept for backward)."""
    return torch.einsum("tm,tmd->td", w_TM, F.embedding(idx_TM, table_ND))
