"""Typed run configuration: schemas in code, values in conf/*.yaml.

`load_config(raw_dict)` turns the plain dict that launch.py gets from Hydra into a
`TrainConfig` of dataclasses, checking every key and type, then `validate()` checks the
combinations (orchestrator/validation.py). Both raise `ConfigError` (one line: key, value, fix). Nothing here knows Hydra.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Optional

from model.config import ModelConfig, doc
from orchestrator.errors import ConfigError

from orchestrator.tokenizer import BYTE_VOCAB_SIZE  # noqa: F401  (re-exported; defined beside the tokenizer)


@dataclass
class RunConfig:
    name: str = doc("run name; the run directory and the MLflow run name derive from it")
    root: str = doc("folder that holds run directories and the default MLflow store (runs/mlflow.db)")
    dir: str = doc("this run's directory: metrics.jsonl, config, logs and (by default) checkpoints")


@dataclass
class DataConfig:
    source: str = doc("'stdlib' (the running Python's standard library sources, always present) or an fsspec URL: file, directory or glob of plain-text, JSON Lines (.jsonl/.json, .gz/.zst), Parquet files or a Hugging Face save_to_disk folder; ignored when data.mixture is set")
    tokenizer: str = doc("'bytes' (257 tokens) or a local path to a Hugging Face tokenizer.json (needs the tokenizers package)")
    seq_len: int = doc("tokens per training sequence")
    val_fraction: float = doc("share of documents held out for validation, chosen by a hash of each plain-text file's path or each record's text")
    cache_dir: str = doc("where prepared token shards are cached (local path; ~ expands); keyed by source, files, tokenizer, text_field and val_fraction")
    text_field: str = doc("the JSON Lines field / Parquet or dataset column that holds a record's text")
    num_workers: int = doc("processes that tokenize in parallel while preparing the cache (1: in the training process)")
    mixture: list = doc("weighted sources, e.g. [{name: web, source: /data/web, weight: 0.7}, {name: code, source: /data/code, weight: 0.3}] (optional text_field each); every step draws its windows by weight; [] trains on data.source alone")


@dataclass
class OptimConfig:
    lr: float = doc("peak learning rate of AdamW")
    min_lr_ratio: float = doc("learning rate at the end of cosine decay, as a fraction of lr")
    warmup_steps: int = doc("linear warmup steps from 0 to lr")
    decay_steps: Optional[int] = doc("steps of cosine decay after warmup; null: until trainer.max_steps (on resume: the checkpoint's)")
    weight_decay: float = doc("AdamW decoupled weight decay on matrices (not on norms, biases, keys or embeddings)")
    beta1: float = doc("AdamW beta1")
    beta2: float = doc("AdamW beta2")
    eps: float = doc("AdamW epsilon")
    grad_clip: float = doc("clip the global gradient norm to this value; 0 disables")
    # A default so that code building an OptimConfig by hand need not name it; the YAML carries the key.
    expert_tables: str = dataclasses.field(default="adamw", metadata={
        "doc": "optimizer of the PEER expert tables U and V: adamw (every row every step, like the rest of the model) "
               "or row_sparse (lazy AdamW: only the rows retrieved in the step are updated, with per-row moments and "
               "bias correction; orchestrator/row_sparse_adamw.py); the rest of the model stays on AdamW"})


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
    # Last and with a default so code that builds a TrainerConfig by hand need not name it.
    eval_sources: Optional[dict] = dataclasses.field(default=None, metadata={"doc": "extra named evaluation sources, {name: source} (source as in data.source), evaluated at every evaluation next to the run's own validation split and logged as val_<name>_loss, ... (orchestrator/evaluate.py); null for none"})
    # A default so that trainers built in code need not name it; the YAML carries the key.
    activation_checkpointing: str = dataclasses.field(default="none", metadata={
        "doc": "none, blocks (keep only each block's input, recompute the block in the backward) or sparse (recompute only the PEER/PKM/MoE layers)"})


@dataclass
class CheckpointConfig:
    dir: str = doc("where checkpoints go: a local path or any fsspec URL (file://, s3://, ...); a rerun resumes from the latest complete one here")
    every_steps: int = doc("steps between checkpoints; 0 saves only at the end (and on a stop signal)")
    resume: bool = doc("resume from the latest complete checkpoint in checkpoint.dir when one exists")
    load_step: Optional[int] = doc("resume from the checkpoint of this step instead of the latest; null for the latest")
    keep_last: int = doc("keep this many newest complete checkpoints, deleting older ones after each save; 0 keeps all")
    staging_dir: Optional[str] = doc("local scratch directory for files on their way to or from remote storage; null: the system temp dir")
    init_from: Optional[str] = doc("warm start: initialise the model from a run's checkpoint dir, a step dir or an export (local or URL), then train from step 0; ignored once this run has checkpoints of its own")
    init_optimizer: bool = doc("with init_from: also take its optimizer state (AdamW moments and step counts)")
    init_strict: bool = doc("with init_from: every tensor must be there with its shape; false loads the tensors that match and lists the new and unused ones")
    export_max_shard_gb: float = doc("python -m orchestrator.export: largest safetensors file, in GB (a bigger tensor gets a file of its own)")


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
    shutdown_grace_s: int = doc("local launcher: seconds the workers get to save and exit after a stop signal is forwarded, before they are killed; a save in progress extends it until the save ends (at most cluster.collective_timeout_s more)")
    # Several hosts (cluster/rendezvous.py). Slurm finds ranks, the first node and a port itself;
    # without Slurm these are torchrun's --node-rank, --master-addr, --master-port (and
    # cluster.nodes is its --nnodes).
    node_rank: int = doc("local launch over several hosts: this host's index in [0, cluster.nodes) (torchrun's --node-rank); node_rank 0 runs on master_addr and hosts the rendezvous. Slurm ignores it")
    master_addr: Optional[str] = doc("local launch over several hosts: address of the node_rank 0 host, the same on every host (torchrun's --master-addr); null with cluster.nodes=1. Slurm uses the address of the job's first node")
    master_port: int = doc("local launch over several hosts: TCP port of the rendezvous on master_addr, the same on every host (torchrun's --master-port). Slurm derives a port from the job id")
    join_timeout_s: int = doc("seconds the hosts of a local multi-host launch wait for each other; then every host that came fails with one line naming the node ranks that did not")
    network_interface: Optional[str] = doc("network interface gloo and NCCL use between hosts (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME); null: the interface routed to the rendezvous address (never loopback)")
    requeue: bool = doc("Slurm: a job hit by preemption or a node failure is requeued (--requeue) and resumes from its last checkpoint; false: --no-requeue, it fails with a line naming the failed node")
    collective_timeout_s: int = doc("seconds a collective may wait for a peer before the rank fails (the process group timeout); bounds how long the survivors of a dead node or rank hang")


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
class EvalConfig:
    """`python -m orchestrator.evaluate` options (eval.<key>=<value>); not part of a run's config."""

    sources: Optional[dict] = doc("named sources to evaluate, {name: source} (source as in data.source); null: the run's own data.source, named val")
    batches: Optional[int] = doc("validation batches per source; null: the run's trainer.eval_batches (the windows the run itself evaluated on)")
    batch_size: Optional[int] = doc("windows per batch; null: the run's trainer.micro_batch_size")
    output: Optional[str] = doc("where the JSON results go; null: eval_step<step>.json in the current directory")
    device: str = doc("auto (cuda when available), cpu or cuda")


@dataclass
class PlanConfig:
    """The planner (orchestrator/plan.py): memory, communication and time of a run before it starts."""

    device: str = doc("device the plan models: auto (cpu without GPUs, else the GPU found here, h100 when none is visible), cpu, h100, h200 or a100")
    check: bool = doc("refuse to launch a run the planner predicts will not fit in the device's memory; false launches anyway")
    table: bool = doc("python -m orchestrator.plan: a table over layouts and device counts instead of one plan")
    max_devices: int = doc("table mode: the largest device count (powers of two from 1)")


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
    plan: Optional[PlanConfig] = dataclasses.field(default=None, metadata={
        "doc": "the planner's device and launch check (conf/config.yaml); null: device auto, check on"})

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
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(key, value, "expected a mapping", f"write {key}={{name: value, ...}}")
    if hint is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(key, value, "expected a list", f"write {key}=[...]")
    raise TypeError(f"unsupported schema type {hint!r} for {key}")  # a schema bug, not user input


def load_section(cls: type, raw: Any, key: str):
    """One part of a config (e.g. ModelConfig from a saved run config's "model"), checked as
    load_config checks it; `key` is its place in the config, for error messages."""
    return _build(cls, raw, prefix=key + ".")


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
    """Check every combination that cannot work (orchestrator/validation.py); raise the first as
    a ConfigError."""
    from orchestrator.validation import validate as validate_combinations

    validate_combinations(cfg, cuda_device_count=cuda_device_count)


if __name__ == "__main__":
    print("\n".join(describe()))
