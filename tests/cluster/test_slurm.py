"""cluster=slurm against a real single-node Slurm cluster (tests/cluster/slurm_up.sh): a 2-task
job equals the same run under cluster=local; a job preempted by the high partition, and one sent
the time-limit signal, are requeued, resume from their checkpoint and end with the losses of an
uninterrupted run in one MLflow run; the requeue limit stops a job with a message; a failing job
fails and is not requeued; a hung rank ends its job naming it; a sweep runs as a job array and its summary table is right; a dry run
submits nothing.

The cluster comes up once per session (about 2 s once installed; the first time apt-get installs
Slurm, munge and MariaDB, about 30 s) and goes down at the end. Without root or apt-get the tests
are skipped with the reason; under CI (the CI variable set) they fail instead, so CI never skips
them silently. Losses are compared with == : every run here is fp32 on CPU with the same data
order, and resuming restores every input of the next step (tests/e2e/test_checkpoint_resume.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY, describe, launch, read_metrics, train_losses

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
STEPS = 8
COMMON = TINY + ["trainer.log_every=1", "trainer.eval_every=0", f"trainer.max_steps={STEPS}",
                 f"optim.decay_steps={STEPS}", "optim.warmup_steps=2", "checkpoint.keep_last=0"]
TWO = ["cluster.nproc_per_node=2", "parallel.dp=2"]
SLURM = ["cluster=slurm", "cluster.time_min=10", "cluster.signal_delay_s=60"]
# Long enough that a signal sent after the first steps arrives well before the end.
LONG = 120
LONG_ARGS = [f"trainer.max_steps={LONG}", f"optim.decay_steps={LONG}", "checkpoint.every_steps=1000"]
JOB_TIMEOUT_S = 300


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
            "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def slurm_cluster():
    """Bring the test cluster up (tests/cluster/slurm_up.sh), and down after the session."""
    ci = bool(os.environ.get("CI"))
    reason = None
    if os.geteuid() != 0:
        reason = "needs root to install and start Slurm (tests/cluster/slurm_up.sh)"
    elif not shutil.which("sbatch") and not shutil.which("apt-get"):
        reason = "Slurm is not installed and there is no apt-get to install it"
    if reason is None:
        up = subprocess.run(["bash", str(HERE / "slurm_up.sh")], capture_output=True, text=True, timeout=900)
        if up.returncode == 3:
            reason = up.stderr.strip().splitlines()[-1]
        elif up.returncode != 0:
            pytest.fail(f"slurm_up.sh failed (exit {up.returncode}):\n{up.stdout}\n{up.stderr}")
    if reason is not None:
        if ci:
            pytest.fail(f"Slurm tests cannot run on CI: {reason}")
        pytest.skip(f"Slurm tests skipped: {reason}")
    try:
        yield
    finally:
        subprocess.run(["bash", str(HERE / "slurm_down.sh")], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    """Uninterrupted local runs (2 gloo ranks, dp=2), the losses every Slurm run must reproduce."""
    out = {}
    for name, extra in (("short", []), ("long", LONG_ARGS)):
        root = tmp_path_factory.mktemp(f"ref_{name}")
        proc = launch(COMMON + TWO + extra + ["tracking.enabled=false", f"run.root={root}",
                                              f"data.cache_dir={data_cache}"], cwd=root)
        assert proc.returncode == 0, describe(proc)
        out[name] = train_losses(root / "default")
    return out


def _args(tmp_path: Path, data_cache: Path, extra=()) -> list[str]:
    return COMMON + TWO + SLURM + list(extra) + [f"run.root={tmp_path}/runs", f"data.cache_dir={data_cache}"]


def _job_id(text: str) -> str:
    found = re.findall(r"submitted Slurm job (\S+)", text)
    assert found, text
    return found[0]


def _scontrol(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def _wait_metrics(path: Path, lines: int, proc=None, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and sum(1 for _ in path.open()) >= lines:
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.3)
    pytest.fail(f"{path} never reached {lines} lines")


def _mlflow_runs(root: Path, experiment: str = "peer-lab"):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def test_dry_run_submits_nothing(slurm_cluster, tmp_path, data_cache):
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    proc = launch(_args(tmp_path, data_cache, ["cluster.dry_run=true", "cluster.partition=high"]), cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "#SBATCH --ntasks-per-node=2" in proc.stdout and "#SBATCH --partition=high" in proc.stdout
    assert "#SBATCH --signal=USR2@60" in proc.stdout and "srun" in proc.stdout
    assert "max_steps: 8" in proc.stdout and "nothing submitted" in proc.stdout
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing"


def test_two_task_job_equals_local(slurm_cluster, tmp_path, data_cache, reference):
    proc = launch(_args(tmp_path, data_cache, ["cluster.wait=true"]), cwd=tmp_path, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, describe(proc)
    job = _job_id(proc.stdout)
    assert f"job {job}: COMPLETED" in proc.stdout
    assert "rank 0 log:" in proc.stdout and "world=2 dp=2" in proc.stdout, "rank 0's log is streamed"
    assert train_losses(tmp_path / "runs" / "default") == reference["short"]
    _, runs = _mlflow_runs(tmp_path / "runs")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def _interrupted_run(tmp_path, data_cache, reference, interrupt, extra=()):
    """Launch a blocking 2-task job, interrupt it after a few steps, and check it comes back."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"),
                             *_args(tmp_path, data_cache, LONG_ARGS + ["cluster.wait=true"] + list(extra))],
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "default"
    _wait_metrics(run_dir / "metrics.jsonl", 3, proc)
    job = next((run_dir / "slurm").glob("*_submission.sh")).name.replace("_submission.sh", "")
    interrupt(job)
    out, err = proc.communicate(timeout=JOB_TIMEOUT_S)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert proc.returncode == 0, describe(result)
    assert f"job {job}: COMPLETED" in out
    assert "requeued job" in out and "resumed from step_" in out, describe(result)
    assert int(_scontrol(job).get("Restarts", "0")) == 1
    steps = [m["step"] for m in read_metrics(run_dir) if "loss" in m]
    assert steps == list(range(1, LONG + 1)), "metrics.jsonl holds every step once"
    assert train_losses(run_dir) == reference["long"]
    client, runs = _mlflow_runs(tmp_path / "runs")
    assert len(runs) == 1, "the requeued job continues the same MLflow run"
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted({m.step for m in history}) == list(range(1, LONG + 1))
    return job


def test_preempted_job_is_requeued_and_resumes(slurm_cluster, tmp_path, data_cache, reference):
    def preempt(job):
        # A job of the high partition needs both CPUs: Slurm sends the low job USR2, then requeues it.
        subprocess.run(["sbatch", "-p", "high", "-n", "2", "-o", "/dev/null", "--wrap", "sleep 2"],
                       check=True, capture_output=True)

    _interrupted_run(tmp_path, data_cache, reference, preempt)


def test_time_limit_signal_requeues_and_resumes(slurm_cluster, tmp_path, data_cache, reference):
    def time_limit(job):
        # What Slurm sends cluster.signal_delay_s before the time limit (--signal=USR2@delay), sent
        # now: the job itself must save and requeue (Slurm does not requeue at a time limit).
        subprocess.run(["scancel", "--signal=USR2", job], check=True, capture_output=True)

    _interrupted_run(tmp_path, data_cache, reference, time_limit)


def test_requeue_limit_stops_the_job_with_a_message(slurm_cluster, tmp_path, data_cache):
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"),
                             *_args(tmp_path, data_cache, LONG_ARGS + ["cluster.wait=true", "cluster.max_requeues=0"])],
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "default"
    _wait_metrics(run_dir / "metrics.jsonl", 3, proc)
    job = next((run_dir / "slurm").glob("*_submission.sh")).name.replace("_submission.sh", "")
    subprocess.run(["scancel", "--signal=USR2", job], check=True, capture_output=True)
    out, err = proc.communicate(timeout=JOB_TIMEOUT_S)
    assert proc.returncode != 0, out + err
    assert "cluster.max_requeues=0" in err and "submit the same command again" in err, err
    assert int(_scontrol(job).get("Restarts", "0")) == 0
    ckpts = [p.name for p in (run_dir / "checkpoints").iterdir() if (p / "manifest.json").exists()]
    assert ckpts, "the stop still saved a complete checkpoint to resume from"


def test_failing_job_fails_and_is_not_requeued(slurm_cluster, tmp_path, data_cache):
    # The data source vanishes between submission and start: a Python error inside the job.
    missing = tmp_path / "corpus"
    missing.mkdir()
    (missing / "a.txt").write_text("some text " * 100)
    args = _args(tmp_path, data_cache, ["cluster.wait=true", "data=files", f"data.source={missing}/*.txt",
                                   "cluster.setup=[\"rm -rf " + str(missing) + "\"]"])
    proc = launch(args, cwd=tmp_path, timeout=JOB_TIMEOUT_S)
    assert proc.returncode != 0, describe(proc)
    job = _job_id(proc.stdout)
    assert f"job {job}: FAILED" in proc.stderr, describe(proc)
    info = _scontrol(job)
    assert info.get("JobState") == "FAILED" and info.get("Restarts") == "0", info
    assert "requeued" not in proc.stdout


def test_a_hung_rank_ends_the_job_naming_it(slurm_cluster, tmp_path, data_cache):
    # Rank 1 of the 2-task job is SIGSTOPped after step 3 (PEERLAB_TEST_KILL_AT, inherited by the
    # job): rank 0's next collective times out after cluster.collective_timeout_s, it names rank 1
    # and exits 1, srun's --kill-on-bad-exit ends the stopped task, and the job FAILS, unrequeued.
    args = _args(tmp_path, data_cache, ["cluster.wait=true", "cluster.collective_timeout_s=10", "checkpoint.every_steps=2",
                                        "tracking.enabled=false"])
    started = time.monotonic()
    proc = launch(args, cwd=tmp_path, timeout=JOB_TIMEOUT_S, extra_env={"PEERLAB_TEST_KILL_AT": "step3:1:STOP"})
    elapsed = time.monotonic() - started
    assert proc.returncode != 0, describe(proc)
    job = _job_id(proc.stdout)
    info = _scontrol(job)
    assert info.get("JobState") == "FAILED" and info.get("Restarts") == "0", info
    run_dir = tmp_path / "runs" / "default"
    logs = "".join(p.read_text() for p in (run_dir / "slurm").glob(f"{job}_*_log.err"))
    assert "cluster.collective_timeout_s=10: rank 0 waited 10 s in a collective at step 4: rank 1 stopped after step 3" \
        in logs + proc.stderr, describe(proc) + logs[-3000:]
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_00000002"] and (run_dir / "checkpoints" / "step_00000002" / "manifest.json").exists(), ckpts
    print(f"hung rank: job {job} ended {elapsed:.1f} s after submission")


def test_sweep_runs_as_a_job_array_with_a_summary(slurm_cluster, tmp_path, data_cache):
    sweep_dir = tmp_path / "runs" / "sweeps" / "lr"
    args = COMMON + SLURM + ["cluster.wait=true", f"hydra.sweep.dir={sweep_dir}", f"run.root={tmp_path}/runs",
                             f"data.cache_dir={data_cache}", "optim.lr=1e-3,3e-3", "trainer.seed=1,2"]
    proc = launch(["-m", *args], cwd=tmp_path, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, describe(proc)
    ids = re.findall(r"submitted Slurm job (\S+)", proc.stdout)
    assert len(ids) == 4 and len({i.split("_")[0] for i in ids}) == 1, "one job array"
    table = proc.stdout[proc.stdout.index("sweep lr: 4 points"):].splitlines()
    rows = [ln.split() for ln in table[3:7]]
    for num, row in enumerate(rows):
        run_dir = sweep_dir / str(num)
        losses = train_losses(run_dir)
        vals = [m["val_loss"] for m in read_metrics(run_dir) if "val_loss" in m]
        assert row[0] == str(num) and "done" in row, row
        assert f"{losses[STEPS]:.4f}" in row and f"{vals[-1]:.4f}" in row, (row, losses[STEPS], vals)
    assert [r[1:3] for r in rows] == [[f"optim.lr={lr}", f"trainer.seed={s}"] for lr in ("0.001", "0.003")
                                      for s in (1, 2)], table
    again = subprocess.run([sys.executable, "-m", "orchestrator.sweep", str(sweep_dir)], cwd=ROOT, env=_env(),
                           capture_output=True, text=True)
    assert again.returncode == 0
    assert [ln.split()[:-1] for ln in again.stdout.strip().splitlines()[3:7]] == [r[:-1] for r in rows]
    _, runs = _mlflow_runs(tmp_path / "runs")
    assert len(runs) == 4
    assert {r.data.tags["sweep.id"] for r in runs} == {"lr"}
    assert {r.data.tags["sweep.overrides"] for r in runs} == {
        f"optim.lr={lr} trainer.seed={s}" for lr in ("0.001", "0.003") for s in (1, 2)}


@pytest.mark.parametrize("extra,path,expected", [
    (["cluster.partition=nope"], None, "cluster.partition='nope': no such Slurm partition; fix: use one of high, low"),
    (["cluster.cpus_per_task=64"], None, "Slurm rejects this request (allocation failure: Requested node configuration"),
    ([], "python-only", "sbatch, srun, sacct, scontrol, sinfo not found"),
])
def test_refusals_are_one_line_and_submit_nothing(slurm_cluster, tmp_path, data_cache, extra, path, expected):
    env = {}
    if path:  # a PATH with python and nothing of Slurm
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "python").symlink_to(sys.executable)
        env["PATH"] = str(bin_dir)
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    proc = launch(_args(tmp_path, data_cache, extra), cwd=tmp_path, extra_env=env)
    assert proc.returncode == 2, describe(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0] and "fix:" in lines[0], lines
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before
    assert not (tmp_path / "runs").exists()
