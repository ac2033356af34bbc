"""Tensor parallelism with ZeRO-1 and checkpoints: a dp=2 x tp=2 run (ZeRO-1) trains like one
process, and, killed after step 5, resumes from its step-4 checkpoint to bitwise the losses of the
uninterrupted run (train and validation, ==, as in test_checkpoint_resume.py: every input of the
next step is restored and CPU fp32 is deterministic). DeepSpeed writes the tp-sharded weights per
tp rank (mp_rank_00/01 model files) and the ZeRO partitions per (dp, tp) rank. Resuming under
another tp is refused by the config comparison (tests/unit/test_tensor_parallel_parts.py; end to
end, the same mechanism refuses another ep in test_checkpoint_resume.py).
"""

from __future__ import annotations

import pytest
import torch

from orchestrator.checkpoint import safe_load
from tests.distributed.test_tensor_parallel import _check_same_losses, _losses_and_norms
from tests.e2e.test_checkpoint_resume import COMMON, STEPS, all_losses
from tests.helpers import describe, launch, read_metrics

pytestmark = pytest.mark.slow

SHARDED_SUFFIXES = ("attn.qkv.weight", "attn.out.weight", "ffn.up.weight", "ffn.down.weight",
                    "expert_down.weight", "expert_up.weight")
DP2_TP2 = ["cluster.nproc_per_node=4", "parallel.dp=2", "parallel.tp=2", "parallel.zero_stage=1"]


def test_dp2_tp2_resumes_bitwise(tmp_path, data_cache):
    ref_root, run_root = tmp_path / "ref", tmp_path / "runs"
    reference = launch(COMMON + DP2_TP2 + [f"run.root={ref_root}", f"data.cache_dir={data_cache}"], cwd=tmp_path)
    assert reference.returncode == 0, describe(reference)
    expected = all_losses(ref_root / "default")
    assert sorted(s for s, kind in expected if kind == "loss") == list(range(1, STEPS + 1))
    # The uninterrupted run trains like one process with the same micro-batches (2 accumulation
    # steps), to the tolerance explained in tests/distributed/test_tensor_parallel.py; with ZeRO-1
    # DeepSpeed computes and clips the norm (optim.grad_clip=1, norms 1.4 to 3: clipped).
    one_root = tmp_path / "one"
    one = launch(COMMON + ["trainer.grad_accum_steps=2", f"run.root={one_root}", f"data.cache_dir={data_cache}"],
                 cwd=tmp_path)
    assert one.returncode == 0, describe(one)
    _check_same_losses(_losses_and_norms(one_root / "default"), _losses_and_norms(ref_root / "default"), STEPS)

    args = COMMON + DP2_TP2 + [f"run.root={run_root}", f"data.cache_dir={data_cache}"]
    first = launch(args, cwd=tmp_path, extra_env={"PEERLAB_TEST_KILL_AT": "step5"})
    assert first.returncode != 0, describe(first)
    checkpoint = run_root / "default" / "checkpoints" / "step_00000004"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt", "manifest.json"} <= files, files
    assert {f"zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt" for dp in (0, 1) for tp in (0, 1)} <= files, files
    # After 4 steps the replicated weights (and BatchNorm statistics) are still bitwise the same on
    # both tp ranks, and the shards differ: every replicated number gets the same update.
    states = [safe_load(str(checkpoint / f"mp_rank_{tp:02d}_model_states.pt"))["module"] for tp in (0, 1)]
    assert states[0].keys() == states[1].keys()
    sharded = [k for k in states[0] if k.endswith(SHARDED_SUFFIXES)]
    assert len(sharded) == 2 * 2 + 2 + 2, sharded  # qkv, out per block; the dense MLP; PEER's U, V
    for key in states[0]:
        same = torch.equal(states[0][key], states[1][key])
        assert same != (key in sharded), key

    second = launch(args, cwd=tmp_path)
    assert second.returncode == 0, describe(second)
    assert "resumed from step_00000004" in second.stdout
    steps = [m["step"] for m in read_metrics(run_root / "default") if "loss" in m]
    assert steps == list(range(1, STEPS + 1)), "metrics.jsonl must hold every step once"
    assert all_losses(run_root / "default") == expected
