"""Whole training steps, tokens/s: model=peer (reference and fused) against model=dense at the
same active FLOPs per token.

    python bench/train_step.py                         # CPU, conf/model/peer.yaml vs dense, 16 x 128 tokens
    python bench/train_step.py --device cuda --dtype bfloat16 --model peer_1m --batch 8 --seq-len 2048

A step is forward, loss, backward and a torch AdamW step of the LM from model/ (no DeepSpeed:
its engine adds the same overhead to every variant). The AdamW is the trainer's
(orchestrator/optim.py: fused at ZeRO 0); `--optimizer single-tensor` takes torch's default path,
as the figures before 2026-12-03 did. Variants:
  peer/reference, peer/fused   conf/model/<--model>.yaml (ffn=peer) with model.peer.impl set
  dense/equal-flops            the same LM with the PEER block replaced by a dense MLP whose
                               d_ff gives that block the PEER block's forward FLOPs per token
                               (retrieval + experts, model/flops.py: 4 d d_ff = PEER FLOPs)
  dense/stock                  conf/model/dense.yaml as is (every block d_ff = model.d_ff)
Time: median step time over --steps after --warmup steps, one process, variants run in turn.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import yaml  # noqa: E402

from model.config import ModelConfig, MoEConfig, PeerConfig  # noqa: E402
from model.flops import count_model  # noqa: E402
from model.lm import build_model  # noqa: E402
from model.mlp import DenseMLP  # noqa: E402
from orchestrator.optim import adamw_kwargs  # noqa: E402

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "model")


def load_model_config(name: str) -> ModelConfig:
    """conf/model/<name>.yaml over its `defaults` (dense), without Hydra."""
    with open(os.path.join(CONF, f"{name}.yaml")) as f:
        values = yaml.safe_load(f)
    base = {}
    for parent in values.pop("defaults", []):
        if parent != "_self_":
            base = dataclasses.asdict(load_model_config(parent))
    for key, value in values.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value
    base["peer"] = PeerConfig(**base["peer"])
    base["moe"] = MoEConfig(**base["moe"])
    return ModelConfig(**base)


def variants(args) -> dict[str, tuple[ModelConfig, int | None]]:
    peer_cfg = load_model_config(args.model)
    assert peer_cfg.ffn == "peer"
    counts = count_model(peer_cfg, args.seq_len)
    peer_flops = counts.breakdown["peer_retrieval"].flops_fwd + counts.breakdown["peer_experts"].flops_fwd
    peer_flops //= len(peer_cfg.sparse_layer_indices())
    equal_d_ff = max(1, round(peer_flops / (4 * peer_cfg.d_model)))
    dense_cfg = dataclasses.replace(peer_cfg, ffn="dense")
    return {
        "peer/reference": (dataclasses.replace(peer_cfg, peer=dataclasses.replace(peer_cfg.peer, impl="reference")), None),
        "peer/fused": (dataclasses.replace(peer_cfg, peer=dataclasses.replace(peer_cfg.peer, impl="fused")), None),
        "dense/equal-flops": (dense_cfg, equal_d_ff),
        "dense/stock": (dense_cfg, peer_cfg.d_ff),
    }


def build(cfg: ModelConfig, sparse_d_ff: int | None, peer_cfg: ModelConfig, device, dtype):
    torch.manual_seed(0)
    model = build_model(cfg)
    if sparse_d_ff is not None:  # the PEER model's sparse blocks get a dense MLP of this width
        for i in peer_cfg.sparse_layer_indices():
            model.blocks[i].ffn = DenseMLP(cfg.d_model, sparse_d_ff, cfg.init_std)
    return model.to(device=device, dtype=dtype)


def flops_of(model: torch.nn.Module, cfg: ModelConfig, sparse_d_ff, peer_cfg, seq_len) -> int:
    if sparse_d_ff is None:
        return count_model(cfg, seq_len).flops_per_token_train
    dense = count_model(cfg, seq_len)
    per_block = 2 * 2 * cfg.d_model * (sparse_d_ff - cfg.d_ff)
    return dense.flops_per_token_train + 3 * per_block * len(peer_cfg.sparse_layer_indices())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="peer", help="conf/model/<name>.yaml with ffn=peer")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--optimizer", default="trainer", choices=["trainer", "single-tensor"],
                        help="trainer: AdamW as the trainer builds it at ZeRO 0 (fused); single-tensor: torch's default")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tokens_per_step = args.batch * args.seq_len
    all_variants = variants(args)
    peer_cfg = all_variants["peer/reference"][0]
    print(f"training step, model={args.model} (d={peer_cfg.d_model}, layers={peer_cfg.num_layers}, "
          f"N={peer_cfg.peer.num_experts}, h={peer_cfg.peer.num_heads}, k={peer_cfg.peer.top_k}), "
          f"{args.batch} x {args.seq_len} tokens, {args.device} {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, AdamW {args.optimizer}, median of {args.steps} steps")
    print(f"{'variant':<18} {'sparse-block FFN':<22} {'train GFLOP/tok':>15} {'step':>9} {'tokens/s':>10} {'vs dense/eq':>11}")
    rows = {}
    for name, (cfg, sparse_d_ff) in all_variants.items():
        model = build(cfg, sparse_d_ff, peer_cfg, device, dtype)
        params = list(model.parameters())
        path = adamw_kwargs(None, params) if args.optimizer == "trainer" else {"foreach": False}
        opt = torch.optim.AdamW(params, lr=1e-4, **path)
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=gen).to(device)
        times = []
        for step in range(args.warmup + args.steps):
            sync()
            t0 = time.perf_counter()
            loss = model(tokens[:, :-1], tokens[:, 1:]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
        ffn = (f"PEER impl={cfg.peer.impl}" if sparse_d_ff is None else f"dense d_ff={sparse_d_ff}")
        rows[name] = (ffn, flops_of(model, cfg, sparse_d_ff, peer_cfg, args.seq_len), step_s)
        del model, opt
    base = rows["dense/equal-flops"][2]
    for name, (ffn, flops, step_s) in rows.items():
        print(f"{name:<18} {ffn:<22} {flops / 1e9:15.4f} {step_s * 1e3:7.1f}ms {tokens_per_step / step_s:10,.0f} "
              f"{step_s / base:10.2f}x")


if __name__ == "__main__":
    main()
