"""Step time of the default model with 128^2 vs 1024^2 PEER experts (equal h, k, d: 739 K vs 796 K
active parameters per token), through the real DeepSpeed engine of orchestrator/engine.py, one
process, the two models' steps interleaved so that both see the same machine load.

    python bench/million_experts.py [--steps 6] [--threads 2]

A step is what orchestrator/train.py does at ZeRO 0: forward, engine.backward, the global
gradient norm and clipping, engine.step (fused AdamW, orchestrator/optim.py); the phases are
timed separately. Needs about 6 GB (the 1024^2 model: 1.1 GB of weights, as much of gradients,
2.2 GB of AdamW moments).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    torch.set_num_threads(args.threads)
    import deepspeed

    from launch import compose_train_config
    from model.lm import build_model
    from orchestrator.engine import build_engine

    deepspeed.init_distributed("gloo")
    runs = {}
    for name, n in (("128^2", 16384), ("1024^2", 1048576)):
        cfg = compose_train_config(["experiment=peer_1m_cpu", f"model.peer.num_experts={n}"], check_fit=False)
        torch.manual_seed(0)
        engine, _ = build_engine(build_model(cfg.model), cfg, bf16=False)
        tokens = torch.randint(0, 257, (cfg.trainer.micro_batch_size, cfg.data.seq_len))
        runs[name] = (engine, tokens, cfg.optim.grad_clip, {"forward": [], "backward": [], "norm+clip": [], "step": [], "total": []})

    def step(engine, tokens, clip, times):
        t0 = time.perf_counter()
        out = engine(tokens, tokens)
        t1 = time.perf_counter()
        engine.backward(out.loss)
        t2 = time.perf_counter()
        params = [p for p in engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
        t3 = time.perf_counter()
        engine.step()
        t4 = time.perf_counter()
        for key, value in zip(("forward", "backward", "norm+clip", "step", "total"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
            times[key].append(value)

    for i in range(args.steps + 1):
        for engine, tokens, clip, times in runs.values():
            step(engine, tokens, clip, times)
    print(f"median of {args.steps} steps after one warm-up, {args.threads} threads, 16 x 128 tokens, ms")
    print("| experts | forward | backward | norm + clip | engine.step (AdamW) | step | tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    medians = {}
    for name, (_, tokens, _, times) in runs.items():
        med = {k: statistics.median(v[1:]) for k, v in times.items()}
        medians[name] = med
        print(f"| {name} | " + " | ".join(f"{med[k] * 1e3:.0f}" for k in ("forward", "backward", "norm+clip", "step", "total"))
              + f" | {tokens.numel() / med['total']:,.0f} |")
    print(f"1024^2 / 128^2 step time: {medians['1024^2']['total'] / medians['128^2']['total']:.2f}x")


if __name__ == "__main__":
    main()
