"""Tensor parallelism (Megatron style): the ranks of a tensor-parallel (tp) group split each layer's
matrices and see the same tokens. Applied to a built model by `apply_tensor_parallel` (called from
parallelize()); the design note is docs/tensor_parallel.md.

Convention: the residual stream, every norm and every tensor between the sharded regions is
replicated over the tp group, values and gradients alike. A sharded region is entered through `f`
and left through `g`, the conjugate pair of autograd functions:

    f = copy_to_tp        forward identity      backward all-reduce (each rank's input gradient
                                                 covers only its shard's use of the input)
    g = reduce_from_tp    forward all-reduce    backward identity (the output gradient is replicated)

and, for PEER, whose tables are split along d rather than along a hidden dim:

    scatter_to_tp         forward: this rank's column slice   backward: all-gather of the slices
    gather_from_tp        forward: all-gather of the slices   backward: this rank's slice

What is sharded (each rank holds 1/tp), everything else is replicated:

    attention   qkv column-parallel: rank r holds the q, k and v rows of heads
                [r * H/tp, (r+1) * H/tp); out row-parallel: the matching input columns. f before,
                g after. Per layer and token: one all-reduce of d numbers forward, one backward.
    dense MLP   up column-parallel (rows of d_ff), down row-parallel (columns of d_ff); f, g.
                Also the experts of DeepSpeed MoE layers (DeepSpeed's "expert tensor
                parallelism", which its expert groups assume once an mpu has tp > 1, below).
    PEER        U and V split along d (tp slices of d/tp columns, each split again over ep when
                ep > 1: expert_parallel.DimShardedPEER); see TensorParallelPEER. Query nets,
                query BatchNorm and product keys stay replicated (h * d_key * d + 2 sqrt(N) d_key
                numbers, small next to the 2 N d of the tables): routing runs on every tp rank
                on the same tokens and gives the same experts and gates.
    replicated  embeddings and the output layer (vocab 257: splitting it would cost a vocab-
                parallel cross-entropy to save 257 * d numbers), RMSNorms, MoE gates, PKM layers.

Replicated parameters get the same, complete gradient on every rank of a tp group (they are
computed from replicated values with replicated output gradients); tp-sharded ones carry
`tensor_model_parallel = True`, the attribute DeepSpeed 0.19's norm code reads
(deepspeed.runtime.utils.is_model_parallel_parameter): its gradient norm counts a sharded
parameter on every tp rank and a replicated one on tp rank 0 only, then sums over the group.
The engines' own norm (orchestrator/engine/grad_norm.py, without ZeRO) does the same.

Every shard is a slice of the weights the single-process model gets from the same seed (the model
is built whole, then sliced; PEER tables are built slice by slice when deferred), so the sharded
model computes the unsharded one up to the summation order of the all-reduces.

Legend (shape suffixes): B batch, T tokens, D d_model, H heads here (H_all / tp), C head dim,
S = D / tp columns of a PEER slice, F d_ff / tp, M = heads * top_k retrieved experts of PEER.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.lm import CausalSelfAttention, apply_rotary
from model.mlp import DenseMLP
from model.moe import MoEFeedForward
from model.peer import PEER
from compat import use_gloo_safe_token_gather
from orchestrator.parallel.expert_parallel import DimShardedPEER, mark_expert_param
from orchestrator.parallel.shards import Piece, declare_tensor, slice_along

# ----------------------------------------------------------------------------- f and g


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _all_gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


def _own_slice(x: torch.Tensor, group) -> torch.Tensor:
    width = x.shape[-1] // dist.get_world_size(group)
    start = dist.get_rank(group) * width
    return x[..., start:start + width].contiguous()


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _own_slice(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_last_dim(grad, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _own_slice(grad, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """f: identity forward, all-reduce of the gradient over the tp group backward."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """g: all-reduce (sum) over the tp group forward, identity backward."""
    return _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's slice of the last dim (of tp equal slices); backward all-gathers the slices."""
    return _ScatterToTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather the ranks' slices along the last dim; backward keeps this rank's slice."""
    return _GatherFromTP.apply(x, group)


def mark_tensor_parallel(param: nn.Parameter, partition_dim: int) -> None:
    """Megatron's marks, read by DeepSpeed (is_model_parallel_parameter: `tensor_model_parallel`):
    the parameter is a 1/tp shard; norms count it on every tp rank."""
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = 1


def is_tensor_parallel(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight.detach().clone())
    return layer


# ----------------------------------------------------------------------------- layers


class TensorParallelAttention(nn.Module):
    """Causal self-attention with H/tp heads on this rank (same math as model.lm's per head)."""

    def __init__(self, attn: CausalSelfAttention, group) -> None:
        super().__init__()
        tp, rank = dist.get_world_size(group), dist.get_rank(group)
        if attn.num_heads % tp:
            raise ValueError(f"{attn.num_heads} attention heads are not divisible by tp={tp}")
        self.group = group
        self.num_heads = attn.num_heads // tp
        self.head_dim = attn.head_dim
        d_model = attn.qkv.in_features
        width = self.num_heads * self.head_dim  # this rank's share of the heads' dims
        rows = slice(rank * width, (rank + 1) * width)
        # qkv rows are ordered (q|k|v, head, head dim): take this rank's heads from each of q, k, v.
        qkv_3DD = attn.qkv.weight.detach().view(3, d_model, d_model)
        self.qkv = _linear(qkv_3DD[:, rows, :].reshape(3 * width, d_model))
        self.out = _linear(attn.out.weight.detach()[:, rows])
        mark_tensor_parallel(self.qkv.weight, 0)
        mark_tensor_parallel(self.out.weight, 1)
        # Checkpoints: local qkv rows [j * width, + width) are the model's rows
        # [j * d + rank * width, + width) for j = q, k, v; out holds columns `rows`.
        declare_tensor(self.qkv, "weight", (3 * d_model, d_model),
                       [Piece((j * width, 0), (j * d_model + rank * width, 0), (width, d_model)) for j in range(3)])
        declare_tensor(self.out, "weight", (d_model, d_model), slice_along((d_model, d_model), 1, rank * width, width))
        self.register_buffer("rope_cos", attn.rope_cos, persistent=False)
        self.register_buffer("rope_sin", attn.rope_sin, persistent=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x_BTD.shape
        x_BTD = copy_to_tp(x_BTD, self.group)
        qkv_BT3HC = self.qkv(x_BTD).view(batch, seq_len, 3, self.num_heads, self.head_dim)
        q_BHTC, k_BHTC, v_BHTC = qkv_BT3HC.permute(2, 0, 3, 1, 4).unbind(0)
        cos_TC2, sin_TC2 = self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        q_BHTC = apply_rotary(q_BHTC, cos_TC2, sin_TC2)
        k_BHTC = apply_rotary(k_BHTC, cos_TC2, sin_TC2)
        att_BHTC = F.scaled_dot_product_attention(q_BHTC, k_BHTC, v_BHTC, is_causal=True)
        partial_BTD = self.out(att_BHTC.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_dim))
        return reduce_from_tp(partial_BTD, self.group)

    def extra_repr(self) -> str:
        return f"local_heads={self.num_heads}, head_dim={self.head_dim}"


class TensorParallelMLP(nn.Module):
    """DenseMLP with d_ff/tp hidden units here: up column-parallel, down row-parallel."""

    def __init__(self, mlp: DenseMLP, group) -> None:
        super().__init__()
        tp, rank = dist.get_world_size(group), dist.get_rank(group)
        d_ff = mlp.up.out_features
        if d_ff % tp:
            raise ValueError(f"d_ff={d_ff} is not divisible by tp={tp}")
        self.group = group
        width = d_ff // tp
        rows = slice(rank * width, (rank + 1) * width)
        self.up = _linear(mlp.up.weight.detach()[rows, :])
        self.down = _linear(mlp.down.weight.detach()[:, rows])
        mark_tensor_parallel(self.up.weight, 0)
        mark_tensor_parallel(self.down.weight, 1)
        d_model = mlp.up.in_features
        declare_tensor(self.up, "weight", (d_ff, d_model), slice_along((d_ff, d_model), 0, rank * width, width))
        declare_tensor(self.down, "weight", (d_model, d_ff), slice_along((d_model, d_ff), 1, rank * width, width))

    def forward(self, x_D: torch.Tensor) -> torch.Tensor:
        x_D = copy_to_tp(x_D, self.group)
        return reduce_from_tp(self.down(F.gelu(self.up(x_D))), self.group)


class TensorParallelPEER(DimShardedPEER):
    """PEER with U and V split along d over the tp group (and over ep within each tp slice).

    x and the routing (gates_THK, idx_THK) are replicated over tp. Per forward, on a tp rank that
    holds the S = d/tp columns cols(r) of U and V (ep = 1; with ep > 1 the ep group's exchange of
    DimShardedPEER runs on the S-wide slice, its ranks holding S/ep columns each):

        x_TS   = scatter_to_tp(x_TD)                   slice; backward all-gathers d x T numbers
        part   = U[idx, cols(r)] . x_TS                 gathered_dot kernel, [T, M]
        pre_TM = reduce_from_tp(part)                   all-reduce of T*M numbers (u_i . x summed)
        w_TM   = copy_to_tp(gates * act(pre_TM))        backward all-reduces dL/dw (T*M numbers)
        y_TS   = sum_m w V[idx, cols(r)]                weighted_gather_sum kernel
        y_TD   = gather_from_tp(y_TS)                   all-gather, T*d numbers; backward slices

    Why this pattern: per token and direction a rank sends about 2M(tp-1)/tp numbers (ring
    all-reduce of M = h*k partial dots) plus d(tp-1)/tp (all-gather of the output slices). The
    alternative of making the output a row-parallel reduce (each rank's [T, d] partial output,
    zeros outside its columns, all-reduced) sends 2d(tp-1)/tp instead of d(tp-1)/tp, and sharding
    the tables by rows (experts) instead of d would all-reduce [T, d] partial outputs too, with a
    load set by hot experts. d-sharding does every rank the same work and sends less whenever
    2M < d (the paper: M = 8*16 = 128, d = 1024).
    """

    @classmethod
    def from_peer(cls, peer: PEER, tp_group, ep_group=None, group_name: str | None = None) -> "TensorParallelPEER":
        self = cls._take_over(peer, ep_group=ep_group, group_name=group_name, tp_group=tp_group)
        for table in (self.expert_down, self.expert_up):
            mark_tensor_parallel(table.weight, 1)
        return self

    def mix_experts(self, x_TD: torch.Tensor, gates_THK: torch.Tensor, idx_THK: torch.Tensor) -> torch.Tensor:
        x_TS = scatter_to_tp(x_TD, self.tp_group)
        part_TM, plan = self.partial_dots(x_TS, idx_THK)
        pre_TM = reduce_from_tp(part_TM, self.tp_group)
        w_TM = copy_to_tp(gates_THK.reshape(pre_TM.shape) * self._act(pre_TM), self.tp_group)
        y_TS = self.output_slices(w_TM, plan)
        return gather_from_tp(y_TS, self.tp_group)


# ----------------------------------------------------------------------------- the transformation


def apply_tensor_parallel(model: nn.Module, tp_group, ep_group=None, expert_group_name: str | None = None) -> nn.Module:
    """Replace, in place, every attention, dense MLP (including DeepSpeed MoE experts) and PEER
    layer of `model` by its tensor-parallel form over `tp_group`. PEER layers use `ep_group` too
    when given (ep > 1: U and V split over tp x ep ranks). MoE experts must already be the global
    experts this rank holds (parallelize() re-draws them first)."""
    # MoE experts are DenseMLPs too; they get DeepSpeed's expert marks back (_tensor_parallel_experts).
    expert_lists = {id(m.moe.deepspeed_moe.experts.deepspeed_experts) for m in model.modules()
                    if isinstance(m, MoEFeedForward)}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, CausalSelfAttention):
                setattr(parent, name, TensorParallelAttention(child, tp_group))
            elif isinstance(child, DenseMLP) and id(parent) not in expert_lists:
                setattr(parent, name, TensorParallelMLP(child, tp_group))
            elif isinstance(child, PEER) and not isinstance(child, DimShardedPEER):
                setattr(parent, name, TensorParallelPEER.from_peer(child, tp_group, ep_group, expert_group_name))
            elif isinstance(child, MoEFeedForward):
                _tensor_parallel_experts(child, tp_group)
    return model


def _tensor_parallel_experts(moe: MoEFeedForward, tp_group) -> None:
    """Each local expert becomes a TensorParallelMLP, keeping DeepSpeed's expert marks.

    DeepSpeed's MoE layer under an mpu with tp > 1 (expert groups made by
    groups._create_expert_data_and_model_parallel, see dims.expert_groups) keeps 1/tp of each
    expert's capacity slots per tp rank for its all-to-all (the slots are duplicated across tp:
    the tokens are) and all-gathers them back before the experts, so every tp rank runs the
    experts on the same tokens: with tp-sharded experts (f/g inside) that is exact and each rank
    does 1/tp of the expert FLOPs and holds 1/tp of the expert weights."""
    use_gloo_safe_token_gather()
    experts = moe.moe.deepspeed_moe.experts.deepspeed_experts
    for i, expert in enumerate(list(experts)):
        group_name = getattr(expert.up.weight, "group_name", None)
        sharded = TensorParallelMLP(expert, tp_group)
        for p in sharded.parameters():
            mark_expert_param(p, group_name)
        experts[i] = sharded

