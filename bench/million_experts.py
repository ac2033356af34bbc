"""Step time of the default model with 128^2 vs 1024^2 PEER experts (equal h, k, d: 739 K vs 796 K
active parameters per token), through the real DeepSpeed engine of orchestrator/engine.py, one
process, the two models' steps interleaved so that both see the same machine load.

    python bench/million_experts.py [--steps 6] [--threads 2]
    python bench/million_experts.py --expert-tables both     # 1024^2 experts: fused AdamW vs row_sparse
    python bench/million_experts.py --row-detection          # finding the retrieved rows: mask vs gradient scan

A step is what orchestrator/train.py does at ZeRO 0: forward, engine.backward, the global
gradient norm and clipping, engine.step (fused AdamW, orchestrator/optim.py, or with
--expert-tables row_sparse the lazy row update of the tables, orchestrator/row_sparse_adamw.py);
the phases are timed separately. Needs about 6 GB (the 1024^2 model: 1.1 GB of weights, as much of gradients,
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
    parser.add_argument("--expert-tables", choices=("adamw", "row_sparse", "both"), default="adamw",
                        help="optim.expert_tables of both models; both: the 1024^2 model twice, adamw against "
                             "row_sparse (orchestrator/row_sparse_adamw.py), interleaved")
    parser.add_argument("--row-detection", action="store_true",
                        help="only time the two ways of finding the rows a step retrieved, at 1024^2 x 128")
    args = parser.parse_args()
    if args.row_detection:
        time_row_detection(args.steps, args.threads)
        return
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
    if args.expert_tables == "both":
        models = (("1024^2 adamw", 1048576, "adamw"), ("1024^2 row_sparse", 1048576, "row_sparse"))
    else:
        models = (("128^2", 16384, args.expert_tables), ("1024^2", 1048576, args.expert_tables))
    for name, n, tables in models:
        cfg = compose_train_config(["experiment=peer_1m_cpu", f"model.peer.num_experts={n}",
                                    f"optim.expert_tables={tables}"], check_fit=False)
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
    optimizer = "optimizer" if args.expert_tables == "both" else args.expert_tables
    print(f"| experts | forward | backward | norm + clip | engine.step ({optimizer}) | step | tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    medians = {}
    for name, (_, tokens, _, times) in runs.items():
        med = {k: statistics.median(v[1:]) for k, v in times.items()}
        medians[name] = med
        print(f"| {name} | " + " | ".join(f"{med[k] * 1e3:.0f}" for k in ("forward", "backward", "norm+clip", "step", "total"))
              + f" | {tokens.numel() / med['total']:,.0f} |")
    if args.expert_tables == "both":
        a, b = medians["1024^2 adamw"], medians["1024^2 row_sparse"]
        print(f"engine.step adamw / row_sparse: {a['step'] / b['step']:.2f}x; whole step: {a['total'] / b['total']:.2f}x")
    else:
        print(f"1024^2 / 128^2 step time: {medians['1024^2']['total'] / medians['128^2']['total']:.2f}x")


def time_row_detection(steps: int, threads: int) -> None:
    """The retrieved rows of one step of experiment=peer_1m_cpu's PEER layer (16 x 128 tokens x
    h=4 x k=8 = 65,536 retrievals of N = 1024^2 rows, d = 128), found two ways, interleaved:
    the mask the layer records (memset of N bools, a scatter per forward, nonzero) against a
    scan of the dense U and V gradients for non-zero rows (what needs no recording)."""
    import torch

    torch.set_num_threads(threads)
    n, d, retrievals = 1048576, 128, 16 * 128 * 4 * 8
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, n, (retrievals,), generator=gen)
    grads = [torch.zeros(n, d), torch.zeros(n, d)]
    for g in grads:
        g.index_add_(0, idx, torch.randn(retrievals, d, generator=gen))
    mask = torch.zeros(n, dtype=torch.bool)

    def by_mask():
        mask.zero_()
        mask[idx] = True
        return mask.nonzero().squeeze(1)

    def by_gradient():
        return ((grads[0] != 0).any(1) | (grads[1] != 0).any(1)).nonzero().squeeze(1)

    assert torch.equal(by_mask(), by_gradient())
    times = {"mask": [], "gradient scan": []}
    for _ in range(steps + 1):
        for name, fn in (("mask", by_mask), ("gradient scan", by_gradient)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    rows = int(by_mask().numel())
    print(f"N={n}, d={d}, {retrievals} retrievals ({rows} distinct rows), {threads} threads, median of {steps} after one warm-up")
    for name, value in med.items():
        print(f"  {name}: {value * 1e3:.2f} ms")
    print(f"gradient scan / mask: {med['gradient scan'] / med['mask']:.1f}x")


if __name__ == "__main__":
    main()
