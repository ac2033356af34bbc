"""The isoFLOP planner's arithmetic and refusals (orchestrator/isoflop.py), on composed configs.

Every point must spend the budget within rounding to whole optimizer steps:
|steps x tokens_per_step x FLOPs_per_token - budget| <= tokens_per_step x FLOPs_per_token / 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from model.flops import count_model
from orchestrator.config import load_config, validate
from orchestrator.errors import ConfigError
from orchestrator.isoflop import apply_overrides, plan, point_config

CONF = Path(__file__).resolve().parents[2] / "conf"


def _raw(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("budget", [3e11, 1e13, 7.77e13, 2e15])
@pytest.mark.parametrize("methods, extra", [
    ("[dense,moe,pkm,peer]", []),
    ("[peer]", ["trainer.micro_batch_size=7", "trainer.grad_accum_steps=3", "data.seq_len=96"]),
    ("[pkm,dense]", ["parallel.dp=2", "cluster.nproc_per_node=2", "trainer.eval_batches=32"]),
])
def test_every_point_spends_the_budget_within_one_step(budget, methods, extra):
    raw = _raw(["experiment=isoflop", f"isoflop.budget={budget}", f"isoflop.methods={methods}",
                "isoflop.min_steps=1", *extra])
    points = plan(raw)
    num_methods = len(methods.strip("[]").split(","))
    assert len(points) == num_methods * len(raw["isoflop"]["ladder"])
    for p in points:
        cfg = load_config(apply_overrides(raw, p.overrides))
        validate(cfg)
        t = cfg.trainer
        tokens_per_step = t.micro_batch_size * t.grad_accum_steps * cfg.parallel.dp * cfg.data.seq_len
        flops_per_token = count_model(cfg.model, cfg.data.seq_len).flops_per_token_train
        assert (p.tokens_per_step, p.flops_per_token) == (tokens_per_step, flops_per_token)
        assert cfg.model.ffn == p.method and cfg.trainer.max_steps == p.steps
        assert p.tokens == p.steps * tokens_per_step
        assert p.flops_spent == p.tokens * flops_per_token
        assert abs(p.flops_spent - budget) <= tokens_per_step * flops_per_token / 2
        # Schedules scale with each point: warmup a share of its steps, cosine to its last step.
        assert cfg.optim.decay_steps is None
        assert cfg.optim.warmup_steps == round(raw["isoflop"]["warmup_fraction"] * p.steps)


def test_plan_is_method_major_and_rungs_grow():
    raw = _raw(["experiment=isoflop", "isoflop.budget=1e13"])
    points = plan(raw)
    ladder = raw["isoflop"]["ladder"]
    assert [p.method for p in points] == [m for m in raw["isoflop"]["methods"] for _ in ladder]
    for method in raw["isoflop"]["methods"]:
        mine = [p for p in points if p.method == method]
        assert [p.rung for p in mine] == list(range(len(ladder)))
        # A larger model costs more per token, so it gets fewer steps at the same budget.
        assert all(a.flops_per_token < b.flops_per_token and a.steps > b.steps for a, b in zip(mine, mine[1:]))


def test_a_point_applies_its_own_overrides():
    raw = _raw(["experiment=isoflop", "isoflop.budget=1e13", "isoflop.point=5"])
    point_raw, point = point_config(raw)
    assert point.index == 5 and point_raw["trainer"]["max_steps"] == point.steps
    assert point_raw["model"]["ffn"] == point.method
    assert point_config(_raw(["experiment=isoflop"]))[1] is None


@pytest.mark.parametrize("overrides, key, words", [
    (["isoflop.budget=1e9"], "isoflop.budget", "fewer than isoflop.min_steps"),
    (["isoflop.budget=-1"], "isoflop.budget", "positive"),
    (["isoflop.methods=[dense,mlp]"], "isoflop.methods", "not a method"),
    (["isoflop.methods=[]"], "isoflop.methods", "empty"),
    (["isoflop.methods=[peer,peer]"], "isoflop.methods", "twice"),
    (["isoflop.ladder=[{d_modle: 64}]"], "isoflop.ladder[0]", "not a model key"),
    (["isoflop.ladder=[{d_model: 100, num_attention_heads: 3}]"], "model.num_attention_heads", "isoflop.ladder[0]"),
    (["isoflop.point=99"], "isoflop.point", "the plan has 12 points"),
])
def test_bad_plans_are_refused_with_the_key(overrides, key, words):
    raw = _raw(["experiment=isoflop", *overrides])
    with pytest.raises(ConfigError) as info:
        validate(load_config(raw))
        point_config(raw) if raw["isoflop"]["point"] is not None else plan(raw)
    assert str(info.value).startswith(f"{key}=") and words in str(info.value) and "; fix: " in str(info.value)
