"""The decoder-only LM: shapes, causality, tying, init, learning, and the dense/PEER/MoE variants.

MoE layers use DeepSpeed; the `gloo_world` fixture gives them a one-process gloo world (or
reuses a world another test left initialised) and tears down only what it created.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from model.config import ModelConfig, MoEConfig, PeerConfig
from model.lm import Block, TransformerLM, apply_rotary, build_model, rotary_tables
from model.mlp import DenseMLP
from model.moe import MoEFeedForward, init_moe_process_groups
from model.peer import PEER


def tiny_config(ffn: str = "dense", **overrides) -> ModelConfig:
    base = dict(
        vocab_size=61,
        d_model=32,
        num_layers=3,
        num_attention_heads=4,
        max_seq_len=16,
        d_ff=48,
        ffn=ffn,
        sparse_layers=[],
        tie_embeddings=True,
        rope_theta=10000.0,
        norm_eps=1e-6,
        init_std=0.02,
        peer=PeerConfig(
            num_experts=64, num_heads=2, top_k=4, d_key=8, query_batchnorm=True, activation="gelu", impl="reference"
        ),
        moe=MoEConfig(
            num_experts=4, top_k=2, d_ff=24, capacity_factor=2.0, eval_capacity_factor=4.0, min_capacity=4,
            aux_loss_coef=0.01, second_expert_sampling=False, random_token_selection=False,
        ),
    )
    base.update(overrides)
    return ModelConfig(**base)


def random_batch(cfg: ModelConfig, batch: int = 2, seq_len: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens_BT = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen)
    targets_BT = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen)
    return tokens_BT, targets_BT


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def gloo_world(monkeypatch):
    """A one-process gloo world with DeepSpeed's comm backend on top of it."""
    monkeypatch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
    import deepspeed
    import deepspeed.comm as ds_dist
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        for key, value in dict(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
        ).items():
            monkeypatch.setenv(key, value)
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    else:
        # Someone else's world: hook DeepSpeed's comm onto it, and leave it alive afterwards.
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False, verbose=False)
    try:
        yield
    finally:
        if created:
            # DeepSpeed's destroy also drops its cached expert groups, so a later world starts clean.
            ds_dist.destroy_process_group()


def test_shapes_and_output_fields():
    cfg = tiny_config()
    model = build_model(cfg)
    tokens_BT, targets_BT = random_batch(cfg)

    out = model(tokens_BT)
    assert out.logits.shape == (2, 12, cfg.vocab_size)
    assert out.loss is None and out.lm_loss is None
    assert out.aux_loss.shape == () and out.aux_loss.item() == 0.0

    out = model(tokens_BT, targets_BT)
    assert out.loss.shape == out.lm_loss.shape == ()
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), targets_BT.reshape(-1))
    torch.testing.assert_close(out.lm_loss, expected)


def test_ignored_targets_do_not_count():
    cfg = tiny_config()
    model = build_model(cfg)
    tokens_BT, targets_BT = random_batch(cfg)
    masked_BT = targets_BT.clone()
    masked_BT[:, 6:] = -100
    out = model(tokens_BT, masked_BT)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :6].reshape(-1, cfg.vocab_size), targets_BT[:, :6].reshape(-1)
    )
    torch.testing.assert_close(out.lm_loss, expected)


def test_sequence_longer_than_rotary_tables_is_rejected():
    cfg = tiny_config(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        build_model(cfg)(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("ffn", ["dense", "peer"])
def test_causality(ffn):
    """Changing token t leaves logits before t unchanged (PEER in eval mode: its query BatchNorm
    in training mode normalises with statistics of the whole batch, future tokens included)."""
    torch.manual_seed(0)
    cfg = tiny_config(ffn)
    model = build_model(cfg).eval()
    tokens_BT, _ = random_batch(cfg)
    changed_BT = tokens_BT.clone()
    position = 7
    changed_BT[:, position] = (changed_BT[:, position] + 1) % cfg.vocab_size

    with torch.no_grad():
        logits_BTV = model(tokens_BT).logits
        changed_logits_BTV = model(changed_BT).logits

    torch.testing.assert_close(changed_logits_BTV[:, :position], logits_BTV[:, :position], rtol=0, atol=1e-6)
    assert not torch.allclose(changed_logits_BTV[:, position], logits_BTV[:, position])


def test_rotary_scores_depend_only_on_relative_position():
    cos_LC2, sin_LC2 = rotary_tables(head_dim=8, max_seq_len=32, theta=10000.0)
    gen = torch.Generator().manual_seed(0)
    q_C, k_C = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    rotated_q_1HLC = apply_rotary(q_C.expand(1, 1, 32, 8), cos_LC2, sin_LC2)
    rotated_k_1HLC = apply_rotary(k_C.expand(1, 1, 32, 8), cos_LC2, sin_LC2)
    score = lambda m, n: (rotated_q_1HLC[0, 0, m] @ rotated_k_1HLC[0, 0, n]).item()  # noqa: E731
    assert math.isclose(score(5, 2), score(20, 17), rel_tol=1e-4, abs_tol=1e-5)
    assert math.isclose(score(0, 0), (q_C @ k_C).item(), rel_tol=1e-5)


def test_tied_and_untied_output_projection():
    cfg_tied = tiny_config(tie_embeddings=True)
    cfg_untied = tiny_config(tie_embeddings=False)
    tied, untied = build_model(cfg_tied), build_model(cfg_untied)

    assert tied.lm_head is None and tied.output_weight() is tied.embed.weight
    assert untied.lm_head is not None and untied.output_weight() is not untied.embed.weight
    num_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert num_params(untied) - num_params(tied) == cfg_tied.vocab_size * cfg_tied.d_model

    # The tied embedding gets gradient from both the input lookup and the logits.
    tokens_BT, targets_BT = random_batch(cfg_tied)
    tied(tokens_BT, targets_BT).loss.backward()
    unused_rows = torch.ones(cfg_tied.vocab_size, dtype=torch.bool)
    unused_rows[tokens_BT.flatten()] = False
    assert tied.embed.weight.grad[unused_rows].abs().sum() > 0, "logits must reach the embedding"


def test_init_std_and_residual_scaling():
    torch.manual_seed(0)
    cfg = tiny_config(d_model=128, d_ff=256, num_attention_heads=4, num_layers=8, init_std=0.05)
    model = build_model(cfg)
    scaled = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    block = model.blocks[0]
    assert math.isclose(model.embed.weight.std().item(), cfg.init_std, rel_tol=0.05)
    assert math.isclose(block.attn.qkv.weight.std().item(), cfg.init_std, rel_tol=0.05)
    assert math.isclose(block.ffn.up.weight.std().item(), cfg.init_std, rel_tol=0.05)
    assert math.isclose(block.attn.out.weight.std().item(), scaled, rel_tol=0.05)
    assert math.isclose(block.ffn.down.weight.std().item(), scaled, rel_tol=0.05)


def test_loss_at_init_is_near_uniform():
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=257, d_model=64)
    model = build_model(cfg)
    tokens_BT, targets_BT = random_batch(cfg, batch=4, seq_len=16)
    loss = model(tokens_BT, targets_BT).loss.item()
    assert abs(loss - math.log(cfg.vocab_size)) < 0.1


@pytest.mark.parametrize("ffn", ["dense", "peer"])
def test_a_few_steps_fit_a_repeated_batch(ffn):
    torch.manual_seed(0)
    cfg = tiny_config(ffn)
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens_BT, targets_BT = random_batch(cfg, batch=4, seq_len=16)
    losses = []
    for _ in range(20):
        loss = model(tokens_BT, targets_BT).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_sparse_layer_placement():
    assert [type(b.ffn) for b in build_model(tiny_config("peer")).blocks] == [DenseMLP, PEER, DenseMLP]
    model = build_model(tiny_config("peer", num_layers=4, sparse_layers=[0, 3]))
    assert [type(b.ffn) for b in model.blocks] == [PEER, DenseMLP, DenseMLP, PEER]
    assert len(list(model.peer_layers())) == 2 and not list(model.moe_layers())
    dense = build_model(tiny_config("dense", sparse_layers=[1]))
    assert all(isinstance(b.ffn, DenseMLP) for b in dense.blocks)
    with pytest.raises(ValueError, match="sparse_layers"):
        build_model(tiny_config("peer", sparse_layers=[3]))
    with pytest.raises(ValueError, match="divide"):
        build_model(tiny_config(num_attention_heads=5))


def test_peer_variant_trains_every_parameter_and_tracks_usage():
    torch.manual_seed(0)
    model = build_model(tiny_config("peer"))
    (peer,) = model.peer_layers()
    peer.track_usage = True
    tokens_BT, targets_BT = random_batch(model.cfg)
    model(tokens_BT, targets_BT).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert peer.usage_counts.sum() == tokens_BT.numel() * peer.num_heads * peer.top_k


def test_moe_variant(gloo_world):
    torch.manual_seed(0)
    cfg = tiny_config("moe", sparse_layers=[0, 2])
    model = build_model(cfg)
    assert [type(b.ffn) for b in model.blocks] == [MoEFeedForward, DenseMLP, MoEFeedForward]
    assert init_moe_process_groups(model) == 2
    assert init_moe_process_groups(model) == 0, "already set: a second call changes nothing"

    tokens_BT, targets_BT = random_batch(cfg, batch=4, seq_len=16)
    out = model(tokens_BT, targets_BT)
    assert out.logits.shape == (4, 16, cfg.vocab_size)
    layer_aux = [layer.moe.deepspeed_moe.l_aux for layer in model.moe_layers()]
    torch.testing.assert_close(out.aux_loss, cfg.moe.aux_loss_coef * torch.stack(layer_aux).sum())
    # DeepSpeed's balancing loss is E * sum(mean gate * token fraction): 1 when perfectly
    # balanced, E when collapsed; near-uniform gates at init keep it close to 1.
    assert all(0.5 < aux.item() < 2.0 for aux in layer_aux), layer_aux
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)

    out.loss.backward()
    for layer in model.moe_layers():
        assert layer.gate_weight().grad.abs().sum() > 0
        assert len(layer.local_experts()) == cfg.moe.num_experts
        assert any(e.down.weight.grad is not None and e.down.weight.grad.abs().sum() > 0 for e in layer.local_experts())


def test_moe_experts_start_different_and_steps_run(gloo_world):
    """Runs after test_moe_variant in the same process: a fresh world must work again."""
    torch.manual_seed(1)
    cfg = tiny_config("moe")
    model = build_model(cfg)
    init_moe_process_groups(model)
    (layer,) = model.moe_layers()
    first, second = layer.local_experts()[:2]
    assert not torch.equal(first.up.weight, second.up.weight), "experts must not be deep copies of one init"
    assert all(p.allreduce is False for e in layer.local_experts() for p in e.parameters()), "DeepSpeed's marks"

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens_BT, targets_BT = random_batch(cfg, batch=4, seq_len=16)
    losses = []
    for _ in range(10):
        loss = model(tokens_BT, targets_BT).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_moe_usage_counts_are_the_gates_routing(gloo_world):
    """With track_usage, an MoE layer counts per expert the tokens its gate routed there (top-k of
    the gate's logits, before capacity drops), like PEER counts retrievals: the trainer's
    expert_usage / expert_kl_uniform read these counts for every sparse layer."""
    torch.manual_seed(2)
    cfg = tiny_config("moe")
    model = build_model(cfg)
    init_moe_process_groups(model)
    (layer,) = model.moe_layers()
    assert list(model.usage_layers()) == [layer]
    tokens_BT, _ = random_batch(cfg, batch=4, seq_len=16)
    model(tokens_BT)
    assert layer.usage_counts.sum() == 0, "counting only while track_usage is set"
    seen = []
    layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().reshape(-1, cfg.d_model)))
    layer.track_usage = True
    model(tokens_BT)
    model(tokens_BT)
    logits = torch.cat(seen) @ layer.gate_weight().detach().t()
    chosen = logits.topk(cfg.moe.top_k, dim=-1).indices.flatten()
    want = torch.bincount(chosen, minlength=cfg.moe.num_experts)
    assert torch.equal(layer.usage_counts, want), (layer.usage_counts, want)
    layer.reset_usage()
    assert layer.usage_counts.sum() == 0


def test_moe_expert_count_must_divide_by_ep_size():
    with pytest.raises(ValueError, match="divisible"):
        build_model(tiny_config("moe"), expert_parallel_size=3)


def test_block_returns_aux_only_for_moe():
    cfg = tiny_config()
    block = Block(cfg, DenseMLP(cfg.d_model, cfg.d_ff, cfg.init_std), output_init_std=0.01)
    x_BTD = torch.randn(2, 5, cfg.d_model)
    y_BTD, aux = block(x_BTD)
    assert y_BTD.shape == x_BTD.shape and aux is None
    assert isinstance(build_model(cfg), TransformerLM)


def test_importing_model_does_not_import_deepspeed():
    """model/ is torch-only until an MoE layer is built (the import rules in README.md, Layout)."""
    code = "import sys, model; assert 'deepspeed' not in sys.modules, 'deepspeed imported'"
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
