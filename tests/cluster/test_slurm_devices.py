"""Login node vs compute node: for cluster=slurm the device and precision checks judge the job's
request (cluster.gpus_per_node, the partition's GRES as Slurm reports it), not the GPU-less machine
that submits; the job checks its own node again and fails in one line if it lacks what was asked.
The real test cluster (tests/cluster/slurm_up.sh) has no GPUs, which is what the last two need."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import launch
from tests.cluster.test_slurm import ROOT, _env, slurm_cluster  # noqa: F401 - the session fixture
from tests.helpers import describe
from tests.helpers import launch as run_launch

GPU_JOB = ["cluster=slurm", "cluster.nproc_per_node=2", "cluster.gpus_per_node=2", "parallel.dp=2",
           "trainer.device=cuda", "trainer.precision=bf16"]


def test_gpu_request_passes_validation_on_a_machine_without_gpus(tmp_path):
    jobs, _, configs = launch.check(GPU_JOB + [f"run.root={tmp_path}/runs"])
    assert configs[0].trainer.device == "cuda" and jobs[0].cluster["gpus_per_node"] == 2


@pytest.mark.parametrize("extra, key, problem", [
    (["trainer.device=cuda"], "trainer.device='cuda'", "the Slurm job asks for no GPU (cluster.gpus_per_node=0)"),
    (["trainer.precision=bf16"], "trainer.precision='bf16'", "bf16 needs GPUs and the Slurm job asks for none"),
])
def test_gpu_training_without_a_gpu_request_is_refused(tmp_path, capsys, extra, key, problem):
    with pytest.raises(SystemExit) as exited:
        launch.check(["cluster=slurm", *extra, f"run.root={tmp_path}/runs"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {key}: {problem}") and "fix: " in err, err


@pytest.mark.slow
def test_gpus_on_a_partition_without_gres_are_refused_before_submission(slurm_cluster, tmp_path):  # noqa: F811
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    proc = run_launch(GPU_JOB + ["cluster.partition=high", f"run.root={tmp_path}/runs"], cwd=tmp_path)
    assert proc.returncode == 2, describe(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cluster.gpus_per_node=2: partition 'high' has no GPUs"), lines
    assert "fix: " in lines[0]
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_the_job_fails_in_one_line_on_a_node_without_the_gpus_it_asked_for(slurm_cluster, tmp_path):  # noqa: F811
    """The login-node check passes (the request asks for GPUs); the job's own first step, on a real
    Slurm node, finds none. Run as a job step (srun) so that it is exactly what a job's rank runs
    first: train_main -> preflight.check_on_node."""
    jobs, _, _ = launch.check(GPU_JOB + [f"run.root={tmp_path}/runs", "tracking.enabled=false"])
    config = tmp_path / "config.json"
    config.write_text(json.dumps(jobs[0].args[0]))
    code = ("import json, sys; from orchestrator.train import train_main; "
            f"train_main(json.load(open({str(config)!r})))")
    proc = subprocess.run(["srun", "-N1", "-n1", "-p", "high", "--time=5", sys.executable, "-c", code], cwd=ROOT,
                          env={**_env(), "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, describe(proc)
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("srun: ")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: trainer.device='cuda': no CUDA device is visible on node ") and \
        "of Slurm job" in lines[0] and "fix: " in lines[0], lines[0]
    assert not (tmp_path / "runs").exists(), "the job stopped before writing anything"
