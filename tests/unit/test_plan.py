"""orchestrator/plan.py against hand-derived counts and against the real model.

Hand-derived: the tiny model below (d=64, L=2, V=257, d_ff=128, tied embeddings) has per block
2d = 128 norm weights, 4 d^2 = 16384 attention weights and 2 d d_ff = 16384 MLP weights; the
embedding is V d = 16448 and the final norm d = 64.
"""

from __future__ import annotations

import pytest
import torch

from launch import compose_train_config
from orchestrator.errors import ConfigError
from orchestrator.parallel.expert_parallel import bytes_per_token
from orchestrator import plan as planner
from tests.helpers import saved_activation_bytes

TINY = ["model.d_model=64", "model.num_layers=2", "model.num_attention_heads=2", "model.d_ff=128",
        "model.max_seq_len=64", "data.seq_len=64", "model.peer.num_experts=1024", "model.peer.num_heads=2",
        "model.peer.top_k=4", "model.peer.d_key=32", "trainer.micro_batch_size=4", "plan.device=cpu"]
EMBED, NORMS, ATTN, MLP = 257 * 64, 128, 4 * 64 * 64, 2 * 64 * 128


def cfg(*overrides):
    return compose_train_config(TINY + list(overrides), check_fit=False)


def test_dense_parameters_gradients_and_adam_state():
    c = cfg("model=dense")
    p = planner.plan(c)
    assert p.params.replicated == EMBED + 2 * NORMS + 64
    assert p.params.tp_shard == 2 * (ATTN + MLP)
    total = EMBED + 2 * (NORMS + ATTN + MLP) + 64
    assert p.params.total == total == sum(t.numel() for t in _built(c).parameters())
    assert p.memory["parameters"] == 4 * total and p.memory["gradients"] == 4 * total
    assert p.memory["optimizer state"] == 8 * total  # AdamW's two fp32 moments, no ZeRO


def _built(c):
    from model.lm import build_model

    return build_model(c.model)


def test_tensor_parallel_shards_attention_and_mlp_only():
    p = planner.plan(cfg("model=dense", "cluster.nproc_per_node=2", "parallel.tp=2"))
    assert p.params.tp_shard == (ATTN + MLP)  # half of two blocks
    assert p.params.replicated == EMBED + 2 * NORMS + 64


def test_expert_tables_are_sharded_over_ep_and_their_state_over_the_expert_data_parallel_group():
    # dp=4, ep=2, ZeRO-1: U and V (2 N d) split over ep=2; their Adam state over dp/ep = 2 more.
    c = cfg("model=peer", "cluster.nproc_per_node=4", "parallel.dp=4", "parallel.ep=2", "parallel.zero_stage=1")
    p = planner.plan(c)
    tables = 2 * 1024 * 64
    assert p.params.expert_shard == tables // 2
    router = 64 * 64 + 2 * 32 * 16 + 2 * 64  # query net d*h*dk, two sub-key halves, BatchNorm affine
    assert p.params.replicated == EMBED + 2 * NORMS + 64 + router
    dense = p.params.replicated + p.params.tp_shard
    # ZeRO-1: AdamW moments + fp32 master + fp32 gradient partition = 16 bytes per partitioned number.
    assert p.memory["optimizer state"] == pytest.approx(16 * (dense / 4 + (tables // 2) / 2))


def test_pipeline_stages_hold_their_blocks_and_the_tied_embedding_twice():
    c = cfg("model=dense", "cluster.nproc_per_node=2", "parallel.pp=2")
    first, last = planner.stage_params(c, 0), planner.stage_params(c, 1)
    assert first.total == EMBED + NORMS + ATTN + MLP
    assert last.total == NORMS + ATTN + MLP + 64 + EMBED  # final norm + the tied copy of the embedding


@pytest.mark.parametrize("ffn", ["dense", "peer", "pkm"])
def test_activation_bytes_equal_what_autograd_keeps(ffn):
    """The per-token formula against the bytes saved_tensors_hooks sees in the real model."""
    c = cfg(f"model={ffn}")
    p = planner.plan(c)
    torch.manual_seed(0)
    model = _built(c)
    tokens = torch.randint(0, 257, (4, 64))
    saved, out = saved_activation_bytes(model, tokens, tokens)
    measured = saved + out.logits.numel() * 4  # the logits the caller holds too
    # Within 1%: BatchNorm's per-feature mean and inverse std (per batch, not per token) and the
    # loss scalar are left out of the per-token formula.
    assert p.memory["activations"] == pytest.approx(measured, rel=0.01)


def test_checkpointing_lowers_predicted_activations():
    none = planner.plan(cfg("model=peer")).memory["activations"]
    sparse = planner.plan(cfg("model=peer", "trainer.activation_checkpointing=sparse")).memory["activations"]
    blocks = planner.plan(cfg("model=peer", "trainer.activation_checkpointing=blocks")).memory["activations"]
    assert blocks < sparse < none


def test_communication_bytes_from_the_counted_formulas():
    c = cfg("model=peer", "cluster.nproc_per_node=2", "parallel.dp=2", "parallel.ep=2", "trainer.grad_accum_steps=3")
    p = planner.plan(c)
    tokens = 4 * 64 * 3  # micro-batch x seq x accumulation steps, per rank and step
    assert p.comm["ep"] == bytes_per_token("dims", 64, 2 * 4, 2) * tokens  # one PEER layer
    dense = p.params.replicated + p.params.tp_shard
    assert p.comm["dp"] == 2 * (2 - 1) / 2 * 4 * dense  # ring all-reduce; experts' edp group is 1: none
    assert p.comm["tp"] == 0 and p.comm["pp"] == 0


def test_pipeline_sends_activations_forward_and_gradients_back():
    c = cfg("model=dense", "cluster.nproc_per_node=2", "parallel.pp=2", "parallel.pp_microbatches=2")
    p = planner.plan(c)
    assert p.comm["pp"] == (4 // 2) * 64 * 64 * 4 * 2  # 2 micro-batches of [2, 64, 64] fp32 each way


def test_flops_and_roofline():
    c = cfg("model=dense")
    p = planner.plan(c)
    from model.flops import count_model

    assert p.flops_per_step == count_model(c.model, 64).flops_per_token_train * 4 * 64
    dev = p.device
    assert p.times["compute"] == pytest.approx(p.flops_per_step / dev.peak_flops["fp32"])
    assert p.times["step"] == pytest.approx(max(p.times["compute"], p.times["memory"]) + p.times["comm"])


def test_refusal_names_predicted_and_available_bytes_and_the_fix():
    c = compose_train_config(TINY + ["model=peer", "model.peer.num_experts=1048576", "cluster.mem_gb=2",
                                     "plan.check=false"])
    c.plan.check = True
    with pytest.raises(ConfigError) as excinfo:
        planner.check_fits(c)
    msg = str(excinfo.value)
    assert msg.startswith("plan.check=True: predicted peak ") and "GB available" in msg
    assert "fix: set trainer.activation_checkpointing=blocks" not in msg  # checkpointing cannot save 2 GB of tables
    assert "plan.check=false" in msg and "\n" not in msg


def test_the_fix_offered_makes_the_plan_fit():
    # 640^2 experts at d=64 on 2 ranks sharing 3 GB: U and V with AdamW state (16 B per number)
    # do not fit replicated; the first fix tried that fits is ZeRO-1 (ep=2 would fit too).
    base = TINY + ["model=peer", "model.peer.num_experts=409600", "cluster.nproc_per_node=2", "parallel.dp=2",
                   "cluster.mem_gb=3"]
    c = compose_train_config(base, check_fit=False)
    dev = planner.device_for(c)
    assert not planner.plan(c, dev).fits
    fix = planner.cheapest_fix(c, dev)
    assert fix == "set parallel.zero_stage=1"
    assert planner.plan(compose_train_config(base + ["parallel.zero_stage=1"], check_fit=False), dev).fits
    assert planner.plan(compose_train_config(base + ["parallel.ep=2"], check_fit=False), dev).fits
