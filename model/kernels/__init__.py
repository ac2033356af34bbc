"""Fused PEER expert compute: one entry point, `peer_expert_mix`, three backends.

    y_TD = sum_{h, k} gates_THK * act(U[idx_THK] . x_T) * V[idx_THK]

Backends (all take the U and V weight tensors, not modules, so the expert-parallel layer can run
the same compute on its shard of rows with local row indices):

    reference  model/kernels/reference.py  gathers [T, H, K, d] rows of U and V and keeps them for
               backward (the paper's Algorithm 1 written literally; the ground truth of the tests)
    chunked    model/kernels/chunked.py    torch ops only, any device (tuned and tested on CPU):
               token chunks of gathered U rows in a reused scratch buffer, V side by embedding_bag
               with per-sample weights; U/V gradients by embedding_bag's dense backward (no
               per-token copies of rows); keeps only [T, H*K] numbers for backward
    triton     model/kernels/triton_peer.py  Triton kernels (GPU, or CPU under TRITON_INTERPRET=1):
               gathers rows with pointer loads, never writes them; dU/dV by fp32 atomic adds

How `impl` resolves (`resolve_impl`): "reference" -> reference. "fused" and "auto" -> triton on
CUDA when triton imports, else chunked (on CPU always chunked: measured 2.7x faster than the
reference at a quarter of its memory, bench/RESULTS.md). They resolve the same today; "auto" is
the config default so that it can follow new measurements without configs changing. The backend
names "chunked" and "triton" are accepted too (tests and benchmarks pin a backend with them).

Legend: T tokens, D d_model, H heads, K top-k, M = H*K retrieved rows per token, N experts.
"""

from __future__ import annotations

import functools

import torch

from model.kernels.chunked import chunked_expert_mix
from model.kernels.reference import reference_expert_mix

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


__all__ = ["BACKENDS", "CONFIG_IMPLS", "peer_expert_mix", "resolve_impl", "triton_available"]
