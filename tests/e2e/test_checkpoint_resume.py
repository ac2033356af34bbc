"""Exact, crash-safe resumption, end to end: `python launch.py` in subprocesses that are killed,
signalled or fed damaged checkpoints, compared with an uninterrupted run.

Exactness is bitwise (==) on CPU in fp32: resuming restores every input of the next step (weights,
AdamW moments, LR schedule, data position and RNG of every rank, BatchNorm statistics), and the
computation itself is deterministic, so there is nothing to tolerate.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY, describe, launch, moto_server, read_metrics, until_up

pytestmark = pytest.mark.slow

STEPS = 12
# decay_steps is pinned so that the schedule does not depend on max_steps (which may change on resume).
COMMON = TINY + ["trainer.log_every=1", "trainer.eval_every=3", "checkpoint.every_steps=4",
                 f"trainer.max_steps={STEPS}", f"optim.decay_steps={STEPS}", "optim.warmup_steps=2",
                 "tracking.enabled=false", "checkpoint.keep_last=0"]
TWO = ["cluster.nproc_per_node=2", "parallel.dp=2", "parallel.zero_stage=1"]
# Expert-parallel PEER: each rank holds half of every expert's columns (saved in its rank file).
EP2 = TWO + ["parallel.ep=2"]
LAYOUTS = {"one": [], "two": TWO, "ep2": EP2}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    """Uninterrupted runs, one per layout."""
    out = {}
    for name, extra in LAYOUTS.items():
        root = tmp_path_factory.mktemp(f"ref_{name}")
        proc = launch(COMMON + extra + [f"run.root={root}", f"data.cache_dir={data_cache}"], cwd=root)
        assert proc.returncode == 0, describe(proc)
        out[name] = all_losses(root / "default")
        assert sorted(s for s, kind in out[name] if kind == "loss") == list(range(1, STEPS + 1))
    return out


def all_losses(run_dir: Path) -> dict[tuple[int, str], float]:
    """Train and validation losses by (step, kind): validation uses the BatchNorm running
    statistics, which differ per rank, so it checks that every rank's buffers were restored."""
    return {(m["step"], kind): m[kind] for m in read_metrics(run_dir) for kind in ("loss", "val_loss") if kind in m}


def _args(tmp_path, data_cache, extra=()):
    return COMMON + list(extra) + [f"run.root={tmp_path}/runs", f"data.cache_dir={data_cache}"]


def _complete(run_dir: Path) -> list[str]:
    ckpt = run_dir / "checkpoints"
    return sorted(p.name for p in ckpt.iterdir() if (p / "manifest.json").exists()) if ckpt.exists() else []


@pytest.mark.parametrize("layout,kill_at,resumed_from", [
    ("one", "step4", 4),             # killed right after a save
    ("one", "step7", 4),             # killed right before one
    # A stop signal that arrives after step N completes is acted on at the end of step N+1, the
    # step during which it arrived: that step finishes, all ranks save, the run exits 75.
    ("one", "step6::TERM", 7),
    ("two", "step5", 4),
    ("two", "step6:1:USR2", 7),      # one rank signalled: every rank stops and saves together
    ("ep2", "step5", 4),
])
def test_interrupted_run_resumes_bitwise(tmp_path, data_cache, reference, layout, kill_at, resumed_from):
    extra = LAYOUTS[layout]
    first = launch(_args(tmp_path, data_cache, extra), cwd=tmp_path, extra_env={"PEERLAB_TEST_KILL_AT": kill_at})
    if "TERM" in kill_at or "USR2" in kill_at:
        assert first.returncode == 75, describe(first)
        assert "stopped by a signal" in first.stdout + first.stderr
    else:
        assert first.returncode != 0, describe(first)
    run_dir = tmp_path / "runs" / "default"
    assert _complete(run_dir)[-1] == f"step_{resumed_from:08d}"

    second = launch(_args(tmp_path, data_cache, extra), cwd=tmp_path)
    assert second.returncode == 0, describe(second)
    assert f"resumed from step_{resumed_from:08d}" in second.stdout
    steps = [m["step"] for m in read_metrics(run_dir) if "loss" in m]
    assert steps == list(range(1, STEPS + 1)), "metrics.jsonl must hold every step once"
    assert all_losses(run_dir) == reference[layout]


@pytest.mark.parametrize("layout,kill_at", [
    ("one", "file2"), ("one", "before_manifest"), ("two", "file1:1"),
])
def test_sigkill_during_save_resumes_from_previous_complete(tmp_path, data_cache, reference, layout, kill_at):
    extra = LAYOUTS[layout]
    first = launch(_args(tmp_path, data_cache, extra + ["trainer.max_steps=7"]), cwd=tmp_path)
    assert first.returncode == 0, describe(first)  # complete checkpoints at 4 and 7 (the end)
    second = launch(_args(tmp_path, data_cache, extra + ["trainer.max_steps=10", "checkpoint.every_steps=3"]),
                    cwd=tmp_path, extra_env={"PEERLAB_TEST_KILL_AT": kill_at})
    assert second.returncode != 0, describe(second)  # killed while saving step 9
    run_dir = tmp_path / "runs" / "default"
    assert _complete(run_dir)[-1] == "step_00000007"
    assert (run_dir / "checkpoints" / "step_00000009").exists(), "the killed save left its partial files"
    third = launch(_args(tmp_path, data_cache, extra), cwd=tmp_path)
    assert third.returncode == 0, describe(third)
    assert "resumed from step_00000007" in third.stdout
    got = all_losses(run_dir)
    # The first run ended at step 7 and evaluated there (the reference evaluates every 3 steps).
    assert set(got) - set(reference[layout]) == {(7, "val_loss")}
    assert {k: v for k, v in got.items() if k in reference[layout]} == reference[layout]
    assert not (run_dir / "checkpoints" / "step_00000009").exists() or \
        (run_dir / "checkpoints" / "step_00000009" / "manifest.json").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_latest_checkpoint_falls_back(tmp_path, data_cache, reference, damage):
    first = launch(_args(tmp_path, data_cache, ["trainer.max_steps=8"]), cwd=tmp_path)
    assert first.returncode == 0, describe(first)
    run_dir = tmp_path / "runs" / "default"
    victim = run_dir / "checkpoints" / "step_00000008" / "state_rank_00000.safetensors"
    data = victim.read_bytes()
    if damage == "flip":  # a byte of the tensors (the file's end), not of its JSON header
        at = len(data) - 1000
        victim.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
    elif damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    else:
        victim.unlink()
    second = launch(_args(tmp_path, data_cache), cwd=tmp_path)
    assert second.returncode == 0, describe(second)
    lines = [ln for ln in second.stdout.splitlines() if "is damaged" in ln]
    assert len(lines) == 1 and "step_00000008" in lines[0] and victim.name in lines[0], second.stdout
    assert "resumed from step_00000004" in second.stdout
    assert all_losses(run_dir) == reference["one"]


def test_config_change_is_refused_with_every_key(tmp_path, data_cache):
    assert launch(_args(tmp_path, data_cache, ["trainer.max_steps=4"]), cwd=tmp_path).returncode == 0
    proc = launch(_args(tmp_path, data_cache, ["model.d_ff=96", "optim.lr=1e-2", "trainer.max_steps=20",
                                          "trainer.log_every=5"]), cwd=tmp_path)
    assert proc.returncode == 2, describe(proc)
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: checkpoint.dir=") and "model.d_ff (128 -> 96)" in err and "optim.lr" in err, err
    assert "max_steps" not in err and "log_every" not in err, "schedule length and intervals may change"
    assert "checkpoint.resume=false" in err


def test_changing_the_global_batch_is_refused_and_a_layout_change_reshards(tmp_path, data_cache):
    """Another ep resumes through the portable state (tests/e2e/test_layout_change.py checks it
    in depth); another global batch is another data order: refused, with the numbers."""
    assert launch(_args(tmp_path, data_cache, EP2 + ["trainer.max_steps=2"]), cwd=tmp_path).returncode == 0
    bad = launch(_args(tmp_path, data_cache, TWO + ["trainer.grad_accum_steps=2", "trainer.max_steps=3"]), cwd=tmp_path)
    assert bad.returncode == 2, describe(bad)
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1, describe(bad)
    err = re.sub(r"^\[rank\d+\]: ", "", lines[0])  # a multi-process run's console lines carry their rank
    assert err.startswith("error: trainer.grad_accum_steps=2: step_00000002 was trained with a global batch of 8 "
                          "sequences") and "this run's is 16" in err and "checkpoint.init_from" in err, err
    proc = launch(_args(tmp_path, data_cache, TWO + ["trainer.max_steps=3"]), cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "resharded step_00000002 from dp=2 ep=2 tp=1 pp=1 (2 ranks) to dp=2 ep=1 tp=1 pp=1 (2 ranks)" in proc.stdout


def test_load_step_and_retention(tmp_path, data_cache, reference):
    args = _args(tmp_path, data_cache, ["checkpoint.every_steps=2", "checkpoint.keep_last=2", "trainer.max_steps=8"])
    assert launch(args, cwd=tmp_path).returncode == 0
    run_dir = tmp_path / "runs" / "default"
    assert _complete(run_dir) == ["step_00000006", "step_00000008"]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_") and
                not (p / "manifest.json").exists()]
    proc = launch(_args(tmp_path, data_cache, ["checkpoint.load_step=6"]), cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "resumed from step_00000006" in proc.stdout
    assert all_losses(run_dir) == reference["one"]
    bad = launch(_args(tmp_path, data_cache, ["checkpoint.load_step=5"]), cwd=tmp_path)
    assert bad.returncode == 2 and "checkpoint.load_step=5" in bad.stderr and "12" in bad.stderr, describe(bad)


def test_external_sigterm_saves_and_exits_75(tmp_path, data_cache):
    """A real signal from outside, as a scheduler sends it, to a running single-process run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = _args(tmp_path, data_cache, ["trainer.max_steps=100000", "checkpoint.every_steps=0"])
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "default" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, f"{out}\n{err}"
    last = max(m["step"] for m in read_metrics(tmp_path / "runs" / "default"))
    assert _complete(tmp_path / "runs" / "default") == [f"step_{last:08d}"]
    assert "stopped by a signal" in out


@pytest.fixture()
def s3(tmp_path):
    """A real S3 API: moto's server on 127.0.0.1, with a bucket made by the test."""
    pytest.importorskip("s3fs")
    import s3fs

    with moto_server() as endpoint:
        env = {"AWS_ACCESS_KEY_ID": "test-key-id", "AWS_SECRET_ACCESS_KEY": "sup3r-s3cret-value",
               "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": endpoint}
        fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"], endpoint_url=endpoint)
        until_up(lambda: fs.mkdir("ckpt-bucket"))
        yield env, fs


def test_s3_round_trip_and_resume(tmp_path, data_cache, reference, s3):
    env, fs = s3
    url = "s3://ckpt-bucket/runs/exp1"
    args = _args(tmp_path, data_cache, [f"checkpoint.dir={url}", "tracking.enabled=true"])
    first = launch(args, cwd=tmp_path, extra_env={**env, "PEERLAB_TEST_KILL_AT": "step6"})
    assert first.returncode != 0, describe(first)
    fs.invalidate_cache()
    listed = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("ckpt-bucket/runs/exp1"))
    assert listed == ["step_00000004"], listed
    files = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("ckpt-bucket/runs/exp1/step_00000004"))
    assert files == ["manifest.json", "rank_00000.pt", "state_rank_00000.safetensors"], files
    second = launch(args, cwd=tmp_path, extra_env=env)
    assert second.returncode == 0, describe(second)
    assert "resumed from step_00000004" in second.stdout
    # A checkpoint is each rank's rank file and tensor file; a resume reads the tensors by ranged
    # GETs (one process needs all of them) and its own rank file.
    manifest4 = json.loads(fs.cat_file("ckpt-bucket/runs/exp1/step_00000004/manifest.json"))
    assert set(manifest4["files"]) == {"rank_00000.pt", "state_rank_00000.safetensors"}, manifest4["files"]
    tensor_bytes = sum(c["end"] - c["begin"] for e in manifest4["portable"]["tensors"].values() for c in e["chunks"])
    line = next(ln for ln in second.stdout.splitlines() if "resumed from step_00000004" in ln)
    read, total = (int(x.replace(",", "")) for x in
                   re.search(r"bytes read per rank ([\d,]+)-[\d,]+ of ([\d,]+)", line).groups())
    assert read == total == tensor_bytes, (read, total, tensor_bytes, line)
    run_dir = tmp_path / "runs" / "default"
    assert all_losses(run_dir) == reference["one"]
    # Credentials never reach logs, saved configs, manifests or MLflow.
    secret = env["AWS_SECRET_ACCESS_KEY"]
    assert secret not in first.stdout + first.stderr + second.stdout + second.stderr
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    manifest = json.loads(fs.cat_file("ckpt-bucket/runs/exp1/step_00000012/manifest.json"))
    assert secret not in json.dumps(manifest)
    assert secret.encode() not in (tmp_path / "runs" / "mlflow.db").read_bytes()


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EXPLOIT_MARKER', '/tmp/peerlab-exploit')}",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, data_cache):
    """Even with a manifest whose checksums match (an attacker can rewrite both), loading never
    unpickles arbitrary objects: weights-only loading refuses them."""
    assert launch(_args(tmp_path, data_cache, ["trainer.max_steps=4"]), cwd=tmp_path).returncode == 0
    ckpt = tmp_path / "runs" / "default" / "checkpoints" / "step_00000004"
    marker = tmp_path / "exploit-ran"
    os.environ["EXPLOIT_MARKER"] = str(marker)
    try:
        import torch
        from orchestrator.checkpoint import sha256_file

        victim = ckpt / "rank_00000.pt"  # the pickled part: RNG states, data position
        torch.save({"rng": _Exploit()}, victim)
        manifest = json.loads((ckpt / "manifest.json").read_text())
        manifest["files"][victim.name].update(size=victim.stat().st_size, sha256=sha256_file(str(victim)))
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
    finally:
        del os.environ["EXPLOIT_MARKER"]
    proc = launch(_args(tmp_path, data_cache), cwd=tmp_path)
    assert proc.returncode != 0
    assert "refusing to load step_00000004" in proc.stderr and "allow-list" in proc.stderr, describe(proc)
    assert not marker.exists(), "loading a checkpoint executed code"
