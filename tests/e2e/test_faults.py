"""A rank that dies (SIGKILL) or hangs (SIGSTOP) mid-step ends the whole run, within the bound set by
cluster.collective_timeout_s, with the rank named; only complete checkpoints remain. Real
processes (2 gloo ranks through the local launcher) and real signals (PEERLAB_TEST_KILL_AT)."""

from __future__ import annotations

import pytest

from tests.helpers import TINY, describe, launch

pytestmark = pytest.mark.slow

ARGS = TINY + ["trainer.max_steps=8", "checkpoint.every_steps=2", "tracking.enabled=false", "cluster.nproc_per_node=2",
               "parallel.dp=2", "cluster.collective_timeout_s=10", "cluster.shutdown_grace_s=2"]


@pytest.mark.parametrize("signal_name, expected", [
    # The hung rank never reaches the gradient all-reduce of step 4: rank 0 times out there and names it.
    ("STOP", "cluster.collective_timeout_s=10: rank 0 waited 10 s in a collective at step 4: rank 1 stopped after step 3"),
    # A dead rank is seen by the launcher itself (its exit by signal), before any timeout.
    ("KILL", "rank 1"),
])
def test_a_rank_that_dies_or_hangs_ends_the_run_naming_it(tmp_path, data_cache, signal_name, expected):
    # Without the setting the survivors would wait 30 min (gloo's default); the subprocess timeout
    # of this test is the bound: the run must end well inside it.
    proc = launch(ARGS + [f"run.root={tmp_path}/runs", f"data.cache_dir={data_cache}"], cwd=tmp_path, timeout=400,
                  extra_env={"PEERLAB_TEST_KILL_AT": f"step3:1:{signal_name}"})
    assert proc.returncode not in (0, 2, 75), describe(proc)
    assert expected in proc.stderr, describe(proc)
    assert "Traceback" not in "\n".join(ln for ln in proc.stderr.splitlines() if "error:" in ln)
    checkpoints = tmp_path / "runs" / "default" / "checkpoints"
    names = sorted(p.name for p in checkpoints.iterdir() if p.name != ".staging")
    assert names == ["step_00000002"], names  # step 4 was never reached by rank 1: nothing of it remains
    staged = [p for p in (checkpoints / ".staging").rglob("*") if p.is_file()] if (checkpoints / ".staging").exists() else []
    assert staged == [], staged  # no half-written save either
    assert (checkpoints / "step_00000002" / "manifest.json").exists()
