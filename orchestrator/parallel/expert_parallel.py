"""Expert-parallel PEER: each rank of an expert-parallel (ep) group holds a d/E column slice of
every expert's u_i and v_i ("dimension sharding"); tokens' x slices, retrieval results and output
slices move by all-to-all. The design note with the byte counts of the candidate schemes is
docs/expert_parallel.md; `bytes_per_token` below is its formula and the layer counts what it sends.

Per forward, with E ranks in the group, T_j tokens on rank j, c = d/E columns on each rank:

    1. x slices      rank r sends x_T[:, cols(j)] to rank j         all-to-all, [T_all, c] arrive
    2. indices       rank r sends its idx_THK to every rank        all-to-all of a repeat (int32)
    3. partial dots  rank j computes U[idx, cols(j)] . x[cols(j)] for every group token and sends
                     each token's [H*K] partial sums to the token's owner, which adds the E parts
    4. weights       the owner forms w = gates * act(u . x) for its tokens (gates stay local) and
                     sends w to every rank                          all-to-all of a repeat
    5. output slices rank j computes sum_{h,k} w V[idx, cols(j)] for every group token and sends
                     each token's [c] slice back to its owner, which concatenates the E slices

Every exchange is `AllToAll` (autograd: the backward is the reverse exchange with swapped split
sizes, so gradients of x, gates (hence keys and query nets), U and V flow exactly as in the
unsharded layer). All use all_to_all_single with split sizes (gloo's list form fails on uneven
sizes, docs/platform.md). No dense token x expert mask exists anywhere.

Steps 3 and 5 run the fused kernels of model/kernels/ selected by the layer's `impl`, as the
unsharded layer does: `gathered_dot` (partial dots of the local column slice of U) and
`weighted_gather_sum` (weighted sum of the local slice of V), on the local [N, C] tables with the
group's global row indices. With impl=fused/auto no [A, M, C] gathered rows exist (chunked on CPU,
Triton on CUDA); with impl=reference they are gathered and kept for backward, T*H*K*d numbers
per rank as in the unsharded reference.

With tensor parallelism too (tensor_parallel.TensorParallelPEER, a subclass), the exchange runs
on the tp rank's slice of S = d/tp columns: `partial_dots` and `output_slices` below are the two
halves, each on an S-wide slice, C = S/E columns held here.

Legend (shape suffixes): T local tokens, A all tokens of the ep group (sum of T_j), D d_model,
S = D / tp the width the group exchanges (D without tp), C = S / E columns held here, H heads,
K top_k, M = H*K, E ranks of the ep group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.kernels import gathered_dot, weighted_gather_sum
from model.peer import PEER
from orchestrator.parallel.shards import declare_tensor, slice_along

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


# ----------------------------------------------------------------------------- the formula


def bytes_per_token(scheme: str, d_model: int, num_retrieved: int, ep: int, *, value_bytes: int = 4,
                    index_bytes: int = 4, distinct_remote_ranks: float | None = None,
                    backward: bool = True) -> float:
    """Bytes one rank sends to other ranks per local token (forward, plus backward by default).

    scheme: "dims" (implemented), "rows" (row sharding, each token's x travels to the distinct
    ranks owning its retrieved experts, partial outputs come back) or "allgather_rows" (fetch the
    retrieved u_i, v_i rows from their owners: the naive baseline). num_retrieved = h * k.
    For "rows", distinct_remote_ranks defaults to its expectation under uniform expert usage,
    (E-1) (1 - (1 - 1/E)^(h k)); skewed usage lowers it but loads the owners of hot experts.
    """
    d, m, e = d_model, num_retrieved, ep
    if e == 1:
        return 0.0
    if scheme == "dims":
        # forward: x slices + idx + partial dots + weights + output slices; backward: the float
        # exchanges reversed (indices carry no gradient).
        fwd = 2 * d * (e - 1) / e * value_bytes + m * (e - 1) * (index_bytes + 2 * value_bytes)
        bwd = 2 * d * (e - 1) / e * value_bytes + m * (e - 1) * 2 * value_bytes
        return fwd + (bwd if backward else 0.0)
    if scheme == "rows":
        n = (e - 1) * (1 - (1 - 1 / e) ** m) if distinct_remote_ranks is None else distinct_remote_ranks
        remote_pairs = m * (e - 1) / e
        # forward: x to n ranks, (index, gate) per remote pair, partial outputs back from n ranks;
        # backward: output grads out, x grads back, gate grads back.
        fwd = 2 * d * n * value_bytes + remote_pairs * (index_bytes + value_bytes)
        bwd = 2 * d * n * value_bytes + remote_pairs * value_bytes
        return fwd + (bwd if backward else 0.0)
    if scheme == "allgather_rows":
        # forward: the owner sends u_i and v_i of each remote retrieved pair; backward: their grads.
        fwd = m * (e - 1) / e * (index_bytes + 2 * d * value_bytes)
        bwd = m * (e - 1) / e * 2 * d * value_bytes
        return fwd + (bwd if backward else 0.0)
    raise ValueError(f"unknown scheme {scheme!r}")


# ----------------------------------------------------------------------------- all-to-all


class CommStats:
    """Bytes this rank sent to other ranks (self-sends are local copies and not counted)."""

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.calls = 0

    def reset(self) -> None:
        self.bytes_sent = 0
        self.calls = 0


def exchange(x: torch.Tensor, out_rows: list[int], in_rows: list[int], group, stats: CommStats | None) -> torch.Tensor:
    """all_to_all_single along dim 0: rows [sum(in_rows[:j]), +in_rows[j]) go to rank j of the
    group; the result stacks what each rank sent here, out_rows[j] rows from rank j."""
    x = x.contiguous()
    out = x.new_empty((sum(out_rows), *x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=out_rows, input_split_sizes=in_rows, group=group)
    if stats is not None:
        me = dist.get_rank(group)
        row_bytes = x[0:1].numel() * x.element_size() if x.dim() > 1 else x.element_size()
        stats.bytes_sent += row_bytes * (sum(in_rows) - in_rows[me])
        stats.calls += 1
    return out


class AllToAll(torch.autograd.Function):
    """`exchange` as an autograd function: the backward sends the gradients back the way they came."""

    @staticmethod
    def forward(ctx, x, out_rows, in_rows, group, stats):
        ctx.out_rows, ctx.in_rows, ctx.group, ctx.stats = out_rows, in_rows, group, stats
        return exchange(x, out_rows, in_rows, group, stats)

    @staticmethod
    def backward(ctx, grad_out):
        return exchange(grad_out, ctx.in_rows, ctx.out_rows, ctx.group, ctx.stats), None, None, None, None


def all_to_all(x, out_rows, in_rows, group, stats=None):
    return AllToAll.apply(x, list(out_rows), list(in_rows), group, stats)


# ----------------------------------------------------------------------------- the layer


class DimShardedPEER(PEER):
    """A PEER layer whose U and V tables hold only columns [ep_rank * C, (ep_rank + 1) * C).

    Routing (query nets, query BatchNorm on the local micro-batch, product keys) is PEER's own and
    runs on the local tokens; only `mix_experts` is replaced. Every rank of the group must call
    forward the same number of times (the exchanges are collective).

    Build with `from_peer`: it takes over the routing modules of a built PEER layer and either
    slices its materialised tables (tests) or, when they are on the meta device, builds only the
    local columns with `PEER.init_expert_table` (training), so the full table never exists here.
    `comm` counts the bytes this layer sends, forward and backward.
    """

    # True when every rank of the group is known to call forward with as many tokens as this one
    # (parallelize() sets it: the trainer's batches have one fixed shape); then the exchange's
    # split sizes need no all_gather of token counts. False (the default) gathers them, so a
    # caller may pass uneven counts.
    equal_token_counts = False

    @classmethod
    def from_peer(cls, peer: PEER, group, group_name: str) -> "DimShardedPEER":
        return cls._take_over(peer, ep_group=group, group_name=group_name)

    @classmethod
    def _take_over(cls, peer: PEER, *, ep_group, group_name: str | None, tp_group=None) -> "DimShardedPEER":
        """The sharded layer built from `peer`: routing modules taken over, tables sliced or built.

        Columns: the tp ranks of a tensor-parallel group (tp_group; None for tp=1) split d into
        slices of S = d/tp (tensor_parallel.py), and the ep ranks of an expert-parallel group
        (ep_group; None for ep=1) split each slice further into C = S/ep columns, so a rank holds
        columns [tp_rank * S + ep_rank * C, + C) of U and V: d/(tp*ep), no two ranks alike.
        """
        ep = dist.get_world_size(ep_group) if ep_group is not None else 1
        ep_rank = dist.get_rank(ep_group) if ep_group is not None else 0
        tp = dist.get_world_size(tp_group) if tp_group is not None else 1
        tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        if peer.d_model % (ep * tp):
            raise ValueError(f"d_model={peer.d_model} is not divisible by the expert-parallel degree {ep} "
                             f"x the tensor-parallel degree {tp}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        for name, value in vars(peer).items():
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        self.training = peer.training
        for name, module in peer.named_children():
            if name not in ("expert_down", "expert_up"):
                self.add_module(name, module)
        for name, param in peer.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in peer.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in peer._non_persistent_buffers_set)
        self._act = _ACTIVATIONS[peer.activation]
        self.group, self.group_name, self.ep, self.ep_rank = ep_group, group_name, ep, ep_rank
        self.tp_group, self.tp, self.tp_rank = tp_group, tp, tp_rank
        self.slice_width = peer.d_model // tp  # S: the width the ep group exchanges
        self.cols = self.slice_width // ep
        self.col_start = tp_rank * self.slice_width + ep_rank * self.cols
        self.comm = CommStats()
        for name in ("expert_down", "expert_up"):
            full = getattr(peer, name).weight
            if full.is_meta:
                local = peer.init_expert_table(name, self.col_start, self.col_start + self.cols, dtype=full.dtype)
            else:
                local = full.detach()[:, self.col_start:self.col_start + self.cols].clone()
            table = nn.Embedding(peer.num_experts, self.cols, _weight=local)
            if ep > 1:
                mark_expert_param(table.weight, group_name)
            # Checkpoints: this table is columns [col_start, + cols) of the model's [N, d] table.
            declare_tensor(table, "weight", (peer.num_experts, peer.d_model),
                           slice_along((peer.num_experts, peer.d_model), 1, self.col_start, self.cols))
            self.add_module(name, table)
        return self

    def reset_parameters(self) -> None:
        raise NotImplementedError("re-initialise the unsharded PEER and shard it again (from_peer)")

    def mix_experts(self, x_TD: torch.Tensor, gates_THK: torch.Tensor, idx_THK: torch.Tensor) -> torch.Tensor:
        pre_TM, plan = self.partial_dots(x_TD, idx_THK)
        w_TM = gates_THK.reshape(pre_TM.shape) * self._act(pre_TM)
        return self.output_slices(w_TM, plan)

    def partial_dots(self, x_TS: torch.Tensor, idx_THK: torch.Tensor):
        """Steps 1-3: u_i . x over the group's S = ep * C columns of x_TS, summed over the ep
        group at each token's owner -> (pre_TM [T, M], plan for `output_slices`)."""
        num_tokens, num_retrieved = x_TS.shape[0], self.num_heads * self.top_k
        idx_TM = idx_THK.reshape(num_tokens, num_retrieved)
        if self.ep == 1:  # tensor parallelism alone: every token is here, nothing to exchange
            self.record_retrieved(idx_TM)
            return gathered_dot(x_TS, self.expert_down.weight, idx_TM, self.impl), (num_tokens, None, None, idx_TM)
        group, ep, stats = self.group, self.ep, self.comm
        if self.equal_token_counts:
            rows_from = [num_tokens] * ep  # T_j
        else:
            counts = torch.tensor([num_tokens], dtype=torch.int64, device=x_TS.device)
            all_counts = [torch.zeros_like(counts) for _ in range(ep)]
            dist.all_gather(all_counts, counts, group=group)  # a collective and a host sync per forward
            rows_from = [int(c) for c in all_counts]  # T_j
        mine = [num_tokens] * ep

        # 1. x slices: [E * T, C] (slice j first) -> [A, C], tokens of rank 0 first.
        x_ETC = x_TS.reshape(num_tokens, ep, self.cols).transpose(0, 1).reshape(ep * num_tokens, self.cols)
        x_AC = all_to_all(x_ETC, rows_from, mine, group, stats)
        # 2. indices of every token of the group (int32 on the wire; N < 2^31).
        idx_AM = exchange(idx_TM.to(torch.int32).repeat(ep, 1), rows_from, mine, group, stats).long()
        # The rows of every token of the group touch this shard: the same set on every ep rank.
        self.record_retrieved(idx_AM)
        # 3. partial dots over the local columns, summed at each token's owner.
        part_AM = gathered_dot(x_AC, self.expert_down.weight, idx_AM, self.impl)
        part_ETM = all_to_all(part_AM, mine, rows_from, group, stats)
        pre_TM = part_ETM.view(ep, num_tokens, num_retrieved).sum(0)
        return pre_TM, (num_tokens, rows_from, mine, idx_AM)

    def output_slices(self, w_TM: torch.Tensor, plan) -> torch.Tensor:
        """Steps 4-5: the weights w = gate * act(u . x) of this rank's tokens -> y [T, S], the
        group's S = ep * C output columns of every local token."""
        num_tokens, rows_from, mine, idx_AM = plan
        if self.ep == 1:
            return weighted_gather_sum(w_TM, self.expert_up.weight, idx_AM, self.impl)
        group, ep, stats = self.group, self.ep, self.comm
        # 4. weights to every rank of the group.
        w_AM = all_to_all(w_TM.repeat(ep, 1), rows_from, mine, group, stats)
        # 5. output slices for every group token, back to the owners: [E * T, C] -> [T, S].
        y_AC = weighted_gather_sum(w_AM, self.expert_up.weight, idx_AM, self.impl)
        y_ETC = all_to_all(y_AC, mine, rows_from, group, stats)
        return y_ETC.view(ep, num_tokens, self.cols).transpose(0, 1).reshape(num_tokens, ep * self.cols)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", sharding=dims, ep={self.ep}, tp={self.tp}, "
                f"columns={self.col_start}:{self.col_start + self.cols}")


def mark_expert_param(param: nn.Parameter, group_name: str) -> None:
    """DeepSpeed's marks for an expert parameter (deepspeed.moe.utils.is_moe_param reads
    `allreduce`; the engine and ZeRO find the expert-data-parallel group by `group_name`)."""
    param.allreduce = False
    param.group_name = group_name
