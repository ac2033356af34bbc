"""PKM memory layer against a straightforward float64 reference, and its counts.

The reference scores all N = S^2 product keys of every head explicitly, takes the top-k, and
sums softmax-weighted value rows in a Python loop: the same math in another order, so 1e-10
relative error is rounding; indices must match exactly (random float64 scores have no ties).
"""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig, MoEConfig, PeerConfig, PKMConfig
from model.flops import count_model
from model.lm import build_model
from model.pkm import PKM


def pkm_config(**overrides) -> PKMConfig:
    base = dict(num_values=49, num_heads=3, top_k=4, d_key=6, query_batchnorm=False, impl="reference")
    base.update(overrides)
    return PKMConfig(**base)


def reference_pkm(layer: PKM, params: dict, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y and idx by brute force: every product key of every head scored, loops over tokens/heads."""
    q_TF = x_TD @ params["query.weight"].t()
    if layer.query_norm is not None:  # training-mode BatchNorm: batch statistics, biased variance
        mean, var = q_TF.mean(0), q_TF.var(0, unbiased=False)
        q_TF = (q_TF - mean) / torch.sqrt(var + layer.query_norm.eps)
        q_TF = q_TF * params["query_norm.weight"] + params["query_norm.bias"]
    q_THQ = q_TF.view(x_TD.shape[0], layer.num_heads, layer.d_key)
    s = layer.num_sub_keys
    values = params["values.weight"]
    y_TD = torch.zeros_like(x_TD)
    idx_THK = torch.empty(x_TD.shape[0], layer.num_heads, layer.top_k, dtype=torch.long)
    for h in range(layer.num_heads):
        keys_NQ = torch.stack([torch.cat([params["sub_keys1"][h, n // s], params["sub_keys2"][h, n % s]])
                               for n in range(s * s)])
        for t in range(x_TD.shape[0]):
            scores_N = keys_NQ @ q_THQ[t, h]
            top, idx = scores_N.topk(layer.top_k)
            idx_THK[t, h] = idx
            gates = torch.softmax(top, dim=0)
            for g, i in zip(gates, idx):
                y_TD[t] = y_TD[t] + g * values[i]
    return y_TD, idx_THK


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("query_batchnorm", [False, True])
def test_pkm_forward_backward_matches_brute_force(impl, query_batchnorm):
    torch.manual_seed(0)
    layer = PKM(10, pkm_config(impl=impl, query_batchnorm=query_batchnorm), init_std=0.5,
                output_init_std=0.7).double()
    layer.train()
    x_TD = torch.randn(13, 10, dtype=torch.float64, requires_grad=True)
    layer.track_usage = True
    y = layer(x_TD)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters()}
    x_ref = x_TD.detach().clone().requires_grad_(True)
    y_ref, idx_ref = reference_pkm(layer, params, x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)

    # Usage: every retrieved slot of every token and head counted once.
    assert int(layer.usage_counts.sum()) == 13 * 3 * 4
    assert torch.equal(layer.usage_counts, torch.bincount(idx_ref.flatten(), minlength=49))

    grad_out = torch.randn_like(y)
    (y * grad_out).sum().backward()
    (y_ref * grad_out).sum().backward()
    torch.testing.assert_close(x_TD.grad, x_ref.grad, rtol=1e-9, atol=1e-12)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-9, atol=1e-12, msg=name)


def test_pkm_leading_dims_and_shape_errors():
    layer = PKM(8, pkm_config(num_values=16, top_k=2, d_key=4), init_std=0.1)
    assert layer(torch.randn(2, 5, 8)).shape == (2, 5, 8)
    with pytest.raises(ValueError, match="last dim 8"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="perfect square"):
        PKM(8, pkm_config(num_values=15), init_std=0.1)
    with pytest.raises(ValueError, match="top_k"):
        PKM(8, pkm_config(num_values=16, top_k=5), init_std=0.1)


def _model_config(**pkm) -> ModelConfig:
    return ModelConfig(
        vocab_size=61, d_model=32, num_layers=3, num_attention_heads=4, max_seq_len=16, d_ff=48, ffn="pkm",
        sparse_layers=[], tie_embeddings=True, rope_theta=10000.0, norm_eps=1e-6, init_std=0.02,
        peer=PeerConfig(num_experts=64, num_heads=2, top_k=4, d_key=8, query_batchnorm=True, activation="relu",
                        impl="reference"),
        moe=MoEConfig(num_experts=4, top_k=2, d_ff=24, capacity_factor=1.0, eval_capacity_factor=1.0,
                      min_capacity=4, aux_loss_coef=0.01, second_expert_sampling=False,
                      random_token_selection=False),
        pkm=pkm_config(**pkm),
    )


@pytest.mark.parametrize("query_batchnorm", [False, True])
def test_pkm_counts_by_hand_and_against_the_built_model(query_batchnorm):
    # d=32, h=3, d_key=6, N=49 (S=7), k=4, seq_len 16: only the middle block's FFN differs from dense.
    cfg = _model_config(query_batchnorm=query_batchnorm)
    counts = count_model(cfg, 16)
    model = build_model(cfg)
    assert counts.total_params == sum(p.numel() for p in model.parameters())
    retrieval = counts.breakdown["pkm_retrieval"]
    values = counts.breakdown["pkm_values"]
    # query 32*18 = 576, keys 3 heads x 2 halves x 7 x 3 = 126, BatchNorm 2*18 = 36
    assert retrieval.params == 576 + 126 + (36 if query_batchnorm else 0)
    # query 2*32*18 = 1152; scores 2 * 3 heads * 2 halves * 7 * 3 = 252; candidate sums 3 * 16 = 48
    assert retrieval.flops_fwd == 1152 + 252 + 48
    assert values.params == 49 * 32 and values.active_params == 12 * 32
    assert values.flops_fwd == 3 * 4 * 2 * 32
    dense = count_model(ModelConfig(**{**vars(cfg), "ffn": "dense"}), 16)
    mlp = 2 * 2 * 32 * 48
    assert counts.flops_per_token_fwd == dense.flops_per_token_fwd - mlp + retrieval.flops_fwd + values.flops_fwd
    assert counts.flops_per_token_train == 3 * counts.flops_per_token_fwd


def test_lm_with_pkm_trains_and_reports_usage():
    torch.manual_seed(0)
    model = build_model(_model_config(impl="fused", query_batchnorm=True))
    (layer,) = model.usage_layers()  # PEER and PKM share the usage path the trainer reads
    assert not list(model.peer_layers())
    assert isinstance(layer, PKM) and layer.num_experts == 49
    tokens = torch.randint(0, 61, (2, 16))
    out = model(tokens, tokens)
    out.loss.backward()
    assert model.blocks[1].ffn.values.weight.grad.abs().sum() > 0
