"""Fused PEER kernels: the expert compute (`peer_expert_mix`, three backends, below) and the
product-key retrieval (`product_key_retrieval`: reference or chunked, model/kernels/retrieval.py).

    y_TD = sum_{h, k} gates_THK * act(U[idx_THK] . x_T) * V[idx_THK]

Backends (all take the U and V weight tensors, not modules, so the expert-parallel layer can run
the same compute on its shard of the tables):

    reference  model/kernels/reference.py  gathers [T, H, K, d] rows of U and V and keeps them for
               backward (the paper's Algorithm 1 written literally; the ground truth of the tests)
    chunked    model/kernels/chunked.py    torch ops only, any device (tuned and tested on CPU):
               token chunks of gathered U rows in a reused scratch buffer, V side by embedding_bag
               with per-sample weights; U/V gradients by embedding_bag's dense backward (no
               per-token copies of rows); keeps only [T, H*K] numbers for backward
    triton     model/kernels/triton_peer.py  Triton kernels (GPU, or CPU under TRITON_INTERPRET=1):
               gathers rows with pointer loads, never writes them; dU/dV by fp32 atomic adds

How `impl` resolves (`resolve_impl`): "reference" -> reference. "fused" and "auto" -> triton on
CUDA when triton imports, else chunked (on CPU always chunked: at most a quarter of the
reference's peak memory; its speed-up on the shared 2-core machine varies from run to run,
bench/RESULTS.md). They resolve the same today; "auto" is
the config default so that it can follow new measurements without configs changing. The backend
names "chunked" and "triton" are accepted too (tests and benchmarks pin a backend with them).

The two halves on their own, for the expert-parallel layer, which must sum the dots over its ranks
before the activation (orchestrator/parallel/expert_parallel.py), same backends and `impl`:

    gathered_dot(x_TD, table_ND, idx_TM)        s_TM[t, m] = table[idx[t, m]] . x[t]
    weighted_gather_sum(w_TM, table_ND, idx_TM) y_TD[t] = sum_m w[t, m] table[idx[t, m]]

Legend: T tokens, D d_model, H heads, K top-k, M = H*K retrieved rows per token, N experts.
"""

from __future__ import annotations

import functools

import torch

from model.kernels.chunked import chunked_expert_mix, chunked_gathered_dot, chunked_weighted_gather_sum
from model.kernels.reference import reference_expert_mix, reference_gathered_dot, reference_weighted_gather_sum
from model.kernels.retrieval import chunked_product_key_topk
from model.product_keys import product_key_topk

CONFIG_IMPLS = ("reference", "fused", "auto")
BACKENDS = ("reference", "chunked", "triton")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the Triton kernel module imports (triton installed and importable)."""
    try:
        import model.kernels.triton_peer  # noqa: F401  (imports triton)
    except Exception:  # ImportError, or a broken triton install: fall back, never crash model/
        return False
    return True


def resolve_impl(impl: str, device: torch.device | str) -> str:
    """The backend that `impl` (a config value or a backend name) runs on `device`."""
    if impl in BACKENDS:
        return impl
    if impl not in CONFIG_IMPLS:
        raise ValueError(f"PEER impl must be one of {CONFIG_IMPLS + BACKENDS[1:]}, got {impl!r}")
    if impl == "reference":
        return "reference"
    if torch.device(device).type == "cuda" and triton_available():
        return "triton"
    return "chunked"


def peer_expert_mix(
    x_TD: torch.Tensor,
    down_weight_ND: torch.Tensor,
    up_weight_ND: torch.Tensor,
    gates_THK: torch.Tensor,
    idx_THK: torch.Tensor,
    activation: str,
    impl: str = "auto",
) -> torch.Tensor:
    """sum over heads h and retrieved k of gates * act(u_idx . x) * v_idx -> y [T, D].

    x_TD [T, D]; down_weight_ND (U) and up_weight_ND (V) [N, D], rows indexed by idx_THK (int64,
    [T, H, K], values in [0, N)); gates_THK [T, H, K]; activation "relu" or "gelu". Differentiable
    in x, U, V and gates with every backend; the gradients of U and V are dense [N, D] tensors
    (what nn.Embedding gives), equal across backends up to rounding.
    """
    if idx_THK.dim() != 3 or gates_THK.shape != idx_THK.shape or x_TD.dim() != 2:
        raise ValueError(
            f"expected x [T, D], gates and idx [T, H, K]; got {tuple(x_TD.shape)}, "
            f"{tuple(gates_THK.shape)}, {tuple(idx_THK.shape)}"
        )
    backend = resolve_impl(impl, x_TD.device)
    if backend == "reference":
        return reference_expert_mix(x_TD, down_weight_ND, up_weight_ND, gates_THK, idx_THK, activation)
    if backend == "chunked":
        return chunked_expert_mix(x_TD, down_weight_ND, up_weight_ND, gates_THK, idx_THK, activation)
    from model.kernels.triton_peer import triton_expert_mix

    return triton_expert_mix(x_TD, down_weight_ND, up_weight_ND, gates_THK, idx_THK, activation)


def _check_rows(name: str, dense: torch.Tensor, dense_shape: str, table_ND: torch.Tensor, idx_TM: torch.Tensor):
    if dense.dim() != 2 or table_ND.dim() != 2 or idx_TM.dim() != 2 or dense.shape[0] != idx_TM.shape[0]:
        raise ValueError(f"{name}: expected {dense_shape}, table [N, D], idx [T, M]; got "
                         f"{tuple(dense.shape)}, {tuple(table_ND.shape)}, {tuple(idx_TM.shape)}")


def gathered_dot(x_TD: torch.Tensor, table_ND: torch.Tensor, idx_TM: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """s_TM[t, m] = table[idx[t, m]] . x[t]: the first half of the expert compute, on its own.

    x_TD [T, D]; table_ND [N, D]; idx_TM [T, M] (integer, values in [0, N)). Returns [T, M] in x's
    dtype. Differentiable in x (dx[t] = sum_m ds[t, m] table[idx[t, m]]) and the table (dense
    [N, D] gradient, rows += ds * x). Backends and `impl` as for `peer_expert_mix`: the chunked one
    gathers rows chunk by chunk into a reused buffer and keeps only the inputs for backward (dx by
    embedding_bag, dtable by embedding_bag's dense backward: no per-token copies of rows); Triton
    gathers by pointer, dtable by fp32 atomics. The expert-parallel layer sums these partial dots
    over its ranks before the activation (orchestrator/parallel/expert_parallel.py).
    """
    _check_rows("gathered_dot", x_TD, "x [T, D]", table_ND, idx_TM)
    if x_TD.shape[1] != table_ND.shape[1]:
        raise ValueError(f"gathered_dot: x has {x_TD.shape[1]} columns, the table {table_ND.shape[1]}")
    idx_TM = idx_TM.long()
    backend = resolve_impl(impl, x_TD.device)
    if backend == "reference":
        return reference_gathered_dot(x_TD, table_ND, idx_TM)
    if backend == "chunked":
        return chunked_gathered_dot(x_TD, table_ND, idx_TM)
    from model.kernels.triton_peer import triton_gathered_dot

    return triton_gathered_dot(x_TD, table_ND, idx_TM)


def weighted_gather_sum(
    w_TM: torch.Tensor, table_ND: torch.Tensor, idx_TM: torch.Tensor, impl: str = "auto"
) -> torch.Tensor:
    """y_TD[t] = sum_m w[t, m] table[idx[t, m]]: the second half of the expert compute, on its own.

    w_TM [T, M]; table_ND [N, D]; idx_TM [T, M] (integer, values in [0, N)). Returns [T, D] in w's
    dtype. Differentiable in w (dw[t, m] = dy[t] . table[idx[t, m]], a gathered dot) and the table
    (dense [N, D] gradient, rows += w * dy). Backends as for `gathered_dot`: chunked is one
    embedding_bag with per-sample weights (no gathered rows), Triton gathers by pointer.
    """
    _check_rows("weighted_gather_sum", w_TM, "w [T, M]", table_ND, idx_TM)
    if w_TM.shape != idx_TM.shape:
        raise ValueError(f"weighted_gather_sum: w {tuple(w_TM.shape)} and idx {tuple(idx_TM.shape)} differ")
    idx_TM = idx_TM.long()
    backend = resolve_impl(impl, w_TM.device)
    if backend == "reference":
        return reference_weighted_gather_sum(w_TM, table_ND, idx_TM)
    if backend == "chunked":
        return chunked_weighted_gather_sum(w_TM, table_ND, idx_TM)
    from model.kernels.triton_peer import triton_weighted_gather_sum

    return triton_weighted_gather_sum(w_TM, table_ND, idx_TM)


def product_key_retrieval(
    q_THD: torch.Tensor,
    keys1_SD2: torch.Tensor,
    keys2_SD2: torch.Tensor,
    top_k: int,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Product-key top-k per head: (scores_THK, idx_THK), exactly `product_key_topk`'s.

    q_THD [T, H, d_key]; sub-keys [S, d_key/2] shared by the heads or [H, S, d_key/2] per head.
    "reference" runs `product_key_topk` (plain autograd over [T, H, S] scores); every other impl
    runs the chunked retrieval (model/kernels/retrieval.py: torch ops, any device; there is no
    Triton retrieval kernel yet, so the "triton" backend uses it too). Same indices; scores and
    the gradients of the query and both key tables equal up to rounding.
    """
    if resolve_impl(impl, q_THD.device) == "reference":
        return product_key_topk(q_THD, keys1_SD2, keys2_SD2, top_k)
    return chunked_product_key_topk(q_THD, keys1_SD2, keys2_SD2, top_k)


__all__ = [
    "BACKENDS", "CONFIG_IMPLS", "gathered_dot", "peer_expert_mix", "product_key_retrieval", "resolve_impl",
    "triton_available", "weighted_gather_sum",
]
