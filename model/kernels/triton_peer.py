"""Triton kernels for PEER's expert compute (GPU; CPU tensors under TRITON_INTERPRET=1).

Imported lazily (model/kernels/__init__.py): only this module imports triton, so machines
without it still import model/.

One program per block of BLOCK_T tokens, covering all M = H*K retrieved rows of each token
(heads sum into the same output row, so no per-head outputs and no atomics in the forward):

forward   phase 1: s[t, m] = U[idx[t, m]] . x[t], looping over d in BLOCK_D slices, rows loaded
          with pointer gathers (tl.load on idx * stride), never written anywhere;
          phase 2: y[t] = sum_m gate[t, m] act(s[t, m]) V[idx[t, m]], per d slice.
          s (fp32, [T, M]) is stored for backward: 4 bytes per retrieved row instead of
          re-reading the U rows to recompute it.
backward  phase 1: dw[t, m] = V[idx[t, m]] . dy[t]; dgates = dw act(s); ds = dw gate act'(s);
          phase 2, per d slice: dx[t] = sum_m ds U[idx], and the row gradients
          dU[idx] += ds x[t], dV[idx] += gate act(s) dy[t] by fp32 atomic adds into dense
          [N, D] fp32 buffers (cast to the weight dtype afterwards when that is not fp32).

Both phases are the shared tile helpers `_dot_rows` and `_store_weighted_rows`. The halves on
their own (for the expert-parallel layer, which sums the dots over ranks between them):
`_gathered_dot_kernel` (gathered_dot forward, weighted_gather_sum's dw) and
`_weighted_rows_kernel` (weighted_gather_sum forward; gathered_dot's dx; the table gradients by
atomics, dx and dtable in one pass over d).

Why atomics rather than a sort-by-expert segmented reduction: retrieval spreads rows over up to
N = 1024^2 experts, so collisions are rare and atomics cost one read-modify-write per retrieved
row element in L2, with no sort, no permutation buffers and no load imbalance when many tokens
pick one expert (a segmented reduction would serialise that expert's segment in one program).
The price: the summation order, hence the last bits of dU and dV, varies from run to run.

Legend as in model/kernels/__init__.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

_ACTIVATION_CODES = {"relu": 0, "gelu": 1}


@triton.jit
def _act(s, ACT: tl.constexpr):
    if ACT == 0:
        out = tl.maximum(s, 0.0)
    else:
        out = 0.5 * s * (1.0 + tl.math.erf(s * 0.7071067811865476))
    return out


@triton.jit
def _act_grad(s, ACT: tl.constexpr):
    if ACT == 0:
        out = tl.where(s > 0.0, 1.0, 0.0)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(s * 0.7071067811865476))
        out = cdf + s * tl.exp(-0.5 * s * s) * 0.3989422804014327
    return out


@triton.jit
def _dot_rows(vec_ptr, vec_row, mask_t, tab_ptr, rows, stride_tab, mask_tm, D,
              BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_T, BLOCK_M] fp32: tab[rows[t, m]] . vec[t], looping over d in BLOCK_D slices (rows
    loaded by pointer gathers, never written)."""
    acc = tl.zeros([BLOCK_T, BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        vec = tl.load(vec_ptr + vec_row + offs_d[None, :], mask=mask_t[:, None] & mask_d[None, :], other=0.0)
        tab = tl.load(tab_ptr + rows[:, :, None] * stride_tab + offs_d[None, None, :],
                      mask=mask_tm[:, :, None] & mask_d[None, None, :], other=0.0)
        acc += tl.sum(tab.to(tl.float32) * vec.to(tl.float32)[:, None, :], axis=2)
    return acc


@triton.jit
def _store_weighted_rows(w, tab_ptr, rows, stride_tab, mask_tm, out_ptr, out_row, mask_t, D,
                         BLOCK_D: tl.constexpr):
    """out[t] = sum_m w[t, m] tab[rows[t, m]] (w fp32 [BLOCK_T, BLOCK_M]), per d slice."""
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        tab = tl.load(tab_ptr + rows[:, :, None] * stride_tab + offs_d[None, None, :],
                      mask=mask_tm[:, :, None] & mask_d[None, None, :], other=0.0)
        out = tl.sum(w[:, :, None] * tab.to(tl.float32), axis=1)
        tl.store(out_ptr + out_row + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=mask_t[:, None] & mask_d[None, :])


@triton.jit
def _peer_fwd_kernel(
    x_ptr, u_ptr, v_ptr, g_ptr, idx_ptr, y_ptr, s_ptr,
    T, M, D, stride_x, stride_u, stride_v, stride_y,
    ACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_m = tl.arange(0, BLOCK_M)
    mask_t = offs_t < T
    mask_tm = mask_t[:, None] & (offs_m[None, :] < M)
    tm = offs_t[:, None].to(tl.int64) * M + offs_m[None, :]  # g, idx, s are contiguous [T, M]
    rows = tl.load(idx_ptr + tm, mask=mask_tm, other=0).to(tl.int64)
    gate = tl.load(g_ptr + tm, mask=mask_tm, other=0.0).to(tl.float32)
    x_row = offs_t[:, None].to(tl.int64) * stride_x
    s = _dot_rows(x_ptr, x_row, mask_t, u_ptr, rows, stride_u, mask_tm, D, BLOCK_T, BLOCK_M, BLOCK_D)
    tl.store(s_ptr + tm, s, mask=mask_tm)
    w = gate * _act(s, ACT)
    y_row = offs_t[:, None].to(tl.int64) * stride_y
    _store_weighted_rows(w, v_ptr, rows, stride_v, mask_tm, y_ptr, y_row, mask_t, D, BLOCK_D)


@triton.jit
def _peer_bwd_kernel(
    x_ptr, u_ptr, v_ptr, g_ptr, idx_ptr, s_ptr, dy_ptr, dx_ptr, dg_ptr, du_ptr, dv_ptr,
    T, M, D, stride_x, stride_u, stride_v, stride_dy, stride_dx,
    ACT: tl.constexpr, NEED_DX: tl.constexpr, NEED_DU: tl.constexpr, NEED_DV: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_m = tl.arange(0, BLOCK_M)
    mask_t = offs_t < T
    mask_tm = mask_t[:, None] & (offs_m[None, :] < M)
    tm = offs_t[:, None].to(tl.int64) * M + offs_m[None, :]
    rows = tl.load(idx_ptr + tm, mask=mask_tm, other=0).to(tl.int64)
    gate = tl.load(g_ptr + tm, mask=mask_tm, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + tm, mask=mask_tm, other=0.0)
    x_row = offs_t[:, None].to(tl.int64) * stride_x
    dy_row = offs_t[:, None].to(tl.int64) * stride_dy
    dw = _dot_rows(dy_ptr, dy_row, mask_t, v_ptr, rows, stride_v, mask_tm, D, BLOCK_T, BLOCK_M, BLOCK_D)
    a = _act(s, ACT)
    tl.store(dg_ptr + tm, dw * a, mask=mask_tm)
    ds = dw * gate * _act_grad(s, ACT)
    w = gate * a
    dx_row = offs_t[:, None].to(tl.int64) * stride_dx
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask_td = mask_t[:, None] & mask_d[None, :]
        mask_tmd = mask_tm[:, :, None] & mask_d[None, None, :]
        grad_offs = rows[:, :, None] * D + offs_d[None, None, :]  # fp32 buffers are contiguous [N, D]
        if NEED_DX:
            u = tl.load(u_ptr + rows[:, :, None] * stride_u + offs_d[None, None, :], mask=mask_tmd, other=0.0)
            dx = tl.sum(ds[:, :, None] * u.to(tl.float32), axis=1)
            tl.store(dx_ptr + dx_row + offs_d[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask_td)
        if NEED_DU:
            x = tl.load(x_ptr + x_row + offs_d[None, :], mask=mask_td, other=0.0).to(tl.float32)
            tl.atomic_add(du_ptr + grad_offs, ds[:, :, None] * x[:, None, :], mask=mask_tmd, sem="relaxed")
        if NEED_DV:
            dy = tl.load(dy_ptr + dy_row + offs_d[None, :], mask=mask_td, other=0.0).to(tl.float32)
            tl.atomic_add(dv_ptr + grad_offs, w[:, :, None] * dy[:, None, :], mask=mask_tmd, sem="relaxed")


def _blocks(num_tokens: int, num_rows: int, d_model: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_M, BLOCK_D). On GPU a [BLOCK_T, BLOCK_M, BLOCK_D] fp32 tile of about 8K
    values (64 registers a thread at 4 warps); under the interpreter few, large programs (its
    cost grows with the number of programs, docs/platform.md)."""
    block_m = triton.next_power_of_2(num_rows)
    if on_gpu:
        block_d = min(triton.next_power_of_2(d_model), max(16, 8192 // block_m))
        block_t = max(1, 8192 // (block_m * block_d))
    else:
        block_d = min(triton.next_power_of_2(d_model), 256)
        block_t = min(64, triton.next_power_of_2(max(1, num_tokens)))
    return block_t, block_m, block_d


class TritonPeerMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, down_ND, up_ND, gates_THK, idx_THK, activation):
        num_tokens, num_heads, top_k = idx_THK.shape
        num_rows = num_heads * top_k
        d_model = x_TD.shape[1]
        x_TD = x_TD.contiguous()
        down_ND, up_ND = down_ND.contiguous(), up_ND.contiguous()
        idx_TM = idx_THK.reshape(num_tokens, num_rows).contiguous()
        gates_TM = gates_THK.reshape(num_tokens, num_rows).contiguous()
        y_TD = torch.empty(num_tokens, d_model, dtype=x_TD.dtype, device=x_TD.device)
        pre_TM = torch.empty(num_tokens, num_rows, dtype=torch.float32, device=x_TD.device)
        block_t, block_m, block_d = _blocks(num_tokens, num_rows, d_model, x_TD.is_cuda)
        if num_tokens:
            _peer_fwd_kernel[(triton.cdiv(num_tokens, block_t),)](
                x_TD, down_ND, up_ND, gates_TM, idx_TM, y_TD, pre_TM,
                num_tokens, num_rows, d_model, x_TD.stride(0), down_ND.stride(0), up_ND.stride(0), y_TD.stride(0),
                ACT=_ACTIVATION_CODES[activation], BLOCK_T=block_t, BLOCK_M=block_m, BLOCK_D=block_d,
            )
        ctx.save_for_backward(x_TD, down_ND, up_ND, gates_TM, idx_TM, pre_TM)
        ctx.activation = activation
        ctx.gates_shape = gates_THK.shape
        return y_TD

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y_TD):
        x_TD, down_ND, up_ND, gates_TM, idx_TM, pre_TM = ctx.saved_tensors
        need_x, need_down, need_up, need_gates = ctx.needs_input_grad[:4]
        num_tokens, num_rows = idx_TM.shape
        d_model = x_TD.shape[1]
        dev = x_TD.device
        grad_y_TD = grad_y_TD.contiguous()
        grad_x = torch.empty_like(x_TD)
        grad_gates_TM = torch.empty(num_tokens, num_rows, dtype=torch.float32, device=dev)
        # Dense fp32 accumulators (atomics need fp32 for accuracy); a 1-element dummy when unused.
        grad_down = torch.zeros(down_ND.shape if need_down else (1,), dtype=torch.float32, device=dev)
        grad_up = torch.zeros(up_ND.shape if need_up else (1,), dtype=torch.float32, device=dev)
        block_t, block_m, block_d = _blocks(num_tokens, num_rows, d_model, x_TD.is_cuda)
        if num_tokens:
            _peer_bwd_kernel[(triton.cdiv(num_tokens, block_t),)](
                x_TD, down_ND, up_ND, gates_TM, idx_TM, pre_TM, grad_y_TD, grad_x, grad_gates_TM, grad_down, grad_up,
                num_tokens, num_rows, d_model, x_TD.stride(0), down_ND.stride(0), up_ND.stride(0),
                grad_y_TD.stride(0), grad_x.stride(0),
                ACT=_ACTIVATION_CODES[ctx.activation], NEED_DX=bool(need_x), NEED_DU=bool(need_down),
                NEED_DV=bool(need_up), BLOCK_T=block_t, BLOCK_M=block_m, BLOCK_D=block_d,
            )
        else:
            grad_x.zero_()
        return (
            grad_x if need_x else None,
            grad_down.to(down_ND.dtype) if need_down else None,
            grad_up.to(up_ND.dtype) if need_up else None,
            grad_gates_TM.to(gates_TM.dtype).view(ctx.gates_shape) if need_gates else None,
            None,
            None,
        )


def triton_expert_mix(x_TD, down_weight_ND, up_weight_ND, gates_THK, idx_THK, activation):
    return TritonPeerMix.apply(x_TD, down_weight_ND, up_weight_ND, gates_THK, idx_THK, activation)


# ----------------------------------------------------------------------------- the two halves
# For the expert-parallel layer (a cross-rank sum of the dots comes between them): the same tile
# helpers as the fused kernels, one program per block of BLOCK_T tokens and all their M rows.


@triton.jit
def _gathered_dot_kernel(
    vec_ptr, tab_ptr, idx_ptr, out_ptr, T, M, D, stride_vec, stride_tab,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[t, m] = tab[idx[t, m]] . vec[t] (out contiguous [T, M])."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_m = tl.arange(0, BLOCK_M)
    mask_t = offs_t < T
    mask_tm = mask_t[:, None] & (offs_m[None, :] < M)
    tm = offs_t[:, None].to(tl.int64) * M + offs_m[None, :]
    rows = tl.load(idx_ptr + tm, mask=mask_tm, other=0).to(tl.int64)
    vec_row = offs_t[:, None].to(tl.int64) * stride_vec
    out = _dot_rows(vec_ptr, vec_row, mask_t, tab_ptr, rows, stride_tab, mask_tm, D, BLOCK_T, BLOCK_M, BLOCK_D)
    tl.store(out_ptr + tm, out.to(out_ptr.dtype.element_ty), mask=mask_tm)


@triton.jit
def _weighted_rows_kernel(
    w_ptr, tab_ptr, idx_ptr, out_ptr, vec_ptr, grad_ptr, T, M, D, stride_tab, stride_out, stride_vec,
    NEED_OUT: tl.constexpr, NEED_GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[t] = sum_m w[t, m] tab[idx[t, m]] (NEED_OUT) and grad[idx[t, m]] += w[t, m] vec[t] by fp32
    atomic adds into a contiguous [N, D] fp32 buffer (NEED_GRAD), in one loop over d slices."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_m = tl.arange(0, BLOCK_M)
    mask_t = offs_t < T
    mask_tm = mask_t[:, None] & (offs_m[None, :] < M)
    tm = offs_t[:, None].to(tl.int64) * M + offs_m[None, :]
    rows = tl.load(idx_ptr + tm, mask=mask_tm, other=0).to(tl.int64)
    w = tl.load(w_ptr + tm, mask=mask_tm, other=0.0).to(tl.float32)
    out_row = offs_t[:, None].to(tl.int64) * stride_out
    vec_row = offs_t[:, None].to(tl.int64) * stride_vec
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask_td = mask_t[:, None] & mask_d[None, :]
        mask_tmd = mask_tm[:, :, None] & mask_d[None, None, :]
        if NEED_OUT:
            tab = tl.load(tab_ptr + rows[:, :, None] * stride_tab + offs_d[None, None, :], mask=mask_tmd, other=0.0)
            out = tl.sum(w[:, :, None] * tab.to(tl.float32), axis=1)
            tl.store(out_ptr + out_row + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask_td)
        if NEED_GRAD:
            vec = tl.load(vec_ptr + vec_row + offs_d[None, :], mask=mask_td, other=0.0).to(tl.float32)
            tl.atomic_add(grad_ptr + rows[:, :, None] * D + offs_d[None, None, :], w[:, :, None] * vec[:, None, :],
                          mask=mask_tmd, sem="relaxed")


def _launch_gathered_dot(vec_TD, table_ND, idx_TM, out_dtype):
    num_tokens, num_rows = idx_TM.shape
    out_TM = torch.empty(num_tokens, num_rows, dtype=out_dtype, device=vec_TD.device)
    if num_tokens and num_rows:
        block_t, block_m, block_d = _blocks(num_tokens, num_rows, table_ND.shape[1], vec_TD.is_cuda)
        _gathered_dot_kernel[(triton.cdiv(num_tokens, block_t),)](
            vec_TD, table_ND, idx_TM, out_TM, num_tokens, num_rows, table_ND.shape[1],
            vec_TD.stride(0), table_ND.stride(0), BLOCK_T=block_t, BLOCK_M=block_m, BLOCK_D=block_d,
        )
    else:
        out_TM.zero_()
    return out_TM


def _launch_weighted_rows(w_TM, table_ND, idx_TM, out_dtype, vec_TD=None):
    """(out_TD or None, grad_ND fp32 or None): out when out_dtype is given, grad when vec_TD is."""
    num_tokens, num_rows = idx_TM.shape
    d_model, dev = table_ND.shape[1], table_ND.device
    need_out, need_grad = out_dtype is not None, vec_TD is not None
    out_TD = torch.zeros(num_tokens if need_out else 1, d_model if need_out else 1, dtype=out_dtype or torch.float32,
                         device=dev)
    grad_ND = torch.zeros(table_ND.shape if need_grad else (1,), dtype=torch.float32, device=dev)
    vec_TD = out_TD if vec_TD is None else vec_TD  # a dummy pointer when unused
    if num_tokens and num_rows and (need_out or need_grad):
        block_t, block_m, block_d = _blocks(num_tokens, num_rows, d_model, table_ND.is_cuda)
        _weighted_rows_kernel[(triton.cdiv(num_tokens, block_t),)](
            w_TM, table_ND, idx_TM, out_TD, vec_TD, grad_ND, num_tokens, num_rows, d_model,
            table_ND.stride(0), out_TD.stride(0), vec_TD.stride(0), NEED_OUT=need_out, NEED_GRAD=need_grad,
            BLOCK_T=block_t, BLOCK_M=block_m, BLOCK_D=block_d,
        )
    return (out_TD if need_out else None), (grad_ND if need_grad else None)


class TritonGatheredDot(torch.autograd.Function):
    """s[t, m] = table[idx[t, m]] . x[t]; backward dx and dtable in one kernel (dtable by atomics)."""

    @staticmethod
    def forward(ctx, x_TD, table_ND, idx_TM):
        x_TD, table_ND, idx_TM = x_TD.contiguous(), table_ND.contiguous(), idx_TM.contiguous()
        ctx.save_for_backward(x_TD, table_ND, idx_TM)
        return _launch_gathered_dot(x_TD, table_ND, idx_TM, x_TD.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_s_TM):
        x_TD, table_ND, idx_TM = ctx.saved_tensors
        need_x, need_table = ctx.needs_input_grad[:2]
        grad_x, grad_table = _launch_weighted_rows(
            grad_s_TM.contiguous(), table_ND, idx_TM, x_TD.dtype if need_x else None, x_TD if need_table else None
        )
        return grad_x, (grad_table.to(table_ND.dtype) if need_table else None), None


class TritonWeightedGatherSum(torch.autograd.Function):
    """y[t] = sum_m w[t, m] table[idx[t, m]]; backward dw by the gathered-dot kernel, dtable by atomics."""

    @staticmethod
    def forward(ctx, w_TM, table_ND, idx_TM):
        w_TM, table_ND, idx_TM = w_TM.contiguous(), table_ND.contiguous(), idx_TM.contiguous()
        ctx.save_for_backward(w_TM, table_ND, idx_TM)
        return _launch_weighted_rows(w_TM, table_ND, idx_TM, w_TM.dtype)[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y_TD):
        w_TM, table_ND, idx_TM = ctx.saved_tensors
        need_w, need_table = ctx.needs_input_grad[:2]
        grad_y_TD = grad_y_TD.contiguous()
        grad_w = _launch_gathered_dot(grad_y_TD, table_ND, idx_TM, w_TM.dtype) if need_w else None
        grad_table = None
        if need_table:
            grad_table = _launch_weighted_rows(w_TM, table_ND, idx_TM, None, grad_y_TD)[1].to(table_ND.dtype)
        return grad_w, grad_table, None


def triton_gathered_dot(x_TD, table_ND, idx_TM):
    return TritonGatheredDot.apply(x_TD, table_ND, idx_TM)


def triton_weighted_gather_sum(w_TM, table_ND, idx_TM):
    return TritonWeightedGatherSum.apply(w_TM, table_ND, idx_TM)
