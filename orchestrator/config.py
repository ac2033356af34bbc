"""Typed run configuration: schemas in code, values in conf/*.yaml.

`load_config(raw_dict)` turns the plain dict that launch.py gets from Hydra into a
`TrainConfig` of dataclasses, checking every key and type, then `validate()` checks the
combinations. Both raise `ConfigError` (one line: key, value, fix). Nothing here knows Hydra.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Optional

from model.config import ACTIVATIONS, FFN_KINDS, PEER_IMPLS, ModelConfig, MoEConfig, PeerConfig, doc
from orchestrator.errors import ConfigError

# The byte tokenizer's vocabulary: 256 byte values plus one end-of-document token.
BYTE_VOCAB_SIZE = 257


@dataclass
class RunConfig:
    name: str = doc("run name; the run directory and the MLflow run name derive from it")
    root: str = doc("folder that holds run directories and the default MLflow store (runs/mlflow.db)")
    dir: str = doc("this run's directory: metrics.jsonl, config, logs and (by default) checkpoints")


@dataclass
class DataConfig:
    source: str = doc("'stdlib' (the running Python's standard library sources, always present) or an fsspec URL: file, directory or glob of text files")
    tokenizer: str = doc("'bytes' (257 tokens) or a local path to a Hugging Face tokenizer.json (needs the tokenizers package)")
    seq_len: int = doc("tokens per training sequence")
    val_fraction: float = doc("share of documents held out for validation, chosen by a hash of each document's name")
    cache_dir: str = doc("where prepared token shards are cached (local path; ~ expands); keyed by source, files and tokenizer")


@dataclass
class OptimConfig:
    lr: float = doc("peak learning rate of AdamW")
    min_lr_ratio: float = doc("learning rate at the end of cosine decay, as a fraction of lr")
    warmup_steps: int = doc("linear warmup steps from 0 to lr")
    decay_steps: Optional[int] = doc("steps of cosine decay after warmup; null means until trainer.max_steps")
    weight_decay: float = doc("AdamW decoupled weight decay on matrices (not on norms, biases, keys or embeddings)")
    beta1: float = doc("AdamW beta1")
    beta2: float = doc("AdamW beta2")
    eps: float = doc("AdamW epsilon")
    grad_clip: float = doc("clip the global gradient norm to this value; 0 disables")


@dataclass
class ParallelConfig:
    dp: int = doc("data-parallel degree; dp x tp x pp must equal the world size")
    ep: int = doc("expert-parallel degree; divides dp: PEER layers split the columns of U and V (ep divides d_model), MoE layers their experts, across groups of ep ranks")
    tp: int = doc("tensor-parallel degree: ranks that split attention heads, MLP hidden units and PEER U/V columns (Megatron style; docs/tensor_parallel.md); divides the head count")
    pp: int = doc("pipeline-parallel degree: stages of contiguous blocks (counts differ by at most one; at most model.num_layers), through DeepSpeed's pipeline engine; ZeRO 0 or 1")
    zero_stage: int = doc("DeepSpeed ZeRO stage: 0, 1 or 2")
    pp_microbatches: int = doc("pipeline micro-batches per trainer micro-batch: each micro-batch of trainer.micro_batch_size sequences is split into this many (it must divide micro_batch_size), so a step runs grad_accum_steps x this many through the pipeline and the global batch is unchanged; 1 when pp=1")


@dataclass
class TrainerConfig:
    max_steps: int = doc("optimizer steps to train")
    seed: int = doc("seed of the model init, the data order and dropout")
    micro_batch_size: int = doc("sequences per rank per forward")
    grad_accum_steps: int = doc("micro-batches per optimizer step; global batch = micro x accum x dp")
    log_every: int = doc("steps between metric lines (loss, lr, grad norm, tokens/s, FLOP/s)")
    eval_every: int = doc("steps between evaluations (val loss, perplexity, expert usage); 0 evaluates only at the end")
    eval_batches: int = doc("validation batches per evaluation, split across data-parallel ranks")
    precision: str = doc("auto (bf16 on GPU, fp32 on CPU), fp32 or bf16")
    device: str = doc("auto (cuda when available), cpu or cuda")
    progress_bar: bool = doc("show a progress bar with ETA on rank 0")


@dataclass
class CheckpointConfig:
    dir: str = doc("where checkpoints go: a local path or any fsspec URL (file://, s3://, ...); a rerun resumes from the latest complete one here")
    every_steps: int = doc("steps between checkpoints; 0 saves only at the end (and on a stop signal)")
    resume: bool = doc("resume from the latest complete checkpoint in checkpoint.dir when one exists")
    load_step: Optional[int] = doc("resume from the checkpoint of this step instead of the latest; null for the latest")
    keep_last: int = doc("keep this many newest complete checkpoints, deleting older ones after each save; 0 keeps all")
    staging_dir: Optional[str] = doc("local scratch directory for files on their way to or from remote storage; null: the system temp dir")


@dataclass
class TrackingConfig:
    enabled: bool = doc("log to MLflow on rank 0")
    uri: Optional[str] = doc("MLflow tracking URI; null means sqlite:///<run.root>/mlflow.db")
    experiment: str = doc("MLflow experiment name")
    tags: list = doc("extra MLflow run tags as 'key=value' strings; a sweep adds sweep.id, sweep.num and sweep.overrides")


@dataclass
class ClusterConfig:
    kind: str = doc("where processes run: local (this machine) or slurm (a batch job submitted through submitit)")
    nproc_per_node: int = doc("processes per node, one per GPU or CPU ranks with gloo (Slurm: --ntasks-per-node); world size = nodes x nproc_per_node")
    nodes: int = doc("machines (Slurm: --nodes); 1 for local")
    gpus_per_node: int = doc("GPUs per node, at most nproc_per_node (Slurm: --gpus-per-node); 0 requests none")
    cpus_per_task: Optional[int] = doc("CPU cores per process (Slurm: --cpus-per-task); null: the cluster's default")
    mem_gb: Optional[int] = doc("memory per node in GB (Slurm: --mem); null: the cluster's default")
    partition: Optional[str] = doc("Slurm partition (--partition); null: the cluster's default partition")
    account: Optional[str] = doc("Slurm account to charge (--account); null: your default account")
    qos: Optional[str] = doc("Slurm quality of service (--qos); null: the default")
    constraint: Optional[str] = doc("Slurm node features required (--constraint), e.g. a100")
    exclusive: bool = doc("take whole nodes (Slurm: --exclusive)")
    time_min: int = doc("time limit of the Slurm job in minutes (--time); a job that reaches it saves and is requeued")
    signal_delay_s: int = doc("seconds before the time limit at which Slurm sends USR2 (save, then requeue)")
    max_requeues: int = doc("times a Slurm job may be requeued after preemption or its time limit; then it stops and says how to resume")
    extra_sbatch: list = doc("more sbatch options as 'name=value' or 'name' strings, e.g. ['reservation=big', 'mail-type=END']")
    setup: list = doc("shell lines the Slurm batch script runs before starting the processes, e.g. ['module load cuda']")
    wait: bool = doc("Slurm: stream rank 0's log until the job ends and exit with its status; false returns once submitted")
    dry_run: bool = doc("print what would run (for Slurm the sbatch script) and the resolved config; submit and start nothing")


@dataclass
class IsoflopConfig:
    """An isoFLOP study (experiment=isoflop, orchestrator/isoflop.py): every method at every rung
    of a ladder of models, each trained on the tokens that spend `budget` training FLOPs."""

    budget: float = doc("training FLOPs of every point (3 x forward FLOPs per token of model/flops.py x tokens); each point trains budget / FLOPs-per-token tokens, rounded to whole optimizer steps")
    methods: list = doc("methods to compare, values of model.ffn: dense, moe, pkm, peer")
    ladder: list = doc("model sizes: one mapping of model keys per rung (nested ones dotted, e.g. {d_model: 64, num_layers: 2, moe.d_ff: 256}), applied to every method")
    warmup_fraction: float = doc("each point's optim.warmup_steps as a share of its steps (cosine decay then runs to its last step)")
    min_steps: int = doc("refuse a plan whose point would train fewer optimizer steps than this (budget too small for the size)")
    point: Optional[int] = doc("index of this run in the plan; launch.py sets it for each point of the sweep (null: plan and run them all)")


@dataclass
class TrainConfig:
    run: RunConfig = doc("run naming and directories")
    model: ModelConfig = doc("the language model")
    data: DataConfig = doc("corpus, tokenizer and sequence length")
    optim: OptimConfig = doc("AdamW and the learning-rate schedule")
    parallel: ParallelConfig = doc("parallel degrees and ZeRO")
    trainer: TrainerConfig = doc("the training loop")
    checkpoint: CheckpointConfig = doc("checkpoint saving and resumption")
    tracking: TrackingConfig = doc("MLflow tracking")
    cluster: ClusterConfig = doc("process placement")
    # Optional and last: only experiment=isoflop (and the ablations) set it; the trainer ignores it.
    isoflop: Optional[IsoflopConfig] = dataclasses.field(default=None, metadata={
        "doc": "isoFLOP study settings (experiment=isoflop); null for an ordinary run"})

    @property
    def world_size(self) -> int:
        return self.cluster.nodes * self.cluster.nproc_per_node


# ----------------------------------------------------------------------------- conversion


def load_config(raw: dict) -> TrainConfig:
    """Build a TrainConfig from a plain nested dict, refusing unknown, missing or mistyped keys."""
    return _build(TrainConfig, raw, prefix="")


def _build(cls: type, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", raw, f"expected a mapping for {cls.__name__}",
                          "give this key a mapping of fields (see conf/)")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        key = prefix + unknown[0]
        raise ConfigError(key, raw[unknown[0]], "unknown key",
                          f"remove it or use one of: {', '.join(names)}")
    values = {}
    for name in names:
        key = prefix + name
        if name not in raw:
            raise ConfigError(key, None, "missing required key", f"set {key} in the YAML or on the command line")
        values[name] = _convert(hints[name], raw[name], key)
    return cls(**values)


def _convert(hint: Any, value: Any, key: str):
    origin = typing.get_origin(hint)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, key)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if value is None:
        raise ConfigError(key, value, "must not be null", f"set {key} to a {getattr(hint, '__name__', hint)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, value, "expected true or false", f"set {key}=true or {key}=false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, value, "expected an integer", f"set {key} to a whole number")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, value, "expected a number", f"set {key} to a number such as 3e-4")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, value, "expected a string", f"quote the value of {key}")
    if hint is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(key, value, "expected a list", f"write {key}=[...]")
    raise TypeError(f"unsupported schema type {hint!r} for {key}")  # a schema bug, not user input


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; used for MLflow params and config comparisons."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def describe(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """One line per leaf key: `key: doc`. Printed by `python launch.py --help-keys`."""
    lines = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if typing.get_origin(hint) is typing.Union:  # Optional[SomeConfig]: document its keys
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if dataclasses.is_dataclass(hint):
            lines += describe(hint, f"{prefix}{f.name}.")
        else:
            lines.append(f"{prefix}{f.name}: {f.metadata.get('doc', '')}")
    return lines


# ----------------------------------------------------------------------------- validation


def validate(cfg: TrainConfig, *, cuda_device_count: int = 0) -> None:
    """Check every combination that cannot work; raise the first as a ConfigError."""
    _validate_model(cfg)
    _validate_data(cfg)
    _validate_optim(cfg.optim)
    _validate_trainer(cfg.trainer, cuda_device_count)
    _validate_cluster(cfg.cluster)  # before the parallel degrees, which are checked against it
    _validate_parallel(cfg)
    _validate_io(cfg)
    if cfg.isoflop is not None:
        _validate_isoflop(cfg.isoflop)


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
    _positive("model.pkm.num_values", p.num_values, 4)
    root = math.isqrt(p.num_values)
    if root * root != p.num_values:
        raise ConfigError("model.pkm.num_values", p.num_values,
                          "must be a perfect square (product keys split slots into sqrt(N) x sqrt(N))",
                          f"use {root * root} ({root}^2) or {(root + 1) ** 2} ({root + 1}^2)")
    _positive("model.pkm.num_heads", p.num_heads)
    _positive("model.pkm.top_k", p.top_k)
    if p.top_k > root:
        raise ConfigError("model.pkm.top_k", p.top_k,
                          f"exceeds sqrt(num_values)={root}, the number of sub-keys per half",
                          f"set model.pkm.top_k<={root} or raise model.pkm.num_values")
    _positive("model.pkm.d_key", p.d_key, 2)
    if p.d_key % 2:
        raise ConfigError("model.pkm.d_key", p.d_key, "must be even (split into two product-key halves)",
                          f"set model.pkm.d_key={p.d_key + 1}")
    _one_of("model.pkm.impl", p.impl, PEER_IMPLS)
    if cfg.parallel.ep > 1:
        raise ConfigError("parallel.ep", cfg.parallel.ep, "PKM memories are not expert-parallel (the value table is "
                          "replicated)", "set parallel.ep=1 with model=pkm")


def _validate_peer(p: PeerConfig) -> None:
    _positive("model.peer.num_experts", p.num_experts, 4)
    root = math.isqrt(p.num_experts)
    if root * root != p.num_experts:
        lo, hi = root * root, (root + 1) ** 2
        raise ConfigError("model.peer.num_experts", p.num_experts,
                          "must be a perfect square (product keys split experts into sqrt(N) x sqrt(N))",
                          f"use {lo} ({root}^2) or {hi} ({root + 1}^2)")
    _positive("model.peer.num_heads", p.num_heads)
    _positive("model.peer.top_k", p.top_k)
    if p.top_k > root:
        raise ConfigError("model.peer.top_k", p.top_k,
                          f"exceeds sqrt(num_experts)={root}, the number of sub-keys per half",
                          f"set model.peer.top_k<={root} or raise model.peer.num_experts")
    _positive("model.peer.d_key", p.d_key, 2)
    if p.d_key % 2:
        raise ConfigError("model.peer.d_key", p.d_key, "must be even (split into two product-key halves)",
                          f"set model.peer.d_key={p.d_key + 1}")
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
    if not d.source:
        raise ConfigError("data.source", d.source, "is empty", "use data.source=stdlib or a path/URL of text files")
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


def _validate_trainer(t: TrainerConfig, cuda_device_count: int) -> None:
    _positive("trainer.max_steps", t.max_steps)
    _positive("trainer.micro_batch_size", t.micro_batch_size)
    _positive("trainer.grad_accum_steps", t.grad_accum_steps)
    _positive("trainer.log_every", t.log_every)
    _positive("trainer.eval_every", t.eval_every, 0)
    _positive("trainer.eval_batches", t.eval_batches)
    _one_of("trainer.device", t.device, ("auto", "cpu", "cuda"))
    _one_of("trainer.precision", t.precision, ("auto", "fp32", "bf16"))
    if t.device == "cuda" and cuda_device_count == 0:
        raise ConfigError("trainer.device", t.device, "no CUDA device is visible on this machine",
                          "set trainer.device=auto or cpu")
    on_gpu = t.device == "cuda" or (t.device == "auto" and cuda_device_count > 0)
    if t.precision == "bf16" and not on_gpu:
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
                          f"set parallel.dp={world // (p.tp * p.pp) if world % (p.tp * p.pp) == 0 else world}"
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
    if c.kind == "local" and c.nodes != 1:
        raise ConfigError("cluster.nodes", c.nodes, "a local run uses this one machine",
                          "set cluster.nodes=1, or cluster=slurm to run on several nodes")
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


if __name__ == "__main__":
    print("\n".join(describe()))
