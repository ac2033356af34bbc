"""Predicted (orchestrator/plan.py) vs measured peak resident memory of real training runs on this
CPU, one run at a time through launch.py under /usr/bin/time -v (its "Maximum resident set size"
is the largest single process of the run: the training process, or the largest rank).

    python bench/plan_vs_measured.py                 # every config below
    python bench/plan_vs_measured.py peer ep2        # some of them

Prints one markdown row per config (bench/RESULTS.md, "Planner"). Memory figures do not depend
on the machine's load; the step times printed next to them do (record `uptime`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMMON = [f"trainer.max_steps={os.environ.get('PLAN_BENCH_STEPS', 4)}", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=2",
          "tracking.enabled=false", "trainer.progress_bar=false", "checkpoint.every_steps=0"]
BIG_DENSE = ["model=dense", "model.d_model=512", "model.num_layers=4", "model.num_attention_heads=8", "model.d_ff=2048"]
PEER_256K = ["model=peer", "model.peer.num_experts=262144"]
CONFIGS = {
    "baseline": ["model=dense", "model.d_model=64", "model.num_layers=2", "model.num_attention_heads=2",
                 "model.d_ff=128", "trainer.micro_batch_size=2"],
    "baseline_dp2": ["model=dense", "model.d_model=64", "model.num_layers=2", "model.num_attention_heads=2",
                     "model.d_ff=128", "trainer.micro_batch_size=2", "cluster.nproc_per_node=2", "parallel.dp=2"],
    "dense": BIG_DENSE,
    "peer": PEER_256K,
    "moe": ["model=moe", "model.moe.num_experts=32", "model.moe.d_ff=2048"],
    "ep2": PEER_256K + ["cluster.nproc_per_node=2", "parallel.dp=2", "parallel.ep=2"],
    "tp2": PEER_256K + ["cluster.nproc_per_node=2", "parallel.tp=2"],
    "pp2": BIG_DENSE + ["cluster.nproc_per_node=2", "parallel.pp=2", "parallel.pp_microbatches=2"],
    "zero1": PEER_256K + ["cluster.nproc_per_node=2", "parallel.dp=2", "parallel.zero_stage=1"],
    "acts": ["model=peer", "trainer.micro_batch_size=64", "data.seq_len=256"],
    "acts_blocks": ["model=peer", "trainer.micro_batch_size=64", "data.seq_len=256",
                    "trainer.activation_checkpointing=blocks"],
    "peer_1m": ["experiment=peer_1m_cpu"],
    "peer_1m_ep2": ["experiment=peer_1m_cpu", "cluster.nproc_per_node=2", "parallel.dp=2", "parallel.ep=2"],
    "peer_16k": ["experiment=peer_1m_cpu", "model.peer.num_experts=16384"],
    "peer_16k_ep2": ["experiment=peer_1m_cpu", "model.peer.num_experts=16384", "cluster.nproc_per_node=2",
                     "parallel.dp=2", "parallel.ep=2"],
}


def measure(name: str, overrides: list[str]) -> dict:
    from launch import compose_train_config
    from orchestrator.plan import plan

    cfg = compose_train_config(overrides, check_fit=False)
    p = plan(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        args = ["/usr/bin/time", "-v", sys.executable, str(ROOT / "launch.py"), *overrides, *COMMON,
                f"run.root={tmp}", f"run.name={name}"]
        start = time.time()
        proc = subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.time() - start
        if proc.returncode:
            raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) * 1024
        steps = [json.loads(line) for line in open(Path(tmp) / name / "metrics.jsonl") if '"loss"' in line]
    tokens_step = cfg.trainer.micro_batch_size * cfg.trainer.grad_accum_steps * cfg.parallel.dp * cfg.data.seq_len
    later = sorted(tokens_step / s["tokens_per_s"] for s in steps if s["step"] >= 2)  # step 1 warms up
    return {"step_s": later[len(later) // 2] if later else float("nan"),"name": name, "overrides": " ".join(overrides), "predicted": p.peak_bytes, "measured": rss,
            "plan": p, "wall_s": wall, "steps": steps, "log": proc.stdout}


def main() -> None:
    names = sys.argv[1:] or list(CONFIGS)
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print("| config | overrides | predicted peak GB | measured peak RSS GB | predicted / measured | "
          "median s/step (from step 2) | roofline s/step |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        r = measure(name, CONFIGS[name])
        print(f"| {name} | `{r['overrides']}` | {r['predicted'] / 1e9:.3f} | {r['measured'] / 1e9:.3f} | "
              f"{r['predicted'] / r['measured']:.2f} | {r['step_s']:.2f} | {r['plan'].times['step']:.2f} |", flush=True)
        for line in r["log"].splitlines():
            if line.startswith("step "):
                print(f"    {name}: {line}", flush=True)
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()
