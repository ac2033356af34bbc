"""Pipeline-parallel settings: what composes, and every refusal as one line naming the key and the
fix, exit code 2, through launch.py's pre-check (nothing starts)."""

from __future__ import annotations

import pytest

import launch
from orchestrator.parallel.pipeline import block_ranges, layer_parts
from tests.config.test_compose import _compose

PP2 = ["cluster.nproc_per_node=2", "parallel.pp=2"]

# (overrides, key named in the message, a word of the fix)
REFUSALS = [
    (PP2 + ["model.num_layers=1"], "parallel.pp=2", "parallel.pp<=1"),
    (PP2 + ["trainer.micro_batch_size=4", "parallel.pp_microbatches=3"], "parallel.pp_microbatches=3", "1, 2, 4"),
    (PP2 + ["parallel.zero_stage=2"], "parallel.zero_stage=2", "parallel.zero_stage=1"),
    (["parallel.pp_microbatches=2"], "parallel.pp_microbatches=2", "parallel.pp_microbatches=1"),
    (PP2 + ["parallel.pp_microbatches=0"], "parallel.pp_microbatches=0", ">=1"),
    (["cluster.nproc_per_node=4", "parallel.pp=2"], "parallel.dp=1", "parallel.dp=2"),
]


@pytest.mark.parametrize("overrides,key,fix", REFUSALS, ids=[" ".join(o) for o, _, _ in REFUSALS])
def test_pipeline_refusal_is_one_line_exit_2(overrides, key, fix, capsys):
    with pytest.raises(SystemExit) as exited:
        launch.check(overrides)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and key in err and "fix:" in err and fix in err, err


@pytest.mark.parametrize("overrides", [
    ["parallel=pp2", "cluster.nproc_per_node=2"],
    PP2 + ["model.num_layers=3", "parallel.pp_microbatches=4", "trainer.micro_batch_size=8"],
    ["cluster.nproc_per_node=4", "parallel.dp=2", "parallel.pp=2", "parallel.ep=2", "model=moe",
     "parallel.zero_stage=1"],
    # tp composes with pp (tests/distributed/test_pipeline_training.py: tp=2 x pp=2).
    ["cluster.nproc_per_node=4", "parallel.pp=2", "parallel.tp=2", "parallel.pp_microbatches=2"],
    ["cluster.nproc_per_node=8", "parallel.dp=2", "parallel.pp=2", "parallel.tp=2", "parallel.zero_stage=1"],
])
def test_pipeline_layouts_validate(overrides):
    launch.check(overrides)  # no SystemExit
    cfg = _compose(overrides)
    assert cfg.parallel.pp == 2


def test_stages_hold_contiguous_blocks_as_evenly_as_possible():
    assert [list(r) for r in block_ranges(4, 2)] == [[0, 1], [2, 3]]
    assert [list(r) for r in block_ranges(5, 3)] == [[0, 1], [2, 3], [4]]
    assert [list(r) for r in block_ranges(3, 3)] == [[0], [1], [2]]
    # layers: embedding, blocks 1..L, final norm, head; the first stage adds the embedding and the
    # last the final norm and the head.
    assert layer_parts(4, 2) == [0, 3, 7]
    assert layer_parts(5, 3) == [0, 3, 5, 8]
