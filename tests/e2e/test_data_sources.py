"""`python launch.py` on JSON Lines and on a weighted mixture: per-source validation loss, a
kill/resume that continues the mixture bitwise, and bad data refused with exit 2 and one line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.helpers import TINY, describe, launch, read_metrics

pytestmark = pytest.mark.slow

STEPS = 8
COMMON = TINY + ["trainer.log_every=1", "trainer.eval_every=4", "checkpoint.every_steps=4",
                 f"trainer.max_steps={STEPS}", f"optim.decay_steps={STEPS}", "optim.warmup_steps=2",
                 "tracking.enabled=false", "checkpoint.keep_last=0"]
WORDS = "the of and to in is was for on that with as by at from it an were are which this be".split()


def _corpus(root: Path) -> dict[str, str]:
    """Two JSON Lines sources that look different (prose, and code-like lines), gzip for one file."""
    import gzip

    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("web", "code"):
        lines = []
        for i in range(150):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120)))
            if name == "code":
                text = f"def f{i}(x):\n    return x * {i}  # {text}"
            lines.append(json.dumps({"text": text}))
        (root / f"{name}-0.jsonl").write_text("\n".join(lines[:100]) + "\n")
        (root / f"{name}-1.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines[100:]) + "\n").encode()))
    return {n: str(root / f"{n}-*") for n in ("web", "code")}


def _mixture(sources: dict[str, str], weights=(0.7, 0.3)) -> str:
    items = ",".join(f"{{name:{n},source:'{s}',weight:{w}}}" for (n, s), w in zip(sources.items(), weights))
    return f"data.mixture=[{items}]"


def _losses(run_dir: Path) -> dict:
    return {(m["step"], k): v for m in read_metrics(run_dir) for k, v in m.items() if "loss" in k}


def test_mixture_run_logs_each_source_and_resumes_bitwise(tmp_path):
    sources = _corpus(tmp_path / "corpus")
    args = COMMON + ["data=mixture", _mixture(sources), "data.num_workers=2", f"data.cache_dir={tmp_path}/cache"]
    ref = launch(args + [f"run.root={tmp_path}/ref"], cwd=tmp_path)
    assert ref.returncode == 0, describe(ref)
    assert "data[web]:" in ref.stdout and "data[code]:" in ref.stdout
    reference = _losses(tmp_path / "ref" / "default")
    assert {(4, "val_loss/web"), (4, "val_loss/code"), (8, "val_loss")} <= set(reference)
    first = launch(args + [f"run.root={tmp_path}/runs"], cwd=tmp_path, extra_env={"PEERLAB_TEST_KILL_AT": "step6"})
    assert first.returncode != 0, describe(first)
    second = launch(args + [f"run.root={tmp_path}/runs"], cwd=tmp_path)
    assert second.returncode == 0, describe(second)
    assert "resumed from step_00000004" in second.stdout
    assert _losses(tmp_path / "runs" / "default") == reference


def test_bad_data_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    proc = launch(COMMON + ["data=files", f"data.source={bad}", f"data.cache_dir={tmp_path}/cache",
                            f"run.root={tmp_path}/runs"], cwd=tmp_path)
    assert proc.returncode == 2, describe(proc)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "bad.jsonl line 2" in line]
    assert len(lines) == 1 and "has no field 'text'" in lines[0] and "fix: set data.text_field" in lines[0], describe(proc)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    weights = launch(COMMON + ["data=mixture", "data.mixture=[{name:a,source:x,weight:-1}]",
                               f"run.root={tmp_path}/runs"], cwd=tmp_path)
    assert weights.returncode == 2 and "data.mixture[0].weight=-1" in weights.stderr + weights.stdout, describe(weights)
