"""PEER forward+backward: reference versus fused, side by side, with ratios.

    python bench/peer_layer.py                      # CPU, the issue's config (T=2048, d=256, N=256^2, h=8, k=16, fp32)
    python bench/peer_layer.py --device cuda        # GPU config (T=16384, d=1024, N=1024^2, bf16) + bandwidth
    python bench/peer_layer.py --tokens 512 --d-model 128 --num-experts 16384   # any size

Workloads (each for impl=reference and impl=fused):
  layer       the whole PEER module (query net, BatchNorm, product-key retrieval, gates, experts)
  layer-nouv  the same with U and V frozen (requires_grad False): no dense [N, d] U/V gradients
              are allocated, everything else (dx, query net, BatchNorm and key gradients) is;
              shows the layer's own working set without the 2 x N x d gradient buffers that
              both impls must allocate (DeepSpeed/AdamW take dense grads)
  experts     model.kernels.peer_expert_mix alone (fixed random indices and gates): the part the
              kernels replace, and the one the bandwidth accounting describes
Every pass starts with all gradients set to None (what zero_grad(set_to_none=True) leaves
between training steps), so no pass pays for accumulating into a previous pass's gradients.
Time: median of --iters forward+backward passes after --warmup (on CUDA forward and backward are
timed separately with CUDA events).
Peak memory: each (workload, impl) runs in a fresh subprocess. CPU, two numbers:
  peak RSS  growth of the resident set over one steady-state forward+backward: one pass first
            (it pays one-off costs: library code paged in, thread pools, BLAS/oneDNN buffers),
            its gradients dropped, free heap memory returned to the OS (glibc malloc_trim), then the
            kernel's high-water mark reset (/proc/self/clear_refs) and VmHWM after the second
            pass minus RSS before it. Where clear_refs cannot be
            written, the first pass's ru_maxrss growth (one-off costs included). Includes what
            the allocator keeps and op-internal temporaries (glibc returns freed blocks above its
            mmap threshold, which adapts up to 32 MiB, to the OS; smaller ones may stay resident).
  tensors   peak of the summed sizes of live tensors created by aten ops during one more such
            pass (a TorchDispatchMode tracks each output storage until it is freed): independent
            of the allocator, but blind to temporaries inside an op.
CUDA: torch.cuda.max_memory_allocated growth over the pass.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import weakref

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model.config import PeerConfig  # noqa: E402
from model.kernels import peer_expert_mix, resolve_impl  # noqa: E402
from model.peer import PEER  # noqa: E402

CPU_DEFAULTS = dict(tokens=2048, d_model=256, num_experts=256**2, heads=8, top_k=16, d_key=128, dtype="float32")
GPU_DEFAULTS = dict(tokens=16384, d_model=1024, num_experts=1024**2, heads=8, top_k=16, d_key=128, dtype="bfloat16")


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_reset() -> bool:
    """Reset this process's peak-RSS mark (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def malloc_trim() -> None:
    """Give the heap's free memory back to the OS (glibc), so that the next pass's growth in RSS
    counts its own allocations rather than reusing pages the previous pass left resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def tensor_peak_bytes(step) -> int:
    """Peak summed bytes of the live tensors that aten ops create during one pass."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    live, state = {}, {"now": 0, "peak": 0}

    def freed(key):
        state["now"] -= live.pop(key)

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    storage = t.untyped_storage()
                    key = storage.data_ptr()
                    if storage.nbytes() and key not in live:
                        live[key] = storage.nbytes()
                        state["now"] += storage.nbytes()
                        state["peak"] = max(state["peak"], state["now"])
                        weakref.finalize(storage, freed, key)
            return out

    with Track():
        y, backward = step()
        backward()
        del y, backward
    gc.collect()
    return state["peak"]


def build(args, workload, impl, device, dtype):
    torch.manual_seed(0)
    T, D, N, H, K = args.tokens, args.d_model, args.num_experts, args.heads, args.top_k
    x = torch.randn(T, D, device=device, dtype=dtype)
    grad_y = torch.randn(T, D, device=device, dtype=dtype)
    if workload in ("layer", "layer-nouv"):
        cfg = PeerConfig(num_experts=N, num_heads=H, top_k=K, d_key=args.d_key, query_batchnorm=True,
                         activation="relu", impl=impl)
        layer = PEER(D, cfg, init_std=0.02).to(device=device, dtype=dtype)
        if workload == "layer-nouv":
            layer.expert_down.weight.requires_grad_(False)
            layer.expert_up.weight.requires_grad_(False)
        x.requires_grad_()

        def zero_grad():
            x.grad = None
            layer.zero_grad(set_to_none=True)

        def step():
            zero_grad()
            y = layer(x)
            return y, lambda: y.backward(grad_y)

        step.zero_grad = zero_grad

        return step
    down = (torch.randn(N, D, device=device, dtype=dtype) / math.sqrt(D)).requires_grad_()
    up = (torch.randn(N, D, device=device, dtype=dtype) * 0.02).requires_grad_()
    gates = torch.softmax(torch.randn(T, H, K, device=device), -1).to(dtype).requires_grad_()
    idx = torch.randint(0, N, (T, H, K), device=device)
    x.requires_grad_()
    leaves = (x, down, up, gates)

    def zero_grad():
        for t in leaves:
            t.grad = None

    def step():
        zero_grad()
        y = peer_expert_mix(x, down, up, gates, idx, "relu", impl)
        return y, lambda: y.backward(grad_y)

    step.zero_grad = zero_grad

    return step


def run_one(args, workload, impl) -> dict:
    """In this (fresh) process: peak memory of the first pass, then timings."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    step = build(args, workload, impl, device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tensor_peak = None
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        y, backward = step()
        backward()
        sync()
        peak = torch.cuda.max_memory_allocated() - before
        del y, backward
    else:
        before = current_rss_bytes()
        y, backward = step()
        backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        del y, backward
        step.zero_grad()
        gc.collect()
        malloc_trim()
        before = current_rss_bytes()
        if hwm_reset():
            y, backward = step()
            backward()
            peak = hwm_bytes() - before
            del y, backward
        tensor_peak = tensor_peak_bytes(step)
    for _ in range(args.warmup):
        y, backward = step()
        backward()
    fwd, bwd, total = [], [], []
    for _ in range(args.iters):
        if device.type == "cuda":
            e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            e0.record()
            y, backward = step()
            e1.record()
            backward()
            e2.record()
            sync()
            fwd.append(e0.elapsed_time(e1) / 1e3)
            bwd.append(e1.elapsed_time(e2) / 1e3)
            total.append(fwd[-1] + bwd[-1])
        else:
            t0 = time.perf_counter()
            y, backward = step()
            t1 = time.perf_counter()
            backward()
            t2 = time.perf_counter()
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            total.append(t2 - t0)
    return dict(workload=workload, impl=impl, backend=resolve_impl(impl, device), peak_bytes=peak,
                tensor_peak_bytes=tensor_peak,
                fwd_s=statistics.median(fwd), bwd_s=statistics.median(bwd), total_s=statistics.median(total))


def copy_bandwidth(device) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted)."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 4 * 10 / (start.elapsed_time(end) / 1e3)


def must_move_bytes(args, elem: int) -> tuple[int, int, int]:
    """(forward, backward, dense-grad overhead) bytes of the expert compute, as the issue counts:
    forward reads the M=h*k rows of U and of V per token, x, writes y (plus idx, gates, the saved
    fp32 pre-activations); backward reads the rows of U and V again, x and dy, writes dx, and
    read-modify-writes every retrieved row of the fp32 dU and dV buffers. The overhead (not
    counted in the bandwidth) zeroes the dense fp32 [N, d] buffers and casts them to the weight
    dtype."""
    T, D, N, M = args.tokens, args.d_model, args.num_experts, args.heads * args.top_k
    small = T * M * (8 + elem + 4)
    fwd = 2 * T * M * D * elem + 2 * T * D * elem + small
    bwd = 2 * T * M * D * elem + 3 * T * D * elem + 2 * T * M * D * 4 * 2 + small + T * M * 4
    overhead = 2 * N * D * (4 + 4 + elem)
    return fwd, bwd, overhead


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    for key in ("tokens", "d_model", "num_experts", "heads", "top_k", "d_key"):
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--workloads", default="layer,layer-nouv,experts")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        workload, impl = args.child.split(":")
        print(json.dumps(run_one(args, workload, impl)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch.cuda.is_available() is False")

    print(f"PEER fwd+bwd, device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"torch {torch.__version__}: T={args.tokens} d={args.d_model} N={args.num_experts} h={args.heads} "
          f"k={args.top_k} d_key={args.d_key} {args.dtype}, median of {args.iters}")
    results = {}
    for workload in args.workloads.split(","):
        for impl in ("reference", "fused"):
            cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", f"{workload}:{impl}"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{workload}/{impl} failed:\n{out.stderr}")
            results[workload, impl] = json.loads(out.stdout.strip().splitlines()[-1])

    cpu = args.device == "cpu"
    header = f"{'workload':<10} {'impl':<21} {'fwd':>9} {'bwd':>9} {'fwd+bwd':>9} {'peak mem':>11}"
    header += f" {'tensors':>9}" if cpu else ""
    print(header)
    print("-" * len(header))
    for workload in args.workloads.split(","):
        ref, fused = results[workload, "reference"], results[workload, "fused"]
        for r in (ref, fused):
            print(f"{workload:<10} {r['impl'] + ' (' + r['backend'] + ')':<21} {r['fwd_s'] * 1e3:7.1f}ms "
                  f"{r['bwd_s'] * 1e3:7.1f}ms {r['total_s'] * 1e3:7.1f}ms {fmt_bytes(r['peak_bytes']):>11}"
                  + (f" {fmt_bytes(r['tensor_peak_bytes']):>9}" if cpu else ""))
        print(f"{workload:<10} {'ratio ref/fused':<21} {ref['fwd_s'] / fused['fwd_s']:8.2f}x {ref['bwd_s'] / fused['bwd_s']:8.2f}x "
              f"{ref['total_s'] / fused['total_s']:8.2f}x {ref['peak_bytes'] / max(fused['peak_bytes'], 1):10.2f}x"
              + (f" {ref['tensor_peak_bytes'] / max(fused['tensor_peak_bytes'], 1):8.2f}x" if cpu else ""))
    if args.device == "cuda" and ("experts", "fused") in results:
        elem = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
        fwd_bytes, bwd_bytes, overhead = must_move_bytes(args, elem)
        peak_bw = copy_bandwidth("cuda")
        r = results["experts", "fused"]
        print(f"\nmeasured copy bandwidth {peak_bw / 1e9:,.0f} GB/s; must-move bytes fwd {fmt_bytes(fwd_bytes)}, "
              f"bwd {fmt_bytes(bwd_bytes)} (+ dense grad zero/cast {fmt_bytes(overhead)}, not counted)")
        for name, nbytes, secs, target in (("forward", fwd_bytes, r["fwd_s"], 0.7), ("backward", bwd_bytes, r["bwd_s"], 0.5)):
            bw = nbytes / secs
            print(f"fused experts {name:<8} {bw / 1e9:8,.0f} GB/s = {bw / peak_bw:6.1%} of copy bandwidth (target {target:.0%})")


if __name__ == "__main__":
    main()
