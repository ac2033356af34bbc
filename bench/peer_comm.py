"""Bytes one rank sends per token (forward + backward, fp32 values, int32 indices) for
expert-parallel PEER: the implemented dimension sharding ("dims"), row sharding ("rows",
expected distinct owner ranks under uniform usage) and the all-gather-of-rows baseline, from the
formula of docs/expert_parallel.md; "dims" is also measured with the real layer on gloo where it
runs here (E in {2, 4}).

    python bench/peer_comm.py [--d-model 1024] [--tokens 16] [--no-measure]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator.parallel.expert_parallel import bytes_per_token

HK = (32, 128, 512)
EPS = (2, 4, 8, 64)


def _measure_rank(rank, world, port, d_model, heads, top_k, tokens, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from model.config import PeerConfig
    from model.peer import PEER, defer_expert_tables
    from orchestrator.parallel.expert_parallel import DimShardedPEER

    torch.manual_seed(0)
    cfg = PeerConfig(num_experts=128 * 128, num_heads=heads, top_k=top_k, d_key=32, query_batchnorm=True,
                     activation="relu", impl="reference")
    with defer_expert_tables():
        layer = DimShardedPEER.from_peer(PEER(d_model, cfg, 0.02), dist.group.WORLD, f"ep_size_{world}")
    x = torch.randn(tokens, d_model, requires_grad=True)
    layer(x).square().sum().backward()
    if rank == 0:
        queue.put(layer.comm.bytes_sent / tokens)
    dist.barrier()
    dist.destroy_process_group()


def measure(world, d_model, hk, tokens):
    heads = 8 if hk >= 128 else 4
    top_k = hk // heads
    queue = mp.get_context("spawn").SimpleQueue()
    port = 29600 + world * 7 + hk % 97
    mp.spawn(_measure_rank, args=(world, port, d_model, heads, top_k, tokens, queue), nprocs=world)
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--no-measure", action="store_true")
    args = parser.parse_args()
    d = args.d_model
    print(f"bytes sent per token per rank, forward + backward, d={d}, fp32 values, int32 indices")
    print("| h*k | E | dims (formula) | dims (measured) | rows (formula) | all-gather rows (formula) | rows / dims |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for hk in HK:
        for ep in EPS:
            dims = bytes_per_token("dims", d, hk, ep)
            rows = bytes_per_token("rows", d, hk, ep)
            gather = bytes_per_token("allgather_rows", d, hk, ep)
            measured = "-"
            if not args.no_measure and ep <= 4:
                measured = f"{measure(ep, d, hk, args.tokens):,.0f}"
            print(f"| {hk} | {ep} | {dims:,.0f} | {measured} | {rows:,.0f} | {gather:,.0f} | {rows / dims:.2f} |")


if __name__ == "__main__":
    main()
