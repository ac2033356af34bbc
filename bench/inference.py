"""Inference cost of dense, MoE, PKM and PEER LMs of equal active parameters per token: prefill and
decode tokens/s at batch 1 and 32, peak memory, and the weight bytes one decoded token reads.

    python bench/inference.py                       # CPU, every variant, fp32
    python bench/inference.py --device cuda --dtype bfloat16
    python bench/inference.py --variants peer-256sq peer-1024sq --batches 1

The LM: d=256, 4 blocks, 4 attention heads, byte vocabulary, dense blocks d_ff=1024, the middle
block (index 2) replaced by the variant's FFN. The variants' FFN blocks have the same active
parameters per token, A = 327,680 (model/flops.py's count):
  dense        d_ff = A / (2 d) = 640
  moe          8 experts, top-2, expert d_ff = A / (4 d) = 320 (+ the gate, 2,048)
  pkm-256sq    256^2 value rows, h=8 heads, k=32 rows per head, d_key=128: h k d + d h d_key
  peer-256sq   256^2 experts, h=8, k=16, d_key=128: h k 2 d + d h d_key
  peer-1024sq  1024^2 experts, same h, k, d_key
Weight bytes read per decoded token, for that FFN block alone (numbers x bytes per number):
  dense 2 d d_ff; moe d E + top_k 2 d d_ff_e; pkm d h d_key + h 2 sqrt(N) d_key/2 (its own keys per
  head) + h k d; peer d h d_key + 2 sqrt(N) d_key/2 (keys shared by the heads) + h k 2 d.
  The rest of the model (attention, the dense blocks, embeddings) is the same for every variant and
  given once. At batch > 1 tokens can share rows, so these are per-token upper bounds.

Measured, each variant in its own subprocess (peak memory is the process's): prefill = one
forward of batch x --prompt-len tokens into an empty KV cache; decode = --decode-steps steps of one
token per sequence after it. Best of --repeats after one warm-up. Peak memory: ru_maxrss (CPU,
whole process, model included) or torch.cuda.max_memory_allocated (CUDA).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from model.config import ModelConfig, MoEConfig, PeerConfig, PKMConfig  # noqa: E402

D, D_FF_STOCK, H, K, D_KEY = 256, 1024, 8, 16, 128
ACTIVE = H * K * 2 * D + D * H * D_KEY  # PEER's active parameters per token (= PKM's with k = 2K)
VARIANTS = ("dense", "moe", "pkm-256sq", "peer-256sq", "peer-1024sq")


def model_config(variant: str) -> ModelConfig:
    peer = PeerConfig(num_experts=256 ** 2, num_heads=H, top_k=K, d_key=D_KEY, query_batchnorm=True,
                      activation="relu", impl="auto")
    moe = MoEConfig(num_experts=8, top_k=2, d_ff=ACTIVE // (4 * D), capacity_factor=1.25,
                    eval_capacity_factor=8.0, min_capacity=4, aux_loss_coef=0.01,
                    second_expert_sampling=False, random_token_selection=False)  # 8.0: no drops
    pkm = PKMConfig(num_values=256 ** 2, num_heads=H, top_k=2 * K, d_key=D_KEY, query_batchnorm=True, impl="auto")
    ffn = {"dense": "dense", "moe": "moe", "pkm-256sq": "pkm"}.get(variant, "peer")
    if variant == "peer-1024sq":
        peer = dataclasses.replace(peer, num_experts=1024 ** 2)
    cfg = ModelConfig(vocab_size=257, d_model=D, num_layers=4, num_attention_heads=4, max_seq_len=1024,
                      d_ff=D_FF_STOCK, ffn=ffn, sparse_layers=[2], tie_embeddings=True, rope_theta=10000.0,
                      norm_eps=1e-5, init_std=0.02, peer=peer, moe=moe, pkm=pkm)
    return cfg


def ffn_numbers_per_token(cfg: ModelConfig, variant: str) -> int:
    """Weight numbers the variant's FFN block reads for one token (module doc)."""
    d = cfg.d_model
    if variant == "dense":
        return 2 * d * (ACTIVE // (2 * D))
    if variant == "moe":
        return d * cfg.moe.num_experts + cfg.moe.top_k * 2 * d * cfg.moe.d_ff
    if variant.startswith("pkm"):
        p = cfg.pkm
        return d * p.num_heads * p.d_key + p.num_heads * 2 * math.isqrt(p.num_values) * p.d_key // 2 + p.num_heads * p.top_k * d
    p = cfg.peer
    return d * p.num_heads * p.d_key + 2 * math.isqrt(p.num_experts) * p.d_key // 2 + p.num_heads * p.top_k * 2 * d


def shared_numbers_per_token(cfg: ModelConfig) -> int:
    """Attention, the three dense blocks, norms and the tied output projection (same everywhere)."""
    d = cfg.d_model
    return cfg.num_layers * 4 * d * d + 3 * 2 * d * cfg.d_ff + cfg.vocab_size * d + (2 * cfg.num_layers + 1) * d


def build(variant: str, device: torch.device, dtype: torch.dtype):
    from model.lm import build_model

    cfg = model_config(variant)
    if variant == "dense":
        cfg = dataclasses.replace(cfg, ffn="dense", sparse_layers=[2])
    if cfg.ffn == "moe":
        from orchestrator.model_io import ensure_moe_world

        ensure_moe_world()
    torch.manual_seed(0)
    model = build_model(cfg)
    if variant == "dense":  # the middle block's MLP at the equal-active width
        from model.mlp import DenseMLP

        model.blocks[2].ffn = DenseMLP(D, ACTIVE // (2 * D), cfg.init_std, cfg.init_std)
    if cfg.ffn == "moe":
        from model.moe import init_moe_process_groups

        init_moe_process_groups(model)
    return cfg, model.to(device=device, dtype=dtype).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def measure(variant: str, args) -> list[dict]:
    from model.lm import KVCache

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cfg, model = build(variant, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for batch in args.batches:
        gen = torch.Generator().manual_seed(batch)
        prompt = torch.randint(0, 256, (batch, args.prompt_len), generator=gen).to(device)
        best_prefill, best_decode = float("inf"), float("inf")
        cpu_prefill, cpu_decode = float("inf"), float("inf")
        for rep in range(args.repeats + 1):  # the first pass warms up (allocations, compiled loops)
            cache = KVCache(cfg, batch, device, dtype=dtype, max_len=args.prompt_len + args.decode_steps)
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            logits = model(prompt, cache=cache).logits[:, -1]
            _sync(device)
            t1, c1 = time.perf_counter(), time.process_time()
            for _ in range(args.decode_steps):
                token = logits.argmax(-1, keepdim=True)
                logits = model(token, cache=cache).logits[:, -1]
            _sync(device)
            t2, c2 = time.perf_counter(), time.process_time()
            if rep:
                best_prefill, best_decode = min(best_prefill, t1 - t0), min(best_decode, t2 - t1)
                cpu_prefill, cpu_decode = min(cpu_prefill, c1 - c0), min(cpu_decode, c2 - c1)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        ffn = ffn_numbers_per_token(cfg, variant)
        rows.append({"variant": variant, "batch": batch, "params": params,
                     "prefill_tok_s": batch * args.prompt_len / best_prefill,
                     "decode_tok_s": batch * args.decode_steps / best_decode,
                     # Per second of this process's CPU time (all its threads): less sensitive to
                     # other processes on a shared machine than wall time (CPU runs only).
                     "prefill_tok_cpu_s": batch * args.prompt_len / max(cpu_prefill, 1e-9),
                     "decode_tok_cpu_s": batch * args.decode_steps / max(cpu_decode, 1e-9),
                     "peak_bytes": peak, "ffn_numbers_per_token": ffn,
                     "ffn_bytes_per_token": ffn * torch.finfo(dtype).bits // 8,
                     "shared_bytes_per_token": shared_numbers_per_token(cfg) * torch.finfo(dtype).bits // 8})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--one", help=argparse.SUPPRESS)  # run one variant here, print JSON rows
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    rows = []
    for variant in args.variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", variant, "--device", args.device,
               "--dtype", args.dtype, "--prompt-len", str(args.prompt_len), "--decode-steps",
               str(args.decode_steps), "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--batches", *map(str, args.batches)]
        env = {**os.environ, "PYTHONPATH": ROOT, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", args.device)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        rows += json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"device {args.device}, {args.dtype}, prompt {args.prompt_len} tokens, {args.decode_steps} decode steps, "
          f"best of {args.repeats}; {torch.get_num_threads()} threads; shared weights read per token (attention, dense blocks, head): "
          f"{rows[0]['shared_bytes_per_token'] / 2**20:.2f} MiB")
    head = (f"{'variant':<12} {'batch':>5} {'params':>8} {'prefill tok/s':>13} {'decode tok/s':>12} {'peak mem':>9} "
            f"{'FFN bytes/decoded tok':>21} {'prefill tok/CPU-s':>17} {'decode tok/CPU-s':>16}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['variant']:<12} {r['batch']:>5} {r['params'] / 1e6:>7.1f}M {r['prefill_tok_s']:>13,.0f} "
              f"{r['decode_tok_s']:>12,.0f} {r['peak_bytes'] / 2**20:>6.0f}MiB {r['ffn_bytes_per_token'] / 2**10:>17.0f} KiB "
              f"{r['prefill_tok_cpu_s']:>17,.0f} {r['decode_tok_cpu_s']:>16,.0f}")


if __name__ == "__main__":
    main()
