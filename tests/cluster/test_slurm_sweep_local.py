"""A sweep under cluster=local (Hydra's basic launcher): one run per point in <sweep dir>/<n>, each
its own MLflow run tagged with the sweep, and the table of final losses at the end."""

from __future__ import annotations

import pytest

from tests.helpers import TINY, describe, launch, read_metrics, train_losses

pytestmark = pytest.mark.slow


def test_local_sweep_table_and_tags(tmp_path):
    sweep_dir = tmp_path / "runs" / "sweeps" / "s"
    args = TINY + ["trainer.log_every=1", "trainer.eval_every=0", "trainer.max_steps=3", f"run.root={tmp_path}/runs",
                   f"hydra.sweep.dir={sweep_dir}", "optim.lr=1e-3,3e-3"]
    proc = launch(["-m", *args], cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    lines = proc.stdout[proc.stdout.index("sweep s: 2 points"):].splitlines()[3:5]
    for num, (line, lr) in enumerate(zip(lines, ("0.001", "0.003"))):
        row = line.split()
        run_dir = sweep_dir / str(num)
        val = [m["val_loss"] for m in read_metrics(run_dir) if "val_loss" in m][-1]
        assert row[:3] == [str(num), f"optim.lr={lr}", "done"], row
        assert row[3:5] == [f"{train_losses(run_dir)[3]:.4f}", f"{val:.4f}"], row
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/runs/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("peer-lab").experiment_id])
    assert sorted((r.info.run_name, r.data.tags["sweep.id"], r.data.tags["sweep.overrides"]) for r in runs) == [
        ("s_0", "s", "optim.lr=0.001"), ("s_1", "s", "optim.lr=0.003")]
