"""Pipeline parallelism end to end (`python launch.py`, gloo): pp=2 and dp=2 x pp=2 (with ep=2) give
the training losses of one process, and a pp=2 run stopped by a signal resumes bitwise.

The reference. pp splits each trainer micro-batch of 4 sequences into parallel.pp_microbatches=2
pipeline micro-batches of 2, and PEER's query BatchNorm, MoE capacity and MoE's load-balancing loss
are computed per forward, so the one-process run that computes the same function uses micro-batches
of 2 sequences with as many accumulation steps (same global batch of 8, same samples in the same
groups of 2: orchestrator/data.py hands out consecutive samples). Its validation uses
eval_batches=4 batches of 2, the same windows as the pipeline's 2 batches of 4 (ValBatches draws
them row by row).

Tolerance. The runs compute the same sums in another order: the loss of a step is the mean of
per-micro-batch losses (DeepSpeed sums them in float32 on the last stage, the one-process trainer
in float64), gradients of the tied embedding are summed across stages before the data-parallel
average, and the norm of the clipped gradients is summed per stage. So the losses agree to float32
rounding, not bitwise. Measured over 20 steps at lr 3e-3 with the gradient clipped every step
(grad_clip=0.2, norms near 2-3): at most 8.9e-8 relative here, 6.3e-7 for MoE at
dp=2 x pp=2 x ep=2 (docs/pipeline_parallel.md). We allow 1e-5 relative: a wrong stage boundary, a lost aux loss or
tied-gradient sum, or a norm that misses a stage changes the loss by more than 1e-3 within a few
steps. The resumed run is compared bitwise (==) with the uninterrupted one, as in
tests/e2e/test_checkpoint_resume.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import TINY, describe, launch, read_metrics

pytestmark = pytest.mark.slow

STEPS = 20
COMMON = TINY + [f"trainer.max_steps={STEPS}", "trainer.log_every=1", "trainer.eval_every=10",
                 "checkpoint.every_steps=0", "checkpoint.keep_last=0", "tracking.enabled=false",
                 "optim.warmup_steps=2", f"optim.decay_steps={STEPS}", "optim.grad_clip=0.2"]
# model=moe with its MoE block on stage 0 only: the aux loss crosses a stage, the stages hold
# different optimizer param groups (ZeRO-1 norm) and save differently (DeepSpeed's MoE files on
# stage 0, layer files on stage 1).
MODELS = {"peer": ["model=peer"], "moe": ["model=moe", "model.sparse_layers=[0]"]}
REFERENCE = ["trainer.micro_batch_size=2", "trainer.grad_accum_steps=4", "trainer.eval_batches=4"]
PP2 = ["cluster.nproc_per_node=2", "parallel.pp=2", "parallel.pp_microbatches=2", "trainer.grad_accum_steps=2"]
DP2_PP2 = ["cluster.nproc_per_node=4", "parallel.dp=2", "parallel.pp=2", "parallel.pp_microbatches=2"]
TOLERANCE = 1e-5


def _run(root: Path, data_cache, args: list[str], env: dict | None = None, expect: int = 0):
    proc = launch(COMMON + args + [f"run.root={root}", f"data.cache_dir={data_cache}"], cwd=root, extra_env=env)
    assert proc.returncode == expect, describe(proc)
    return proc


def _metrics(run_dir: Path) -> dict[tuple[int, str], float]:
    keys = ("loss", "val_loss", "peer_usage")
    return {(m["step"], k): m[k] for m in read_metrics(run_dir) for k in keys if k in m}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    """One-process references and pp=2 runs, by name, launched on first use."""
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            model, layout = name.split("/")
            root = tmp_path_factory.mktemp(name.replace("/", "_"))
            _run(root, data_cache, MODELS[model] + {"one": REFERENCE, "pp2": PP2}[layout])
            cache[name] = _metrics(root / "default")
        return cache[name]

    return get


def _assert_close(ref: dict, got: dict, keys=("loss",)) -> float:
    ref = {k: v for k, v in ref.items() if k[1] in keys}
    got = {k: v for k, v in got.items() if k[1] in keys}
    assert sorted(ref) == sorted(got) and len(ref) >= STEPS
    diffs = {k: abs(ref[k] - got[k]) / abs(ref[k]) for k in ref}
    assert max(diffs.values()) < TOLERANCE, f"relative differences: {diffs}"
    return max(diffs.values())


@pytest.mark.parametrize("model", ["peer", "moe"])
def test_pp2_matches_one_process(runs, model):
    """Also validation: one data-parallel rank, so the BatchNorm running statistics (updated in
    the same order) and the PEER usage counters (summed on stage 1, reported by rank 0 on stage 0)
    match the one-process run's."""
    keys = ("loss", "val_loss", "peer_usage")
    _assert_close(runs(f"{model}/one"), runs(f"{model}/pp2"), keys)


def test_dp2_pp2_ep2_matches_one_process(tmp_path, data_cache, runs):
    """4 ranks: PEER (block 1, stage 1) split over ep=2 within each stage's data-parallel pair,
    ZeRO-1 (expert param groups on stage 1 only). Training losses only: each data-parallel rank
    keeps BatchNorm statistics of its own batches, as with dp alone, so validation differs from
    the one-process run. (model=moe at dp=2 x pp=2 x ep=2 is left out to keep CI short; see
    docs/pipeline_parallel.md for its measured agreement.)"""
    _run(tmp_path, data_cache, MODELS["peer"] + DP2_PP2 + ["parallel.ep=2", "parallel.zero_stage=1"])
    _assert_close(runs("peer/one"), _metrics(tmp_path / "default"))


def test_pp2_stop_signal_saves_and_resumes_bitwise(tmp_path, data_cache, runs):
    """USR2 to rank 1 (stage 1) only: every rank finishes the step, saves, exits 75; the rerun
    resumes and every later loss equals the uninterrupted run's. Then a resume with pp=1 is
    refused: a checkpoint's layout (layer files per stage) cannot change."""
    args = MODELS["moe"] + PP2
    _run(tmp_path, data_cache, args, env={"PEERLAB_TEST_KILL_AT": "step10:1:USR2"}, expect=75)
    checkpoints = tmp_path / "default" / "checkpoints"
    manifest = json.loads((checkpoints / "step_00000011" / "manifest.json").read_text())
    on_disk = {p.name for p in (checkpoints / "step_00000011").iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk, "every file of the checkpoint is in the manifest"
    assert {manifest["files"][f"rank_0000{r}.pt"]["rank"] for r in (0, 1)} == {0, 1}
    assert any(name.startswith("layer_") and rec["rank"] == 1 for name, rec in manifest["files"].items())

    second = _run(tmp_path, data_cache, args)
    assert "resumed from step_00000011" in second.stdout
    assert [m["step"] for m in read_metrics(tmp_path / "default") if "loss" in m] == list(range(1, STEPS + 1))
    assert _metrics(tmp_path / "default") == runs("moe/pp2")

    refused = _run(tmp_path, data_cache, MODELS["moe"] + ["trainer.max_steps=30"], expect=2)
    assert "parallel.pp (2 -> 1)" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, \
        describe(refused)
