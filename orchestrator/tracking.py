"""Rank-0 side effects in one object: console lines, the progress bar, metrics.jsonl and MLflow.

Every rank builds a `Reporter`; on ranks other than 0 every method is a no-op, so the train loop
never branches on rank to print or log (DESIGN principle 12).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Optional

from orchestrator.config import TrackingConfig
from orchestrator.storage import redact

# MLflow caps one param value at 6000 characters; longer values (lists) are cut with a marker.
_MLFLOW_PARAM_MAX = 6000


def default_tracking_uri(run_root: str) -> str:
    return "sqlite:///" + os.path.abspath(os.path.join(run_root, "mlflow.db"))


class Reporter:
    """Console, progress bar, metrics.jsonl and MLflow for rank 0; silent elsewhere."""

    def __init__(self, rank: int, run_dir: str, tracking: TrackingConfig, run_root: str,
                 run_name: str, max_steps: int, progress_bar: bool):
        self.enabled = rank == 0
        self.run_dir = run_dir
        self._tracking = tracking
        self._run_root = run_root
        self._run_name = run_name
        self._max_steps = max_steps
        self._want_bar = progress_bar
        self._bar = None
        self._metrics_file = None
        self.mlflow_run_id: Optional[str] = None
        self._mlflow = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, start_step: int, resumed_run_id: Optional[str]) -> None:
        """Open metrics.jsonl (dropping lines past `start_step` left by a run that died after its
        last checkpoint) and start or continue the MLflow run."""
        if not self.enabled:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        path = os.path.join(self.run_dir, "metrics.jsonl")
        _truncate_after_step(path, start_step)
        self._metrics_file = open(path, "a", encoding="utf-8")
        if self._tracking.enabled:
            self._start_mlflow(resumed_run_id)
        # A bar is for a terminal; in a log file its redraws are noise, and the step lines carry the ETA.
        if self._want_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self._max_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, file=sys.stderr, mininterval=1.0, smoothing=0.1)

    def _start_mlflow(self, resumed_run_id: Optional[str]) -> None:
        import mlflow

        uri = self._tracking.uri or default_tracking_uri(self._run_root)
        if uri.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(uri[len("sqlite:///"):]) or ".", exist_ok=True)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(self._tracking.experiment)
        if resumed_run_id:
            run = mlflow.start_run(run_id=resumed_run_id)
        else:
            run = mlflow.start_run(run_name=self._run_name)
        self._mlflow = mlflow
        self.mlflow_run_id = run.info.run_id
        # tracking.tags ('key=value'): the sweep id and a point's overrides, or the user's own.
        tags = dict(t.split("=", 1) if "=" in t else (t, "") for t in getattr(self._tracking, "tags", []))
        if tags:
            mlflow.set_tags(tags)
        self.print(f"mlflow: experiment {self._tracking.experiment!r}, run {self.mlflow_run_id} at {redact(uri)}")

    def close(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._mlflow is not None:
            self._mlflow.end_run(status=status)
            self._mlflow = None

    # ------------------------------------------------------------------ outputs
    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def log_params(self, params: dict[str, Any]) -> None:
        if self._mlflow is None:
            return
        existing = self._mlflow.get_run(self.mlflow_run_id).data.params
        fresh = {k: _param_value(v) for k, v in params.items() if k not in existing}
        if fresh:
            self._mlflow.log_params(fresh)

    def log_artifact(self, path: str) -> None:
        if self._mlflow is not None:
            self._mlflow.log_artifact(path)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """One JSON line with `step` first, the same values to MLflow at that step."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        if self._metrics_file is not None:
            self._metrics_file.write(json.dumps(record) + "\n")
            self._metrics_file.flush()
        if self._mlflow is not None:
            finite = {k: float(v) for k, v in metrics.items()
                      if isinstance(v, (int, float)) and math.isfinite(float(v))}
            self._mlflow.log_metrics(finite, step=step)
        if self._bar is not None and "loss" in metrics:
            self._bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MLFLOW_PARAM_MAX else text[: _MLFLOW_PARAM_MAX - 3] + "..."


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _truncate_after_step(path: str, step: int) -> None:
    """Keep only lines with step <= `step`, written atomically, so a resumed run does not
    duplicate the steps that a crashed run logged after its last checkpoint."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError):
            continue  # a line cut by a crash
    if len(kept) == len(lines):
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class Stopwatch:
    """Wall time between `lap()` calls; the train loop's tokens/s and FLOP/s window."""

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed
