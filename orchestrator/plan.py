"""Know before you launch: memory per rank, communication per step, FLOPs and a roofline step time
of a TrainConfig, without building the model.

    python -m orchestrator.plan <the same overrides as launch.py>      # one config, per rank
    python -m orchestrator.plan experiment=peer_1m plan.device=h100 plan.table=true   # layouts x devices

The overrides are composed by launch.py's own `compose_train_config` (Hydra stays in launch.py).
launch.py refuses a run that this model says cannot fit (orchestrator/validation.py calls
`check_fits`); `plan.check=false` overrides. The model, term by term, is docs/planner.md; the
evidence (predicted vs measured peak RSS, predicted vs counted bytes) is bench/RESULTS.md.

Units: bytes and FLOPs per rank unless named otherwise; "step" = one optimizer step.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field, replace

from model.config import ModelConfig
from model.flops import count_model
from orchestrator.config import TrainConfig
from orchestrator.parallel.expert_parallel import bytes_per_token

GB = 1e9
GIB = 2**30


# ----------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class Device:
    """One accelerator (or this CPU host): what the roofline and the fit check need."""

    name: str
    memory_bytes: float  # usable memory per rank
    memory_bandwidth: float  # bytes/s
    peak_flops: dict  # precision -> FLOP/s (dense)
    intra_node_bandwidth: float  # bytes/s per rank per direction within a node
    inter_node_bandwidth: float  # bytes/s per rank per direction across nodes
    baseline_bytes: float  # resident memory of a training process before the model (interpreter, torch, DeepSpeed; CUDA context)
    source: str


DEVICES = {
    # Datasheet figures, dense (no sparsity). NVLink figures are the bidirectional aggregate / 2.
    "h100": Device("NVIDIA H100 SXM5 80 GB", 80 * GB, 3.35e12, {"bf16": 989e12, "fp32": 67e12},
                   450 * GB, 50 * GB, 1.5 * GB,
                   "NVIDIA H100 Tensor Core GPU datasheet (SXM5: 80 GB HBM3, 3.35 TB/s, 989 TFLOP/s bf16 dense, "
                   "67 TFLOP/s fp32, NVLink 900 GB/s); 400 Gb/s InfiniBand NDR per GPU"),
    "h200": Device("NVIDIA H200 SXM 141 GB", 141 * GB, 4.8e12, {"bf16": 989e12, "fp32": 67e12},
                   450 * GB, 50 * GB, 1.5 * GB,
                   "NVIDIA H200 Tensor Core GPU datasheet (141 GB HBM3e, 4.8 TB/s, same compute and NVLink as H100 SXM)"),
    "a100": Device("NVIDIA A100 SXM4 80 GB", 80 * GB, 2.039e12, {"bf16": 312e12, "fp32": 19.5e12},
                   300 * GB, 25 * GB, 1.5 * GB,
                   "NVIDIA A100 Tensor Core GPU datasheet (80 GB HBM2e, 2,039 GB/s, 312 TFLOP/s bf16 dense, "
                   "19.5 TFLOP/s fp32, NVLink 600 GB/s); 200 Gb/s InfiniBand HDR per GPU"),
    # Measured on the project's 2-core CI machine (bench/RESULTS.md, "Planner"): fp32 matmul
    # 2048^3 with 2 threads, torch copy of 1 GiB tensors, gloo all-reduce over loopback, and the
    # resident size of a training process before its model. Memory: this host's total RAM,
    # read at plan time and shared by the processes of the node.
    "cpu": Device("this host's CPU", 0.0, 15e9, {"fp32": 44e9, "bf16": 44e9},
                  1.0 * GB, 1.0 * GB, 0.565 * GB,
                  "measured here (bench/RESULTS.md): 44 GFLOP/s fp32 matmul, 15 GB/s copy, under load 4 on 2 cores"),
}


def device_for(cfg: TrainConfig) -> Device:
    """The device of plan.device; for cpu, memory = this host's RAM (or cluster.mem_gb) per process."""
    name = cfg.plan.device if cfg.plan is not None else "auto"
    if name == "auto":
        name = "cpu" if cfg.cluster.gpus_per_node == 0 and cfg.trainer.device != "cuda" else _cuda_device_name()
    dev = DEVICES[name]
    if name == "cpu":
        per_node = cfg.cluster.mem_gb * GB if cfg.cluster.mem_gb else _host_memory_bytes()
        dev = replace(dev, memory_bytes=per_node / cfg.cluster.nproc_per_node)
    return dev


def _cuda_device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0).lower()
            return next((k for k in ("h200", "h100", "a100") if k in gpu), "h100")
    except Exception:  # no usable CUDA here (a login node): plan for the datasheet default
        pass
    return "h100"


def _host_memory_bytes() -> float:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024.0
    return 0.0


# ----------------------------------------------------------------------------- parameters


@dataclass
class ParamCounts:
    """Parameters held by one rank, by how they are placed (numbers, not bytes)."""

    replicated: int = 0  # every rank of the replica holds all of it (embeddings, norms, routers, PKM)
    tp_shard: int = 0  # this rank's 1/tp of attention and dense MLPs
    expert_shard: int = 0  # this rank's slice of expert tables / experts (PEER U, V at 1/(ep tp); MoE experts at ep/E, 1/tp)
    largest_expert_table: int = 0  # one U or V slice held here (the largest [N, d/(ep tp)] buffer)

    @property
    def total(self) -> int:
        return self.replicated + self.tp_shard + self.expert_shard


def _layer_params(m: ModelConfig, kind: str, ep: int, tp: int) -> ParamCounts:
    d = m.d_model
    c = ParamCounts(replicated=2 * d, tp_shard=4 * d * d // tp)  # two RMSNorms; attention
    if kind == "dense":
        c.tp_shard += 2 * d * m.d_ff // tp
    elif kind == "peer":
        p = m.peer
        feats = p.num_heads * p.d_key
        c.replicated += d * feats + 2 * math.isqrt(p.num_experts) * (p.d_key // 2) + (2 * feats if p.query_batchnorm else 0)
        table = p.num_experts * d // (ep * tp)
        c.largest_expert_table = table
        c.expert_shard += 2 * table  # at ep = 1 too: its "expert-data-parallel" group is then dp
    elif kind == "moe":
        mo = m.moe
        c.replicated += d * mo.num_experts
        c.expert_shard += (mo.num_experts // ep) * 2 * d * mo.d_ff // tp
        c.largest_expert_table = d * mo.d_ff // tp
    elif kind == "pkm":
        p = m.pkm
        feats = p.num_heads * p.d_key
        c.replicated += (d * feats + p.num_heads * 2 * math.isqrt(p.num_values) * (p.d_key // 2)
                         + (2 * feats if p.query_batchnorm else 0) + p.num_values * d)
        c.largest_expert_table = p.num_values * d
    return c


def stage_blocks(num_layers: int, pp: int) -> list[range]:
    """DeepSpeed's uniform partition, as orchestrator/parallel/pipeline.py builds it."""
    size, extra = divmod(num_layers, pp)
    bounds = [0]
    for stage in range(pp):
        bounds.append(bounds[-1] + size + (1 if stage < extra else 0))
    return [range(bounds[s], bounds[s + 1]) for s in range(pp)]


def stage_params(cfg: TrainConfig, stage: int) -> ParamCounts:
    m, par = cfg.model, cfg.parallel
    sparse = set(m.sparse_layer_indices())
    out = ParamCounts()
    for layer in stage_blocks(m.num_layers, par.pp)[stage]:
        lc = _layer_params(m, m.ffn if layer in sparse else "dense", par.ep, par.tp)
        out.replicated += lc.replicated
        out.tp_shard += lc.tp_shard
        out.expert_shard += lc.expert_shard
        out.largest_expert_table = max(out.largest_expert_table, lc.largest_expert_table)
    vocab_d = m.vocab_size * m.d_model
    if stage == 0:
        out.replicated += vocab_d
    if stage == par.pp - 1:
        out.replicated += m.d_model  # final norm
        # Untied: the head. Tied under pp > 1: the last stage holds a copy of the embedding.
        if not m.tie_embeddings or par.pp > 1:
            out.replicated += vocab_d
    return out


# ----------------------------------------------------------------------------- activations


def activation_bytes_per_token(m: ModelConfig, kind: str, tp: int, value_bytes: int) -> int:
    """Bytes autograd keeps per token of one block (what saved_tensors_hooks sees, parameters
    excluded; tests/unit/test_plan.py checks these against the real model). fp32 values, int64
    indices. Two RMSNorms keep x, 1/rms and their output (2d + 1 each); attention its input d,
    qkv 3d, rotated q and k 2d, its output d with the log-sum-exp (h), the out-projection input d."""
    d, b = m.d_model, value_bytes
    norms = 2 * (2 * d + 1) * b
    attention = (2 * d + 6 * d // tp) * b + (m.num_attention_heads // tp) * 4
    return norms + attention + ffn_activation_bytes_per_token(m, kind, tp, value_bytes)


def ffn_activation_bytes_per_token(m: ModelConfig, kind: str, tp: int, value_bytes: int) -> float:
    """The FFN's share of `activation_bytes_per_token` (what activation_checkpointing=sparse drops)."""
    d, b = m.d_model, value_bytes
    if kind == "dense":  # input, pre-activation, activation
        return (d + 2 * m.d_ff // tp) * b
    if kind == "peer":
        p = m.peer
        feats, retrieved = p.num_heads * p.d_key, p.num_heads * p.top_k
        # input, query, normed query; gates, pre-activations; int64 indices
        ffn = (d + 2 * feats + 2 * retrieved) * b + 8 * retrieved
        if p.impl == "reference":
            ffn += 2 * retrieved * d // tp * b  # the gathered U and V rows
        return ffn
    if kind == "pkm":
        p = m.pkm
        feats, retrieved = p.num_heads * p.d_key, p.num_heads * p.top_k
        return (d + 2 * feats + retrieved) * b + 8 * retrieved
    if kind == "moe":  # DeepSpeed's gate, dispatch and combine buffers, each expert slot's MLP
        mo = m.moe
        return (3 * d + moe_slots_per_token(mo) * (d + 2 * mo.d_ff // tp)) * b + 17 * mo.num_experts + 36
    raise ValueError(kind)


def moe_slots_per_token(mo) -> float:
    """Expert slots DeepSpeed computes per token: top_k x capacity_factor (its capacity rule)."""
    return mo.top_k * mo.capacity_factor


def head_activation_bytes_per_token(m: ModelConfig, value_bytes: int) -> int:
    """Token ids, final RMSNorm (2d+1), head input d, log-softmax V and the returned logits V."""
    return 8 + (3 * m.d_model + 1 + 2 * m.vocab_size) * value_bytes


# ----------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    device: Device
    world_size: int
    stage: int  # the pipeline stage of the rank planned (the one with the most memory)
    params: ParamCounts
    memory: dict  # name -> bytes per rank, the peak's terms
    comm: dict  # mesh axis -> bytes this rank sends per optimizer step
    flops_per_step: float  # the whole job, model FLOPs (model/flops.py, 3x forward)
    times: dict  # compute, memory, comm, step seconds
    notes: list = field(default_factory=list)

    @property
    def peak_bytes(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.device.memory_bytes

    @property
    def mfu(self) -> float:
        peak = self.device.peak_flops[self.precision]
        return self.flops_per_step / (self.times["step"] * peak * self.world_size)

    precision: str = "fp32"


def plan(cfg: TrainConfig, device: Device | None = None) -> Plan:
    """The plan of the worst pipeline stage (most bytes) of cfg."""
    device = device or device_for(cfg)
    plans = [_plan_stage(cfg, device, s) for s in range(cfg.parallel.pp)]
    return max(plans, key=lambda p: p.peak_bytes)


def _precision(cfg: TrainConfig, device: Device) -> str:
    if cfg.trainer.precision in ("fp32", "bf16"):
        return cfg.trainer.precision
    return "fp32" if device.name.startswith("this host") else "bf16"


def _plan_stage(cfg: TrainConfig, device: Device, stage: int) -> Plan:
    m, par, t = cfg.model, cfg.parallel, cfg.trainer
    precision = _precision(cfg, device)
    vb = 2 if precision == "bf16" else 4
    edp = par.dp // par.ep  # ranks holding the same expert shard
    params = stage_params(cfg, stage)
    dense = params.replicated + params.tp_shard
    expert = params.expert_shard
    memory: dict[str, float] = {"process baseline": device.baseline_bytes}
    # Weights, gradients (same dtype, fp32 accumulators in bf16 runs too), AdamW's two moments.
    memory["parameters"] = params.total * vb
    grad_bytes = params.total * 4
    if par.zero_stage >= 2:
        grad_bytes = dense * 4 / par.dp + expert * 4 / edp
    memory["gradients"] = grad_bytes
    adam = 8.0
    master = 4.0 if (precision == "bf16" or par.zero_stage >= 1) else 0.0  # fp32 master partition
    part = (dense / par.dp + expert / edp) if par.zero_stage >= 1 else params.total
    memory["optimizer state"] = part * (adam + master)
    if par.zero_stage == 1:
        memory["optimizer state"] += part * 4  # ZeRO-1's fp32 gradient partition

    # Activations: micro-batches in flight x tokens per micro-batch x bytes per token.
    sparse = set(m.sparse_layer_indices())
    blocks = list(stage_blocks(m.num_layers, par.pp)[stage])
    mb_seqs = t.micro_batch_size // (par.pp_microbatches if par.pp > 1 else 1)
    tokens_mb = mb_seqs * cfg.data.seq_len
    in_flight = min(par.pp - stage, par.pp_microbatches * t.grad_accum_steps) if par.pp > 1 else 1
    mode = getattr(t, "activation_checkpointing", "none")
    per_block = [activation_bytes_per_token(m, m.ffn if i in sparse else "dense", par.tp, vb) for i in blocks]
    kinds = [m.ffn if i in sparse else "dense" for i in blocks]
    # Kept per block until its backward, and what its recompute adds back while it runs.
    if mode == "blocks":  # a block keeps only its input and is recomputed whole
        kept_i = [m.d_model * vb for _ in blocks]
        recompute_i = per_block
    elif mode == "sparse":  # a sparse FFN keeps only its input and is recomputed alone
        ffn = [ffn_activation_bytes_per_token(m, k, par.tp, vb) if k != "dense" else 0 for k in kinds]
        kept_i = [b - f + (m.d_model * vb if f else 0) for b, f in zip(per_block, ffn)]
        recompute_i = ffn
    else:
        kept_i, recompute_i = per_block, [0 for _ in blocks]
    head = head_activation_bytes_per_token(m, vb) if stage == par.pp - 1 else 0
    # The peak is at the start of the backward (everything kept, the head too) or while block i
    # is recomputed (blocks after i already freed, the head freed).
    kept = max([sum(kept_i) + head] + [sum(kept_i[:i + 1]) + recompute_i[i] for i in range(len(blocks))])
    memory["activations"] = in_flight * tokens_mb * kept

    # Largest temporaries alive at the peak (the end of the forward / start of the backward):
    # the logits' gradient [tokens, V] and the retrieval working set of one chunk.
    temps = tokens_mb * m.vocab_size * 4 if stage == par.pp - 1 else tokens_mb * m.d_model * vb
    temps += _retrieval_working_set(m, tokens_mb, sparse & set(blocks))
    # The backward of a block holds the gradients of its activations while all earlier blocks'
    # activations are still kept: about one block's worth more.
    temps += tokens_mb * max(per_block, default=0)
    if par.zero_stage == 0 and par.dp > 1 and par.pp == 1:
        # DeepSpeed's all-reduce flattens a group's gradients into one bucket (at most 5e8
        # numbers), reduces it and copies it back: replicated and expert groups one after another.
        temps += min(max(dense, expert), 5e8) * 4  # expert ones too when dp / ep = 1 (DeepSpeed does)
    memory["largest temporaries"] = temps

    # Saving a checkpoint copies nothing at ZeRO 0: each rank streams its tensors into its file
    # one block at a time (orchestrator/checkpoint/portable.py). (Until 2026-12-03 the trainer
    # copied its expert shards and their moments first: a "checkpoint copies" term here.)
    comm = _comm_per_step(cfg, params, blocks, sparse, vb, tokens_mb)
    world = cfg.world_size
    tokens_step = t.micro_batch_size * t.grad_accum_steps * par.dp * cfg.data.seq_len
    counts = count_model(m, cfg.data.seq_len)
    flops_step = float(counts.flops_per_token_train) * tokens_step
    # Recomputation is hardware work, not model FLOPs: it lengthens the step, not the MFU numerator.
    recompute_fwd = {"blocks": counts.flops_per_token_fwd - counts.breakdown["lm_head"].flops_fwd,
                     "sparse": sum(c.flops_fwd for k, c in counts.breakdown.items()
                                   if k.startswith(("peer", "pkm", "moe")))}.get(mode, 0)
    hardware_flops = flops_step + float(recompute_fwd) * tokens_step
    times = _roofline(cfg, device, precision, params, memory, comm, hardware_flops / world)
    p = Plan(device, world, stage, params, memory, comm, flops_step, times, precision=precision)
    if m.ffn == "peer" and par.ep > 1 and mode != "none":
        p.notes.append("activation checkpointing recomputes the expert-parallel exchange: ep bytes are x1.5 in the forward")
    return p


def _retrieval_working_set(m: ModelConfig, tokens: int, sparse_blocks: set) -> float:
    """One chunk of sub-key scores per half and the [T, H, K*K] candidates (chunked retrieval)."""
    if not sparse_blocks or m.ffn not in ("peer", "pkm"):
        return 0.0
    p = m.peer if m.ffn == "peer" else m.pkm
    return 2 * (1 << 20) + tokens * p.num_heads * (p.top_k ** 2) * 4 / max(1, tokens // 64)


def _comm_per_step(cfg: TrainConfig, params: ParamCounts, blocks: list, sparse: set, vb: int,
                   tokens_mb: int) -> dict:
    """Bytes this rank sends per optimizer step, by mesh axis.

    dp: ring all-reduce of the gradients, 2 (g - 1)/g x bytes over a group of g (ZeRO 1/2:
    reduce-scatter then all-gather of the updated parameters, the same total); replicated and
    tp-shard gradients over dp, expert gradients over the expert-data-parallel group dp/ep.
    ep: PEER's dimension sharding, `bytes_per_token("dims", ...)` per local token and PEER layer
    (the formula its byte counter CommStats is tested against); DeepSpeed MoE: its all-to-all of
    the dispatched [E, C, d] buffer and back, forward and backward, (ep-1)/ep of it leaves the rank.
    tp: per layer and token, two all-reduces of d (forward g, backward f) for attention and for a
    dense MLP; PEER an all-reduce of h k and an all-gather of d each way.
    pp: the activations [micro-batch, seq, d] forward to the next stage, their gradient back.
    """
    m, par, t = cfg.model, cfg.parallel, cfg.trainer
    micro_batches = t.grad_accum_steps * (par.pp_microbatches if par.pp > 1 else 1)
    tokens_step = tokens_mb * micro_batches
    ring = lambda g: 2 * (g - 1) / g if g > 1 else 0.0  # noqa: E731
    grad_b = 2 if vb == 2 else 4
    comm = {"dp": ring(par.dp) * (params.replicated + params.tp_shard) * grad_b
            + ring(par.dp // par.ep) * params.expert_shard * grad_b}
    ep_bytes = 0.0
    tp_bytes = 0.0
    d = m.d_model
    for layer in blocks:
        kind = m.ffn if layer in sparse else "dense"
        if kind == "peer" and par.ep > 1:
            ep_bytes += bytes_per_token("dims", d // par.tp, m.peer.num_heads * m.peer.top_k, par.ep,
                                        value_bytes=vb) * tokens_step
        if kind == "moe" and par.ep > 1:
            ep_bytes += 4 * moe_slots_per_token(m.moe) * d * vb * (par.ep - 1) / par.ep * tokens_step
        if par.tp > 1:
            allreduce = ring(par.tp) * d * vb
            tp_bytes += 2 * allreduce * tokens_step  # attention
            if kind == "peer":
                retrieved = m.peer.num_heads * m.peer.top_k
                tp_bytes += (2 * ring(par.tp) * retrieved * vb + 2 * (par.tp - 1) / par.tp * d * vb) * tokens_step
            elif kind in ("dense", "moe"):
                tp_bytes += 2 * allreduce * tokens_step
    comm["ep"] = ep_bytes
    comm["tp"] = tp_bytes
    if par.pp > 1:
        boundaries = 2 if 0 < _stage_of(blocks, cfg) < par.pp - 1 else 1
        comm["pp"] = boundaries * tokens_mb * d * vb * micro_batches
    else:
        comm["pp"] = 0.0
    return comm


def _stage_of(blocks: list, cfg: TrainConfig) -> int:
    ranges = stage_blocks(cfg.model.num_layers, cfg.parallel.pp)
    return next(i for i, r in enumerate(ranges) if blocks and blocks[0] in r)


def _roofline(cfg: TrainConfig, device: Device, precision: str, params: ParamCounts, memory: dict,
              comm: dict, flops_rank: float) -> dict:
    """step = max(compute, memory traffic) + communication (no overlap assumed).

    Memory traffic per step: the optimizer's pass over its partition (fused AdamW reads p, g, m,
    v and writes p, m, v: 28 bytes per fp32 parameter), zeroing and norming the gradients (8),
    the backward's write of the dense gradients (4), three passes over the activations (write in
    the forward, read and write of their gradients in the backward)."""
    local = params.total
    traffic = local * (28 + 8 + 4) + 3 * memory["activations"]
    compute = flops_rank / device.peak_flops[precision]
    mem_time = traffic / device.memory_bandwidth
    intra = cfg.cluster.nproc_per_node
    comm_time = 0.0
    for axis, sent in comm.items():
        span = {"tp": cfg.parallel.tp, "ep": cfg.parallel.ep, "dp": cfg.parallel.dp * cfg.parallel.tp,
                "pp": cfg.world_size}[axis]
        bw = device.intra_node_bandwidth if span <= intra else device.inter_node_bandwidth
        comm_time += sent / bw
    return {"compute": compute, "memory": mem_time, "comm": comm_time, "step": max(compute, mem_time) + comm_time}


# ----------------------------------------------------------------------------- the fit check


def _with(cfg: TrainConfig, **sections) -> TrainConfig:
    """cfg with some keys changed: _with(cfg, parallel={"ep": 4})."""
    changed = {name: replace(getattr(cfg, name), **values) for name, values in sections.items()}
    return replace(cfg, **changed)


def cheapest_fix(cfg: TrainConfig, device: Device) -> str:
    """The first change, cheapest first, that makes cfg fit on the same devices: ZeRO-1 (more
    communication, none of it per token), a larger ep (experts sharded wider), recomputing
    activations (one more forward per block), a smaller micro-batch (same global batch)."""
    par, t = cfg.parallel, cfg.trainer
    candidates: list[tuple[str, TrainConfig]] = []
    if par.zero_stage == 0 and par.dp > 1 and par.pp == 1:
        candidates.append(("set parallel.zero_stage=1", _with(cfg, parallel={"zero_stage": 1})))
    if par.zero_stage == 1 and par.dp > 1 and par.pp == 1:
        candidates.append(("set parallel.zero_stage=2", _with(cfg, parallel={"zero_stage": 2})))
    if cfg.model.ffn in ("peer", "moe"):
        ep = par.ep * 2
        while ep <= par.dp:
            if par.dp % ep == 0:
                candidates.append((f"raise parallel.ep to {ep}", _with(cfg, parallel={"ep": ep})))
            ep *= 2
    if t.activation_checkpointing != "blocks":
        candidates.append(("set trainer.activation_checkpointing=blocks",
                           _with(cfg, trainer={"activation_checkpointing": "blocks"})))
    mb, accum = t.micro_batch_size, t.grad_accum_steps
    while mb % 2 == 0 and mb > 1:
        mb, accum = mb // 2, accum * 2
        candidates.append((f"set trainer.micro_batch_size={mb} trainer.grad_accum_steps={accum}",
                           _with(cfg, trainer={"micro_batch_size": mb, "grad_accum_steps": accum})))
    for text, candidate in candidates:
        try:
            if plan(candidate, device).fits:
                return text
        except (ValueError, ZeroDivisionError):
            continue
    return (f"no single change fits on {cfg.world_size} device(s): add devices and raise parallel.ep "
            f"(python -m orchestrator.plan ... plan.table=true lists layouts that fit)")


def check_fits(cfg: TrainConfig) -> None:
    """ConfigError unless the planner predicts the run fits (validation.py calls this)."""
    if cfg.plan is not None and not cfg.plan.check:
        return
    from orchestrator.errors import ConfigError

    device = device_for(cfg)
    p = plan(cfg, device)
    if p.fits:
        return
    where = f" (pipeline stage {p.stage})" if cfg.parallel.pp > 1 else ""
    raise ConfigError("plan.check", True,
                      f"predicted peak {p.peak_bytes / GB:.2f} GB per rank{where} > {device.memory_bytes / GB:.2f} GB "
                      f"available on {device.name}", cheapest_fix(cfg, device) + " (or plan.check=false to launch anyway)")


# ----------------------------------------------------------------------------- output


def _h(n: float, unit: str = "") -> str:
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {suffix}{unit}"
    return f"{n:.3g} {unit}".rstrip()


def format_plan(cfg: TrainConfig, p: Plan) -> str:
    par, t = cfg.parallel, cfg.trainer
    lines = [
        f"plan: {cfg.model.ffn} d={cfg.model.d_model} L={cfg.model.num_layers} on {p.world_size} x {p.device.name} "
        f"(dp={par.dp} ep={par.ep} tp={par.tp} pp={par.pp}, ZeRO-{par.zero_stage}, {p.precision}, "
        f"micro-batch {t.micro_batch_size} x seq {cfg.data.seq_len} x accum {t.grad_accum_steps}, "
        f"activation checkpointing {t.activation_checkpointing})",
        f"parameters per rank{f' (pipeline stage {p.stage})' if par.pp > 1 else ''}: "
        f"replicated {_h(p.params.replicated)}, tp shard {_h(p.params.tp_shard)}, "
        f"expert shard {_h(p.params.expert_shard)}; total {_h(p.params.total)}",
        "memory per rank at the peak:",
    ]
    for name, value in p.memory.items():
        lines.append(f"  {name:<20} {value / GB:9.3f} GB")
    verdict = "fits" if p.fits else "DOES NOT FIT"
    lines.append(f"  {'total':<20} {p.peak_bytes / GB:9.3f} GB of {p.device.memory_bytes / GB:.2f} GB: {verdict}")
    lines.append("communication per optimizer step, bytes this rank sends: "
                 + ", ".join(f"{axis} {_h(b, 'B')}" for axis, b in p.comm.items()))
    lines.append(f"FLOPs per step (model/flops.py, 3x forward): {_h(p.flops_per_step, 'FLOP')} for the job, "
                 f"{_h(p.flops_per_step / p.world_size, 'FLOP')} per rank")
    tm = p.times
    lines.append(f"roofline step time: {tm['step'] * 1e3:.1f} ms = max(compute {tm['compute'] * 1e3:.1f} ms, memory "
                 f"{tm['memory'] * 1e3:.1f} ms) + communication {tm['comm'] * 1e3:.1f} ms; MFU {p.mfu:.1%}")
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def layouts(world: int, cfg: TrainConfig) -> list[dict]:
    """Layouts of `world` ranks the table compares: dp x tp with ep over dp (powers of two)."""
    out = []
    tp = 1
    while tp <= min(world, 8):
        if world % tp == 0 and cfg.model.num_attention_heads % tp == 0 and cfg.model.d_model % tp == 0:
            dp = world // tp
            ep = 1
            while ep <= dp:
                if dp % ep == 0 and (cfg.model.ffn in ("peer", "moe") or ep == 1):
                    for zero in (0, 1) if dp > 1 else (0,):
                        out.append({"dp": dp, "ep": ep, "tp": tp, "pp": 1, "zero_stage": zero})
                ep *= 2
        tp *= 2
    return out


def format_table(cfg: TrainConfig, device: Device, max_devices: int, best: int = 3) -> str:
    """Per device count (powers of two), the `best` layouts that fit with the most tokens/s, and how many fit."""
    rows = ["| devices | dp | ep | tp | ZeRO | peak GB/rank | step ms | MFU | tokens/s | ep GB/step | dp GB/step | layouts that fit |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    world = 1
    while world <= max_devices:
        planned = []
        for lay in layouts(world, cfg):
            if cfg.model.ffn == "peer" and cfg.model.d_model % (lay["ep"] * lay["tp"]):
                continue
            c = _with(cfg, parallel=lay, cluster={"nproc_per_node": min(world, 8), "nodes": max(1, world // 8)})
            planned.append((lay, c, plan(c, device)))
        # Fastest = most tokens per second (a larger dp trains more tokens per step).
        fitting = sorted((x for x in planned if x[2].fits), key=lambda x: -x[0]["dp"] / x[2].times["step"])
        for lay, c, p in fitting[:best]:
            tokens = c.trainer.micro_batch_size * c.trainer.grad_accum_steps * lay["dp"] * c.data.seq_len
            rows.append(f"| {world} | {lay['dp']} | {lay['ep']} | {lay['tp']} | {lay['zero_stage']} | "
                        f"{p.peak_bytes / GB:.1f} | {p.times['step'] * 1e3:.0f} | {p.mfu:.1%} | "
                        f"{tokens / p.times['step']:,.0f} | {p.comm['ep'] / GB:.2f} | {p.comm['dp'] / GB:.2f} | "
                        f"{len(fitting)} of {len(planned)} |")
        if not fitting:
            smallest = min(planned, key=lambda x: x[2].peak_bytes)[2] if planned else None
            rows.append(f"| {world} | - | - | - | - | {smallest.peak_bytes / GB if smallest else 0:.1f} (least) | - | - | - | - | - | "
                        f"0 of {len(planned)} |")
        world *= 2
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    from launch import compose_train_config  # Hydra composition lives in launch.py only
    from orchestrator.errors import USER_ERROR_EXIT_CODE, ConfigError

    try:
        cfg = compose_train_config(argv, check_fit=False)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    device = device_for(cfg)
    if cfg.plan is not None and cfg.plan.table:
        print(f"plan table: {cfg.model.ffn} d={cfg.model.d_model} L={cfg.model.num_layers}, "
              f"micro-batch {cfg.trainer.micro_batch_size} x seq {cfg.data.seq_len}, on {device.name} "
              f"({device.memory_bytes / GB:.0f} GB)")
        print(format_table(cfg, device, cfg.plan.max_devices))
        return 0
    print(format_plan(cfg, plan(cfg, device)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.exit(main(sys.argv[1:]))
