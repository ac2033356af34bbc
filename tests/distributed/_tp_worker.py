"""One rank of the tensor-parallel tests (run by tests/distributed/test_tensor_parallel.py).

    python -m tests.distributed._tp_worker <scenario> <out_dir>   (RANK, WORLD_SIZE, MASTER_* set)

Scenarios (every rank checks itself and raises on a mismatch; results go to rank<r>.json):
    layers  tp=2 (2 ranks), float64: attention, dense MLP, PEER (reference and fused kernels) and
            the whole PEER LM, sharded vs unsharded, forward and every gradient; then the whole
            MoE LM in float32 (DeepSpeed's gate computes in float32 whatever the model's dtype).
    ep_tp   dp=2 x ep=2 x tp=2 (4 ranks), float64: the PEER layer with U and V split over tp x ep
            (d/4 columns per rank), each data-parallel rank with its own tokens.

Tolerances. float64 (1e-12 relative to the largest entry): the sharded layers add the same
products in another order (tp partial sums of a dot product, then the all-reduce), which moves
results by a few ulps (2^-52 = 2.2e-16) amplified by at most the conditioning of the softmax,
BatchNorm and attention backward; measured errors are ~1e-16 to 1e-15 (printed in the json), a
missing reduction or a wrong slice is O(1). float32 (1e-5): the same reordering at 2^-23.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def close(name, a, b, tol):
    a, b = a.detach(), b.detach()
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    scale = max(float(b.abs().max()), 1e-30)
    err = float((a - b).abs().max()) / scale
    if not err < tol:
        raise AssertionError(f"rank {dist.get_rank()}: {name} differs: max |a-b| / max |b| = {err:.3e} >= {tol}")
    return err


def shard_of(name: str, full: torch.Tensor, tp: int, r: int, d_model: int, peer_cols=None) -> torch.Tensor:
    """The slice of an unsharded parameter (or its gradient) that tp rank r holds, written
    independently of tensor_parallel.py from the Megatron layout."""
    leaf = ".".join(name.split(".")[-2:])
    if leaf == "qkv.weight":
        w = d_model // tp
        return full.view(3, d_model, d_model)[:, r * w:(r + 1) * w, :].reshape(3 * w, d_model)
    if leaf == "out.weight":
        w = d_model // tp
        return full[:, r * w:(r + 1) * w]
    if leaf == "up.weight":
        f = full.shape[0] // tp
        return full[r * f:(r + 1) * f]
    if leaf == "down.weight":
        f = full.shape[1] // tp
        return full[:, r * f:(r + 1) * f]
    if leaf in ("expert_down.weight", "expert_up.weight"):
        start, cols = peer_cols
        return full[:, start:start + cols]
    return full


def model_config(ffn: str):
    from model.config import ModelConfig, MoEConfig, PeerConfig

    return ModelConfig(
        vocab_size=257, d_model=32, num_layers=2, num_attention_heads=4, max_seq_len=16, d_ff=64, ffn=ffn,
        sparse_layers=[1], tie_embeddings=True, rope_theta=10000.0, norm_eps=1e-5, init_std=0.2,
        peer=PeerConfig(num_experts=256, num_heads=2, top_k=4, d_key=8, query_batchnorm=True, activation="gelu",
                        impl="reference"),
        moe=MoEConfig(num_experts=4, top_k=2, d_ff=64, capacity_factor=2.0, eval_capacity_factor=2.0,
                      min_capacity=4, aux_loss_coef=0.01, second_expert_sampling=False,
                      random_token_selection=False))


def layers() -> dict:
    from model.lm import CausalSelfAttention, build_model
    from model.mlp import DenseMLP
    from model.peer import PEER
    from orchestrator.parallel.dims import ParallelDims
    from orchestrator.parallel.parallelize import parallelize
    from orchestrator.parallel.tensor_parallel import (TensorParallelAttention, TensorParallelMLP,
                                                      TensorParallelPEER, is_tensor_parallel)

    dims = ParallelDims(dp=1, tp=2)
    tp, r = 2, dist.get_rank()
    group = dims.tp_group()
    dtype = torch.float64
    tol = TOL[dtype]
    errs: dict[str, float] = {}
    cfg = model_config("peer")
    d = cfg.d_model

    def check_layer(label, ref, sharded, x, peer_cols=None):
        w = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=dtype)
        x_ref, x_sh = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref, y_sh = ref(x_ref), sharded(x_sh)
        (y_ref * w).sum().backward()
        (y_sh * w).sum().backward()
        errs[f"{label}.y"] = close(f"{label}: y", y_sh, y_ref, tol)
        errs[f"{label}.x.grad"] = close(f"{label}: x.grad", x_sh.grad, x_ref.grad, tol)
        ref_params = dict(ref.named_parameters())
        for name, p in sharded.named_parameters():
            expected = shard_of(name, ref_params[name].grad, tp, r, d, peer_cols)
            errs[f"{label}.{name}"] = close(f"{label}: {name}.grad", p.grad, expected, tol)

    # The same input on both ranks (tensor parallelism splits weights, not tokens).
    x = torch.randn(3, 16, d, generator=torch.Generator().manual_seed(3), dtype=dtype)
    torch.manual_seed(0)
    attn = CausalSelfAttention(cfg, output_init_std=0.1).to(dtype)
    check_layer("attention", attn, TensorParallelAttention(copy.deepcopy(attn), group), x)
    mlp = DenseMLP(d, cfg.d_ff, 0.2, 0.1).to(dtype)
    check_layer("mlp", mlp, TensorParallelMLP(copy.deepcopy(mlp), group), x)
    peer = PEER(d, cfg.peer, init_std=0.2).to(dtype)
    for impl in ("reference", "fused"):
        sharded_input = copy.deepcopy(peer)
        sharded_input.impl = impl
        sharded = TensorParallelPEER.from_peer(sharded_input, group)
        ref_peer = copy.deepcopy(peer)
        check_layer(f"peer[{impl}]", ref_peer, sharded, x.view(-1, d), (sharded.col_start, sharded.cols))
        # Query BatchNorm: replicated, fed the same tokens, so the same running statistics.
        errs[f"peer[{impl}].running_mean"] = close("peer running_mean", sharded.query_norm.running_mean,
                                                   ref_peer.query_norm.running_mean, tol)

    # The whole LM: built from one seed, one copy parallelized.
    results = {"errs": errs}
    for ffn, mdtype in (("peer", torch.float64), ("moe", torch.float32)):
        mtol = TOL[mdtype]
        torch.manual_seed(1)
        ref = build_model(model_config(ffn)).to(mdtype)
        model = parallelize(copy.deepcopy(ref), dims)
        tokens = torch.randint(0, 257, (4, 16), generator=torch.Generator().manual_seed(5))
        if ffn == "moe":
            from deepspeed.utils import groups

            from model.moe import init_moe_process_groups
            # The reference runs without an mpu (DeepSpeed's MoE then neither splits nor gathers
            # capacity slots over tp: the plain single-process layer), the sharded model with it,
            # as deepspeed.initialize(mpu=...) sets it.
            init_moe_process_groups(ref)
            out_ref = ref(tokens, tokens)
            out_ref.loss.backward()
            groups.mpu = dims.grid()
            init_moe_process_groups(model)
        else:
            out_ref = ref(tokens, tokens)
            out_ref.loss.backward()
        out = model(tokens, tokens)
        out.loss.backward()
        merrs = {"loss": close(f"{ffn} LM loss", out.loss, out_ref.loss, mtol),
                 "logits": close(f"{ffn} LM logits", out.logits, out_ref.logits, mtol)}
        ref_params = dict(ref.named_parameters())
        peer_cols = None
        for m in model.modules():
            if isinstance(m, TensorParallelPEER):
                peer_cols = (m.col_start, m.cols)
        num_sharded = num_numbers = 0
        for name, p in model.named_parameters():
            ref_name = name
            expected = shard_of(name, ref_params[ref_name].grad, tp, r, d, peer_cols)
            merrs[name] = close(f"{ffn} LM {name}.grad", p.grad, expected, mtol)
            num_sharded += int(is_tensor_parallel(p))
            num_numbers += p.numel()
        results[ffn] = {"errs": merrs, "num_sharded": num_sharded, "numel": num_numbers,
                        "full_numel": sum(p.numel() for p in ref.parameters())}
        if ffn == "moe":
            groups.mpu = None
    return results


def ep_tp() -> dict:
    from model.peer import PEER
    from orchestrator.parallel.dims import ParallelDims
    from orchestrator.parallel.tensor_parallel import TensorParallelPEER

    dims = ParallelDims(dp=2, ep=2, tp=2)
    rank = dist.get_rank()
    coords = dims.coords(rank)
    tp_group = dims.tp_group()
    ep_group, _ = dims.expert_groups()
    dtype = torch.float64
    tol = TOL[dtype]
    cfg = model_config("peer").peer
    d = 32
    torch.manual_seed(0)
    ref = PEER(d, cfg, init_std=0.5).to(dtype)
    out = {}
    for impl in ("reference", "fused"):
        peer = copy.deepcopy(ref)
        peer.impl = impl
        sharded = TensorParallelPEER.from_peer(peer, tp_group, ep_group, dims.expert_group_name)
        assert sharded.cols == d // 4 and sharded.col_start == coords.tp * 16 + coords.dp * 8, (sharded.col_start,)
        # Each data-parallel rank has its own tokens (different counts); tp ranks share them.
        inputs = {}
        for dp in range(2):
            gen = torch.Generator().manual_seed(100 + dp)
            n = 10 + 3 * dp
            inputs[dp] = (torch.randn(n, d, generator=gen, dtype=dtype), torch.randn(n, d, generator=gen, dtype=dtype))
        ref_grads, ref_y, ref_xgrad = {}, {}, {}
        for dp, (x, w) in inputs.items():
            one = copy.deepcopy(ref)
            xr = x.clone().requires_grad_()
            y = one(xr)
            (y * w).sum().backward()
            ref_grads[dp] = {n: p.grad for n, p in one.named_parameters()}
            ref_y[dp], ref_xgrad[dp] = y, xr.grad
        x, w = inputs[coords.dp]
        xs = x.clone().requires_grad_()
        y = sharded(xs)
        (y * w).sum().backward()
        errs = {"y": close(f"{impl} y", y, ref_y[coords.dp], tol),
                "x.grad": close(f"{impl} x.grad", xs.grad, ref_xgrad[coords.dp], tol)}
        for name, p in sharded.named_parameters():
            if name.startswith("expert_"):
                # The tables' gradient holds every token of the ep group (both dp ranks).
                full = ref_grads[0][name] + ref_grads[1][name]
                expected = full[:, sharded.col_start:sharded.col_start + sharded.cols]
            else:
                expected = ref_grads[coords.dp][name]
            errs[name] = close(f"{impl} {name}.grad", p.grad, expected, tol)
        out[impl] = errs
    return {"errs": out, "coords": list(coords)}


def main() -> None:
    scenario, out_dir = sys.argv[1:3]
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    try:
        result = layers() if scenario == "layers" else ep_tp()
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
