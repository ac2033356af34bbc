"""PEER: Parameter Efficient Expert Retrieval (He 2024, "Mixture of A Million Experts").

Reference implementation in plain PyTorch: readable and exact; fused kernels live in
model/kernels/ and are checked against this one.

    N experts, expert i is one neuron: e_i(x) = act(u_i . x) v_i with u_i, v_i in R^d.
    h heads; head j has a query q_j(x) in R^{d_key} (one Linear gives all heads' queries).
    Each head retrieves its top-k experts by product keys (model/product_keys.py), shared by all
    heads, and weighs them with g = softmax of the k retrieved scores.
    y(x) = sum_j sum_{i in topk_j(x)} g_{j,i}(x) act(u_i . x) v_i

Legend (shape suffixes):
    T  tokens (all leading dims of the input flattened)
    D  d_model
    H  heads h
    Q  d_key, the query/key width; Q2 = d_key / 2
    F  h * d_key, the flat query features the BatchNorm sees
    K  top_k, experts retrieved per head
    S  sub-keys per half, sqrt(N)
    N  experts
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ACTIVATIONS, PEER_IMPLS, PeerConfig
from model.product_keys import product_key_topk

_ACTIVATION_FNS = {"relu": F.relu, "gelu": F.gelu}


def validate_peer_shapes(d_model: int, cfg: PeerConfig) -> int:
    """Raise ValueError for a PEER layer that cannot be built; return sqrt(N).

    These are internal guards: the orchestrator validates user configs with friendlier messages.
    """
    if d_model < 1:
        raise ValueError(f"PEER d_model must be >= 1, got {d_model}")
    if cfg.num_experts < 1 or math.isqrt(cfg.num_experts) ** 2 != cfg.num_experts:
        raise ValueError(f"PEER num_experts must be a perfect square, got {cfg.num_experts}")
    num_sub_keys = math.isqrt(cfg.num_experts)
    if cfg.num_heads < 1:
        raise ValueError(f"PEER num_heads must be >= 1, got {cfg.num_heads}")
    if not 1 <= cfg.top_k <= num_sub_keys:
        raise ValueError(f"PEER top_k must be in [1, sqrt(num_experts) = {num_sub_keys}], got {cfg.top_k}")
    if cfg.d_key < 2 or cfg.d_key % 2:
        raise ValueError(f"PEER d_key must be even and >= 2, got {cfg.d_key}")
    if cfg.activation not in ACTIVATIONS:
        raise ValueError(f"PEER activation must be one of {ACTIVATIONS}, got {cfg.activation!r}")
    if cfg.impl not in PEER_IMPLS:
        raise ValueError(f"PEER impl must be one of {PEER_IMPLS}, got {cfg.impl!r}")
    return num_sub_keys


class PEER(nn.Module):
    """A PEER feed-forward layer: x [..., d_model] -> y [..., d_model].

    Parameters: `query` (all heads' query nets), `query_norm` (BatchNorm1d or None),
    `sub_keys1`, `sub_keys2` ([sqrt(N), d_key/2] each, shared by the heads), `expert_down`
    (U: row i is u_i) and `expert_up` (V: row i is v_i), both nn.Embedding(N, d_model).

    `init_std` sets the query net; `output_init_std` (default init_std) sets V, the layer's
    output projection, so the LM can give it the same depth scaling as its other residual
    branches.

    Usage tracking for evaluation metrics: set `track_usage = True` and every forward adds how
    often each expert was retrieved (over all tokens and heads; two heads retrieving the same
    expert for one token count twice) to the non-persistent int64 buffer `usage_counts` [N].
    """

    def __init__(
        self,
        d_model: int,
        cfg: PeerConfig,
        init_std: float,
        output_init_std: float | None = None,
    ) -> None:
        super().__init__()
        self.num_sub_keys = validate_peer_shapes(d_model, cfg)
        self.d_model = d_model
        self.num_experts = cfg.num_experts
        self.num_heads = cfg.num_heads
        self.top_k = cfg.top_k
        self.d_key = cfg.d_key
        self.activation = cfg.activation
        self._act = _ACTIVATION_FNS[cfg.activation]
        self.init_std = init_std
        self.output_init_std = init_std if output_init_std is None else output_init_std

        num_query_features = cfg.num_heads * cfg.d_key
        self.query = nn.Linear(d_model, num_query_features, bias=False)
        # BatchNorm over the flat features [T, h * d_key]: each head's query is standardised
        # separately per feature, which spreads queries over the keys and raises expert usage.
        self.query_norm = nn.BatchNorm1d(num_query_features) if cfg.query_batchnorm else None
        self.sub_keys1 = nn.Parameter(torch.empty(self.num_sub_keys, cfg.d_key // 2))
        self.sub_keys2 = nn.Parameter(torch.empty(self.num_sub_keys, cfg.d_key // 2))
        self.expert_down = nn.Embedding(cfg.num_experts, d_model)  # U, input vectors u_i
        self.expert_up = nn.Embedding(cfg.num_experts, d_model)  # V, output vectors v_i

        self.track_usage = False
        self.register_buffer("usage_counts", torch.zeros(cfg.num_experts, dtype=torch.int64), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Query net: the model-wide init_std, like every other Linear. With query BatchNorm
        # its scale does not matter; without it, it sets the spread of the scores.
        nn.init.normal_(self.query.weight, mean=0.0, std=self.init_std)
        if self.query_norm is not None:
            self.query_norm.reset_parameters()
        # Sub-keys ~ N(0, 1/(d_key/2)): against a unit-variance query half (what the BatchNorm
        # produces) each half-score has unit variance, so the k retrieved scores differ by O(1)
        # and the softmax gates are neither one-hot nor uniform at init.
        key_std = 1.0 / math.sqrt(self.d_key // 2)
        nn.init.normal_(self.sub_keys1, mean=0.0, std=key_std)
        nn.init.normal_(self.sub_keys2, mean=0.0, std=key_std)
        # U rows ~ N(0, 1/d): the input is RMS-normalised (unit rms per coordinate), so u . x is
        # O(1) and the neuron sits where relu/gelu is non-linear, not in a near-linear sliver
        # around 0 as with u ~ N(0, init_std^2).
        nn.init.normal_(self.expert_down.weight, mean=0.0, std=1.0 / math.sqrt(self.d_model))
        # V rows small, like any output projection into the residual stream: the layer starts
        # close to the identity block and its output grows as the experts learn.
        nn.init.normal_(self.expert_up.weight, mean=0.0, std=self.output_init_std)

    def reset_usage(self) -> None:
        self.usage_counts.zero_()

    def queries(self, x_TD: torch.Tensor) -> torch.Tensor:
        """All heads' queries [T, H, Q] (BatchNorm applied to the flat [T, F] features)."""
        q_TF = self.query(x_TD)
        if self.query_norm is not None:
            q_TF = self.query_norm(q_TF)
        return q_TF.view(x_TD.shape[0], self.num_heads, self.d_key)

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Retrieve experts: (gates_THK, idx_THK), gates a softmax over each head's k scores."""
        q_THQ = self.queries(x_TD)
        scores_THK, idx_THK = product_key_topk(q_THQ, self.sub_keys1, self.sub_keys2, self.top_k)
        gates_THK = torch.softmax(scores_THK, dim=-1)
        return gates_THK, idx_THK

    def mix_experts(self, x_TD: torch.Tensor, gates_THK: torch.Tensor, idx_THK: torch.Tensor) -> torch.Tensor:
        """sum over heads and retrieved experts of gate * act(u_i . x) * v_i -> [T, D].

        Split from `route` so that an expert-parallel wrapper can send (x, gates, idx) to the
        ranks that hold the U/V rows and run only this part there.
        """
        u_THKD = self.expert_down(idx_THK)
        v_THKD = self.expert_up(idx_THK)
        hidden_THK = self._act(torch.einsum("thkd,td->thk", u_THKD, x_TD))
        return torch.einsum("thk,thkd->td", gates_THK * hidden_THK, v_THKD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"PEER expects last dim {self.d_model}, got input shape {tuple(x.shape)}")
        x_TD = x.reshape(-1, self.d_model)
        gates_THK, idx_THK = self.route(x_TD)
        if self.track_usage:
            with torch.no_grad():
                self.usage_counts += torch.bincount(idx_THK.flatten(), minlength=self.num_experts)
        y_TD = self.mix_experts(x_TD, gates_THK, idx_THK)
        return y_TD.reshape(x.shape)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, num_heads={self.num_heads}, "
            f"top_k={self.top_k}, d_key={self.d_key}, activation={self.activation}"
        )
