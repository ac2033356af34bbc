"""The dimension-sharded PEER layer equals the unsharded reference (E = 2 and 4 gloo processes,
float64 and float32, per-rank compute by the reference gathers and by the fused kernels;
tolerances explained in _ep_worker.py), sends exactly the bytes of the design
note's formula, and each rank of a DeepSpeed engine holds 1/E of the expert parameters and of
their optimizer state."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def run_ranks(world: int, scenario: str, arg: str, out_dir) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world)}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.distributed._ep_worker", scenario, arg, str(out_dir)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for rank, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} exit {p.returncode}:\n{text[-4000:]}"
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_sharded_layer_matches_reference(tmp_path, world, dtype):
    results = run_ranks(world, "layer", dtype, tmp_path)
    for r in results:
        # Each rank runs the sharded layer with impl=reference (gathers) and impl=fused (the
        # gathered_dot / weighted_gather_sum kernels) against the unsharded reference.
        assert sorted(r["impls"]) == ["fused", "reference"]
        for impl, res in r["impls"].items():
            # Values and gradients: checked inside each rank (it raises on a mismatch).
            # Communication: exactly the formula of the design note, forward and forward + backward.
            assert res["fwd_bytes"] == r["formula_fwd"], impl
            assert res["fwd_bytes"] + res["bwd_bytes"] == r["formula_total"], impl
        # Memory: 1/E of U and V here.
        assert r["expert_numel"] * world == r["full_expert_numel"]


def test_sharded_layer_uneven_token_counts(tmp_path):
    run_ranks(2, "uneven", "float64", tmp_path)


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_each_rank_owns_one_ep_th_of_experts_and_their_optimizer_state(tmp_path, zero_stage):
    results = run_ranks(2, "engine", str(zero_stage), tmp_path)
    for r in results:
        assert r["has_moe_layers"]
        assert r["num_expert_tensors"] == 2  # U and V shards of the one PEER layer
        assert r["expert_numel"] * 2 == r["full_expert_numel"]
        assert r["expert_state_numel"] == 2 * r["expert_numel"]  # Adam's exp_avg and exp_avg_sq


def test_row_sparse_optimizer_on_sharded_tables_matches_unsharded(tmp_path):
    """optim.expert_tables=row_sparse under ep=2: each rank's columns, moments and per-row step
    counts equal the unsharded layer's after 3 steps on both ranks' tokens (float64, checked in the
    worker), so the retrieved-row set is the same on both shards."""
    results = run_ranks(2, "row_sparse", "3", tmp_path)
    for r in results:
        assert r["row_step_sums_by_rank"][0][0] == r["row_step_sums_by_rank"][0][1]
        assert r["never_retrieved"] > 0 and r["max_row_step"] == 3  # some rows in no step, some in every one
