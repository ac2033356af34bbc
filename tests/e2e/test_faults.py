"""A rank that dies (SIGKILL) or hangs (SIGSTOP) mid-step ends the whole run, within the bound set by
cluster.collective_timeout_s, with the rank named; only complete checkpoints remain. Real
processes (2 gloo ranks through the local launcher) and real signals (PEERLAB_TEST_KILL_AT)."""

from __future__ import annotations

import os
import resource
import signal
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


def test_a_stop_signal_during_a_save_longer_than_the_grace_is_not_cut(tmp_path, data_cache):
    """SIGTERM to the local launcher while the save it triggers takes 8 s (PEERLAB_TEST_SAVE_DELAY_S,
    a slow store) with cluster.shutdown_grace_s=2: the launcher waits for the save instead of
    killing it, the checkpoint is complete, and exit code 75 reaches the caller."""
    import time

    run_dir = tmp_path / "runs" / "default"
    args = TINY + ["trainer.max_steps=100000", "checkpoint.every_steps=0", "tracking.enabled=false", "cluster.nproc_per_node=2",
                   "parallel.dp=2", "cluster.shutdown_grace_s=2", f"run.root={tmp_path}/runs", f"data.cache_dir={data_cache}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
           "PEERLAB_TEST_SAVE_DELAY_S": "8"}
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        launcher = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], cwd=tmp_path, env=env,
                                    stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + 300
            while not (run_dir / "heartbeat" / "rank_00001").exists():  # rank 1 finished a step
                assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "err.txt").read_text()
                time.sleep(0.2)
            signalled = time.monotonic()
            launcher.send_signal(signal.SIGTERM)
            code = launcher.wait(timeout=120)
            waited = time.monotonic() - signalled
        finally:
            if launcher.poll() is None:
                launcher.kill()
    stdout, stderr = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert code == 75, f"exit {code}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    assert waited >= 8, waited  # the save's 8 s were not cut at the 2 s grace
    assert "saved checkpoint step_" in stdout, stdout[-3000:]
    tags = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert len(tags) == 1 and (tags[0] / "manifest.json").exists(), tags
    assert "stopped by a signal after a complete checkpoint" in stderr, stderr[-3000:]
    assert not list((run_dir / "logs" / "saving").glob("saving_rank_*"))  # markers go with their save
