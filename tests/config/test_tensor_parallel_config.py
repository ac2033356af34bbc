"""Every layout that tensor parallelism cannot run is refused before anything starts: one line,
exit 2, naming the key, the value and the fix (orchestrator/config.py _validate_tensor_parallel)."""

from __future__ import annotations

import pytest

import launch
from tests.config.test_compose import _compose

TP2 = ["cluster.nproc_per_node=2", "parallel.tp=2"]

# (overrides, key named in the message, words of the problem, a word of the fix)
TP_REFUSALS = [
    (TP2 + ["model.num_attention_heads=1"], "parallel.tp=2", "model.num_attention_heads=1", "divisors of the head count: 1"),
    (["cluster.nproc_per_node=3", "parallel.tp=3"], "parallel.tp=3", "num_attention_heads=4", "1, 2, 4"),
    (TP2 + ["model.d_ff=511"], "parallel.tp=2", "model.d_ff=511", "divisors of d_ff: 1, 7, 73, 511"),
    (TP2 + ["model.d_model=132", "model.num_attention_heads=2", "model=peer", "model.d_ff=512",
            "cluster.nproc_per_node=8", "parallel.dp=4", "parallel.ep=4"],
     "parallel.tp=2", "times parallel.ep=4 (8 ranks) does not divide model.d_model=132", "product divides d_model"),
    (TP2 + ["model=moe", "model.moe.d_ff=255"], "parallel.tp=2", "model.moe.d_ff=255", "dividing model.moe.d_ff"),
    (TP2 + ["model=moe", "model.moe.second_expert_sampling=true"], "model.moe.second_expert_sampling=True",
     "route identically", "second_expert_sampling=false"),
    (TP2 + ["model=moe", "model.moe.top_k=1", "model.moe.random_token_selection=true"],
     "model.moe.random_token_selection=True", "route identically", "random_token_selection=false"),
    (TP2 + ["model=moe", "model.moe.capacity_factor=1.28", "trainer.micro_batch_size=1"],
     "model.moe.capacity_factor=1.28", "gives 41 slots per expert", "multiple of 2"),
    # Under pp the capacity is that of one pipeline micro-batch (micro_batch_size / pp_microbatches).
    (TP2 + ["model=moe", "model.moe.capacity_factor=1.28", "trainer.micro_batch_size=2",
            "cluster.nproc_per_node=4", "parallel.pp=2", "parallel.pp_microbatches=2"],
     "model.moe.capacity_factor=1.28", "gives 41 slots per expert", "multiple of 2"),
    (TP2 + ["model=moe", "model.moe.eval_capacity_factor=1.28", "trainer.micro_batch_size=1"],
     "model.moe.eval_capacity_factor=1.28", "not divisible by parallel.tp=2", "multiple of 2"),
    (TP2 + ["parallel.dp=2"], "parallel.dp=2", "dp=2 x tp=2 x pp=1 = 4", "parallel.dp=1"),
]


@pytest.mark.parametrize("overrides,key,problem,fix", TP_REFUSALS, ids=[" ".join(o[2:]) for o, *_ in TP_REFUSALS])
def test_tensor_parallel_refusal_is_one_line_exit_2(overrides, key, problem, fix, capsys):
    with pytest.raises(SystemExit) as exited:
        launch.check(overrides)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {key}: ") and problem in err and "fix:" in err and fix in err, err


@pytest.mark.parametrize("overrides", [
    TP2,                                                                   # the default PEER model
    TP2 + ["model=moe"],                                                   # capacity 640 slots
    TP2 + ["model=dense"],
    TP2 + ["model=pkm"],                                                   # PKM stays replicated
    ["cluster.nproc_per_node=8", "parallel.dp=4", "parallel.ep=2", "parallel.tp=2"],  # d/(tp*ep) = 32 columns
])
def test_tensor_parallel_layouts_that_work_validate(overrides):
    cfg = _compose(overrides)
    assert cfg.parallel.tp == 2
