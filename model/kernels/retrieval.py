"""Fused product-key top-k (torch ops, any device; tuned on CPU): PEER's retrieval without the
[T, H, sqrt(N)] score tensors.

The reference (model/product_keys.py `product_key_topk`) is exact and plain autograd: it builds
both halves' sub-key scores [T, H, S] and the k*k candidate sums [T, H, K*K] for all tokens at
once, and its backward materialises the gradients of all three (dense, mostly zeros: only k of
the S entries of a row receive a gradient).

Forward here, per chunk of tokens (about SCORE_BYTES of scores per half, reused buffers):
    s1 = q1 . keys1, s2 = q2 . keys2              [c, H, S] each, by one mm (bmm for per-head keys)
    best1, sub1 = top-k(s1); best2, sub2 = top-k(s2)                      [c, H, K]
    cand = best1[:, :, :, None] + best2[:, :, None, :]                    [c, H, K, K]
    scores, pair = top-k(cand)   and   idx = sub1[pair // K] * S + sub2[pair % K]
The same ops on the same numbers as the reference, so the same indices and the same scores
(the GEMMs here differ from the reference's only in their number of rows).

Saved for backward: the query and idx [T, H, K] (which already says which sub-key of each half
won: i1 = idx // S, i2 = idx % S). Each retrieved score is q1 . keys1[i1] + q2 . keys2[i2], so
    dq1[t, h]   = sum_k dscore[t, h, k] keys1[i1[t, h, k]]      (embedding_bag, per-sample weights)
    dkeys1[s]  += sum over (t, h, k) with i1 = s of dscore q1[t, h]   (embedding_bag's dense backward)
and likewise for half 2: no [T, H, S] gradient, no per-token copies of key rows. For per-head
keys [H, S, D2] the table is viewed as [H * S, D2] and head h's indices are offset by h * S.

Legend as in model/product_keys.py (T tokens, H heads, D d_key, D2 = D / 2, S sub-keys per half,
K top-k, C = K * K); B = T * H query rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from model.kernels.chunked import rows_grad
from model.product_keys import check_product_key_inputs

# Sub-key scores held per half and chunk. On CPU a cache-sized chunk (64 tokens at H = 8,
# S = 256, fp32); on GPU a large one, so that the loop runs few, big kernels.
SCORE_BYTES = 1 << 20
SCORE_BYTES_GPU = 64 << 20


def _chunk_tokens(num_heads: int, num_sub_keys: int, element_size: int, device: torch.device) -> int:
    budget = SCORE_BYTES if device.type == "cpu" else SCORE_BYTES_GPU
    return max(1, budget // max(1, num_heads * num_sub_keys * element_size))


def _half_scores_into(out_HnS_or_BS: torch.Tensor, q_nHD2: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Scores of one chunk's query half against its sub-keys, written into a reused buffer.

    Shared keys [S, D2]: one mm, [n * H, S] (rows token-major, like the reference's einsum).
    Per-head keys [H, S, D2]: one bmm, [H, n, S]; returned transposed to [n, H, S] (a view).
    """
    n, num_heads, d2 = q_nHD2.shape
    if keys.dim() == 2:
        return torch.mm(q_nHD2.reshape(n * num_heads, d2), keys.t(), out=out_HnS_or_BS)
    torch.bmm(q_nHD2.transpose(0, 1), keys.transpose(1, 2), out=out_HnS_or_BS)
    return out_HnS_or_BS.transpose(0, 1)


class ChunkedProductKeyTopk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_THD, keys1, keys2, top_k):
        num_tokens, num_heads, d_key = q_THD.shape
        d2 = d_key // 2
        num_sub_keys = keys1.shape[-2]
        per_head = keys1.dim() == 3
        device, dtype = q_THD.device, torch.promote_types(q_THD.dtype, keys1.dtype)
        q_cast = q_THD.to(dtype)
        keys1_c, keys2_c = keys1.to(dtype), keys2.to(dtype)

        scores_BK = torch.empty(num_tokens * num_heads, top_k, dtype=dtype, device=device)
        idx_BK = torch.empty(num_tokens * num_heads, top_k, dtype=torch.int64, device=device)
        chunk = min(num_tokens, _chunk_tokens(num_heads, num_sub_keys, torch.empty((), dtype=dtype).element_size(), device))
        rows = chunk * num_heads
        score_shape = (num_heads, chunk, num_sub_keys) if per_head else (rows, num_sub_keys)
        s1_buf = torch.empty(score_shape, dtype=dtype, device=device)
        s2_buf = torch.empty(score_shape, dtype=dtype, device=device)
        best1 = torch.empty(rows, top_k, dtype=dtype, device=device)
        best2 = torch.empty_like(best1)
        sub1 = torch.empty(rows, top_k, dtype=torch.int64, device=device)
        sub2 = torch.empty_like(sub1)
        cand_BC = torch.empty(rows, top_k, top_k, dtype=dtype, device=device)
        pair = torch.empty(rows, top_k, dtype=torch.int64, device=device)

        for start in range(0, num_tokens, chunk):
            stop = min(start + chunk, num_tokens)
            n = stop - start
            b = n * num_heads
            q_nHD = q_cast[start:stop]
            bufs = (s1_buf[:, :n], s2_buf[:, :n]) if per_head else (s1_buf[:b], s2_buf[:b])
            for buf, q_half, keys, best, sub in (
                (bufs[0], q_nHD[..., :d2], keys1_c, best1, sub1),
                (bufs[1], q_nHD[..., d2:], keys2_c, best2, sub2),
            ):
                s = _half_scores_into(buf, q_half, keys)  # [b, S], or an [n, H, S] view for per-head
                torch.topk(s, top_k, dim=-1, out=(best[:b].view(s.shape[:-1] + (top_k,)),
                                                  sub[:b].view(s.shape[:-1] + (top_k,))))
            # Candidate (a, b'): row a of best1 with column b' of best2, flat index a * K + b'.
            cand = torch.add(best1[:b, :, None], best2[:b, None, :], out=cand_BC[:b]).view(b, top_k * top_k)
            torch.topk(cand, top_k, dim=-1, out=(scores_BK[start * num_heads:stop * num_heads], pair[:b]))
            i1 = sub1[:b].gather(1, pair[:b] // top_k)
            i2 = sub2[:b].gather(1, pair[:b] % top_k)
            torch.add(i2, i1, alpha=num_sub_keys, out=idx_BK[start * num_heads:stop * num_heads])

        idx_THK = idx_BK.view(num_tokens, num_heads, top_k)
        ctx.save_for_backward(q_THD, keys1, keys2, idx_THK)
        ctx.mark_non_differentiable(idx_THK)
        return scores_BK.view(num_tokens, num_heads, top_k).to(q_THD.dtype), idx_THK

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_scores_THK, _grad_idx):
        q_THD, keys1, keys2, idx_THK = ctx.saved_tensors
        need_q, need_k1, need_k2 = ctx.needs_input_grad[:3]
        num_tokens, num_heads, top_k = idx_THK.shape
        d2 = q_THD.shape[-1] // 2
        num_sub_keys = keys1.shape[-2]
        num_rows = num_tokens * num_heads
        i1_BK = (idx_THK // num_sub_keys).view(num_rows, top_k)
        i2_BK = (idx_THK % num_sub_keys).view(num_rows, top_k)
        if keys1.dim() == 3:  # per-head tables seen as one [H * S, D2] table
            head_offset = (torch.arange(num_heads, device=idx_THK.device) * num_sub_keys).repeat(num_tokens)[:, None]
            i1_BK = i1_BK + head_offset
            i2_BK = i2_BK + head_offset
        grad_q = grad_k1 = grad_k2 = None
        if need_q:
            halves = []
            for keys, i_BK in ((keys1, i1_BK), (keys2, i2_BK)):
                w_BK = grad_scores_THK.reshape(num_rows, top_k).to(keys.dtype)
                halves.append(F.embedding_bag(i_BK, keys.reshape(-1, d2), per_sample_weights=w_BK, mode="sum"))
            grad_q = torch.cat(halves, dim=-1).view(q_THD.shape).to(q_THD.dtype)
            del halves  # not alive while the key gradients below are built
        for need, keys, i_BK, half in ((need_k1, keys1, i1_BK, slice(0, d2)), (need_k2, keys2, i2_BK, slice(d2, None))):
            if not need:
                continue
            q_half_BD2 = q_THD[..., half].reshape(num_rows, d2).to(keys.dtype)
            grad = rows_grad(q_half_BD2, i_BK, grad_scores_THK.reshape(num_rows, top_k), keys.numel() // d2)
            if half.start == 0:
                grad_k1 = grad.view(keys.shape)
            else:
                grad_k2 = grad.view(keys.shape)
        return grad_q, grad_k1, grad_k2, None


def chunked_product_key_topk(
    q_THD: torch.Tensor, keys1_SD2: torch.Tensor, keys2_SD2: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`product_key_topk` (same arguments, same (scores_THK, idx_THK)) in token chunks: holds at
    most one chunk's [c, H, S] scores per half and [c, H, K, K] candidates, and keeps only the
    query and idx [T, H, K] for backward."""
    check_product_key_inputs(q_THD, keys1_SD2, keys2_SD2, top_k)
    return ChunkedProductKeyTopk.apply(q_THD, keys1_SD2, keys2_SD2, top_k)
