"""Parameter and FLOP counts of a ModelConfig, without building the model.

Conventions
-----------
- A multiply-accumulate is 2 FLOPs; a matmul [1, a] x [a, b] per token costs 2ab.
- Counts are per token of one sequence of length `seq_len`, forward pass; training is 3x the
  forward (the backward pass costs twice the forward: gradients of activations and of weights).
  The 3x rule is applied to PEER and MoE too, although their backward scatters rows.
- Attention: q/k/v and output projections 2 * 4 d^2; scores QK^T and the weighted sum of V cost
  2 * 2 * seq_len * d per token per layer, counting all seq_len positions: no halving for the
  causal mask (the usual "model FLOPs" convention; kernels that skip masked blocks do less).
- Output logits 2 d V. The embedding lookup, the loss and its softmax are not counted.
- Not counted (elementwise or comparisons, O(d) or less per token): RMSNorm, rotary, residual
  adds, activations, softmaxes (attention, PEER gates, MoE gate), BatchNorm, top-k comparisons.
- PEER per layer: query nets 2 d h d_key; sub-key scores 2 * h * 2 * sqrt(N) * (d_key/2);
  candidate sums h k^2 (one add each); per head and retrieved expert 2d (u . x) + 2d
  (accumulate the weighted v) + 1 (gate x activation). Retrieval is counted, it is not free.
- PKM per layer (Lample et al. 2019; values only): query nets 2 d h d_key; sub-key scores
  2 * h * 2 * sqrt(N) * (d_key/2) (each head has its own keys, same count); candidate sums h k^2;
  per head and retrieved slot 2d (accumulate the weighted value row). Retrieval is counted.
- MoE per layer: gate 2 d E; top_k experts of 2 * 2 d d_ff each. These are useful FLOPs: the
  capacity padding DeepSpeed computes (and the tokens it drops) are not counted.

Parameters
----------
- `total_params`: every parameter once (a tied output projection is the embedding), with
  RMSNorm weights and BatchNorm affine weight and bias; BatchNorm running stats are buffers and
  not counted. Equals sum(p.numel() for p in build_model(cfg).parameters()) (MoE at ep_size 1).
- `embedding_params`: the input embedding plus an untied output projection (V d each).
- `active_params_per_token`: total minus the expert parameters a token does not use: a PEER
  token touches at most min(h k, N) distinct experts (2d parameters each, U and V rows; heads
  can retrieve the same expert, so this is an upper bound), a PKM token min(h k, N) value rows
  (d each), an MoE token top_k of E experts.
  Embedding tables count as fully active.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from model.config import ModelConfig


@dataclass
class ComponentCounts:
    """One component summed over all layers; flops_fwd is per token."""

    params: int = 0
    active_params: int = 0
    flops_fwd: int = 0

    def add(self, params: int, active_params: int, flops_fwd: int) -> None:
        self.params += params
        self.active_params += active_params
        self.flops_fwd += flops_fwd


@dataclass
class ModelCounts:
    seq_len: int
    total_params: int
    embedding_params: int
    active_params_per_token: int
    flops_per_token_fwd: int
    flops_per_token_train: int  # 3 x forward
    breakdown: dict[str, ComponentCounts] = field(default_factory=dict)

    @property
    def non_embedding_params(self) -> int:
        return self.total_params - self.embedding_params


def count_model(cfg: ModelConfig, seq_len: int) -> ModelCounts:
    """Parameters and per-token FLOPs of the LM that build_model(cfg) builds (see conventions)."""
    d = cfg.d_model
    vocab = cfg.vocab_size
    sparse_layers = set(cfg.sparse_layer_indices())
    parts: dict[str, ComponentCounts] = {
        name: ComponentCounts() for name in ("embedding", "attention", "norms")
    }

    parts["embedding"].add(vocab * d, vocab * d, 0)
    for layer in range(cfg.num_layers):
        attn_params = 3 * d * d + d * d
        parts["attention"].add(attn_params, attn_params, 2 * attn_params + 2 * 2 * seq_len * d)
        parts["norms"].add(2 * d, 2 * d, 0)
        kind = cfg.ffn if layer in sparse_layers else "dense"
        if kind == "dense":
            mlp_params = 2 * d * cfg.d_ff
            parts.setdefault("dense_mlp", ComponentCounts()).add(mlp_params, mlp_params, 2 * mlp_params)
        elif kind == "peer":
            _add_peer(parts, cfg)
        elif kind == "moe":
            _add_moe(parts, cfg)
        elif kind == "pkm":
            _add_pkm(parts, cfg)
        else:
            raise ValueError(f"unknown ffn kind {kind!r}")
    parts["norms"].add(d, d, 0)  # final norm
    head_params = 0 if cfg.tie_embeddings else vocab * d
    parts.setdefault("lm_head", ComponentCounts()).add(head_params, head_params, 2 * d * vocab)

    flops_fwd = sum(p.flops_fwd for p in parts.values())
    return ModelCounts(
        seq_len=seq_len,
        total_params=sum(p.params for p in parts.values()),
        embedding_params=parts["embedding"].params + parts["lm_head"].params,
        active_params_per_token=sum(p.active_params for p in parts.values()),
        flops_per_token_fwd=flops_fwd,
        flops_per_token_train=3 * flops_fwd,
        breakdown=parts,
    )


def _add_peer(parts: dict[str, ComponentCounts], cfg: ModelConfig) -> None:
    d, p = cfg.d_model, cfg.peer
    num_sub_keys = math.isqrt(p.num_experts)
    query_features = p.num_heads * p.d_key
    retrieval_params = d * query_features + 2 * num_sub_keys * (p.d_key // 2)
    if p.query_batchnorm:
        retrieval_params += 2 * query_features  # affine weight and bias
    retrieval_flops = (
        2 * d * query_features  # query nets
        + 2 * p.num_heads * 2 * num_sub_keys * (p.d_key // 2)  # both halves' sub-key scores
        + p.num_heads * p.top_k * p.top_k  # candidate sums
    )
    parts.setdefault("peer_retrieval", ComponentCounts()).add(retrieval_params, retrieval_params, retrieval_flops)

    expert_params = 2 * p.num_experts * d  # U and V
    active_experts = min(p.num_heads * p.top_k, p.num_experts)
    retrieved = p.num_heads * p.top_k
    parts.setdefault("peer_experts", ComponentCounts()).add(
        expert_params, 2 * d * active_experts, retrieved * (2 * d + 2 * d + 1)
    )


def _add_pkm(parts: dict[str, ComponentCounts], cfg: ModelConfig) -> None:
    d, p = cfg.d_model, cfg.pkm
    num_sub_keys = math.isqrt(p.num_values)
    query_features = p.num_heads * p.d_key
    # Per-head keys: h sub-key tables per half (PEER shares one); the score FLOPs are the same.
    retrieval_params = d * query_features + p.num_heads * 2 * num_sub_keys * (p.d_key // 2)
    if p.query_batchnorm:
        retrieval_params += 2 * query_features
    retrieval_flops = (
        2 * d * query_features
        + 2 * p.num_heads * 2 * num_sub_keys * (p.d_key // 2)
        + p.num_heads * p.top_k * p.top_k
    )
    parts.setdefault("pkm_retrieval", ComponentCounts()).add(retrieval_params, retrieval_params, retrieval_flops)
    active_rows = min(p.num_heads * p.top_k, p.num_values)
    parts.setdefault("pkm_values", ComponentCounts()).add(
        p.num_values * d, active_rows * d, p.num_heads * p.top_k * 2 * d
    )


def _add_moe(parts: dict[str, ComponentCounts], cfg: ModelConfig) -> None:
    d, m = cfg.d_model, cfg.moe
    gate_params = d * m.num_experts
    parts.setdefault("moe_gate", ComponentCounts()).add(gate_params, gate_params, 2 * gate_params)
    per_expert = 2 * d * m.d_ff
    parts.setdefault("moe_experts", ComponentCounts()).add(
        m.num_experts * per_expert, m.top_k * per_expert, m.top_k * 2 * per_expert
    )


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}" if isinstance(n, float) else str(n)


def format_counts(counts: ModelCounts) -> str:
    """A few lines for the log: totals, then one line per component."""
    lines = [
        f"params: total {_human(counts.total_params)} (embedding {_human(counts.embedding_params)}, "
        f"non-embedding {_human(counts.non_embedding_params)}), active per token "
        f"{_human(counts.active_params_per_token)}",
        f"FLOPs per token at seq_len {counts.seq_len}: forward {_human(counts.flops_per_token_fwd)}, "
        f"train (3x forward) {_human(counts.flops_per_token_train)}",
    ]
    width = max(len(name) for name in counts.breakdown)
    for name, part in counts.breakdown.items():
        share = part.flops_fwd / counts.flops_per_token_fwd if counts.flops_per_token_fwd else 0.0
        lines.append(
            f"  {name:<{width}}  params {_human(part.params):>7}  active {_human(part.active_params):>7}  "
            f"fwd FLOPs {_human(part.flops_fwd):>7} ({share:6.1%})"
        )
    return "\n".join(lines)
