"""Sweeps: each point's run directory and tags, the MLflow store made once before the points
start, and the summary table.

    python -m orchestrator.sweep runs/sweeps/2026-11-22_10-00-00     # table of a sweep's points

A sweep (`python launch.py -m optim.lr=1e-3,3e-3 ...`) runs one point per combination, each in
<sweep dir>/<job number>/ (its run.dir), where launch.py writes `sweep.json` (sweep id, job number,
the point's overrides, the Slurm job id) before the point starts. The table reads those files and
each point's metrics.jsonl and config.json; it needs no MLflow and works while a sweep runs.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Optional

from orchestrator.tracking import default_tracking_uri

SWEEP_FILE = "sweep.json"


def prepare_tracking_store(uri: Optional[str], experiment: str, run_root: str) -> str:
    """Create the MLflow store and the experiment once, before a sweep's jobs start: several jobs
    creating one new sqlite database at once race ("Online migration expected to match one row")."""
    import mlflow

    uri = uri or default_tracking_uri(run_root)
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri[len("sqlite:///"):]) or ".", exist_ok=True)
    client = mlflow.MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment)
    return uri


def write_point(run_dir: str, sweep_id: str, num: int, overrides: list[str], job_id: Optional[str] = None) -> None:
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, SWEEP_FILE)
    record = {"sweep_id": sweep_id, "num": num, "overrides": list(overrides)}
    if job_id is not None:
        record["slurm_job_id"] = job_id
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)


# Point generators: a config with this key set stands for the runs that the function makes of it
# (`module:function`, called with the resolved config dict and a label for what it prints).
POINT_GENERATORS = {"isoflop": "orchestrator.isoflop:generate_points"}


def generate(raw: dict, label: str, validate_base) -> Optional[tuple[list[tuple[dict[str, Any], list[str]]], bool]]:
    """([(values to set, the same as override strings)], is_sweep) from the point generator whose
    key the config sets; None for an ordinary run. `validate_base()` runs first, so that the base
    config's own errors name its own keys."""
    import importlib

    for key, spec in POINT_GENERATORS.items():
        if raw.get(key) is not None:
            validate_base()
            module, _, name = spec.partition(":")
            return getattr(importlib.import_module(module), name)(raw, label)
    return None


def point_values(sweep_dir: str, num: int, given_keys: set[str], tags: list[str], overrides: list[str]) -> dict[str, Any]:
    """The config values a sweep gives its point `num` (set before the point is validated): its own
    run.dir (<sweep dir>/<num>) and run.name (<sweep id>_<num>) unless the sweep sets them, and its
    MLflow tags: sweep.id, sweep.num and the point's overrides."""
    sweep_id = os.path.basename(os.path.normpath(sweep_dir))
    values: dict[str, Any] = {"tracking.tags": [*tags, f"sweep.id={sweep_id}", f"sweep.num={num}",
                                                "sweep.overrides=" + " ".join(overrides)]}
    if "run.dir" not in given_keys:
        values["run.dir"] = os.path.join(sweep_dir, str(num))
    if "run.name" not in given_keys:
        values["run.name"] = f"{sweep_id}_{num}"
    return values


def summary(sweep_dir: str, finished: bool, isoflop: bool) -> str:
    """What a sweep prints at its end: the table of its points (and an isoFLOP study's report), or
    where to find them once its Slurm jobs are done."""
    if not finished:
        lines = [f"table of final losses once the jobs are done: python -m orchestrator.sweep {sweep_dir}"]
        if isoflop:
            lines.append(f"isoFLOP report once the jobs are done: python -m orchestrator.isoflop report {sweep_dir}")
        return "\n".join(lines)
    text = table(sweep_dir)
    if isoflop:
        from orchestrator.isoflop import report

        text += "\n" + report(sweep_dir)
    return text


def hooks(sweep_dir: str, cfg) -> dict[str, Any]:
    """What a sweep does around its points, for the launcher (cluster.launchers.SweepHooks): the
    tracking store made once before any point starts (from the first point's config `cfg`), each
    point's sweep.json written when it starts (with its Slurm job id), and the summary at the end."""
    sweep_id = os.path.basename(os.path.normpath(sweep_dir))
    tracking, run_root, isoflop = cfg.tracking, cfg.run.root, cfg.isoflop is not None

    def before_start() -> None:
        if tracking.enabled:
            prepare_tracking_store(tracking.uri, tracking.experiment, run_root)

    def on_started(job, job_id: Optional[str]) -> None:
        write_point(job.run_dir, sweep_id, job.num, job.overrides, job_id=job_id)

    def print_summary(finished: bool) -> None:
        print(summary(sweep_dir, finished, isoflop), flush=True)

    return {"sweep_dir": sweep_dir, "before_start": before_start, "on_started": on_started, "summary": print_summary}


def points(sweep_dir: str) -> list[dict[str, Any]]:
    """One row per point of the sweep in `sweep_dir`, in job-number order."""
    rows = []
    for name in os.listdir(sweep_dir):
        run_dir = os.path.join(sweep_dir, name)
        meta_path = os.path.join(run_dir, SWEEP_FILE)
        if not os.path.isfile(meta_path):
            continue
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        row: dict[str, Any] = {"num": meta["num"], "overrides": meta["overrides"], "run_dir": run_dir,
                               "job_id": meta.get("slurm_job_id"), "step": 0, "max_steps": None,
                               "train_loss": None, "val_loss": None}
        config_path = os.path.join(run_dir, "config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                row["max_steps"] = json.load(f)["trainer"]["max_steps"]
        for record in _metrics(os.path.join(run_dir, "metrics.jsonl")):
            row["step"] = max(row["step"], record.get("step", 0))
            if isinstance(record.get("loss"), (int, float)):
                row["train_loss"] = record["loss"]
            if isinstance(record.get("val_loss"), (int, float)):
                row["val_loss"] = record["val_loss"]
        row["status"] = ("done" if row["max_steps"] and row["step"] >= row["max_steps"]
                         else f"step {row['step']}" if row["step"] else "no metrics")
        rows.append(row)
    return sorted(rows, key=lambda r: r["num"])


def table(sweep_dir: str) -> str:
    rows = points(sweep_dir)
    if not rows:
        return f"no sweep points in {sweep_dir} (no */{SWEEP_FILE})"
    header = ["#", "overrides", "status", "train loss", "val loss", "run dir"]
    body = [[str(r["num"]), " ".join(r["overrides"]) or "-", r["status"], _loss(r["train_loss"]),
             _loss(r["val_loss"]), _shown(r["run_dir"])] for r in rows]
    if any(r["job_id"] for r in rows):
        header.insert(3, "slurm job")
        for line, r in zip(body, rows):
            line.insert(3, r["job_id"] or "-")
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return f"sweep {os.path.basename(os.path.normpath(sweep_dir))}: {len(rows)} points\n" + "\n".join(lines)


def _shown(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _loss(value: Optional[float]) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m orchestrator.sweep <sweep dir>   (e.g. runs/sweeps/<date>_<time>)", file=sys.stderr)
        return 2
    if not os.path.isdir(argv[0]):
        print(f"error: {argv[0]}: not a directory; fix: give a sweep directory (runs/sweeps/<name>)", file=sys.stderr)
        return 2
    print(table(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
