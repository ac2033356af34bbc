"""Product-key top-k retrieval (Lample et al. 2019), shared by PEER and, later, PKM memories.

A product key is the concatenation of one sub-key from each of two sets of S = sqrt(N) sub-keys,
so N = S^2 keys are never stored. The score of key (i1, i2) for a query q = [q1; q2] is
q1 . k1[i1] + q2 . k2[i2]. The global top-k of the N sums lies within the k x k grid of the two
per-half top-k lists (an entry outside half 1's top-k is beaten by k entries paired with the
same i2), so retrieval costs O((S + k^2) d) instead of O(N d).

Legend (shape suffixes):
    T  tokens (any number of leading dims flattened by the caller)
    H  heads
    D  query/key width d_key (even); D2 = d_key / 2, the width of one half
    S  sub-keys per half, sqrt(N)
    K  top_k
    C  candidates per head, K * K
"""

from __future__ import annotations

import torch


def _half_scores(q_THD2: torch.Tensor, keys_SD2: torch.Tensor) -> torch.Tensor:
    """Scores of one query half against its sub-keys: shared [S, D2] or per head [H, S, D2]."""
    if keys_SD2.dim() == 2:
        return torch.einsum("thd,sd->ths", q_THD2, keys_SD2)
    if keys_SD2.dim() == 3:
        # Per-head sub-keys, as in PKM's multi-head memory (each head owns its keys).
        return torch.einsum("thd,hsd->ths", q_THD2, keys_SD2)
    raise ValueError(f"sub-keys must be [S, d_key/2] or [H, S, d_key/2], got shape {tuple(keys_SD2.shape)}")


def check_product_key_inputs(
    q_THD: torch.Tensor, keys1_SD2: torch.Tensor, keys2_SD2: torch.Tensor, top_k: int
) -> int:
    """Raise ValueError unless the shapes fit `product_key_topk`; return S = sqrt(N).

    Shared by the fused retrieval (model/kernels/retrieval.py), so both reject the same inputs.
    """
    if q_THD.dim() != 3:
        raise ValueError(f"queries must be [T, H, d_key], got shape {tuple(q_THD.shape)}")
    d_key = q_THD.shape[-1]
    if d_key % 2:
        raise ValueError(f"d_key must be even to split into two halves, got {d_key}")
    num_sub_keys = keys1_SD2.shape[-2]
    if keys2_SD2.shape != keys1_SD2.shape or keys1_SD2.shape[-1] != d_key // 2:
        raise ValueError(
            f"sub-key tables must both be [..., S, {d_key // 2}], got {tuple(keys1_SD2.shape)} "
            f"and {tuple(keys2_SD2.shape)}"
        )
    if keys1_SD2.dim() not in (2, 3):
        raise ValueError(f"sub-keys must be [S, d_key/2] or [H, S, d_key/2], got shape {tuple(keys1_SD2.shape)}")
    if keys1_SD2.dim() == 3 and keys1_SD2.shape[0] != q_THD.shape[1]:
        raise ValueError(
            f"per-head sub-keys [H, S, d_key/2] need H = {q_THD.shape[1]} heads, got shape {tuple(keys1_SD2.shape)}"
        )
    if not 1 <= top_k <= num_sub_keys:
        raise ValueError(f"top_k must be in [1, sqrt(N) = {num_sub_keys}], got {top_k}")
    return num_sub_keys


def product_key_topk(
    q_THD: torch.Tensor,
    keys1_SD2: torch.Tensor,
    keys2_SD2: torch.Tensor,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k product keys for every token and head.

    q_THD: queries [T, H, d_key]. keys1_SD2, keys2_SD2: sub-keys of the first and second query
    half, [S, d_key/2] shared by all heads or [H, S, d_key/2] per head. top_k <= S.

    Returns (scores_THK, idx_THK): the k best scores q . key, sorted descending, and their expert
    indices i1 * S + i2 (int64, in [0, S^2)). Scores are differentiable with respect to the
    queries and the sub-keys; indices are not.
    """
    num_sub_keys = check_product_key_inputs(q_THD, keys1_SD2, keys2_SD2, top_k)
    d_key = q_THD.shape[-1]
    q1_THD2, q2_THD2 = q_THD.split(d_key // 2, dim=-1)
    scores1_THS = _half_scores(q1_THD2, keys1_SD2)
    scores2_THS = _half_scores(q2_THD2, keys2_SD2)

    best1_THK, sub_idx1_THK = scores1_THS.topk(top_k, dim=-1)
    best2_THK, sub_idx2_THK = scores2_THS.topk(top_k, dim=-1)

    # Candidate (a, b) pairs a row of best1 with a column of best2: flat index a * K + b.
    cand_THKK = best1_THK.unsqueeze(-1) + best2_THK.unsqueeze(-2)
    cand_THC = cand_THKK.flatten(-2)
    scores_THK, cand_idx_THK = cand_THC.topk(top_k, dim=-1)  # sorted descending

    i1_THK = sub_idx1_THK.gather(-1, cand_idx_THK // top_k)
    i2_THK = sub_idx2_THK.gather(-1, cand_idx_THK % top_k)
    idx_THK = i1_THK * num_sub_keys + i2_THK
    return scores_THK, idx_THK
