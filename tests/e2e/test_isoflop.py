"""`python launch.py experiment=isoflop` end to end: a tiny study (two methods x two model sizes)
plans, runs as one sweep, and ends with the report (table, plot, MLflow run); bad studies are
refused before anything starts."""

from __future__ import annotations

import json

import pytest

from tests.helpers import describe, launch

# Tiny models; the ladder replaces the model's sizes, so only what it leaves is set here.
TINY_STUDY = ["data.seq_len=32", "model.max_seq_len=32", "model.pkm.num_values=256", "model.pkm.top_k=4",
              "model.pkm.d_key=16", "model.pkm.num_heads=2", "trainer.micro_batch_size=4", "trainer.eval_batches=2",
              "isoflop.min_steps=5", "isoflop.methods=[dense,pkm]",
              "isoflop.ladder=[{d_model: 32, num_layers: 1, num_attention_heads: 2, d_ff: 64},"
              "{d_model: 64, num_layers: 2, num_attention_heads: 2, d_ff: 128}]"]


@pytest.mark.slow
def test_tiny_isoflop_study_runs_and_reports(tmp_path, data_cache):
    root, sweep = tmp_path / "runs", tmp_path / "runs" / "study"
    args = ["experiment=isoflop", "isoflop.budget=3e9", *TINY_STUDY, f"run.root={root}",
            f"data.cache_dir={data_cache}", f"hydra.sweep.dir={sweep}", "tracking.experiment=iso-test"]
    proc = launch(args, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "isoFLOP plan: 4 points" in proc.stdout

    rows = json.loads((sweep / "report" / "isoflop.json").read_text())["points"]
    assert [(r["method"], r["rung"]) for r in rows] == [("dense", 0), ("dense", 1), ("pkm", 0), ("pkm", 1)]
    for r in rows:
        assert r["done"] and r["val_loss"] is not None
        assert abs(r["flops_spent"] - 3e9) <= r["flops_per_token"] * 4 * 32 / 2  # within half a step
    assert all(r["usage"] is None for r in rows if r["method"] == "dense")
    assert all(0 < r["usage"] <= 1 and r["kl_uniform"] >= 0 for r in rows if r["method"] == "pkm")
    table = (sweep / "report" / "isoflop.md").read_text()
    assert table.count("| pkm |") == 2 and "best point per method" in table
    assert (sweep / "report" / "isoflop.png").read_bytes()[:4] == b"\x89PNG"

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("iso-test").experiment_id])
    names = sorted(r.info.run_name for r in runs)
    assert names == ["study_0", "study_1", "study_2", "study_3", "study_report"]
    report_run = next(r for r in runs if r.info.run_name == "study_report")
    artifacts = {a.path for a in client.list_artifacts(report_run.info.run_id)}
    assert {"isoflop.md", "isoflop.png", "isoflop.json"} <= artifacts


@pytest.mark.parametrize("args, start", [
    # (the other refusals are checked without a subprocess in tests/config/test_isoflop.py)
    (["isoflop.budget=1e6"], "error: isoflop.budget=1000000.0: buys 0 optimizer steps"),
])
def test_bad_study_is_refused_in_one_line(tmp_path, args, start):
    proc = launch(["experiment=isoflop", *args, f"run.root={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 2, describe(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start) and "; fix: " in lines[0], proc.stderr
    assert not (tmp_path / "sweeps").exists()
