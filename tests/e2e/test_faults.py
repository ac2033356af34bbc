"""A rank that dies (SIGKILL) or hangs (SIGSTOP) mid-step ends the whole run, within the bound set by
cluster.collective_timeout_s, with the rank named; only complete checkpoints remain. Real
processes (2 gloo ranks through the local launcher) and real signals (PEERLAB_TEST_KILL_AT)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from tests.helpers import ROOT, TINY, describe, launch

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


def test_out_of_memory_in_the_first_step_ends_in_one_line(tmp_path, data_cache):
    """A real allocation failure: the run's address space is limited (`ulimit -v`, RLIMIT_AS) to
    3 GiB, enough to start and to train at trainer.micro_batch_size=4 (checked first), not for the
    activations of 4096 sequences in the first step."""
    def limited(micro_batch: int) -> subprocess.CompletedProcess:
        args = TINY + ["trainer.max_steps=1", "tracking.enabled=false", "plan.check=false", f"run.root={tmp_path}/runs",
                       f"data.cache_dir={data_cache}", f"trainer.micro_batch_size={micro_batch}", f"run.name=mb{micro_batch}"]
        return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                          "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30)))

    fits = limited(4)
    assert fits.returncode == 0, describe(fits)
    proc = limited(4096)
    assert proc.returncode == 1, describe(proc)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, describe(proc)
    assert errors[0].startswith("error: out of memory on rank 0 during step 1: an allocation of "), errors[0]
    assert "ulimit -v, is 3.0 GiB" in errors[0] and "lower trainer.micro_batch_size" in errors[0], errors[0]
    assert "Traceback" not in proc.stderr, describe(proc)
