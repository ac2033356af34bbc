"""validate(cfg): every combination of a TrainConfig's values that cannot work, refused as a
ConfigError (one line: key, value, problem, fix) before anything starts. The schemas and their
loading are in orchestrator/config.py; this module checks what single keys cannot: shapes that
must divide, parallel layouts against the world size and the model, cluster and storage settings.
"""

from __future__ import annotations

import dataclasses
import math

from model.config import ACTIVATIONS, FFN_KINDS, PEER_IMPLS, ModelConfig, MoEConfig, PeerConfig
from orchestrator.config import (
    BYTE_VOCAB_SIZE,
    ClusterConfig,
    IsoflopConfig,
    OptimConfig,
    TrainConfig,
    TrainerConfig,
)
from orchestrator.errors import ConfigError


def validate(cfg: TrainConfig, *, cuda_device_count: int = 0) -> None:
    """Check every combination that cannot work; raise the first as a ConfigError."""
    _validate_model(cfg)
    _validate_data(cfg)
    _validate_optim(cfg.optim)
    # Slurm: the job's nodes, not this (login) machine, run the training: judge what the job asks for;
    # the job checks its node again when it starts (orchestrator/preflight.py check_on_node).
    slurm = cfg.cluster.kind == "slurm"
    _validate_trainer(cfg.trainer, cfg.cluster.gpus_per_node if slurm else cuda_device_count, slurm)
    _validate_cluster(cfg.cluster)  # before the parallel degrees, which are checked against it
    _validate_parallel(cfg)
    _validate_expert_tables(cfg, cuda_device_count)
    _validate_io(cfg)
    if cfg.isoflop is not None:
        _validate_isoflop(cfg.isoflop)
    _validate_plan(cfg)  # last: the memory plan needs every other value valid


def _validate_plan(cfg: TrainConfig) -> None:
    """trainer.activation_checkpointing and plan.* values, then the fit check (orchestrator/plan.py)."""
    _one_of("trainer.activation_checkpointing", cfg.trainer.activation_checkpointing, ("none", "blocks", "sparse"))
    if cfg.plan is None:
        return
    _one_of("plan.device", cfg.plan.device, ("auto", "cpu", "h100", "h200", "a100"))
    _positive("plan.max_devices", cfg.plan.max_devices)
    from orchestrator.plan import check_fits

    check_fits(cfg)


def _validate_isoflop(s: IsoflopConfig) -> None:
    if not s.budget > 0:
        raise ConfigError("isoflop.budget", s.budget, "must be a positive number of FLOPs", "set isoflop.budget=1e13")
    if not s.methods:
        raise ConfigError("isoflop.methods", s.methods, "is empty", "set isoflop.methods=[dense,moe,pkm,peer]")
    for method in s.methods:
        if method not in FFN_KINDS:
            raise ConfigError("isoflop.methods", s.methods, f"{method!r} is not a method (a value of model.ffn)",
                              f"use methods among: {', '.join(FFN_KINDS)}")
    if len(set(s.methods)) != len(s.methods):
        raise ConfigError("isoflop.methods", s.methods, "names a method twice", "list each method once")
    if not s.ladder:
        raise ConfigError("isoflop.ladder", s.ladder, "is empty", "give at least one rung, e.g. isoflop.ladder=[{d_model: 64}]")
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    for num, rung in enumerate(s.ladder):
        if not isinstance(rung, dict):
            raise ConfigError(f"isoflop.ladder[{num}]", rung, "is not a mapping of model keys",
                              "write each rung as {d_model: 64, num_layers: 2, ...}")
        for key in rung:
            if str(key).split(".")[0] not in model_keys:
                raise ConfigError(f"isoflop.ladder[{num}]", rung, f"{key!r} is not a model key",
                                  "use keys of model.* (see python -m orchestrator.config), nested ones dotted")
    if not 0.0 <= s.warmup_fraction < 1.0:
        raise ConfigError("isoflop.warmup_fraction", s.warmup_fraction, "must be in [0, 1)", "set isoflop.warmup_fraction=0.1")
    _positive("isoflop.min_steps", s.min_steps)
    if s.point is not None:
        _positive("isoflop.point", s.point, 0)


def _positive(key: str, value: int | float, minimum: int | float = 1) -> None:
    if value < minimum:
        raise ConfigError(key, value, f"must be at least {minimum}", f"set {key}>={minimum}")


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(key, value, "unknown choice", f"use one of: {', '.join(choices)}")


def _validate_model(cfg: TrainConfig) -> None:
    m = cfg.model
    for key in ("vocab_size", "d_model", "num_layers", "num_attention_heads", "max_seq_len", "d_ff"):
        _positive(f"model.{key}", getattr(m, key))
    if m.d_model % m.num_attention_heads:
        raise ConfigError("model.num_attention_heads", m.num_attention_heads,
                          f"does not divide model.d_model={m.d_model}",
                          "choose heads that divide d_model (e.g. d_model/64)")
    if (m.d_model // m.num_attention_heads) % 2:
        raise ConfigError("model.num_attention_heads", m.num_attention_heads,
                          f"gives an odd head width {m.d_model // m.num_attention_heads}; rotary needs it even",
                          "choose heads so that d_model/heads is even")
    _one_of("model.ffn", m.ffn, FFN_KINDS)
    for i in m.sparse_layers:
        if not isinstance(i, int) or not 0 <= i < m.num_layers:
            raise ConfigError("model.sparse_layers", m.sparse_layers,
                              f"index {i} is not a block of a {m.num_layers}-layer model",
                              f"use indices in 0..{m.num_layers - 1}, or [] for the middle block")
    if m.tie_embeddings not in (True, False):
        raise ConfigError("model.tie_embeddings", m.tie_embeddings, "expected true or false", "set it to true or false")
    _positive("model.rope_theta", m.rope_theta, 1.0)
    if not m.norm_eps > 0:
        raise ConfigError("model.norm_eps", m.norm_eps, "must be positive", "set model.norm_eps=1e-5")
    if not m.init_std > 0:
        raise ConfigError("model.init_std", m.init_std, "must be positive", "set model.init_std=0.02")
    if m.ffn == "peer":
        _validate_peer(m.peer)
    if m.ffn == "moe":
        _validate_moe(m.moe)
    if m.ffn == "pkm":
        _validate_pkm(cfg)


def _validate_pkm(cfg: TrainConfig) -> None:
    p = cfg.model.pkm
    if p is None:
        raise ConfigError("model.pkm", None, "model.ffn=pkm needs the memory's settings",
                          "use model=pkm (conf/model/pkm.yaml) or set the model.pkm block")
    _validate_product_keys("model.pkm", "num_values", "slots", p.num_values, p.num_heads, p.top_k, p.d_key)
    _one_of("model.pkm.impl", p.impl, PEER_IMPLS)
    if cfg.parallel.ep > 1:
        raise ConfigError("parallel.ep", cfg.parallel.ep, "PKM memories are not expert-parallel (the value table is "
                          "replicated)", "set parallel.ep=1 with model=pkm")


def _validate_product_keys(prefix: str, count_key: str, what: str, count: int, num_heads: int, top_k: int,
                           d_key: int) -> None:
    """The product-key retrieval shared by PEER and PKM: N a perfect square, top_k at most the
    sqrt(N) sub-keys of a half, d_key even (split into the two halves)."""
    _positive(f"{prefix}.{count_key}", count, 4)
    root = math.isqrt(count)
    if root * root != count:
        raise ConfigError(f"{prefix}.{count_key}", count,
                          f"must be a perfect square (product keys split {what} into sqrt(N) x sqrt(N))",
                          f"use {root * root} ({root}^2) or {(root + 1) ** 2} ({root + 1}^2)")
    _positive(f"{prefix}.num_heads", num_heads)
    _positive(f"{prefix}.top_k", top_k)
    if top_k > root:
        raise ConfigError(f"{prefix}.top_k", top_k,
                          f"exceeds sqrt({count_key})={root}, the number of sub-keys per half",
                          f"set {prefix}.top_k<={root} or raise {prefix}.{count_key}")
    _positive(f"{prefix}.d_key", d_key, 2)
    if d_key % 2:
        raise ConfigError(f"{prefix}.d_key", d_key, "must be even (split into two product-key halves)",
                          f"set {prefix}.d_key={d_key + 1}")


def _validate_peer(p: PeerConfig) -> None:
    _validate_product_keys("model.peer", "num_experts", "experts", p.num_experts, p.num_heads, p.top_k, p.d_key)
    _one_of("model.peer.activation", p.activation, ACTIVATIONS)
    _one_of("model.peer.impl", p.impl, PEER_IMPLS)


def _validate_moe(m: MoEConfig) -> None:
    _positive("model.moe.num_experts", m.num_experts)
    if m.top_k not in (1, 2):
        raise ConfigError("model.moe.top_k", m.top_k, "DeepSpeed's top-k gating supports k=1 or k=2",
                          "set model.moe.top_k=1 or 2")
    if m.top_k > m.num_experts:
        raise ConfigError("model.moe.top_k", m.top_k, f"exceeds model.moe.num_experts={m.num_experts}",
                          "lower top_k or add experts")
    _positive("model.moe.d_ff", m.d_ff)
    _positive("model.moe.capacity_factor", m.capacity_factor, 0.0)
    _positive("model.moe.eval_capacity_factor", m.eval_capacity_factor, 0.0)
    _positive("model.moe.min_capacity", m.min_capacity, 0)
    _positive("model.moe.aux_loss_coef", m.aux_loss_coef, 0.0)


def _validate_data(cfg: TrainConfig) -> None:
    d = cfg.data
    if not d.source and not d.mixture:
        raise ConfigError("data.source", d.source, "is empty", "use data.source=stdlib or a path/URL of text files")
    from orchestrator.data.mixture import check_mixture  # data.mixture, num_workers, text_field (issue 14)

    check_mixture(d)
    _positive("data.seq_len", d.seq_len, 2)
    if d.seq_len > cfg.model.max_seq_len:
        raise ConfigError("data.seq_len", d.seq_len, f"exceeds model.max_seq_len={cfg.model.max_seq_len}",
                          f"set model.max_seq_len>={d.seq_len} or lower data.seq_len")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError("data.val_fraction", d.val_fraction, "must lie strictly between 0 and 1",
                          "set data.val_fraction=0.05")
    if d.tokenizer == "bytes" and cfg.model.vocab_size < BYTE_VOCAB_SIZE:
        raise ConfigError("model.vocab_size", cfg.model.vocab_size,
                          f"is smaller than the byte tokenizer's {BYTE_VOCAB_SIZE} tokens",
                          f"set model.vocab_size={BYTE_VOCAB_SIZE}")


def _validate_optim(o: OptimConfig) -> None:
    if not o.lr > 0:
        raise ConfigError("optim.lr", o.lr, "must be positive", "set optim.lr=1e-3")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError("optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]", "set optim.min_lr_ratio=0.1")
    _positive("optim.warmup_steps", o.warmup_steps, 0)
    if o.decay_steps is not None:
        _positive("optim.decay_steps", o.decay_steps, 1)
    _positive("optim.weight_decay", o.weight_decay, 0.0)
    for key in ("beta1", "beta2"):
        value = getattr(o, key)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"optim.{key}", value, "must be in [0, 1)", f"set optim.{key}=0.9")
    if not o.eps > 0:
        raise ConfigError("optim.eps", o.eps, "must be positive", "set optim.eps=1e-8")
    _positive("optim.grad_clip", o.grad_clip, 0.0)


def _validate_expert_tables(cfg: TrainConfig, cuda_device_count: int) -> None:
    """optim.expert_tables=row_sparse needs DeepSpeed to call step() on our optimizer itself, with
    the tables as real [N, d] parameters (orchestrator/row_sparse_adamw.py)."""
    value = cfg.optim.expert_tables
    _one_of("optim.expert_tables", value, ("adamw", "row_sparse"))
    if value != "row_sparse":
        return
    p, t = cfg.parallel, cfg.trainer
    if p.zero_stage > 0:
        raise ConfigError("optim.expert_tables", value, f"cannot run under parallel.zero_stage={p.zero_stage}: ZeRO "
                          "partitions the tables into flat buffers and steps those, not rows",
                          "set parallel.zero_stage=0 or optim.expert_tables=adamw")
    if p.pp > 1:
        raise ConfigError("optim.expert_tables", value, f"is not supported with parallel.pp={p.pp} (the pipeline "
                          "engine's optimizer path is not covered)", "set parallel.pp=1 or optim.expert_tables=adamw")
    gpus = cfg.cluster.gpus_per_node if cfg.cluster.kind == "slurm" else cuda_device_count  # as _validate_trainer
    on_gpu = t.device == "cuda" or (t.device == "auto" and gpus > 0)
    if t.precision == "bf16" or (t.precision == "auto" and on_gpu):
        raise ConfigError("optim.expert_tables", value, f"cannot run in bf16 (trainer.precision={t.precision}"
                          f"{' on this GPU' if t.precision == 'auto' else ''}): DeepSpeed's bf16 optimizer steps flat "
                          "fp32 copies of the parameters, not the tables' rows",
                          "set trainer.precision=fp32 or optim.expert_tables=adamw")


def _validate_trainer(t: TrainerConfig, cuda_device_count: int, slurm_request: bool = False) -> None:
    _positive("trainer.max_steps", t.max_steps)
    _positive("trainer.micro_batch_size", t.micro_batch_size)
    _positive("trainer.grad_accum_steps", t.grad_accum_steps)
    _positive("trainer.log_every", t.log_every)
    _positive("trainer.eval_every", t.eval_every, 0)
    _positive("trainer.eval_batches", t.eval_batches)
    _one_of("trainer.device", t.device, ("auto", "cpu", "cuda"))
    _one_of("trainer.precision", t.precision, ("auto", "fp32", "bf16"))
    if t.device == "cuda" and cuda_device_count == 0:
        if slurm_request:
            raise ConfigError("trainer.device", t.device, "the Slurm job asks for no GPU (cluster.gpus_per_node=0)",
                              "set cluster.gpus_per_node=<GPUs per node>, or trainer.device=auto or cpu")
        raise ConfigError("trainer.device", t.device, "no CUDA device is visible on this machine",
                          "set trainer.device=auto or cpu")
    on_gpu = t.device == "cuda" or (t.device == "auto" and cuda_device_count > 0)
    if t.precision == "bf16" and not on_gpu:
        if slurm_request:
            raise ConfigError("trainer.precision", t.precision, "bf16 needs GPUs and the Slurm job asks for none "
                              "(cluster.gpus_per_node=0)", "set cluster.gpus_per_node=<GPUs per node>, or trainer.precision=fp32")
        raise ConfigError("trainer.precision", t.precision, "bf16 training is supported on GPUs only here",
                          "set trainer.precision=auto or fp32 on CPU")


def _validate_parallel(cfg: TrainConfig) -> None:
    p, world = cfg.parallel, cfg.world_size
    for key in ("dp", "ep", "tp", "pp"):
        _positive(f"parallel.{key}", getattr(p, key))
    _validate_pipeline(cfg)
    product = p.dp * p.tp * p.pp
    if product != world:
        raise ConfigError("parallel.dp", p.dp,
                          f"dp={p.dp} x tp={p.tp} x pp={p.pp} = {product} but the world size is {world} "
                          + (f"(cluster.nodes={cfg.cluster.nodes} x cluster.nproc_per_node={cfg.cluster.nproc_per_node})"
                             if cfg.cluster.nodes > 1 else f"(cluster.nproc_per_node={cfg.cluster.nproc_per_node})"),
                          (f"set parallel.dp={world // (p.tp * p.pp)}" if world % (p.tp * p.pp) == 0
                           else f"choose parallel.tp x parallel.pp dividing {world}")
                          + (f" or cluster.nproc_per_node={product // cfg.cluster.nodes}"
                             if product % cfg.cluster.nodes == 0 else ""))
    if p.dp % p.ep:
        raise ConfigError("parallel.ep", p.ep, f"does not divide parallel.dp={p.dp}",
                          f"choose ep among the divisors of dp: {_divisors(p.dp)}")
    if p.ep > 1:
        if cfg.model.ffn == "dense":
            raise ConfigError("parallel.ep", p.ep, "a dense model has no experts to split",
                              "set parallel.ep=1, or use model=moe")
        if cfg.model.ffn == "peer" and cfg.model.d_model % p.ep:
            # Expert-parallel PEER shards the columns of U and V (docs/expert_parallel.md), so ep
            # must divide d_model; N needs no condition (every rank holds all N rows).
            raise ConfigError("parallel.ep", p.ep,
                              f"does not divide model.d_model={cfg.model.d_model} (each rank holds d_model/ep "
                              "columns of every PEER expert)",
                              f"choose ep among the common divisors of dp and d_model: "
                              f"{', '.join(str(e) for e in range(1, p.dp + 1) if p.dp % e == 0 and cfg.model.d_model % e == 0)}")
        if cfg.model.ffn == "moe" and cfg.model.moe.num_experts % p.ep:
            raise ConfigError("parallel.ep", p.ep,
                              f"does not divide model.moe.num_experts={cfg.model.moe.num_experts}",
                              "choose ep dividing the number of experts")
    _validate_tensor_parallel(cfg)
    if cfg.trainer.eval_batches % p.dp:
        # Every rank must run the same number of evaluation forwards: MoE layers exchange tokens
        # across ranks in each forward, and a rank with an extra batch would wait forever.
        raise ConfigError("trainer.eval_batches", cfg.trainer.eval_batches,
                          f"is not a multiple of parallel.dp={p.dp}",
                          f"set trainer.eval_batches={max(p.dp, cfg.trainer.eval_batches // p.dp * p.dp)}")
    if p.zero_stage not in (0, 1, 2):
        raise ConfigError("parallel.zero_stage", p.zero_stage, "supported ZeRO stages are 0, 1 and 2",
                          "set parallel.zero_stage to 0, 1 or 2")


def _validate_tensor_parallel(cfg: TrainConfig) -> None:
    """What tensor parallelism splits must split evenly (orchestrator/parallel/tensor_parallel.py,
    docs/tensor_parallel.md); dp x tp x pp = world is checked before."""
    p, m = cfg.parallel, cfg.model
    if p.tp == 1:
        return

    def divisors_of(n: int) -> str:
        return ", ".join(str(t) for t in range(1, n + 1) if n % t == 0)

    if m.num_attention_heads % p.tp:
        raise ConfigError("parallel.tp", p.tp,
                          f"does not divide model.num_attention_heads={m.num_attention_heads} (each tp rank "
                          "computes heads/tp attention heads)",
                          f"choose tp among the divisors of the head count: {divisors_of(m.num_attention_heads)}")
    if (m.ffn == "dense" or len(m.sparse_layer_indices()) < m.num_layers) and m.d_ff % p.tp:
        raise ConfigError("parallel.tp", p.tp,
                          f"does not divide model.d_ff={m.d_ff} (each tp rank holds d_ff/tp hidden units of "
                          "every dense MLP)", f"choose tp among the divisors of d_ff: {divisors_of(m.d_ff)}")
    if m.ffn == "peer" and m.d_model % (p.tp * p.ep):
        raise ConfigError("parallel.tp", p.tp,
                          f"times parallel.ep={p.ep} ({p.tp * p.ep} ranks) does not divide model.d_model={m.d_model} (each rank holds "
                          "d_model/(tp*ep) columns of every PEER expert's u and v)",
                          "choose tp and ep whose product divides d_model")
    if m.ffn == "moe":
        _validate_moe_tensor_parallel(cfg)


def _validate_moe_tensor_parallel(cfg: TrainConfig) -> None:
    """DeepSpeed MoE under tp: experts tp-sharded, capacity slots split over the tp ranks."""
    p, moe = cfg.parallel, cfg.model.moe
    if moe.d_ff % p.tp:
        raise ConfigError("parallel.tp", p.tp,
                          f"does not divide model.moe.d_ff={moe.d_ff} (each tp rank holds d_ff/tp hidden units "
                          "of every expert)", "choose tp dividing model.moe.d_ff")
    for key, on in (("second_expert_sampling", moe.second_expert_sampling),
                    ("random_token_selection", moe.random_token_selection)):
        if on:
            # DeepSpeed draws the routing noise from each rank's generator, but the tp ranks of a
            # replica must route their (identical) tokens identically.
            raise ConfigError(f"model.moe.{key}", on, "random MoE routing is not supported with parallel.tp>1 "
                              "(the tp ranks of a replica must route identically)",
                              f"set model.moe.{key}=false")
    import torch  # DeepSpeed's own arithmetic (float32 factor), so the check agrees with it

    # Tokens per forward: under pp each micro-batch goes through as pp_microbatches pieces
    # (_validate_pipeline, run before, checked that they divide it; 1 without pp).
    tokens = cfg.trainer.micro_batch_size // p.pp_microbatches * cfg.data.seq_len
    for key, factor in (("capacity_factor", moe.capacity_factor), ("eval_capacity_factor", moe.eval_capacity_factor)):
        capacity = max(int(torch.ceil((tokens / moe.num_experts) * torch.tensor(factor * moe.top_k))),
                       moe.min_capacity)
        if capacity % p.tp:
            # DeepSpeed's MoE splits each expert's capacity slots over the tp ranks before its
            # all-to-all (deepspeed/moe/mappings.py drop_tokens) and asserts they divide.
            raise ConfigError(f"model.moe.{key}", factor,
                              f"gives {capacity} slots per expert (max(ceil(micro_batch_size / pp_microbatches x seq_len / "
                              f"num_experts x {key} x top_k), min_capacity)), not divisible by parallel.tp={p.tp}",
                              f"choose a {key} that makes it a multiple of {p.tp}, or change "
                              "trainer.micro_batch_size")


def _validate_pipeline(cfg: TrainConfig) -> None:
    """Pipeline parallelism (orchestrator/parallel/pipeline.py, docs/pipeline_parallel.md)."""
    p, t = cfg.parallel, cfg.trainer
    _positive("parallel.pp_microbatches", p.pp_microbatches)
    if p.pp == 1:
        if p.pp_microbatches != 1:
            raise ConfigError("parallel.pp_microbatches", p.pp_microbatches,
                              "splits micro-batches for a pipeline, but parallel.pp=1",
                              "set parallel.pp_microbatches=1 (or parallel.pp>1)")
        return
    if p.pp > cfg.model.num_layers:
        raise ConfigError("parallel.pp", p.pp,
                          f"exceeds model.num_layers={cfg.model.num_layers}: every pipeline stage needs a block",
                          f"set parallel.pp<={cfg.model.num_layers}")
    if t.micro_batch_size % p.pp_microbatches:
        raise ConfigError("parallel.pp_microbatches", p.pp_microbatches,
                          f"does not divide trainer.micro_batch_size={t.micro_batch_size}",
                          f"choose among its divisors: {_divisors(t.micro_batch_size)}")
    if p.zero_stage >= 2:
        raise ConfigError("parallel.zero_stage", p.zero_stage,
                          "DeepSpeed's pipeline engine supports ZeRO 0 and 1 only (parallel.pp>1)",
                          "set parallel.zero_stage=1 (or 0)")


def _validate_io(cfg: TrainConfig) -> None:
    _positive("checkpoint.every_steps", cfg.checkpoint.every_steps, 0)
    _positive("checkpoint.keep_last", cfg.checkpoint.keep_last, 0)
    if cfg.checkpoint.load_step is not None:
        _positive("checkpoint.load_step", cfg.checkpoint.load_step, 1)
        if not cfg.checkpoint.resume:
            raise ConfigError("checkpoint.load_step", cfg.checkpoint.load_step, "contradicts checkpoint.resume=false",
                              "drop one of the two overrides")
    from orchestrator.storage import check_url, redact

    if cfg.checkpoint.init_from is not None and check_url(cfg.checkpoint.init_from):
        raise ConfigError("checkpoint.init_from", redact(cfg.checkpoint.init_from),
                          f"cannot be opened here: {check_url(cfg.checkpoint.init_from)}",
                          "give a local path or a URL whose fsspec filesystem is installed")
    if cfg.checkpoint.export_max_shard_gb <= 0:
        raise ConfigError("checkpoint.export_max_shard_gb", cfg.checkpoint.export_max_shard_gb, "must be positive",
                          "set it to the largest file size wanted, in GB (for example 2.0)")
    problem = check_url(cfg.checkpoint.dir)
    if problem:
        protocol = cfg.checkpoint.dir.split("://", 1)[0]
        hint = "pip install s3fs" if protocol in ("s3", "s3a") else f"install the fsspec implementation of {protocol}://"
        raise ConfigError("checkpoint.dir", redact(cfg.checkpoint.dir), f"cannot be opened here: {problem}", hint)
    if not cfg.tracking.experiment:
        raise ConfigError("tracking.experiment", cfg.tracking.experiment, "is empty", "name the MLflow experiment")
    for key in ("run.name", "run.dir"):
        section, name = key.split(".")
        if not getattr(getattr(cfg, section), name):
            raise ConfigError(key, "", "is empty", f"set {key}")


def _validate_cluster(c: ClusterConfig) -> None:
    """Placement requests that cannot work; what only Slurm knows (partitions, limits) is checked
    by cluster/slurm.py before submitting."""
    _one_of("cluster.kind", c.kind, ("local", "slurm"))
    _positive("cluster.nproc_per_node", c.nproc_per_node)
    _positive("cluster.nodes", c.nodes)
    _positive("cluster.gpus_per_node", c.gpus_per_node, 0)
    _positive("cluster.shutdown_grace_s", c.shutdown_grace_s, 1)
    if c.kind == "local" and c.nodes != 1 and not c.master_addr:
        raise ConfigError("cluster.nodes", c.nodes, "a local run over several hosts needs the address of the "
                          "node_rank 0 host", "set cluster.master_addr (and cluster.node_rank on each host), "
                          "cluster.nodes=1, or cluster=slurm")
    if c.kind == "local" and not 0 <= c.node_rank < c.nodes:
        raise ConfigError("cluster.node_rank", c.node_rank, f"outside [0, cluster.nodes={c.nodes})",
                          f"give each of the {c.nodes} host(s) its own node_rank from 0 to {c.nodes - 1}")
    if not 0 < c.master_port < 65536:
        raise ConfigError("cluster.master_port", c.master_port, "is not a TCP port", "use a port in 1..65535")
    _positive("cluster.join_timeout_s", c.join_timeout_s)
    _positive("cluster.collective_timeout_s", c.collective_timeout_s)
    if c.gpus_per_node > c.nproc_per_node:
        raise ConfigError("cluster.gpus_per_node", c.gpus_per_node,
                          f"more GPUs per node than processes (cluster.nproc_per_node={c.nproc_per_node}); "
                          "each process drives one GPU",
                          f"set cluster.nproc_per_node={c.gpus_per_node} (one per GPU) or cluster.gpus_per_node={c.nproc_per_node}")
    for key in ("cpus_per_task", "mem_gb"):
        if getattr(c, key) is not None:
            _positive(f"cluster.{key}", getattr(c, key))
    _positive("cluster.time_min", c.time_min)
    _positive("cluster.signal_delay_s", c.signal_delay_s, 0)
    if c.signal_delay_s >= c.time_min * 60:
        raise ConfigError("cluster.signal_delay_s", c.signal_delay_s,
                          f"is not shorter than the time limit (cluster.time_min={c.time_min} minutes): the job "
                          "would be told to stop as it starts",
                          f"set cluster.signal_delay_s below {c.time_min * 60} or raise cluster.time_min")
    _positive("cluster.max_requeues", c.max_requeues, 0)
    for key in ("extra_sbatch", "setup"):
        bad = [x for x in getattr(c, key) if not isinstance(x, str) or not x.strip()]
        if bad:
            raise ConfigError(f"cluster.{key}", getattr(c, key), f"holds {bad[0]!r}, not a non-empty string",
                              f"write cluster.{key}='[\"...\"]' with one string per entry")
    for option in c.extra_sbatch:
        name = option.lstrip("-").split("=", 1)[0]
        if not name or " " in name:
            raise ConfigError("cluster.extra_sbatch", c.extra_sbatch, f"{option!r} is not an sbatch option",
                              "write options as 'name=value' or 'name', e.g. 'reservation=big'")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
