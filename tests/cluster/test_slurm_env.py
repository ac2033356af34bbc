"""cluster.slurm without a cluster: ranks and rendezvous from Slurm's variables, and the sbatch
request built from the `cluster` config section."""

from __future__ import annotations

import socket

import pytest

from cluster.env import DistEnv
from cluster.rendezvous import (RendezvousError, check_port_free, expand_tasks_per_node, interface_addresses,
                                interface_environ, placement)
from cluster.slurm import exit_status, sbatch_parameters, sbatch_script, slurm_dist_env

CLUSTER = {"kind": "slurm", "nodes": 2, "nproc_per_node": 4, "gpus_per_node": 4, "cpus_per_task": 8,
           "mem_gb": 200, "partition": "gpu", "account": "proj", "qos": "high", "constraint": "a100",
           "exclusive": True, "time_min": 120, "signal_delay_s": 90, "max_requeues": 3,
           "extra_sbatch": ["reservation=big", "--mail-type=END", "hold"], "setup": ["module load cuda"],
           "wait": False, "dry_run": False, "requeue": True}


def _slurm_task_env(monkeypatch, **values):
    for key in [k for k in __import__("os").environ if k.startswith("SLURM_") or k in ("MASTER_PORT", "MASTER_ADDR")]:
        monkeypatch.delenv(key)
    for key, value in values.items():
        monkeypatch.setenv(key, value)


def test_ranks_and_rendezvous_come_from_slurm(monkeypatch):
    # Two nodes whose names resolve to addresses of this machine (an IP literal is a name too):
    # MASTER_ADDR is the first node's address and the interface is the one routed to it (here lo,
    # which a multi-node job refuses: its peers could never connect back).
    _slurm_task_env(monkeypatch, SLURM_PROCID="3", SLURM_NTASKS="4", SLURM_LOCALID="1", SLURM_JOB_ID="12345",
                    SLURM_JOB_NUM_NODES="2", SLURM_NODEID="1", SLURM_JOB_NODELIST="127.0.0.1,127.0.0.2",
                    SUBMITIT_EXECUTOR="slurm")
    with pytest.raises(RendezvousError, match="resolves to 127.0.0.1"):
        slurm_dist_env()
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu07")
    out = slurm_dist_env()
    assert out == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(20000 + 12345 % 20000)}
    assert DistEnv.from_environ(out).world_size == 4


def test_placement_line_and_tasks_per_node():
    assert expand_tasks_per_node("2(x2),1") == [2, 2, 1]
    assert placement(["node1", "node2", "node3"], [2, 2, 1]) == "node1 ranks 0-1, node2 ranks 2-3, node3 rank 4"


def test_interface_routed_to_an_address_and_loopback_refused():
    addresses = interface_addresses()
    assert addresses.get("lo") == "127.0.0.1"
    with pytest.raises(RendezvousError, match="loopback interface"):
        interface_environ("127.0.0.1", None)
    with pytest.raises(RendezvousError, match="cluster.network_interface='nope0': no such interface"):
        interface_environ("127.0.0.1", "nope0")


def test_port_in_use_is_refused_in_one_line():
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RendezvousError, match=f"cluster.master_port={port}: already in use"):
            check_port_free(port)
    check_port_free(port)


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


def test_no_requeue_reaches_sbatch():
    script = sbatch_script({**CLUSTER, "requeue": False}, "run1", "/tmp/f")
    assert "#SBATCH --no-requeue\n" in script and "#SBATCH --requeue\n" not in script
