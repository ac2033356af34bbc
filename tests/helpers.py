"""Shared helpers for tests that run `python launch.py` as a user would."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A model small enough for a few seconds of CPU training per launch, with every kind of block.
TINY = ["model.d_model=64", "model.num_layers=2", "model.num_attention_heads=2", "model.d_ff=128",
        "model.max_seq_len=64", "data.seq_len=64", "model.peer.num_experts=1024", "model.peer.num_heads=2",
        "model.peer.top_k=4", "model.peer.d_key=32", "model.moe.d_ff=128", "model.moe.num_experts=4",
        "trainer.micro_batch_size=4", "trainer.eval_batches=2", "trainer.progress_bar=false"]


def launch(args: list[str], cwd: Path, timeout: int = 600, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def saved_activation_bytes(model, inputs, targets):
    """(bytes of the tensors autograd keeps for the backward of model(inputs, targets), the output):
    every saved tensor's storage counted once, the model's own parameters left out."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(inputs, targets)
    return sum(seen.values()), out


def until_up(fn, timeout_s: float = 30.0):
    """fn() once it stops raising (a server still starting), or its last exception after timeout_s."""
    import time

    deadline = time.time() + timeout_s
    while True:
        try:
            return fn()
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.3)


@contextlib.contextmanager
def moto_server(extra_env: dict | None = None):
    """A real S3 (and IAM) API: moto's server on 127.0.0.1 on a free port; yields its endpoint URL.
    Skips the test where moto's server is not installed."""
    import shutil

    import pytest

    from cluster.local import free_port

    if not shutil.which("moto_server"):
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    server = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, **(extra_env or {})},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)
