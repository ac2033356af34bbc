"""count_model against formulas derived by hand here, and against the built modules.

The expected values are written out from the conventions in model/flops.py's docstring, not
from its code: per layer, attention 4d^2 params and 8d^2 + 4 s d FLOPs, two RMSNorms of d, etc.
"""

from __future__ import annotations

import math

import pytest

from model.config import ModelConfig, MoEConfig, PeerConfig
from model.flops import count_model, format_counts
from model.lm import build_model

SEQ_LEN = 16


def config(ffn="dense", peer=None, moe=None, **overrides) -> ModelConfig:
    base = dict(
        vocab_size=61, d_model=32, num_layers=3, num_attention_heads=4, max_seq_len=SEQ_LEN, d_ff=48, ffn=ffn,
        sparse_layers=[], tie_embeddings=True, rope_theta=10000.0, norm_eps=1e-6, init_std=0.02,
        peer=peer or PeerConfig(num_experts=64, num_heads=2, top_k=4, d_key=8, query_batchnorm=True,
                                activation="relu", impl="reference"),
        moe=moe or MoEConfig(num_experts=4, top_k=2, d_ff=24, capacity_factor=1.0, eval_capacity_factor=1.0,
                             min_capacity=4, aux_loss_coef=0.01, second_expert_sampling=False,
                             random_token_selection=False),
    )
    base.update(overrides)
    return ModelConfig(**base)


def test_dense_counts_by_hand():
    counts = count_model(config("dense"), SEQ_LEN)
    # V=61, d=32, L=3, d_ff=48, tied, s=16.
    embedding = 61 * 32  # 1952
    per_layer = 4 * 32 * 32 + 2 * 32 + 2 * 32 * 48  # attention 4096 + norms 64 + MLP 3072
    assert counts.total_params == embedding + 3 * per_layer + 32 == 23680
    assert counts.embedding_params == 1952
    assert counts.active_params_per_token == counts.total_params

    attention_flops = 2 * 4 * 32 * 32 + 2 * 2 * SEQ_LEN * 32  # 8192 + 2048
    mlp_flops = 2 * 2 * 32 * 48  # 6144
    logits_flops = 2 * 32 * 61  # 3904
    assert counts.flops_per_token_fwd == 3 * (attention_flops + mlp_flops) + logits_flops == 53056
    assert counts.flops_per_token_train == 3 * 53056


def test_attention_flops_grow_linearly_with_seq_len():
    cfg = config("dense")
    short, long = count_model(cfg, 16), count_model(cfg, 1040)
    # No causal halving: 4 d FLOPs per extra position per layer.
    assert long.flops_per_token_fwd - short.flops_per_token_fwd == 3 * 4 * 32 * (1040 - 16)
    assert long.total_params == short.total_params


def test_peer_counts_by_hand():
    cfg = config("peer", tie_embeddings=False)  # PEER in block 1 (the middle), untied head
    counts = count_model(cfg, SEQ_LEN)
    d, n, h, k, d_key, sqrt_n = 32, 64, 2, 4, 8, 8
    peer_params = (
        d * h * d_key  # query nets 512
        + 2 * h * d_key  # BatchNorm weight and bias 32
        + 2 * sqrt_n * d_key // 2  # sub-keys 64
        + 2 * n * d  # U and V 4096
    )
    assert peer_params == 4704
    per_layer_shared = 4 * d * d + 2 * d
    expected_total = 2 * 61 * d + 3 * per_layer_shared + 2 * (2 * d * 48) + peer_params + d
    assert counts.total_params == expected_total == 27264
    assert counts.embedding_params == 2 * 61 * d
    # A token uses h * k = 8 of the 64 experts: 56 U rows and 56 V rows are idle.
    assert counts.active_params_per_token == expected_total - (n - h * k) * 2 * d == 23680

    peer_flops = (
        2 * d * h * d_key  # query nets 1024
        + 2 * h * 2 * sqrt_n * (d_key // 2)  # sub-key scores 256
        + h * k * k  # candidate sums 32
        + h * k * (2 * d + 2 * d + 1)  # u.x, weighted v, gate x act: 1032
    )
    assert peer_flops == 2344
    attention_flops = 8 * d * d + 4 * SEQ_LEN * d
    expected_fwd = 3 * attention_flops + 2 * (4 * d * 48) + peer_flops + 2 * d * 61
    assert counts.flops_per_token_fwd == expected_fwd == 49256
    assert counts.breakdown["peer_retrieval"].flops_fwd == 1024 + 256 + 32
    assert counts.breakdown["peer_experts"].active_params == h * k * 2 * d


def test_peer_active_experts_capped_at_num_experts():
    peer = PeerConfig(num_experts=4, num_heads=3, top_k=2, d_key=4, query_batchnorm=False, activation="gelu",
                      impl="reference")
    counts = count_model(config("peer", peer=peer), SEQ_LEN)
    # h * k = 6 retrievals among 4 experts: every expert may be used, nothing is idle.
    assert counts.active_params_per_token == counts.total_params
    assert counts.breakdown["peer_experts"].flops_fwd == 6 * (4 * 32 + 1)
    assert counts.breakdown["peer_retrieval"].params == 32 * 12 + 2 * 2 * 2  # no BatchNorm


def test_moe_counts_by_hand():
    cfg = config("moe", sparse_layers=[0, 2])
    counts = count_model(cfg, SEQ_LEN)
    d, experts, top_k, d_ff_expert = 32, 4, 2, 24
    moe_params = d * experts + experts * 2 * d * d_ff_expert  # gate 128 + experts 6144
    expected_total = 61 * d + 3 * (4 * d * d + 2 * d) + 1 * (2 * d * 48) + 2 * moe_params + d
    assert counts.total_params == expected_total
    idle = (experts - top_k) * 2 * d * d_ff_expert
    assert counts.active_params_per_token == expected_total - 2 * idle
    moe_flops = 2 * d * experts + top_k * 2 * 2 * d * d_ff_expert  # 256 + 6144
    expected_fwd = 3 * (8 * d * d + 4 * SEQ_LEN * d) + 4 * d * 48 + 2 * moe_flops + 2 * d * 61
    assert counts.flops_per_token_fwd == expected_fwd


PARAM_CASES = {
    "dense_tied": config("dense"),
    "dense_untied": config("dense", tie_embeddings=False),
    "peer_bn": config("peer"),
    "peer_no_bn_two_layers": config(
        "peer",
        sparse_layers=[0, 2],
        peer=PeerConfig(num_experts=49, num_heads=3, top_k=5, d_key=6, query_batchnorm=False, activation="gelu",
                        impl="reference"),
    ),
    "moe_top1": config(
        "moe",
        moe=MoEConfig(num_experts=3, top_k=1, d_ff=20, capacity_factor=1.0, eval_capacity_factor=1.0,
                      min_capacity=4, aux_loss_coef=0.01, second_expert_sampling=False,
                             random_token_selection=False),
    ),
    "moe_top2_untied": config("moe", tie_embeddings=False, sparse_layers=[1, 2]),
}


@pytest.mark.parametrize("name", sorted(PARAM_CASES))
def test_total_params_match_built_model(name):
    cfg = PARAM_CASES[name]
    model = build_model(cfg)  # MoE at ep_size 1: construction needs no process group
    counts = count_model(cfg, SEQ_LEN)
    assert counts.total_params == sum(p.numel() for p in model.parameters())
    # The breakdown is a partition of the totals.
    assert sum(p.params for p in counts.breakdown.values()) == counts.total_params
    assert sum(p.active_params for p in counts.breakdown.values()) == counts.active_params_per_token
    assert sum(p.flops_fwd for p in counts.breakdown.values()) == counts.flops_per_token_fwd


def test_paper_scale_peer_layer():
    """N = 1024^2, d = 1024: U and V hold 2 x 1024^2 x 1024 = 2.1 B parameters."""
    peer = PeerConfig(num_experts=1024**2, num_heads=8, top_k=16, d_key=128, query_batchnorm=True,
                      activation="relu", impl="reference")
    cfg = config("peer", d_model=1024, num_attention_heads=8, d_ff=4096, peer=peer, max_seq_len=2048)
    counts = count_model(cfg, 2048)
    assert counts.breakdown["peer_experts"].params == 2 * 1024**2 * 1024
    assert math.isclose(counts.breakdown["peer_experts"].params / 1e9, 2.147, rel_tol=1e-3)
    assert counts.breakdown["peer_experts"].active_params == 8 * 16 * 2 * 1024


def test_format_counts_mentions_every_component():
    counts = count_model(config("peer"), SEQ_LEN)
    text = format_counts(counts)
    for name in counts.breakdown:
        assert name in text
    assert f"total {counts.total_params / 1e3:.3g}K" in text  # 25312 -> "25.3K"
    assert "active per token" in text and "train (3x forward)" in text
