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

import contextlib
import math

import torch
from torch import nn

from model.config import ACTIVATIONS, PEER_IMPLS, PeerConfig
from model.kernels import peer_expert_mix, product_key_retrieval


# Set by defer_expert_tables(); a list so the context manager can flip it in place.
_DEFER_EXPERT_TABLES = [False]


@contextlib.contextmanager
def defer_expert_tables(enabled: bool = True):
    """PEER layers built inside get their U and V tables on the meta device: no memory, no fill.

    Everything else (query nets, keys, the global RNG stream, `expert_seed`) is built exactly as
    without it, so the caller can materialise any column slice of the tables that an eager build
    would hold with `PEER.init_expert_table`. For expert parallelism (orchestrator/parallel), where
    a table of 1024^2 x d must never exist whole on one rank.
    """
    previous = _DEFER_EXPERT_TABLES[0]
    _DEFER_EXPERT_TABLES[0] = enabled
    try:
        yield
    finally:
        _DEFER_EXPERT_TABLES[0] = previous


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

    retrieved_rows: torch.Tensor | None = None  # see track_retrieved_rows

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
        self.impl = cfg.impl
        self.init_std = init_std
        self.output_init_std = init_std if output_init_std is None else output_init_std

        num_query_features = cfg.num_heads * cfg.d_key
        self.query = nn.Linear(d_model, num_query_features, bias=False)
        # BatchNorm over the flat features [T, h * d_key]: each head's query is standardised
        # separately per feature, which spreads queries over the keys and raises expert usage.
        self.query_norm = nn.BatchNorm1d(num_query_features) if cfg.query_batchnorm else None
        self.sub_keys1 = nn.Parameter(torch.empty(self.num_sub_keys, cfg.d_key // 2))
        self.sub_keys2 = nn.Parameter(torch.empty(self.num_sub_keys, cfg.d_key // 2))
        # U (input vectors u_i) and V (output vectors v_i). Built from an empty weight so that
        # nn.Embedding's own init draws nothing; reset_parameters fills them. Under
        # defer_expert_tables() they live on the meta device (expert parallelism, see there).
        table_device = "meta" if _DEFER_EXPERT_TABLES[0] else None
        self.expert_down = nn.Embedding(cfg.num_experts, d_model,
                                        _weight=torch.empty(cfg.num_experts, d_model, device=table_device))
        self.expert_up = nn.Embedding(cfg.num_experts, d_model,
                                      _weight=torch.empty(cfg.num_experts, d_model, device=table_device))

        self.track_usage = False
        self.register_buffer("usage_counts", torch.zeros(cfg.num_experts, dtype=torch.int64), persistent=False)
        # Row-sparse optimizer (orchestrator/row_sparse_adamw.py): None, or a bool mask [N] of the
        # U/V rows this layer's training forwards retrieved since the last optimizer step.
        self.retrieved_rows = None
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
        # V rows small, like any output projection into the residual stream: the layer starts
        # close to the identity block and its output grows as the experts learn.
        # Both tables come from a private generator seeded by one draw of the global stream, so
        # the global stream advances by the same amount whatever the table size or placement,
        # and any column slice of the tables can be rebuilt alone (init_expert_table).
        self.expert_seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
        for name in ("expert_down", "expert_up"):
            weight = getattr(self, name).weight
            if not weight.is_meta:
                weight.copy_(self.init_expert_table(name))

    # Rows per generator call when filling a table: fixed, because the values depend on it.
    EXPERT_INIT_CHUNK_ROWS = 4096

    @torch.no_grad()
    def init_expert_table(self, name: str, col_start: int = 0, col_end: int | None = None,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Columns [col_start, col_end) of the initial U ("expert_down", N(0, 1/d)) or V
        ("expert_up", N(0, output_init_std^2)) table, [N, col_end - col_start], on the CPU.

        A function of `expert_seed` only. Rows are drawn full width in fixed chunks and sliced,
        so a slice equals the same columns of the full table without the full table ever
        existing (expert-parallel ranks each build their own columns this way).
        """
        std = {"expert_down": 1.0 / math.sqrt(self.d_model), "expert_up": self.output_init_std}[name]
        col_end = self.d_model if col_end is None else col_end
        gen = torch.Generator(device="cpu").manual_seed(self.expert_seed + (name == "expert_up"))
        out = torch.empty(self.num_experts, col_end - col_start, dtype=dtype)
        chunk = torch.empty(self.EXPERT_INIT_CHUNK_ROWS, self.d_model)
        for row in range(0, self.num_experts, self.EXPERT_INIT_CHUNK_ROWS):
            rows = min(self.EXPERT_INIT_CHUNK_ROWS, self.num_experts - row)
            chunk[:rows].normal_(mean=0.0, std=std, generator=gen)
            out[row:row + rows] = chunk[:rows, col_start:col_end]
        return out

    def reset_usage(self) -> None:
        self.usage_counts.zero_()

    def track_retrieved_rows(self) -> torch.Tensor:
        """Start recording the rows of U and V that training forwards retrieve (a bool mask [N] on
        the tables' device, OR-ed over forwards until its owner clears it); returns the mask."""
        if self.retrieved_rows is None:
            self.retrieved_rows = torch.zeros(self.num_experts, dtype=torch.bool, device=self.expert_down.weight.device)
        return self.retrieved_rows

    def record_retrieved(self, idx: torch.Tensor) -> None:
        """Mark the rows `idx` (any shape) as retrieved, when recording. Only forwards that build a
        graph count (training, grad enabled; an activation-checkpoint recompute marks the same rows
        again): evaluation under no_grad must not make rows look retrieved."""
        if self.retrieved_rows is not None and self.training and torch.is_grad_enabled():
            self.retrieved_rows[idx.reshape(-1)] = True

    def queries(self, x_TD: torch.Tensor) -> torch.Tensor:
        """All heads' queries [T, H, Q] (BatchNorm applied to the flat [T, F] features)."""
        q_TF = self.query(x_TD)
        if self.query_norm is not None:
            q_TF = self.query_norm(q_TF)
        return q_TF.view(x_TD.shape[0], self.num_heads, self.d_key)

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Retrieve experts: (gates_THK, idx_THK), gates a softmax over each head's k scores.

        Product keys by `self.impl` too: "reference" is model/product_keys.py's plain autograd,
        fused/auto the chunked retrieval (model/kernels/retrieval.py); same experts, same scores.
        """
        q_THQ = self.queries(x_TD)
        scores_THK, idx_THK = product_key_retrieval(q_THQ, self.sub_keys1, self.sub_keys2, self.top_k, self.impl)
        gates_THK = torch.softmax(scores_THK, dim=-1)
        return gates_THK, idx_THK

    def mix_experts(self, x_TD: torch.Tensor, gates_THK: torch.Tensor, idx_THK: torch.Tensor) -> torch.Tensor:
        """sum over heads and retrieved experts of gate * act(u_i . x) * v_i -> [T, D].

        Split from `route` so that an expert-parallel wrapper can send (x, gates, idx) to the
        ranks that hold the U/V rows and run only this part there. `self.impl` picks the kernel
        (model/kernels/: reference, or fused = Triton on CUDA and chunked torch ops on CPU); all
        compute the same values and gradients.
        """
        self.record_retrieved(idx_THK)
        return peer_expert_mix(
            x_TD, self.expert_down.weight, self.expert_up.weight, gates_THK, idx_THK, self.activation, self.impl
        )

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
            f"top_k={self.top_k}, d_key={self.d_key}, activation={self.activation}, impl={self.impl}"
        )
