"""optim.expert_tables: what composes, and every refusal as one line naming the key, the value and
the fix, exit code 2, through launch.py's pre-check (nothing starts)."""

from __future__ import annotations

import pytest

import launch
from orchestrator.config import validate
from orchestrator.errors import ConfigError
from tests.config.test_compose import _compose

ROW_SPARSE = ["model=peer", "optim.expert_tables=row_sparse"]

# (overrides, a word of the problem, the fix)
REFUSALS = [
    (ROW_SPARSE + ["cluster.nproc_per_node=2", "parallel.dp=2", "parallel.zero_stage=1"], "zero_stage=1",
     "set parallel.zero_stage=0 or optim.expert_tables=adamw"),
    (ROW_SPARSE + ["cluster.nproc_per_node=2", "parallel.pp=2"], "parallel.pp=2",
     "set parallel.pp=1 or optim.expert_tables=adamw"),
    (["optim.expert_tables=sparse"], "unknown choice", "use one of: adamw, row_sparse"),
]


@pytest.mark.parametrize("overrides,problem,fix", REFUSALS, ids=[" ".join(o) for o, _, _ in REFUSALS])
def test_row_sparse_refusal_is_one_line_exit_2(overrides, problem, fix, capsys):
    with pytest.raises(SystemExit) as exited:
        launch.check(overrides)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    value = overrides[-1].split("=", 1)[1] if "sparse" in overrides[-1] else "row_sparse"
    assert err.startswith(f"error: optim.expert_tables='{value}': "), err
    assert problem in err and f"fix: {fix}" in err, err


def test_bf16_is_refused_where_a_gpu_would_pick_it():
    # trainer.precision=auto means bf16 on a GPU; this machine may have none, so the validation
    # function is asked as if one were visible (launch.py passes the real count).
    cfg = _compose(ROW_SPARSE + ["plan.check=false"])
    with pytest.raises(ConfigError) as refused:
        validate(cfg, cuda_device_count=1)
    assert refused.value.key == "optim.expert_tables" and "bf16" in refused.value.problem
    assert refused.value.fix == "set trainer.precision=fp32 or optim.expert_tables=adamw"
    validate(_compose(ROW_SPARSE + ["plan.check=false", "trainer.precision=fp32"]), cuda_device_count=1)


@pytest.mark.parametrize("overrides", [
    ROW_SPARSE,
    ROW_SPARSE + ["cluster.nproc_per_node=2", "parallel.dp=2", "parallel.ep=2"],
    ROW_SPARSE + ["cluster.nproc_per_node=2", "parallel.tp=2"],
    ["optim.expert_tables=row_sparse"],  # a model without PEER layers: AdamW for everything
])
def test_row_sparse_layouts_validate(overrides):
    launch.check(overrides)  # no SystemExit
    assert _compose(overrides).optim.expert_tables == "row_sparse"


def test_default_is_adamw():
    assert _compose([]).optim.expert_tables == "adamw"
