"""PEER layer and product-key retrieval against brute-force and naive-loop references.

Tolerances: references run in float64 with the same math in a different order (full N-key
scoring, Python loops), so 1e-10 relative error is rounding; indices must match exactly (random
float64 scores have no ties at that precision).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from model.config import PeerConfig
from model.peer import PEER
from model.product_keys import product_key_topk


def peer_config(**overrides) -> PeerConfig:
    base = dict(
        num_experts=36, num_heads=2, top_k=3, d_key=6, query_batchnorm=True, activation="gelu", impl="reference"
    )
    base.update(overrides)
    return PeerConfig(**base)


def brute_force_topk(q_THD, keys1, keys2, top_k):
    """Score all N = S^2 product keys explicitly and take the top-k."""
    num_sub_keys = keys1.shape[-2]
    idx_N = torch.arange(num_sub_keys * num_sub_keys)
    if keys1.dim() == 2:
        full_keys_ND = torch.cat([keys1[idx_N // num_sub_keys], keys2[idx_N % num_sub_keys]], dim=-1)
        scores_THN = torch.einsum("thd,nd->thn", q_THD, full_keys_ND)
    else:
        full_keys_HND = torch.cat([keys1[:, idx_N // num_sub_keys], keys2[:, idx_N % num_sub_keys]], dim=-1)
        scores_THN = torch.einsum("thd,hnd->thn", q_THD, full_keys_HND)
    return scores_THN.topk(top_k, dim=-1)


@pytest.mark.parametrize(
    "num_sub_keys, d_key, top_k, num_heads, num_tokens",
    [
        (4, 2, 1, 1, 5),
        (5, 6, 3, 2, 7),  # non-power-of-two sqrt(N), d_key, k
        (8, 10, 5, 3, 9),
        (6, 4, 6, 2, 4),  # k = sqrt(N): every sub-key is a candidate
        (32, 16, 7, 4, 11),
    ],
)
@pytest.mark.parametrize("per_head_keys", [False, True])
def test_product_key_topk_matches_brute_force(num_sub_keys, d_key, top_k, num_heads, num_tokens, per_head_keys):
    gen = torch.Generator().manual_seed(num_sub_keys * 100 + d_key)
    key_shape = (num_heads, num_sub_keys, d_key // 2) if per_head_keys else (num_sub_keys, d_key // 2)
    q_THD = torch.randn(num_tokens, num_heads, d_key, generator=gen, dtype=torch.float64)
    keys1 = torch.randn(*key_shape, generator=gen, dtype=torch.float64)
    keys2 = torch.randn(*key_shape, generator=gen, dtype=torch.float64)

    scores_THK, idx_THK = product_key_topk(q_THD, keys1, keys2, top_k)
    ref_scores_THK, ref_idx_THK = brute_force_topk(q_THD, keys1, keys2, top_k)

    assert idx_THK.dtype == torch.int64
    assert idx_THK.shape == (num_tokens, num_heads, top_k)
    assert torch.equal(idx_THK, ref_idx_THK)
    torch.testing.assert_close(scores_THK, ref_scores_THK, rtol=1e-10, atol=1e-10)
    assert (scores_THK[..., :-1] >= scores_THK[..., 1:]).all(), "scores must be sorted descending"


def test_product_key_topk_rejects_bad_shapes():
    q_THD = torch.randn(3, 2, 6)
    keys = torch.randn(4, 3)
    with pytest.raises(ValueError, match="top_k"):
        product_key_topk(q_THD, keys, keys, 5)
    with pytest.raises(ValueError, match="sub-key"):
        product_key_topk(q_THD, keys, torch.randn(4, 2), 2)
    with pytest.raises(ValueError, match="even"):
        product_key_topk(torch.randn(3, 2, 5), keys, keys, 2)


def test_gates_are_a_softmax_per_head():
    torch.manual_seed(0)
    layer = PEER(12, peer_config(num_experts=49, num_heads=3, top_k=4), init_std=0.02)
    x_TD = torch.randn(10, 12)
    gates_THK, idx_THK = layer.route(x_TD)
    assert gates_THK.shape == idx_THK.shape == (10, 3, 4)
    assert (gates_THK > 0).all()
    torch.testing.assert_close(gates_THK.sum(-1), torch.ones(10, 3))
    assert idx_THK.min() >= 0 and idx_THK.max() < 49
    # Gates follow the sorted scores, so they are sorted too.
    assert (gates_THK[..., :-1] >= gates_THK[..., 1:]).all()


def naive_peer(layer: PEER, x_TD: torch.Tensor) -> torch.Tensor:
    """The PEER formula token by token, head by head, scoring all N product keys."""
    num_tokens = x_TD.shape[0]
    sqrt_n = layer.num_sub_keys
    act = {"relu": F.relu, "gelu": F.gelu}[layer.activation]
    q_TF = x_TD @ layer.query.weight.T
    if layer.query_norm is not None:
        bn = layer.query_norm
        assert bn.training, "reference assumes batch statistics"
        mean_F = q_TF.mean(0)
        var_F = q_TF.var(0, unbiased=False)
        q_TF = (q_TF - mean_F) / torch.sqrt(var_F + bn.eps) * bn.weight + bn.bias
    y_TD = torch.zeros_like(x_TD)
    for t in range(num_tokens):
        for head in range(layer.num_heads):
            q = q_TF[t, head * layer.d_key : (head + 1) * layer.d_key]
            q1, q2 = q[: layer.d_key // 2], q[layer.d_key // 2 :]
            scores = torch.stack(
                [q1 @ layer.sub_keys1[i // sqrt_n] + q2 @ layer.sub_keys2[i % sqrt_n] for i in range(layer.num_experts)]
            )
            top_scores, top_idx = scores.topk(layer.top_k)
            gates = torch.softmax(top_scores, dim=0)
            for gate, i in zip(gates, top_idx.tolist()):
                u_i = layer.expert_down.weight[i]
                v_i = layer.expert_up.weight[i]
                y_TD[t] += gate * act(u_i @ x_TD[t]) * v_i
    return y_TD


@pytest.mark.parametrize(
    "d_model, overrides",
    [
        (12, dict(num_experts=25, num_heads=2, top_k=3, d_key=6, activation="gelu", query_batchnorm=True)),
        (10, dict(num_experts=16, num_heads=3, top_k=4, d_key=4, activation="relu", query_batchnorm=False)),
        (7, dict(num_experts=9, num_heads=1, top_k=1, d_key=2, activation="relu", query_batchnorm=True)),
    ],
)
def test_output_matches_naive_loop(d_model, overrides):
    torch.manual_seed(1)
    layer = PEER(d_model, peer_config(**overrides), init_std=0.3).double()
    # Non-trivial BN affine parameters and V rows, so the test would see them misapplied.
    if layer.query_norm is not None:
        with torch.no_grad():
            layer.query_norm.weight.uniform_(0.5, 1.5)
            layer.query_norm.bias.normal_()
    with torch.no_grad():
        layer.expert_up.weight.normal_()
    x_BTD = torch.randn(2, 4, d_model, dtype=torch.float64)

    y_BTD = layer(x_BTD)

    assert y_BTD.shape == x_BTD.shape
    torch.testing.assert_close(y_BTD.reshape(-1, d_model), naive_peer(layer, x_BTD.reshape(-1, d_model)))


@pytest.mark.parametrize("query_batchnorm", [False, True])
def test_gradcheck_reaches_keys_queries_and_tables(query_batchnorm):
    torch.manual_seed(2)
    layer = PEER(5, peer_config(num_experts=16, num_heads=2, top_k=2, d_key=4, query_batchnorm=query_batchnorm,
                                activation="gelu"), init_std=0.5).double()
    names = ["query.weight", "sub_keys1", "sub_keys2", "expert_down.weight", "expert_up.weight"]
    if query_batchnorm:
        names += ["query_norm.weight", "query_norm.bias"]
    params = dict(layer.named_parameters())
    assert sorted(params) == sorted(names), "the test must cover every parameter"
    x_TD = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    inputs = (x_TD, *[params[n].detach().clone().requires_grad_(True) for n in names])

    def f(x, *values):
        return functional_call(layer, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)

    # gradcheck passes for zero gradients too: check every parameter actually gets one.
    f(*inputs).pow(2).sum().backward()
    for name, value in zip(names, inputs[1:]):
        assert value.grad is not None and value.grad.abs().sum() > 0, name


def test_usage_tracking_counts_every_retrieval():
    torch.manual_seed(3)
    cfg = peer_config(num_experts=16, num_heads=2, top_k=3, d_key=4)
    layer = PEER(8, cfg, init_std=0.02)
    x_BTD = torch.randn(2, 5, 8)

    layer(x_BTD)
    assert layer.usage_counts.sum() == 0, "off by default"

    layer.track_usage = True
    layer.eval()  # BatchNorm on running stats, so route() below sees the same queries
    layer(x_BTD)
    layer(x_BTD)
    _, idx_THK = layer.route(x_BTD.reshape(-1, 8))
    expected_N = 2 * torch.bincount(idx_THK.flatten(), minlength=16)
    assert layer.usage_counts.dtype == torch.int64
    assert torch.equal(layer.usage_counts, expected_N)
    assert layer.usage_counts.sum() == 2 * 10 * 2 * 3
    assert "usage_counts" not in layer.state_dict()

    layer.reset_usage()
    assert layer.usage_counts.sum() == 0


@pytest.mark.parametrize(
    "d_model, overrides, match",
    [
        (8, dict(num_experts=15), "perfect square"),
        (8, dict(num_experts=0), "perfect square"),
        (8, dict(num_experts=16, top_k=5), "top_k"),
        (8, dict(top_k=0), "top_k"),
        (8, dict(d_key=5), "d_key"),
        (8, dict(d_key=0), "d_key"),
        (8, dict(num_heads=0), "num_heads"),
        (8, dict(activation="tanh"), "activation"),
        (8, dict(impl="triton"), "impl"),
        (0, dict(), "d_model"),
    ],
)
def test_constructor_guards(d_model, overrides, match):
    with pytest.raises(ValueError, match=match):
        PEER(d_model, peer_config(**overrides), init_std=0.02)


def test_init_scales():
    torch.manual_seed(4)
    d_model = 256
    cfg = peer_config(num_experts=64 * 64, d_key=32)
    layer = PEER(d_model, cfg, init_std=0.02, output_init_std=0.005)
    assert math.isclose(layer.expert_down.weight.std().item(), 1 / math.sqrt(d_model), rel_tol=0.05)
    assert math.isclose(layer.expert_up.weight.std().item(), 0.005, rel_tol=0.05)
    assert math.isclose(layer.query.weight.std().item(), 0.02, rel_tol=0.05)
    assert math.isclose(layer.sub_keys1.std().item(), 1 / math.sqrt(16), rel_tol=0.1)
    # u . x is O(1) for a unit-rms input.
    x_TD = torch.randn(64, d_model)
    pre_act = layer.expert_down.weight[:100] @ x_TD.T
    assert 0.8 < pre_act.std().item() < 1.2


def test_product_key_topk_rejects_per_head_keys_for_other_head_count():
    """Per-head sub-keys [H, S, d_key/2] must have one table per query head."""
    q_THD = torch.randn(3, 2, 6)
    keys_HSD2 = torch.randn(3, 4, 3)
    with pytest.raises(ValueError, match="per-head"):
        product_key_topk(q_THD, keys_HSD2, keys_HSD2, 2)


@pytest.mark.parametrize("impl", ["fused", "auto"])
def test_route_fused_retrieval_equals_reference(impl):
    """route() with impl=fused/auto (chunked product keys) picks the same experts with the same
    gates as impl=reference, and gives the keys and query net the same gradients."""
    torch.manual_seed(5)
    ref = PEER(11, peer_config(num_experts=64, num_heads=3, top_k=5, d_key=8), init_std=0.3).double()
    fused = PEER(11, peer_config(num_experts=64, num_heads=3, top_k=5, d_key=8, impl=impl), init_std=0.3).double()
    fused.load_state_dict(ref.state_dict())
    x_TD = torch.randn(13, 11, dtype=torch.float64)
    grad_THK = torch.randn(13, 3, 5, dtype=torch.float64)
    results = []
    for layer in (ref, fused):
        gates_THK, idx_THK = layer.route(x_TD)
        gates_THK.backward(grad_THK)
        results.append((gates_THK.detach(), idx_THK, [p.grad for p in (layer.sub_keys1, layer.sub_keys2, layer.query.weight)]))
    assert torch.equal(results[1][1], results[0][1])
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=1e-12)
    for got, want in zip(results[1][2], results[0][2]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
