"""trainer.activation_checkpointing: same losses and gradients as without it (bitwise: the
recompute runs the same deterministic CPU kernels on the same inputs), PEER's query BatchNorm
statistics updated once per forward, and fewer bytes kept for the backward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import ModelConfig, PeerConfig, PKMConfig, MoEConfig
from model.lm import build_model
from tests.helpers import saved_activation_bytes


def tiny(ffn: str) -> ModelConfig:
    return ModelConfig(vocab_size=257, d_model=64, num_layers=3, num_attention_heads=2, max_seq_len=64, d_ff=128,
                       ffn=ffn, sparse_layers=[], tie_embeddings=True, rope_theta=10000.0, norm_eps=1e-5,
                       init_std=0.02,
                       peer=PeerConfig(num_experts=1024, num_heads=2, top_k=4, d_key=32, query_batchnorm=True,
                                       activation="relu", impl="auto"),
                       moe=MoEConfig(num_experts=4, top_k=2, d_ff=128, capacity_factor=1.25, eval_capacity_factor=2.0,
                                     min_capacity=4, aux_loss_coef=0.01, second_expert_sampling=False,
                                     random_token_selection=False),
                       pkm=PKMConfig(num_values=1024, num_heads=2, top_k=4, d_key=32, query_batchnorm=True, impl="auto"))


def _two_steps(cfg: ModelConfig, mode: str):
    torch.manual_seed(0)
    model = build_model(cfg)
    model.set_activation_checkpointing(mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    losses, grads = [], None
    for _ in range(2):
        tokens = torch.randint(0, 257, (4, 32), generator=gen)
        out = model(tokens, tokens)
        out.loss.backward()
        losses.append(out.loss.detach().clone())
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
    stats = {n: b.clone() for n, b in model.named_buffers() if "running" in n or "num_batches" in n}
    return losses, grads, stats


@pytest.mark.parametrize("ffn", ["peer", "pkm", "dense"])
@pytest.mark.parametrize("mode", ["blocks", "sparse"])
def test_same_losses_gradients_and_batchnorm_stats(ffn, mode):
    ref_losses, ref_grads, ref_stats = _two_steps(tiny(ffn), "none")
    losses, grads, stats = _two_steps(tiny(ffn), mode)
    # Bitwise: the recompute is the same sequence of deterministic CPU ops on the same inputs.
    assert all(torch.equal(a, b) for a, b in zip(ref_losses, losses))
    assert all(torch.equal(a, b) for a, b in zip(ref_grads, grads))
    assert stats.keys() == ref_stats.keys()
    for name in stats:  # running stats and batch counts as after one update per forward
        assert torch.equal(stats[name], ref_stats[name]), name
    if ffn in ("peer", "pkm"):
        assert int(stats["blocks.1.ffn.query_norm.num_batches_tracked"]) == 2


def test_recompute_would_update_batchnorm_twice_without_the_freeze():
    """The freeze is needed: a plain torch.utils.checkpoint of the PEER block counts 2 batches."""
    torch.manual_seed(0)
    model = build_model(tiny("peer"))
    block = model.blocks[1]
    x = torch.randn(2, 16, 64, requires_grad=True)
    torch.utils.checkpoint.checkpoint(block._forward, x, use_reentrant=False)[0].sum().backward()
    assert int(block.ffn.query_norm.num_batches_tracked) == 2
    block.ffn.query_norm.reset_running_stats()
    block.recompute = "block"
    block(x)[0].sum().backward()
    assert int(block.ffn.query_norm.num_batches_tracked) == 1


def test_checkpointing_keeps_fewer_bytes_for_the_backward():
    tokens = torch.randint(0, 257, (4, 64))
    kept = {}
    for mode in ("none", "sparse", "blocks"):
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(tiny("peer"), sparse_layers=[0, 1, 2]))
        model.set_activation_checkpointing(mode)
        kept[mode] = saved_activation_bytes(model, tokens, tokens)[0]
    assert kept["blocks"] < kept["sparse"] < kept["none"]
