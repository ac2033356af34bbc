"""Resume under another parallel layout, end to end: `python launch.py` at layout A saves at step 2;
the same command at layout B resumes it.

Checked for every pair:
- the start line says `resharded step_00000002 from <A> to <B>`;
- lossless: the state gathered right after resharding (written by the test hook
  PEERLAB_TEST_RESAVE_AFTER_RESHARD from layout B's ranks) equals the saved state, bitwise, for
  every model tensor (fp32 weights, BatchNorm statistics), AdamW moment and step count;
- the following losses equal the uninterrupted layout-A run within a relative 2e-6 at the first
  resumed step and 2e-5 at the second. Why these: after resharding, B starts from bitwise the same
  state as A, so the first resumed step differs only by the order of fp32 sums (dp all-reduce vs
  local accumulation over the micro-batches, tp partial sums, pipeline stages): a few float32
  roundings (2^-24 = 6e-8) per reduction over a handful of layers, around 1e-7 relative. The
  second step adds one AdamW update computed from gradients that differ at that rounding level;
  Adam divides by sqrt(v), so a coordinate with a tiny v can move its update by a relative 1e-5 at
  most over one step at lr 3e-3 (the one-process vs sharded tests, tests/distributed/, see up to
  1e-6 over 4 steps); the bounds leave a 10x margin over what these runs measure.
The global batch is the same in every layout (micro_batch_size 4 x grad_accum_steps x dp = 8).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from orchestrator.checkpoint.warm_start import read_full_state
from tests.e2e.test_checkpoint_resume import s3  # noqa: F401  (the moto server fixture)
from tests.helpers import TINY, describe, launch, train_losses

pytestmark = pytest.mark.slow

STEPS, SAVED = 4, 2
COMMON = TINY + ["trainer.log_every=1", "trainer.eval_every=0", f"checkpoint.every_steps={SAVED}",
                 f"trainer.max_steps={STEPS}", f"optim.decay_steps={STEPS}", "optim.warmup_steps=1",
                 "tracking.enabled=false", "checkpoint.keep_last=0"]


def _procs(n: int) -> list[str]:
    return [f"cluster.nproc_per_node={n}"]


LAYOUTS = {
    "1": _procs(1) + ["trainer.grad_accum_steps=2"],
    "dp2": _procs(2) + ["parallel.dp=2"],
    "dp2z1": _procs(2) + ["parallel.dp=2", "parallel.zero_stage=1"],
    "dp2ep2": _procs(2) + ["parallel.dp=2", "parallel.ep=2", "parallel.zero_stage=1"],
    "tp2": _procs(2) + ["parallel.tp=2", "trainer.grad_accum_steps=2"],
    "pp2": _procs(2) + ["parallel.pp=2", "trainer.grad_accum_steps=2"],
    "dp2tp2": _procs(4) + ["parallel.dp=2", "parallel.tp=2"],
}
DESCRIBED = {"1": "dp=1 ep=1 tp=1 pp=1 (1 rank)", "dp2": "dp=2 ep=1 tp=1 pp=1 (2 ranks)",
             "dp2z1": "dp=2 ep=1 tp=1 pp=1 (2 ranks)", "dp2ep2": "dp=2 ep=2 tp=1 pp=1 (2 ranks)",
             "tp2": "dp=1 ep=1 tp=2 pp=1 (2 ranks)", "pp2": "dp=1 ep=1 tp=1 pp=2 (2 ranks)",
             "dp2tp2": "dp=2 ep=1 tp=2 pp=1 (4 ranks)"}
MOE = ["model=moe"]
PAIRS = [("1", "dp2", []), ("dp2z1", "1", []), ("dp2ep2", "1", []), ("1", "dp2ep2", []), ("tp2", "pp2", []),
         ("pp2", "dp2", []), ("dp2tp2", "1", []), ("dp2ep2", "dp2z1", MOE)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_cache):
    """Layout-A runs to STEPS, saving at step 2 and 4 (one per layout and model, made on demand)."""
    cache: dict = {}

    def get(layout: str, model: list[str]) -> Path:
        key = (layout, tuple(model))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"ref_{layout}_{'_'.join(model) or 'peer'}".replace("=", ""))
            proc = launch(COMMON + model + LAYOUTS[layout] + [f"run.root={root}", f"data.cache_dir={data_cache}"],
                          cwd=root)
            assert proc.returncode == 0, describe(proc)
            cache[key] = root / "default"
        return cache[key]

    return get


def _resume_at(b: str, model: list[str], saved_step_dir: Path, tmp_path: Path, data_cache, checkpoint_dir=None,
               env=None):
    resaved = tmp_path / "resaved"
    run_root = tmp_path / "runs"
    args = COMMON + model + LAYOUTS[b] + [f"run.root={run_root}", f"data.cache_dir={data_cache}"]
    if checkpoint_dir is None:
        target = run_root / "default" / "checkpoints" / saved_step_dir.name
        shutil.copytree(saved_step_dir, target)
    else:
        args.append(f"checkpoint.dir={checkpoint_dir}")
    proc = launch(args, cwd=tmp_path, extra_env={"PEERLAB_TEST_RESAVE_AFTER_RESHARD": str(resaved), **(env or {})})
    assert proc.returncode == 0, describe(proc)
    return proc, resaved, run_root / "default"


def _check_lossless(saved: Path | str, resaved: Path) -> None:
    before, step = read_full_state(str(saved))
    after, step_after = read_full_state(str(resaved))
    assert step == step_after == SAVED
    assert sorted(before) == sorted(after), set(before) ^ set(after)
    kinds = {k.split("/", 1)[0] for k in before}
    assert kinds == {"model", "exp_avg", "exp_avg_sq", "step"}, kinds
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key


def _check_losses(reference: Path, resumed: Path) -> None:
    ref, got = train_losses(reference), train_losses(resumed)
    assert sorted(got) == list(range(SAVED + 1, STEPS + 1)), got
    diffs = {s: abs(got[s] - ref[s]) / abs(ref[s]) for s in got}
    assert diffs[SAVED + 1] < 2e-6 and max(diffs.values()) < 2e-5, diffs


@pytest.mark.parametrize("a,b,model", PAIRS, ids=[f"{a}-to-{b}{'-moe' if m else ''}" for a, b, m in PAIRS])
def test_resume_under_another_layout(a, b, model, uninterrupted, tmp_path, data_cache):
    reference = uninterrupted(a, model)
    saved = reference / "checkpoints" / f"step_{SAVED:08d}"
    proc, resaved, resumed = _resume_at(b, model, saved, tmp_path, data_cache)
    line = f"resharded step_{SAVED:08d} from {DESCRIBED[a]} to {DESCRIBED[b]}"
    assert line in proc.stdout, describe(proc)
    _check_lossless(saved, resaved)
    _check_losses(reference, resumed)


def test_layout_free_state_holds_batchnorm_statistics_pooled_over_data_parallel_ranks(uninterrupted):
    """Each dp rank tracks its own BatchNorm statistics (kept in its rank file for an exact
    same-layout resume); the layout-free state, which every other layout, export and evaluation
    reads, holds them pooled over the ranks (orchestrator/checkpoint/portable.py), not rank 0's."""
    from orchestrator.checkpoint import safe_load
    from orchestrator.checkpoint.portable import pool_batchnorm_statistics

    saved = uninterrupted("dp2z1", []) / "checkpoints" / f"step_{SAVED:08d}"
    portable, _ = read_full_state(str(saved))
    ranks = [safe_load(saved / f"rank_{r:05d}.pt", map_location="cpu")["extra"]["buffers"] for r in (0, 1)]
    statistics = [n for n in ranks[0] if n.endswith(("running_mean", "running_var"))]
    assert statistics, sorted(ranks[0])
    pooled = pool_batchnorm_statistics(ranks)
    for name in statistics:
        assert not torch.equal(ranks[0][name], ranks[1][name]), name  # the ranks saw other batches
        assert torch.equal(portable[f"model/{name}"], pooled[name]), name


def test_resume_under_another_layout_through_s3(uninterrupted, tmp_path, data_cache, s3):  # noqa: F811
    """One process -> dp2 x ep2 with the checkpoint on S3 (moto's server): each rank reads only the
    chunks it needs, by ranged GETs; under ep2 a rank needs half of every PEER table."""
    env, fs = s3
    reference = uninterrupted("1", [])
    saved = reference / "checkpoints" / f"step_{SAVED:08d}"
    fs.put(str(saved), f"ckpt-bucket/layout/step_{SAVED:08d}", recursive=True)
    proc, resaved, resumed = _resume_at("dp2ep2", [], saved, tmp_path, data_cache,
                                        checkpoint_dir="s3://ckpt-bucket/layout", env=env)
    line = next((ln for ln in proc.stdout.splitlines() if "resharded" in ln), "")
    assert f"resharded step_{SAVED:08d} from {DESCRIBED['1']} to {DESCRIBED['dp2ep2']}" in line, describe(proc)
    low, high, total = (int(x.replace(",", "")) for x in
                        re.search(r"bytes read per rank ([\d,]+)-([\d,]+) of ([\d,]+)", line).groups())
    # Under ep2 a rank needs half of each PEER table (and of its two AdamW moments): about a third
    # of this tiny model's tensor bytes are never read by it.
    assert 0 < low <= high < 0.75 * total, line
    print(line)
    _check_lossless(saved, resaved)
