"""cluster.slurm without a cluster: ranks and rendezvous from Slurm's variables, and the sbatch
request built from the `cluster` config section."""

from __future__ import annotations

from cluster.env import DistEnv
from cluster.slurm import exit_status, sbatch_parameters, sbatch_script, slurm_dist_env

CLUSTER = {"kind": "slurm", "nodes": 2, "nproc_per_node": 4, "gpus_per_node": 4, "cpus_per_task": 8,
           "mem_gb": 200, "partition": "gpu", "account": "proj", "qos": "high", "constraint": "a100",
           "exclusive": True, "time_min": 120, "signal_delay_s": 90, "max_requeues": 3,
           "extra_sbatch": ["reservation=big", "--mail-type=END", "hold"], "setup": ["module load cuda"],
           "wait": False, "dry_run": False}


def test_ranks_and_rendezvous_come_from_slurm():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "12345",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    out = slurm_dist_env(env)
    assert out == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 12345 % 20000)}
    assert DistEnv.from_environ(out).world_size == 8
    one = slurm_dist_env({**env, "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"})
    assert one["MASTER_ADDR"] == "127.0.0.1" and one["LOCAL_WORLD_SIZE"] == "2"


def test_every_request_key_reaches_sbatch():
    params = sbatch_parameters(CLUSTER, "run1")
    assert params["ntasks_per_node"] == 4 and params["nodes"] == 2 and params["gpus_per_node"] == 4
    script = sbatch_script(CLUSTER, "run1", "/tmp/f")
    for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--mem=200GB",
                 "--partition=gpu", "--account=proj", "--qos=high", "--constraint=a100", "--exclusive",
                 "--time=120", "--signal=USR2@90", "--reservation=big", "--mail-type=END", "--hold",
                 "--requeue", "--job-name=run1"):
        assert f"#SBATCH {flag}\n" in script, flag
    assert "module load cuda" in script and "--kill-on-bad-exit=1" in script


def test_exit_status_of_a_finished_job():
    assert exit_status("COMPLETED", "0:0") == 0
    assert exit_status("FAILED", "75:0") == 75
    assert exit_status("CANCELLED", "0:15") == 1
