"""PEER expert compute from torch ops, without the [T, H, K, D] intermediates (CPU path).

Forward: the dots of the retrieved U rows with x (`gathered_dots`: a loop compiled by inductor
that reads rows in place for large calls; else per token chunk, the chunk's rows gathered into one
reused, cache-sized scratch buffer and multiplied by bmm); then one embedding_bag over V with
per-sample weights gates * act(dots) sums the weighted V rows without gathering them. Only
x, U, V, gates, idx and the [T, M] pre-activations are kept for backward.

Backward: dots of the V rows with dy (chunked like the forward), then
    dgates = dy.v * act(s)          ds = dy.v * gate * act'(s)
    dx     = embedding_bag(U, weights ds)
    dU[i]  = sum_{(t,m): idx=i} ds_tm x_t      dV[i] = sum w_tm dy_t
The last two are sums over the (t, m) entries that read a row: on CPU one sparse x dense product
each (A @ x, A[i, t] = the weights of token t's entries for row i, a CSR matrix whose pattern,
idx turned around, is built once for both tables); elsewhere aten's `_embedding_bag_dense_backward`,
which accumulates them straight into one dense [N, D] buffer (an index_add_ over chunked products
is the last fallback). Either way no per-token copies of rows. Dense, not sparse, gradients: the
reference's nn.Embedding gives dense ones too, and DeepSpeed's optimizers and ZeRO expect dense
grads.

The halves on their own (`ChunkedGatheredDot`, `ChunkedWeightedGatherSum`, for the
expert-parallel layer) are built from the same three pieces: `gathered_dots`, `weighted_rows_sum`
(embedding_bag with per-sample weights) and `rows_grad`.

Measured on a 2-core CPU (bench/RESULTS.md): the scratch budget hardly matters between 8 and 64
tokens per chunk at T=2048, H*K=128, d=256 (within 3%); what matters is reusing the buffer
(fresh allocations of that size page-fault on every chunk and cost 2x).
Legend as in model/kernels/__init__.py.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from model.kernels.reference import ACTIVATION_FNS

SCRATCH_BYTES = 4 << 20


def _chunk_tokens(num_rows_per_token: int, d_model: int, element_size: int) -> int:
    return max(1, SCRATCH_BYTES // max(1, num_rows_per_token * d_model * element_size))


# Below this many multiply-adds (T x M x D) a gathered dot is a few milliseconds and the eager
# path wins: compiling costs about 6 s per process with inductor's cache warm, 30 s cold.
COMPILE_MIN_ELEMENTS = 1 << 22
_compiled_gathered_dots = None  # built on first large call; False once compiling has failed


def _gathered_dots_expr(weight_ND: torch.Tensor, idx_TM: torch.Tensor, x_TD: torch.Tensor) -> torch.Tensor:
    # Written as gather-then-reduce for inductor, which fuses it into one loop that reads each
    # row of the table in place: written eagerly this expression would materialise [T, M, D].
    return (weight_ND[idx_TM] * x_TD[:, None, :]).sum(-1)


def gathered_dots(weight_ND: torch.Tensor, idx_TM: torch.Tensor, x_TD: torch.Tensor) -> torch.Tensor:
    """dots_TM[t, m] = weight[idx[t, m]] . x[t].

    Large CPU calls run a loop compiled by torch.compile (inductor) that reads the rows in place:
    about 2.4x faster than copying rows to a scratch buffer for bmm (bench/RESULTS.md). Small calls,
    other devices and machines where compiling fails (no C++ compiler) take the eager path, which
    gathers at most one chunk of rows at a time."""
    global _compiled_gathered_dots
    x_TD = x_TD.to(weight_ND.dtype)
    # Under a Python dispatch mode (profilers, FLOP counters, memory trackers) dynamo runs the
    # expression eagerly, materialising [T, M, D]: the chunked path keeps memory bounded there.
    if (_compiled_gathered_dots is not False and weight_ND.device.type == "cpu"
            and idx_TM.numel() * weight_ND.shape[1] >= COMPILE_MIN_ELEMENTS
            and _get_current_dispatch_mode() is None):
        if _compiled_gathered_dots is None:
            _compiled_gathered_dots = torch.compile(_gathered_dots_expr, dynamic=True)
        try:
            return _compiled_gathered_dots(weight_ND, idx_TM, x_TD)
        except Exception as error:  # noqa: BLE001 - any compiler failure means: use the eager path
            warnings.warn(f"PEER gathered dot: torch.compile failed ({type(error).__name__}: {error}); "
                          "using the eager path", RuntimeWarning, stacklevel=2)
            _compiled_gathered_dots = False
    return eager_gathered_dots(weight_ND, idx_TM, x_TD)


def eager_gathered_dots(weight_ND: torch.Tensor, idx_TM: torch.Tensor, x_TD: torch.Tensor) -> torch.Tensor:
    """gathered_dots without compiling: gather one chunk of rows into a reused scratch buffer
    (about SCRATCH_BYTES), then bmm with x."""
    num_tokens, num_rows = idx_TM.shape
    d_model = weight_ND.shape[1]
    dots_TM = torch.empty(num_tokens, num_rows, dtype=weight_ND.dtype, device=weight_ND.device)
    chunk = _chunk_tokens(num_rows, d_model, weight_ND.element_size())
    scratch = torch.empty(min(chunk, num_tokens) * num_rows, d_model, dtype=weight_ND.dtype, device=weight_ND.device)
    for start in range(0, num_tokens, chunk):
        stop = min(start + chunk, num_tokens)
        n = stop - start
        rows = scratch[: n * num_rows]
        torch.index_select(weight_ND, 0, idx_TM[start:stop].reshape(-1), out=rows)
        torch.bmm(rows.view(n, num_rows, d_model), x_TD[start:stop].unsqueeze(-1), out=dots_TM[start:stop].view(n, num_rows, 1))
    return dots_TM


def weighted_rows_sum(weight_ND: torch.Tensor, idx_TM: torch.Tensor,
                      weights_TM: torch.Tensor) -> torch.Tensor:
    """sum_TD[t] = sum_m weights[t, m] weight[idx[t, m]]: one embedding_bag with per-sample
    weights, no gathered rows (in the table's dtype)."""
    return F.embedding_bag(idx_TM, weight_ND, per_sample_weights=weights_TM.to(weight_ND.dtype), mode="sum")


def _offsets(num_tokens: int, num_rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    bag_of_row = torch.arange(num_tokens, device=device).repeat_interleave(num_rows)
    bag_size = torch.full((num_tokens,), num_rows, dtype=torch.int64, device=device)
    return bag_of_row, bag_size


class RowIndex(NamedTuple):
    """idx_TM turned around: which (token, slot) entries read each table row, as the pattern of a
    CSR matrix [N, T]. Built once per backward and shared by every table gradient over the same
    idx (U and V of one PEER layer)."""

    row_starts: torch.Tensor  # [N + 1]: row i's entries are positions row_starts[i]:row_starts[i+1]
    tokens: torch.Tensor      # [T * M]: the token of each entry, grouped by row
    order: torch.Tensor       # [T * M]: the flat (t * M + m) position of each entry in idx_TM


def row_index(idx_TM: torch.Tensor, num_rows_total: int) -> RowIndex:
    flat = idx_TM.reshape(-1)
    # Stable, so a row's entries keep (t, m) order: the sums below are then a fixed function of
    # idx, the same in every run and for any column slice of the table (expert-parallel shards).
    order = torch.argsort(flat, stable=True)
    row_starts = torch.zeros(num_rows_total + 1, dtype=torch.int64, device=idx_TM.device)
    torch.cumsum(torch.bincount(flat, minlength=num_rows_total), 0, out=row_starts[1:])
    return RowIndex(row_starts, torch.div(order, idx_TM.shape[1], rounding_mode="floor"), order)


def _sparse_matmul_applies(grad_TD: torch.Tensor) -> bool:
    # MKL's CSR x dense product: CPU, fp32/fp64 only; and not under a Python dispatch mode
    # (FLOP counters, memory trackers), which see the aten ops of the fallback more plainly.
    return (grad_TD.device.type == "cpu" and grad_TD.dtype in (torch.float32, torch.float64)
            and _get_current_dispatch_mode() is None)


def rows_grad(grad_TD: torch.Tensor, idx_TM: torch.Tensor, weights_TM: torch.Tensor, num_rows_total: int,
              index: RowIndex | None = None) -> torch.Tensor:
    """Dense [N, D] gradient G with G[i] = sum over (t, m) with idx[t, m] = i of weights[t, m] * grad[t].

    On CPU this is one sparse x dense product: G = A @ grad with A[i, t] = sum of the weights of
    token t's entries for row i, as a CSR matrix built from `index` (`row_index(idx_TM, N)`; pass
    it when several gradients share idx). 2-5x faster than embedding_bag's dense backward here
    (bench/RESULTS.md); elsewhere that backward, which accumulates into one dense buffer too."""
    num_tokens, num_rows = idx_TM.shape
    weights_TM = weights_TM.to(grad_TD.dtype)
    if _sparse_matmul_applies(grad_TD):
        index = row_index(idx_TM, num_rows_total) if index is None else index
        values = weights_TM.reshape(-1)[index.order]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            matrix = torch.sparse_csr_tensor(index.row_starts, index.tokens, values, (num_rows_total, num_tokens),
                                             check_invariants=False)
        return torch.sparse.mm(matrix, grad_TD.contiguous())
    op = getattr(torch.ops.aten, "_embedding_bag_dense_backward", None)
    if op is not None:
        bag_of_row, bag_size = _offsets(num_tokens, num_rows, idx_TM.device)
        # mode 0 = sum; max_indices are unused in sum mode (bag_size stands in for the argument).
        return op(grad_TD.contiguous(), idx_TM.reshape(-1), bag_of_row, bag_size, bag_size,
                  num_rows_total, False, 0, weights_TM.reshape(-1).contiguous(), -1)
    return rows_grad_index_add(grad_TD, idx_TM, weights_TM, num_rows_total)


def rows_grad_index_add(grad_TD, idx_TM, weights_TM, num_rows_total):
    """The fallback of `rows_grad` for a torch without the aten op: index_add_ of token chunks of
    weighted rows (one chunk's products at a time, about SCRATCH_BYTES)."""
    num_tokens, num_rows = idx_TM.shape
    weights_TM = weights_TM.to(grad_TD.dtype)
    out_ND = torch.zeros(num_rows_total, grad_TD.shape[1], dtype=grad_TD.dtype, device=grad_TD.device)
    chunk = _chunk_tokens(num_rows, grad_TD.shape[1], grad_TD.element_size())
    for start in range(0, num_tokens, chunk):
        stop = min(start + chunk, num_tokens)
        prod = weights_TM[start:stop, :, None] * grad_TD[start:stop, None, :]
        out_ND.index_add_(0, idx_TM[start:stop].reshape(-1), prod.reshape(-1, grad_TD.shape[1]))
    return out_ND


def _activation_grad(grad_TM: torch.Tensor, pre_TM: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return grad_TM * (pre_TM > 0)
    return torch.ops.aten.gelu_backward(grad_TM, pre_TM, approximate="none")


class ChunkedPeerMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, down_ND, up_ND, gates_THK, idx_THK, activation):
        num_tokens, num_heads, top_k = idx_THK.shape
        idx_TM = idx_THK.reshape(num_tokens, num_heads * top_k)
        gates_TM = gates_THK.reshape(num_tokens, num_heads * top_k)
        pre_TM = gathered_dots(down_ND, idx_TM, x_TD)
        weights_TM = (gates_TM * ACTIVATION_FNS[activation](pre_TM)).to(up_ND.dtype)
        y_TD = weighted_rows_sum(up_ND, idx_TM, weights_TM)
        ctx.save_for_backward(x_TD, down_ND, up_ND, gates_TM, idx_TM, pre_TM)
        ctx.activation = activation
        ctx.gates_shape = gates_THK.shape
        return y_TD.to(x_TD.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y_TD):
        x_TD, down_ND, up_ND, gates_TM, idx_TM, pre_TM = ctx.saved_tensors
        need_x, need_down, need_up, need_gates = ctx.needs_input_grad[:4]
        grad_y_TD = grad_y_TD.contiguous()
        act_TM = ACTIVATION_FNS[ctx.activation](pre_TM)
        grad_x = grad_down = grad_up = grad_gates = None
        index = row_index(idx_TM, down_ND.shape[0]) if (need_down and need_up and _sparse_matmul_applies(down_ND)) else None
        if need_x or need_down or need_gates:
            grad_w_TM = gathered_dots(up_ND, idx_TM, grad_y_TD)  # d loss / d (gate * act)
            if need_gates:
                grad_gates = (grad_w_TM * act_TM).to(gates_TM.dtype).view(ctx.gates_shape)
            grad_pre_TM = _activation_grad(grad_w_TM * gates_TM, pre_TM, ctx.activation)
            if need_x:
                grad_x = weighted_rows_sum(down_ND, idx_TM, grad_pre_TM).to(x_TD.dtype)
            if need_down:
                grad_down = rows_grad(x_TD.to(down_ND.dtype), idx_TM, grad_pre_TM, down_ND.shape[0], index)
        if need_up:
            grad_up = rows_grad(grad_y_TD.to(up_ND.dtype), idx_TM, gates_TM * act_TM, up_ND.shape[0], index)
        return grad_x, grad_down, grad_up, grad_gates, None, None


def chunked_expert_mix(x_TD, down_weight_ND, up_weight_ND, gates_THK, idx_THK, activation):
    return ChunkedPeerMix.apply(x_TD, down_weight_ND, up_weight_ND, gates_THK, idx_THK, activation)


# The two halves of the expert compute as separate differentiable ops (the expert-parallel layer
# sums the dots over ranks between them). The same pieces as ChunkedPeerMix: chunked gathered
# dots, embedding_bag sums with per-sample weights, and rows_grad for the table gradient.


class ChunkedGatheredDot(torch.autograd.Function):
    """s[t, m] = table[idx[t, m]] . x[t]; keeps only x, table and idx for backward."""

    @staticmethod
    def forward(ctx, x_TD, table_ND, idx_TM):
        ctx.save_for_backward(x_TD, table_ND, idx_TM)
        return gathered_dots(table_ND, idx_TM, x_TD).to(x_TD.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_s_TM):
        x_TD, table_ND, idx_TM = ctx.saved_tensors
        need_x, need_table = ctx.needs_input_grad[:2]
        grad_x = grad_table = None
        if need_x:  # dx[t] = sum_m ds[t, m] table[idx[t, m]]
            grad_x = weighted_rows_sum(table_ND, idx_TM, grad_s_TM).to(x_TD.dtype)
        if need_table:  # dtable[i] += ds[t, m] x[t] for every (t, m) with idx = i
            grad_table = rows_grad(x_TD.to(table_ND.dtype), idx_TM, grad_s_TM, table_ND.shape[0])
        return grad_x, grad_table, None


class ChunkedWeightedGatherSum(torch.autograd.Function):
    """y[t] = sum_m w[t, m] table[idx[t, m]]; keeps only w, table and idx for backward."""

    @staticmethod
    def forward(ctx, w_TM, table_ND, idx_TM):
        ctx.save_for_backward(w_TM, table_ND, idx_TM)
        return weighted_rows_sum(table_ND, idx_TM, w_TM).to(w_TM.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y_TD):
        w_TM, table_ND, idx_TM = ctx.saved_tensors
        need_w, need_table = ctx.needs_input_grad[:2]
        grad_y_TD = grad_y_TD.contiguous()
        grad_w = grad_table = None
        if need_w:  # dw[t, m] = dy[t] . table[idx[t, m]]
            grad_w = gathered_dots(table_ND, idx_TM, grad_y_TD).to(w_TM.dtype)
        if need_table:  # dtable[i] += w[t, m] dy[t]
            grad_table = rows_grad(grad_y_TD.to(table_ND.dtype), idx_TM, w_TM, table_ND.shape[0])
        return grad_w, grad_table, None


def chunked_gathered_dot(x_TD, table_ND, idx_TM):
    return ChunkedGatheredDot.apply(x_TD, table_ND, idx_TM)


def chunked_weighted_gather_sum(w_TM, table_ND, idx_TM):
    return ChunkedWeightedGatherSum.apply(w_TM, table_ND, idx_TM)
