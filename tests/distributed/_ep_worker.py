"""One rank of the expert-parallel tests (run by tests/distributed/test_expert_parallel.py).

    python -m tests.distributed._ep_worker <scenario> <dtype> <out_dir>   (RANK, WORLD_SIZE, MASTER_* set)

Scenarios: layer (sharded vs unsharded PEER, forward and gradients, byte count), uneven (ranks
with different token counts), engine (DeepSpeed engine: what each rank owns), row_sparse (the
row-sparse optimizer on the sharded tables against the unsharded layer). Raises on mismatch.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

from model.config import PeerConfig
from model.peer import PEER
from orchestrator.parallel.expert_parallel import DimShardedPEER, bytes_per_token

# Tolerances. float64: the sharded layer adds the E partial dot products of u_i . x in another
# order than one dot over d, and the rest is the same arithmetic: agreement to ~1e-15 relative.
# float32: the same reordering costs a few ulps (2^-23 = 1.2e-7) per value, amplified at most
# by the conditioning of the softmax/BatchNorm backward; 1e-5 relative to the largest entry is far
# above that and far below any real error (a missing or doubled exchange is O(1)).
TOL = {"float64": 1e-11, "float32": 1e-5}


def close(name, a, b, tol):
    a, b = a.detach(), b.detach()
    scale = max(float(b.abs().max()), 1e-30)
    err = float((a - b).abs().max()) / scale
    if not err < tol:
        raise AssertionError(f"rank {dist.get_rank()}: {name} differs: max |a-b| / max |b| = {err:.3e} >= {tol}")
    return err


# The sharded layer's per-rank compute runs the kernels of its `impl` (model/kernels: reference
# gathers, or the fused gathered_dot / weighted_gather_sum); every rank checks both against the
# unsharded reference layer in one process (a second spawn per impl would double the test time).
SHARDED_IMPLS = ("reference", "fused")


def layer(dtype_name: str, uneven: bool) -> dict:
    dtype = getattr(torch, dtype_name)
    rank, world = dist.get_rank(), dist.get_world_size()
    d_model, heads, top_k = 16, 2, 4
    cfg = PeerConfig(num_experts=256, num_heads=heads, top_k=top_k, d_key=8, query_batchnorm=True,
                     activation="gelu", impl="reference")
    torch.manual_seed(0)
    ref = PEER(d_model, cfg, init_std=0.5).to(dtype)
    shardeds = {}
    for impl in SHARDED_IMPLS:
        peer = copy.deepcopy(ref)
        peer.impl = impl
        shardeds[impl] = DimShardedPEER.from_peer(peer, dist.group.WORLD, f"ep_size_{world}")
    num_tokens = 12 + (3 * rank if uneven else 0)
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(num_tokens, d_model, generator=gen, dtype=dtype)
    w = torch.randn(num_tokens, d_model, generator=gen, dtype=dtype)
    x_ref = x.clone().requires_grad_()
    y_ref = ref(x_ref)
    (y_ref * w).sum().backward()
    tol = TOL[dtype_name]
    c = d_model // world
    full_grads = {}
    for name in ("expert_down", "expert_up"):
        full_grads[name] = getattr(ref, name).weight.grad.clone()
        dist.all_reduce(full_grads[name])
    per_impl = {}
    for impl, sharded in shardeds.items():
        x_sh = x.clone().requires_grad_()
        y_sh = sharded(x_sh)
        sharded.comm.reset()
        (y_sh * w).sum().backward()
        bwd_bytes = sharded.comm.bytes_sent
        # Query BatchNorm statistics come from the local tokens, as in the unsharded layer.
        running_mean_err = close(f"{impl}: running_mean", sharded.query_norm.running_mean,
                                 ref.query_norm.running_mean, tol)
        sharded.comm.reset()
        sharded(x_sh)  # a forward alone, for the forward byte count
        fwd_bytes = sharded.comm.bytes_sent
        errs = {"y": close(f"{impl}: y", y_sh, y_ref, tol),
                "x.grad": close(f"{impl}: x.grad", x_sh.grad, x_ref.grad, tol)}
        for name in ("query.weight", "sub_keys1", "sub_keys2", "query_norm.weight", "query_norm.bias"):
            errs[name] = close(f"{impl}: {name}", dict(sharded.named_parameters())[name].grad,
                               dict(ref.named_parameters())[name].grad, tol)
        # U and V: the sharded grad of a column slice holds every group token's contribution; the
        # unsharded layer's grads summed over ranks is the same thing.
        for name in ("expert_down", "expert_up"):
            errs[name] = close(f"{impl}: {name}", getattr(sharded, name).weight.grad,
                               full_grads[name][:, rank * c:(rank + 1) * c], tol)
        errs["running_mean"] = running_mean_err
        per_impl[impl] = {"errs": errs, "fwd_bytes": fwd_bytes, "bwd_bytes": bwd_bytes}
    sharded = shardeds[SHARDED_IMPLS[-1]]
    out = {"impls": per_impl, "tokens": num_tokens,
           "expert_numel": sum(p.numel() for p in sharded.parameters() if getattr(p, "allreduce", True) is False),
           "full_expert_numel": 2 * cfg.num_experts * d_model}
    if not uneven:
        m = heads * top_k
        vb = torch.finfo(dtype).bits // 8
        out["formula_fwd"] = bytes_per_token("dims", d_model, m, world, value_bytes=vb, backward=False) * num_tokens
        out["formula_total"] = bytes_per_token("dims", d_model, m, world, value_bytes=vb) * num_tokens
    return out


def engine(zero_stage: int) -> dict:
    """A tiny PEER LM through parallelize + build_engine: count what this rank owns."""
    import deepspeed
    from launch import compose_train_config
    from model.lm import build_model
    from model.peer import defer_expert_tables
    from orchestrator.engine import build_engine
    from orchestrator.parallel.dims import ParallelDims
    from orchestrator.parallel.parallelize import expert_parameters, parallelize

    world = dist.get_world_size()
    cfg = compose_train_config([
        "model.d_model=64", "model.num_layers=2", "model.num_attention_heads=2", "model.max_seq_len=64",
        "data.seq_len=64", "model.peer.num_experts=1024", "model.peer.num_heads=2", "model.peer.top_k=4",
        "model.peer.d_key=32", f"cluster.nproc_per_node={world}", f"parallel.dp={world}",
        f"parallel.ep={world}", f"parallel.zero_stage={zero_stage}", "trainer.micro_batch_size=2",
        "trainer.eval_batches=2", "run.root=/tmp"], check_fit=False)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    torch.manual_seed(0)
    dims = ParallelDims.from_config(cfg.parallel)
    with defer_expert_tables():
        model = build_model(cfg.model)
    model = parallelize(model, dims)
    eng, _ = build_engine(model, cfg, bf16=False)
    tokens = torch.randint(0, 257, (2, 64))
    out = eng(tokens, tokens)
    eng.backward(out.loss)
    eng.step()
    experts = expert_parameters(eng.module)
    expert_ids = {id(p) for p in experts}
    opt = eng.optimizer
    if zero_stage == 0:
        state_numel = sum(v.numel() for p in experts for k, v in opt.state[p].items() if k != "step")
    else:
        # ZeRO keeps fp32 partitions of each param group; the expert group's are the moe groups.
        state_numel = 0
        for i, group in enumerate(opt.optimizer.param_groups):
            if group.get("moe"):
                for p in group["params"]:
                    state_numel += sum(v.numel() for k, v in opt.optimizer.state[p].items() if k != "step")
    return {"expert_numel": sum(p.numel() for p in experts),
            "expert_state_numel": state_numel,
            "full_expert_numel": 2 * cfg.model.peer.num_experts * cfg.model.d_model,
            "num_expert_tensors": len(expert_ids),
            "has_moe_layers": bool(eng.has_moe_layers)}


def row_sparse(steps: int) -> dict:
    """optim.expert_tables=row_sparse on a 2-rank expert-parallel PEER layer (float64, no query
    BatchNorm, so that routing is per token): each rank feeds its own tokens; the reference is the
    unsharded layer fed both ranks' tokens, stepped by the same optimizer in one process. Only the
    tables are optimized (the routing weights stay fixed on both sides). Every rank must end with
    its columns of the reference's tables and moments and with the reference's per-row counts."""
    from orchestrator.row_sparse_adamw import RowSparseAdamW, peer_tables

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = PeerConfig(num_experts=256, num_heads=2, top_k=4, d_key=8, query_batchnorm=False,
                     activation="gelu", impl="reference")
    torch.manual_seed(0)
    ref = PEER(16, cfg, init_std=0.5).double()
    sharded = DimShardedPEER.from_peer(copy.deepcopy(ref), dist.group.WORLD, f"ep_size_{world}")
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, foreach=False)

    def tables(layer):
        return [layer.expert_down.weight, layer.expert_up.weight]

    ref_opt = RowSparseAdamW(tables(ref), peer_tables(ref), **kwargs)
    opt = RowSparseAdamW(tables(sharded), peer_tables(sharded), dp_group=dist.group.WORLD, dp_size=world, **kwargs)
    for step in range(steps):
        xs = [torch.randn(6, 16, generator=torch.Generator().manual_seed(1000 * step + r), dtype=torch.float64)
              for r in range(world)]
        ws = [torch.randn(6, 16, generator=torch.Generator().manual_seed(1000 * step + r + 500), dtype=torch.float64)
              for r in range(world)]
        (ref(torch.cat(xs)) * torch.cat(ws)).sum().backward()
        (sharded(xs[rank]) * ws[rank]).sum().backward()
        ref_opt.step()
        opt.step()
        for o in (ref_opt, opt):
            o.zero_grad()
    cols = slice(sharded.col_start, sharded.col_start + sharded.cols)
    counts = []
    for mine, full in zip(tables(sharded), tables(ref)):
        close("table", mine, full[:, cols], TOL["float64"])
        for key in ("exp_avg", "exp_avg_sq"):
            close(key, opt.state[mine][key], ref_opt.state[full][key][:, cols], TOL["float64"])
        if not torch.equal(opt.state[mine]["row_step"], ref_opt.state[full]["row_step"]):
            raise AssertionError(f"rank {rank}: per-row step counts differ from the unsharded layer's")
        gathered = [torch.zeros_like(opt.state[mine]["row_step"]) for _ in range(world)]
        dist.all_gather(gathered, opt.state[mine]["row_step"])
        counts.append([int(c.sum()) for c in gathered])
    row_step = ref_opt.state[ref.expert_down.weight]["row_step"]
    return {"row_step_sums_by_rank": counts, "never_retrieved": int((row_step == 0).sum()),
            "max_row_step": int(row_step.max())}


def main() -> None:
    scenario, arg, out_dir = sys.argv[1:4]
    dist.init_process_group("gloo")
    try:
        if scenario == "engine":
            result = engine(int(arg))
        elif scenario == "row_sparse":
            result = row_sparse(int(arg))
        else:
            result = layer(arg, uneven=scenario == "uneven")
        with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()  # no rank tears gloo down while another still exchanges
    except BaseException:
        dist.destroy_process_group()
        raise
    # The result is on disk and every rank is past the barrier: leave without the interpreter's
    # teardown, where gloo's threads can abort the process ("terminate called without an active
    # exception", SIGABRT) after the work is done and fail a test that passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
