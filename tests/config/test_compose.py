"""Every experiment and model option composes and validates; every bad override is refused with
one line naming the key and the fix, exit code 2, before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import launch
from orchestrator.config import TrainConfig, describe, load_config, validate

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"


def _compose(overrides: list[str]) -> TrainConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return launch.to_train_config(cfg)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_validates(experiment):
    # plan.check=false: whether a config fits depends on the memory of the machine running the
    # tests (model=peer_1m needs ~40 GB); the check itself is tested in tests/unit/test_plan.py.
    cfg = _compose([f"experiment={experiment}", "plan.check=false"])
    assert isinstance(cfg, TrainConfig)


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_model_option_composes_and_validates(model):
    cfg = _compose([f"model={model}", "plan.check=false"])  # see above
    assert cfg.model.ffn in ("dense", "peer", "moe", "pkm")


def test_paper_setting_is_the_paper_setting():
    p = _compose(["model=peer_1m", "plan.check=false"]).model.peer  # ~40 GB: more than a CI machine has
    assert (p.num_experts, p.num_heads, p.top_k, p.query_batchnorm) == (1024**2, 8, 16, True)


def test_default_is_a_small_peer_model_in_one_process():
    cfg = _compose([])
    assert cfg.model.ffn == "peer" and cfg.cluster.nproc_per_node == 1 and cfg.data.source == "stdlib"
    assert cfg.checkpoint.dir.startswith(cfg.run.dir)


def test_required_override_keys_exist():
    overrides = ["trainer.max_steps=7", "trainer.seed=3", "trainer.log_every=2", "trainer.eval_every=5",
                 "run.dir=/tmp/x", "checkpoint.dir=/tmp/ck", "checkpoint.every_steps=4", "model=peer",
                 "model.peer.num_experts=4096", "model.peer.num_heads=2", "model.peer.top_k=4",
                 "parallel.dp=2", "parallel.ep=1", "parallel.tp=1", "parallel.pp=1", "cluster=local",
                 "cluster.nproc_per_node=2", "tracking.uri=sqlite:////tmp/m.db", "tracking.experiment=e"]
    cfg = _compose(overrides)
    assert cfg.trainer.max_steps == 7 and cfg.model.peer.num_experts == 4096 and cfg.parallel.dp == 2
    assert cfg.run.dir == "/tmp/x" and cfg.checkpoint.dir == "/tmp/ck" and cfg.tracking.uri == "sqlite:////tmp/m.db"


# (overrides, key named in the message, a word of the fix)
BAD_OVERRIDES = [
    (["model.peer.num_experts=1000"], "model.peer.num_experts=1000", "1024"),
    (["model.peer.top_k=200"], "model.peer.top_k=200", "top_k<=128"),
    (["model.peer.d_key=63"], "model.peer.d_key=63", "d_key=64"),
    (["model.peer.num_heads=0"], "model.peer.num_heads=0", ">=1"),
    (["model.peer.activation=tanh"], "model.peer.activation='tanh'", "relu"),
    (["model.num_attention_heads=3"], "model.num_attention_heads=3", "divide"),
    (["model.sparse_layers=[9]"], "model.sparse_layers=[9]", "0..3"),
    (["model.vocab_size=100"], "model.vocab_size=100", "257"),
    (["data.seq_len=1000"], "data.seq_len=1000", "max_seq_len"),
    (["data=files"], "data.source", "data.source="),
    (["parallel.dp=2"], "parallel.dp=2", "nproc_per_node=2"),
    (["cluster.nproc_per_node=2"], "parallel.dp=1", "parallel.dp=2"),
    (["cluster.nproc_per_node=4", "parallel.dp=4", "parallel.ep=3", "model=moe"], "parallel.ep=3", "1, 2, 4"),
    (["cluster.nproc_per_node=4", "parallel.dp=4", "parallel.ep=4", "model.d_model=66", "model.num_attention_heads=1"],
     "parallel.ep=4", "common divisors of dp and d_model: 1, 2"),
    (["cluster.nproc_per_node=2", "parallel.dp=2", "parallel.ep=2", "model=dense"], "parallel.ep=2", "model=moe"),
    (["parallel.tp=2", "cluster.nproc_per_node=2", "model.num_attention_heads=1"], "parallel.tp=2", "divisors"),
    (["parallel.pp=2", "cluster.nproc_per_node=2", "parallel.zero_stage=2"], "parallel.zero_stage=2",
     "parallel.zero_stage=1"),
    (["parallel.zero_stage=3"], "parallel.zero_stage=3", "0, 1 or 2"),
    (["model.moe.top_k=3", "model=moe"], "model.moe.top_k=3", "top_k=1 or 2"),
    (["model=pkm", "model.pkm.num_values=1000"], "model.pkm.num_values=1000", "1024 (32^2)"),
    (["model=pkm", "model.pkm.top_k=200"], "model.pkm.top_k=200", "top_k<=128"),
    (["model=pkm", "model.pkm.d_key=63"], "model.pkm.d_key=63", "d_key=64"),
    (["model=pkm", "cluster.nproc_per_node=2", "parallel.dp=2", "parallel.ep=2"], "parallel.ep=2", "parallel.ep=1"),
    (["experiment=isoflop", "isoflop.methods=[dense,mlp]"], "isoflop.methods", "dense, peer, moe, pkm"),
    (["experiment=isoflop", "isoflop.budget=1e9"], "isoflop.budget=1000000000.0", "raise isoflop.budget"),
    (["trainer.max_steps=0"], "trainer.max_steps=0", ">=1"),
    (["trainer.max_steps=abc"], "trainer.max_steps='abc'", "whole number"),
    (["trainer.precision=bf16"], "trainer.precision='bf16'", "fp32"),
    (["optim.lr=-1"], "optim.lr=-1", "optim.lr="),
    (["trainer.foo=1"], "trainer.foo=1", "unknown key"),
    (["model=foo"], "model=foo", "dense, moe, peer, peer_1m"),
    (["experiment=nope"], "experiment=nope", "default"),
    (["trainer.max_steps=[1"], "trainer.max_steps=[1", "key=value"),
    (["cluster.kind=pbs"], "cluster.kind='pbs'", "local, slurm"),
    (["cluster.gpus_per_node=2"], "cluster.gpus_per_node=2", "cluster.nproc_per_node=2"),
    (["cluster.nodes=2", "parallel.dp=2"], "cluster.nodes=2", "cluster=slurm"),
    (["cluster=slurm", "cluster.nodes=2"], "parallel.dp=1", "parallel.dp=2"),
    (["cluster=slurm", "cluster.time_min=1", "cluster.signal_delay_s=90"], "cluster.signal_delay_s=90", "below 60"),
    (["cluster=slurm", "cluster.max_requeues=-1"], "cluster.max_requeues=-1", ">=0"),
    (["cluster=slurm", "cluster.extra_sbatch=[a b]"], "cluster.extra_sbatch", "name=value"),
    (["-m", "optim.lr=1e-3,-1"], "sweep point 1 (optim.lr=-1): optim.lr=-1", "optim.lr="),
    (["-m", "model.peer.num_experts=1024,1000"], "sweep point 1", "1024 (32^2)"),
    (["model=peer", "optim.expert_tables=row_sparse", "cluster.nproc_per_node=2", "parallel.dp=2",
      "parallel.zero_stage=1"], "optim.expert_tables='row_sparse'", "set parallel.zero_stage=0 or optim.expert_tables=adamw"),
    (["model=peer", "optim.expert_tables=row_sparse", "cluster.nproc_per_node=2", "parallel.pp=2"],
     "optim.expert_tables='row_sparse'", "set parallel.pp=1 or optim.expert_tables=adamw"),
    (["optim.expert_tables=sparse"], "optim.expert_tables='sparse'", "use one of: adamw, row_sparse"),
]


@pytest.mark.parametrize("overrides,key,fix", BAD_OVERRIDES, ids=[" ".join(o) for o, _, _ in BAD_OVERRIDES])
def test_bad_override_is_one_line_exit_2(overrides, key, fix, capsys):
    with pytest.raises(SystemExit) as exited:
        launch.check(overrides)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and key in err and "fix:" in err and fix in err, err


def _run_launch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_refusal_from_the_command_line_starts_nothing(tmp_path):
    proc = _run_launch("model.peer.num_experts=1000", f"run.root={tmp_path}/runs", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists(), "a refused run must leave nothing behind"


def test_cfg_job_prints_the_composed_config(tmp_path):
    proc = _run_launch("--cfg", "job", "model=moe", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ffn: moe" in proc.stdout and "trainer:" in proc.stdout and "hydra:" not in proc.stdout


def test_every_key_has_a_doc():
    lines = describe()
    assert all(line.split(": ", 1)[1].strip() for line in lines), [ln for ln in lines if not ln.split(": ", 1)[1]]
    assert any(line.startswith("model.peer.num_experts:") for line in lines)


def test_load_config_refuses_unknown_and_missing_keys():
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(
        compose_raw([]), resolve=True)
    raw["trainer"]["bogus"] = 1
    with pytest.raises(Exception, match="trainer.bogus"):
        load_config(raw)
    del raw["trainer"]["bogus"]
    del raw["optim"]["lr"]
    with pytest.raises(Exception, match="optim.lr.*missing"):
        load_config(raw)


def compose_raw(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_world_size_rule_names_every_factor():
    cfg = _compose([])
    cfg.cluster.nproc_per_node = 4
    with pytest.raises(Exception) as err:
        validate(cfg)
    msg = str(err.value)
    assert "dp=1 x tp=1 x pp=1 = 1" in msg and "world size is 4" in msg and "parallel.dp=4" in msg
