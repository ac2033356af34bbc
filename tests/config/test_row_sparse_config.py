"""optim.expert_tables: what composes, and the bf16 refusal (its other refusals, one line and exit 2
through launch.py's pre-check, are rows of tests/config/test_compose.py's BAD_OVERRIDES)."""

from __future__ import annotations

import pytest

import launch
from orchestrator.config import validate
from orchestrator.errors import ConfigError
from tests.config.test_compose import _compose

ROW_SPARSE = ["model=peer", "optim.expert_tables=row_sparse"]

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
