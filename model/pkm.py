"""PKM: product-key memory (Lample et al. 2019, "Large Memory Layers with Product Keys").

The baseline of the PEER paper's isoFLOP comparison: the same product-key retrieval as PEER
(model/product_keys.py, model/kernels/), but the retrieved items are plain value rows, with no
per-expert input vector and no non-linearity:

    h heads; head j has a query net q_j(x) in R^{d_key} (one Linear for all heads, BatchNorm on
    the flat query features by default, as in PEER) and its own product keys (two sub-key tables
    of sqrt(N) x d_key/2 per head: Lample's multi-head memory). All heads share one value table
    V of N x d_model.
    y(x) = sum_j sum_{i in topk_j(x)} softmax_j(scores)_i v_i

The weighted sum of value rows is `weighted_gather_sum` (model/kernels/): an embedding_bag with
per-sample weights on CPU, no gathered [T, H, K, d] rows.

Legend (shape suffixes):
    T  tokens (all leading dims of the input flattened)
    D  d_model
    H  heads h
    Q  d_key; Q2 = d_key / 2
    F  h * d_key, the flat query features the BatchNorm sees
    K  top_k, slots retrieved per head
    M  h * k, slots retrieved per token
    S  sub-keys per half and head, sqrt(N)
    N  memory slots (value rows)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.config import PEER_IMPLS, PKMConfig
from model.kernels import product_key_retrieval, weighted_gather_sum


def validate_pkm_shapes(d_model: int, cfg: PKMConfig) -> int:
    """Raise ValueError for a memory that cannot be built; return sqrt(N). Internal guards: the
    orchestrator validates user configs with friendlier messages."""
    if d_model < 1:
        raise ValueError(f"PKM d_model must be >= 1, got {d_model}")
    if cfg.num_values < 1 or math.isqrt(cfg.num_values) ** 2 != cfg.num_values:
        raise ValueError(f"PKM num_values must be a perfect square, got {cfg.num_values}")
    num_sub_keys = math.isqrt(cfg.num_values)
    if cfg.num_heads < 1:
        raise ValueError(f"PKM num_heads must be >= 1, got {cfg.num_heads}")
    if not 1 <= cfg.top_k <= num_sub_keys:
        raise ValueError(f"PKM top_k must be in [1, sqrt(num_values) = {num_sub_keys}], got {cfg.top_k}")
    if cfg.d_key < 2 or cfg.d_key % 2:
        raise ValueError(f"PKM d_key must be even and >= 2, got {cfg.d_key}")
    if cfg.impl not in PEER_IMPLS:
        raise ValueError(f"PKM impl must be one of {PEER_IMPLS}, got {cfg.impl!r}")
    return num_sub_keys


class PKM(nn.Module):
    """A product-key memory feed-forward layer: x [..., d_model] -> y [..., d_model].

    Parameters: `query` (all heads' query nets), `query_norm` (BatchNorm1d or None), `sub_keys1`,
    `sub_keys2` ([h, sqrt(N), d_key/2] each: every head owns its keys) and `values`
    (nn.Embedding(N, d_model), shared by the heads). `init_std` sets the query net;
    `output_init_std` (default init_std) sets the values, the layer's output into the residual
    stream, so the LM gives it the same depth scaling as its other residual branches.

    Usage tracking, the same interface as PEER (the trainer measures both alike): with
    `track_usage = True` every forward adds how often each slot was retrieved (over all tokens and
    heads) to the non-persistent int64 buffer `usage_counts` [N]; `num_experts` is N.
    """

    def __init__(self, d_model: int, cfg: PKMConfig, init_std: float, output_init_std: float | None = None) -> None:
        super().__init__()
        self.num_sub_keys = validate_pkm_shapes(d_model, cfg)
        self.d_model = d_model
        self.num_values = cfg.num_values
        self.num_heads = cfg.num_heads
        self.top_k = cfg.top_k
        self.d_key = cfg.d_key
        self.impl = cfg.impl
        self.init_std = init_std
        self.output_init_std = init_std if output_init_std is None else output_init_std

        num_query_features = cfg.num_heads * cfg.d_key
        self.query = nn.Linear(d_model, num_query_features, bias=False)
        self.query_norm = nn.BatchNorm1d(num_query_features) if cfg.query_batchnorm else None
        self.sub_keys1 = nn.Parameter(torch.empty(cfg.num_heads, self.num_sub_keys, cfg.d_key // 2))
        self.sub_keys2 = nn.Parameter(torch.empty(cfg.num_heads, self.num_sub_keys, cfg.d_key // 2))
        self.values = nn.Embedding(cfg.num_values, d_model, _weight=torch.empty(cfg.num_values, d_model))

        self.track_usage = False
        self.register_buffer("usage_counts", torch.zeros(cfg.num_values, dtype=torch.int64), persistent=False)
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        """N under the name the trainer's usage statistics read (a slot is PKM's 'expert')."""
        return self.num_values

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # The same choices as PEER (model/peer.py): query net at the model's init_std, sub-keys
        # ~ N(0, 1/(d_key/2)) so that each half-score has unit variance against a normalised
        # query, value rows small like any output projection into the residual stream.
        nn.init.normal_(self.query.weight, mean=0.0, std=self.init_std)
        if self.query_norm is not None:
            self.query_norm.reset_parameters()
        key_std = 1.0 / math.sqrt(self.d_key // 2)
        nn.init.normal_(self.sub_keys1, mean=0.0, std=key_std)
        nn.init.normal_(self.sub_keys2, mean=0.0, std=key_std)
        nn.init.normal_(self.values.weight, mean=0.0, std=self.output_init_std)

    def reset_usage(self) -> None:
        self.usage_counts.zero_()

    def queries(self, x_TD: torch.Tensor) -> torch.Tensor:
        """All heads' queries [T, H, Q] (BatchNorm applied to the flat [T, F] features)."""
        q_TF = self.query(x_TD)
        if self.query_norm is not None:
            q_TF = self.query_norm(q_TF)
        return q_TF.view(x_TD.shape[0], self.num_heads, self.d_key)

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gates_THK, idx_THK): per head, softmax over its k retrieved scores, and slot indices."""
        q_THQ = self.queries(x_TD)
        scores_THK, idx_THK = product_key_retrieval(q_THQ, self.sub_keys1, self.sub_keys2, self.top_k, self.impl)
        return torch.softmax(scores_THK, dim=-1), idx_THK

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"PKM expects last dim {self.d_model}, got input shape {tuple(x.shape)}")
        x_TD = x.reshape(-1, self.d_model)
        gates_THK, idx_THK = self.route(x_TD)
        if self.track_usage:
            with torch.no_grad():
                self.usage_counts += torch.bincount(idx_THK.flatten(), minlength=self.num_values)
        num_tokens = x_TD.shape[0]
        y_TD = weighted_gather_sum(gates_THK.reshape(num_tokens, -1), self.values.weight,
                                   idx_THK.reshape(num_tokens, -1), self.impl)
        return y_TD.reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_values={self.num_values}, num_heads={self.num_heads}, "
                f"top_k={self.top_k}, d_key={self.d_key}, impl={self.impl}")
