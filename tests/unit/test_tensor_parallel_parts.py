"""Single-process parts of tensor parallelism: the mesh placement, the resume refusal of another
tp, and the marks DeepSpeed's norm code reads."""

from __future__ import annotations

import torch

from orchestrator.checkpoint import config_differences
from orchestrator.parallel.dims import ParallelDims
from orchestrator.parallel.tensor_parallel import is_tensor_parallel, mark_tensor_parallel


def test_tp_ranks_are_consecutive_and_data_ranks_shared():
    dims = ParallelDims(dp=2, ep=2, tp=2)
    assert [dims.coords(r) for r in range(4)] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    assert all(dims.rank_of(*dims.coords(r)) == r for r in range(4))
    layout = dims.layout()
    assert "rank = (pp_rank * dp + dp_rank) * tp + tp_rank" in layout and "rank 3: pp 0  dp 1  tp 1" in layout


def test_changing_tp_is_refused_on_resume():
    saved = {"parallel": {"dp": 2, "ep": 1, "tp": 2, "pp": 1}, "trainer": {"max_steps": 10}}
    current = {"parallel": {"dp": 4, "ep": 1, "tp": 1, "pp": 1}, "trainer": {"max_steps": 20}}
    assert config_differences(saved, current) == ["parallel.dp (2 -> 4)", "parallel.tp (2 -> 1)"]


def test_sharded_params_carry_deepspeeds_model_parallel_mark():
    from deepspeed.runtime.utils import is_model_parallel_parameter

    p, q = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2, 2))
    mark_tensor_parallel(p, partition_dim=0)
    assert is_tensor_parallel(p) and is_model_parallel_parameter(p)
    assert not is_tensor_parallel(q) and not is_model_parallel_parameter(q)
