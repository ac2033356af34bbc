"""Tensor parallelism with ZeRO-1 and checkpoints: a dp=2 x tp=2 run (ZeRO-1) trains like one
process, and, killed after step 5, resumes from its step-4 checkpoint to bitwise the losses of the
uninterrupted run (train and validation, ==, as in test_checkpoint_resume.py: every input of the
next step is restored and CPU fp32 is deterministic). Each rank writes its pieces of the portable
state (tp-sharded weights and their moments with global coordinates, replicated tensors once);
resuming under another layout is tests/e2e/test_layout_change.py.
"""

from __future__ import annotations

import json

import pytest

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
    assert files == {"manifest.json"} | {f"rank_{r:05d}.pt" for r in range(4)} | \
        {f"state_rank_{r:05d}.safetensors" for r in range(4)}, files
    # The tensor-parallel shards come from both tp ranks (of dp rank 0), each replicated tensor from
    # one rank only: both tp ranks hold it bitwise the same (every replicated number gets the same
    # update), which the bitwise resume below checks, since it loads that one copy into both ranks.
    tensors = json.loads((checkpoint / "manifest.json").read_text())["portable"]["tensors"]
    writers = {key: {c["file"] for c in entry["chunks"]} for key, entry in tensors.items() if key.startswith("model/")}
    sharded = [k for k in writers if k.endswith(SHARDED_SUFFIXES)]
    assert len(sharded) == 2 * 2 + 2 + 2, sharded  # qkv, out per block; the dense MLP; PEER's U, V
    for key, written_by in writers.items():
        assert len(written_by) == (2 if key in sharded else 1), (key, written_by)

    second = launch(args, cwd=tmp_path)
    assert second.returncode == 0, describe(second)
    assert "resumed from step_00000004" in second.stdout
    steps = [m["step"] for m in read_metrics(run_root / "default") if "loss" in m]
    assert steps == list(range(1, STEPS + 1)), "metrics.jsonl must hold every step once"
    assert all_losses(run_root / "default") == expected
