"""optim.expert_tables=row_sparse through `python launch.py`: its per-row step counts are saved and
resumed exactly, in the same layout (bitwise losses) and in another (through the layout-free state).
That the ep ranks of a group hold the same per-row counts is checked on the layer itself
(tests/distributed/test_expert_parallel_layer.py, row_sparse).

Same pattern and tolerances as tests/e2e/test_layout_change.py (its docstring says why): a run at
layout A saves at step 2 of 4; the same command resumes step 2 at layout B.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from orchestrator.checkpoint.warm_start import read_full_state
from tests.e2e.test_layout_change import COMMON, SAVED, STEPS
from tests.helpers import describe, launch, train_losses

pytestmark = pytest.mark.slow

ROW_SPARSE = COMMON + ["model=peer", "optim.expert_tables=row_sparse"]
LAYOUTS = {
    "1": ["cluster.nproc_per_node=1", "trainer.grad_accum_steps=2"],
    "dp2ep2": ["cluster.nproc_per_node=2", "parallel.dp=2", "parallel.ep=2"],
}
DESCRIBED = {"1": "dp=1 ep=1 tp=1 pp=1 (1 rank)", "dp2ep2": "dp=2 ep=2 tp=1 pp=1 (2 ranks)"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_cache):
    cache: dict = {}

    def get(layout: str) -> Path:
        if layout not in cache:
            root = tmp_path_factory.mktemp(f"row_sparse_{layout}")
            proc = launch(ROW_SPARSE + LAYOUTS[layout] + [f"run.root={root}", f"data.cache_dir={data_cache}"], cwd=root)
            assert proc.returncode == 0, describe(proc)
            cache[layout] = root / "default"
        return cache[layout]

    return get


def _resume(layout: str, saved_step_dir: Path, tmp_path: Path, data_cache):
    run_root, resaved = tmp_path / "runs", tmp_path / "resaved"
    shutil.copytree(saved_step_dir, run_root / "default" / "checkpoints" / saved_step_dir.name)
    proc = launch(ROW_SPARSE + LAYOUTS[layout] + [f"run.root={run_root}", f"data.cache_dir={data_cache}"], cwd=tmp_path,
                  extra_env={"PEERLAB_TEST_RESAVE_AFTER_RESHARD": str(resaved)})
    assert proc.returncode == 0, describe(proc)
    return proc, resaved, run_root / "default"


def _row_steps(step_dir: Path) -> dict[str, torch.Tensor]:
    state, step = read_full_state(str(step_dir))
    assert step == SAVED
    return {k: v for k, v in state.items() if k.startswith("row_step/")}


def test_checkpoint_holds_per_row_step_counts(uninterrupted):
    rows = _row_steps(uninterrupted("1") / "checkpoints" / f"step_{SAVED:08d}")
    assert sorted(rows) == ["row_step/blocks.1.ffn.expert_down.weight", "row_step/blocks.1.ffn.expert_up.weight"], rows
    for t in rows.values():
        assert t.dtype == torch.int64 and t.shape == (1024,)
        # Some rows were retrieved in both steps, some in one, some never: really per row.
        assert set(t.unique().tolist()) == {0, 1, 2}, t.unique()


def test_same_layout_resume_is_bitwise(uninterrupted, tmp_path, data_cache):
    reference = uninterrupted("1")
    _, _, resumed = _resume("1", reference / "checkpoints" / f"step_{SAVED:08d}", tmp_path, data_cache)
    ref, got = train_losses(reference), train_losses(resumed)
    assert sorted(got) == list(range(SAVED + 1, STEPS + 1))
    assert all(got[s] == ref[s] for s in got), (got, ref)


@pytest.mark.parametrize("a,b", [("1", "dp2ep2"), ("dp2ep2", "1")])
def test_resume_under_another_layout_carries_the_row_counts(a, b, uninterrupted, tmp_path, data_cache):
    reference = uninterrupted(a)
    saved = reference / "checkpoints" / f"step_{SAVED:08d}"
    proc, resaved, resumed = _resume(b, saved, tmp_path, data_cache)
    assert f"resharded step_{SAVED:08d} from {DESCRIBED[a]} to {DESCRIBED[b]}" in proc.stdout, describe(proc)
    before, _ = read_full_state(str(saved))
    after, _ = read_full_state(str(resaved))
    assert sorted(before) == sorted(after) and any(k.startswith("row_step/") for k in before)
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    ref, got = train_losses(reference), train_losses(resumed)
    diffs = {s: abs(got[s] - ref[s]) / abs(ref[s]) for s in got}
    assert sorted(got) == list(range(SAVED + 1, STEPS + 1)) and diffs[SAVED + 1] < 2e-6 and max(diffs.values()) < 2e-5, diffs

