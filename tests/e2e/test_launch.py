"""`python launch.py` end to end, in a subprocess as a user runs it: training, metrics.jsonl,
MLflow, checkpoints, and a second run that resumes from the first."""

from __future__ import annotations


import pytest

from tests.helpers import TINY, describe, launch, read_metrics, train_losses

pytestmark = pytest.mark.slow


def test_train_then_resume(tmp_path, data_cache):
    root = tmp_path / "runs"
    common = TINY + [f"run.root={root}", f"data.cache_dir={data_cache}", "run.name=e2e", "trainer.log_every=5",
                     "trainer.eval_every=20", "checkpoint.every_steps=20", "optim.warmup_steps=5",
                     "tracking.experiment=e2e-test"]
    first = launch(common + ["trainer.max_steps=40"], cwd=tmp_path)
    assert first.returncode == 0, describe(first)
    run_dir = root / "e2e"

    losses = train_losses(run_dir)
    assert sorted(losses) == [5, 10, 15, 20, 25, 30, 35, 40]
    assert losses[40] < losses[5] - 0.5, f"training loss did not fall: {losses}"
    val = [m for m in read_metrics(run_dir) if "val_loss" in m]
    assert [m["step"] for m in val] == [20, 40] and val[1]["val_loss"] < val[0]["val_loss"]
    assert all(0 < m["expert_usage"] <= 1 and m["expert_kl_uniform"] >= 0 for m in val)
    committed = sorted(p.parent.name for p in (run_dir / "checkpoints").glob("step_*/manifest.json"))
    assert committed == ["step_00000020", "step_00000040"]
    assert "step 40/40" in first.stdout and "eval step 40" in first.stdout
    assert (run_dir / "config.json").exists()

    second = launch(common + ["trainer.max_steps=50"], cwd=tmp_path)
    assert second.returncode == 0, describe(second)
    assert "resumed from step_00000040" in second.stdout
    steps = [m["step"] for m in read_metrics(run_dir) if "loss" in m]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50], "resumed run must continue without duplicate steps"

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "the resumed run continues the same MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50]
    assert {"val_loss", "val_perplexity", "expert_usage", "tokens_per_s", "flops_per_s", "grad_norm"} <= set(run.data.metrics)
    assert run.data.params["model.peer.num_experts"] == "1024"
    assert int(run.data.params["counts.total_params"]) > 0
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "config.json" in artifacts


def test_resume_false_starts_fresh(tmp_path, data_cache):
    root = tmp_path / "runs"
    common = TINY + [f"run.root={root}", f"data.cache_dir={data_cache}", "trainer.log_every=2",
                     "trainer.eval_every=0", "checkpoint.every_steps=0", "tracking.enabled=false"]
    assert launch(common + ["trainer.max_steps=4"], cwd=tmp_path).returncode == 0
    again = launch(common + ["trainer.max_steps=4", "checkpoint.resume=false"], cwd=tmp_path)
    assert again.returncode == 0, describe(again)
    assert "resumed" not in again.stdout
