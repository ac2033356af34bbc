"""Evaluate a trained model on one or several named sources: loss, perplexity, bits per byte, and
expert usage per sparse layer.

    python -m orchestrator.evaluate <run dir | checkpoint dir | step dir | export | URL> \\
        'eval.sources={code: stdlib, docs: "/data/docs/**/*.txt"}' eval.batches=16

Overrides are key=value, the value read as YAML: eval.* (orchestrator/config.py EvalConfig),
tracking.enabled/uri/experiment, data.cache_dir. Each source is prepared exactly as training
prepares data.source (orchestrator/corpus.py: same tokenizer, same val_fraction, same cache) and
its *validation* split is read through orchestrator/data.ValBatches: `batches` x `batch_size`
windows of seq_len + 1 tokens whose starts come from numpy's default_rng([0, 1]) over that split,
independent of the run's seed and of the layout. With the defaults (the run's own data.source,
trainer.eval_batches, trainer.micro_batch_size, data.seq_len) these are the windows the training
run evaluated on, so `evaluate` reproduces the val_loss the run logged at that step (exactly
for a one-process run; after dp > 1 closely, since the reader pools the ranks' BatchNorm
statistics, orchestrator/model_io.py).

Measures, per source: loss = mean cross-entropy in nats over every predicted token (every batch
has as many tokens, so also the mean of batch means, as the trainer computes it); perplexity =
exp(loss); bits per byte, byte tokenizer only, = total nats / ln 2 / number of predicted tokens that
are bytes (end-of-document predictions cost bits but carry no byte); per sparse layer (PEER, PKM,
MoE), the share of experts used at least once and KL(usage || uniform) over these windows.

Output: a table (one row per source), a JSON file (eval.output), and, when tracking is enabled,
an MLflow run tagged peer_lab.train_run_id=<the training run's MLflow id> (and peer_lab.kind=
evaluation) with every metric at the checkpoint's step. The trainer evaluates trainer.eval_sources
with the same code (`SourceEvaluator`), logged as val_<name>_loss and so on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from orchestrator.errors import USER_ERROR_EXIT_CODE, ConfigError
from orchestrator.storage import redact

LN2 = math.log(2.0)


@dataclass
class SourceResult:
    name: str
    source: str
    num_windows: int
    tokens: int  # predicted tokens
    loss: float
    perplexity: float
    bits_per_byte: Optional[float]
    layers: list[dict] = field(default_factory=list)  # per sparse layer: {"layer", "kind", "usage", "kl_uniform"}
    windows: dict = field(default_factory=dict)  # how the windows were chosen

    def metrics(self, prefix: str) -> dict[str, float]:
        """Flat metrics, e.g. prefix 'val_docs_' -> val_docs_loss, val_docs_perplexity, ..."""
        out = {f"{prefix}loss": self.loss, f"{prefix}perplexity": self.perplexity}
        if self.bits_per_byte is not None:
            out[f"{prefix}bits_per_byte"] = self.bits_per_byte
        for i, layer in enumerate(self.layers):
            out[f"{prefix}expert_usage_{i}"] = layer["usage"]
            out[f"{prefix}expert_kl_uniform_{i}"] = layer["kl_uniform"]
        return out


class SourceEvaluator:
    """The validation windows of named sources, prepared once; `evaluate` runs a model over them.

    dp_rank / dp_size split the batches as the trainer splits its own; `evaluate` sums over the
    world when torch.distributed is initialised (every rank must call it)."""

    def __init__(self, sources: dict[str, str], data_cfg, tokenizer, batch_size: int, num_batches: int,
                 dp_rank: int = 0, dp_size: int = 1, key: str = "eval.sources"):
        from orchestrator.data import DEFAULT_VAL_SEED, ValBatches, prepare_corpus

        if not isinstance(sources, dict) or not sources:
            raise ConfigError(key, sources, "expected a non-empty mapping of names to sources",
                              f"write {key}={{name: stdlib, other: '/path/**/*.txt'}}")
        self.byte_level = getattr(tokenizer, "name", "").startswith("bytes")
        self.batches: dict[str, Any] = {}
        self.specs: dict[str, str] = {}
        self.windows: dict[str, dict] = {}
        for name, spec in sources.items():
            if not isinstance(spec, str) or not str(name).isidentifier():
                raise ConfigError(f"{key}.{name}", spec, "needs an identifier as name and a source string",
                                  "give name: stdlib, or name: a path, directory, glob or fsspec URL")
            try:
                corpus = prepare_corpus(dataclasses.replace(data_cfg, source=spec), tokenizer)
                val = ValBatches(corpus.load("val"), data_cfg.seq_len, batch_size, num_batches, dp_rank, dp_size)
            except ConfigError as exc:
                raise ConfigError(f"{key}.{name}", spec, exc.problem, exc.fix) from None
            self.batches[name], self.specs[name] = val, spec
            all_starts = ValBatches(corpus.load("val"), data_cfg.seq_len, batch_size, num_batches, 0, 1)._starts
            self.windows[name] = {
                "split": "val", "val_tokens": int(corpus.meta["val"]["num_tokens"]),
                "val_documents": int(corpus.meta["val"]["num_documents"]),
                "num_windows": int(all_starts.size), "window_tokens": data_cfg.seq_len + 1,
                "starts_rule": f"numpy default_rng([{DEFAULT_VAL_SEED}, 1]).integers(0, val_tokens - seq_len, "
                               f"size=({num_batches}, {batch_size}))",
                "first_starts": [int(s) for s in all_starts.flatten()[:4]],
                "starts_sha256": hashlib.sha256(np.ascontiguousarray(all_starts, dtype=np.int64).tobytes()).hexdigest()[:16],
            }

    @torch.no_grad()
    def evaluate(self, forward, usage_layers: list, device: torch.device) -> dict[str, SourceResult]:
        """forward(inputs_BT, targets_BT) -> LMOutput (the model or the DeepSpeed engine, in eval
        mode); usage_layers: the model's sparse layers (their usage counters are reset and read)."""
        import torch.distributed as dist

        from orchestrator.engine.base import expert_usage_stats

        results = {}
        for name, val in self.batches.items():
            for layer in usage_layers:
                layer.reset_usage()
                layer.track_usage = True
            # nats, predicted tokens, predicted byte tokens, windows
            sums = torch.zeros(4, dtype=torch.float64)
            for inputs, targets in val:
                out = forward(inputs.to(device), targets.to(device))
                nats = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.to(device).flatten(), reduction="sum")
                sums += torch.tensor([float(nats), targets.numel(), float((targets < 256).sum()), inputs.shape[0]],
                                     dtype=torch.float64)
            counts = [layer.usage_counts.clone() for layer in usage_layers]
            for layer in usage_layers:
                layer.track_usage = False
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                # tp ranks of a replica add the same numbers: ratios below are unchanged by that.
                sums = sums.to(device)
                dist.all_reduce(sums)
                for c in counts:
                    dist.all_reduce(c)
            nats, tokens, byte_tokens, windows = (float(x) for x in sums.cpu())
            loss = nats / max(tokens, 1.0)
            layers = []
            for i, (layer, c) in enumerate(zip(usage_layers, counts)):
                usage, kl = expert_usage_stats(c)
                layers.append({"layer": i, "kind": type(layer).__name__, "num_experts": int(c.numel()),
                               "usage": usage, "kl_uniform": kl})
            results[name] = SourceResult(
                name=name, source=self.specs[name], num_windows=self.windows[name]["num_windows"],
                tokens=int(self.windows[name]["num_windows"] * (self.windows[name]["window_tokens"] - 1)),
                loss=loss, perplexity=math.exp(min(loss, 50.0)),
                bits_per_byte=(nats / LN2 / byte_tokens) if self.byte_level and byte_tokens else None,
                layers=layers, windows=self.windows[name])
        return results


# ----------------------------------------------------------------------------- trainer hook


def evaluator_for_training(cfg, tokenizer, dp_rank: int, dp_size: int) -> Optional[SourceEvaluator]:
    """The trainer's evaluator of trainer.eval_sources (None when empty), windows as its own val."""
    sources = cfg.trainer.eval_sources
    if not sources:
        return None
    if cfg.parallel.pp > 1:
        raise ConfigError("trainer.eval_sources", sources, "not evaluated under parallel.pp>1 (a pipeline "
                          "stage has no whole model)", "evaluate a checkpoint with python -m orchestrator.evaluate")
    return SourceEvaluator(sources, cfg.data, tokenizer, cfg.trainer.micro_batch_size, cfg.trainer.eval_batches,
                           dp_rank, dp_size, key="trainer.eval_sources")


def evaluate_for_training(evaluator: SourceEvaluator, engine, device, reporter, step: int) -> dict[str, float]:
    """The trainer's periodic evaluation of trainer.eval_sources (every rank calls it): logs
    val_<name>_loss, _perplexity, _bits_per_byte, _expert_usage_<i>, _expert_kl_uniform_<i> at
    `step` and prints one line per source through the rank-0 reporter."""
    engine.eval()
    try:
        results = evaluator.evaluate(engine, list(engine.module.usage_layers()), device)
    finally:
        engine.train()
    metrics: dict[str, float] = {}
    for name, r in results.items():
        metrics.update(r.metrics(f"val_{name}_"))
        bpb = f" | bpb {r.bits_per_byte:.3f}" if r.bits_per_byte is not None else ""
        reporter.print(f"eval step {step} | {name} | loss {r.loss:.4f} | ppl {r.perplexity:.2f}{bpb} | {r.num_windows} windows")
    reporter.log_metrics(step, metrics)
    return metrics


# ----------------------------------------------------------------------------- command line


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """['eval.batches=4', 'eval.sources={a: stdlib}'] -> {'eval.batches': 4, ...}; values as YAML."""
    import yaml

    allowed = {f"eval.{f.name}" for f in dataclasses.fields(_eval_config_class())}
    allowed |= {"tracking.enabled", "tracking.uri", "tracking.experiment", "data.cache_dir"}
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(pair, None, "not a key=value override", "write e.g. eval.batches=16")
        key, text = pair.split("=", 1)
        if key not in allowed:
            raise ConfigError(key, text, "unknown key", f"use one of: {', '.join(sorted(allowed))}")
        try:
            out[key] = yaml.safe_load(text) if text else None
        except yaml.YAMLError as exc:
            raise ConfigError(key, text, f"not a YAML value ({str(exc).splitlines()[0]})",
                              "quote it, e.g. 'eval.sources={docs: \"/data/**/*.txt\"}'") from None
    return out


def _eval_config_class():
    from orchestrator.config import EvalConfig

    return EvalConfig


def evaluate_checkpoint(source: str, overrides: dict[str, Any]) -> tuple[dict, dict[str, SourceResult]]:
    """Everything the CLI does but printing: (record for the JSON file, results by source name)."""
    from orchestrator.config import DataConfig, load_section
    from orchestrator.model_io import build_loaded_model, describe_state, read_model_state, resolve_device, tokenizer_spec
    from orchestrator.tokenizer import check_model_vocab, load_tokenizer

    raw = {f.name: None for f in dataclasses.fields(_eval_config_class())}
    raw["device"] = "auto"
    raw.update({k[len("eval."):]: v for k, v in overrides.items() if k.startswith("eval.")})
    opts = load_section(_eval_config_class(), raw, "eval")
    for key in ("batches", "batch_size"):
        if getattr(opts, key) is not None and getattr(opts, key) < 1:
            raise ConfigError(f"eval.{key}", getattr(opts, key), "must be at least 1", f"set eval.{key}=1 or more")
    device = resolve_device(opts.device)
    state = read_model_state(source)
    run = state.config
    data_cfg = load_section(DataConfig, run["data"], "data")
    if "data.cache_dir" in overrides:
        data_cfg = dataclasses.replace(data_cfg, cache_dir=str(overrides["data.cache_dir"]))
    if state.tokenizer_file:
        data_cfg = dataclasses.replace(data_cfg, tokenizer=state.tokenizer_file)
    tokenizer = load_tokenizer(tokenizer_spec(state))
    check_model_vocab(tokenizer, run["model"]["vocab_size"])
    sources = opts.sources if opts.sources is not None else {"val": run["data"]["source"]}
    trainer = run["trainer"]
    evaluator = SourceEvaluator(sources, data_cfg, tokenizer, opts.batch_size or trainer["micro_batch_size"],
                                opts.batches or trainer["eval_batches"])
    model = build_loaded_model(state, device)
    results = evaluator.evaluate(model, list(model.usage_layers()), device)
    record = {"checkpoint": describe_state(state), "device": device.type, "seq_len": data_cfg.seq_len,
              "tokenizer": tokenizer.name, "results": {n: dataclasses.asdict(r) for n, r in results.items()}}
    record["output"] = opts.output or f"eval_step{state.step}.json"
    record["tracking"] = _tracking_settings(run, overrides)
    return record, results


def _tracking_settings(run: dict, overrides: dict) -> dict:
    from orchestrator.tracking import default_tracking_uri

    t = run.get("tracking", {})
    enabled = overrides.get("tracking.enabled", t.get("enabled", False))
    uri = overrides.get("tracking.uri", t.get("uri")) or default_tracking_uri(run.get("run", {}).get("root", "runs"))
    return {"enabled": bool(enabled), "uri": uri, "experiment": overrides.get("tracking.experiment",
                                                                               t.get("experiment", "peer-lab"))}


def format_table(results: dict[str, SourceResult]) -> str:
    """One row per source, as the paper's Table 1; sparse layers' usage and KL after the bar."""
    header = f"{'source':<12} {'windows':>7} {'tokens':>9} {'loss':>7} {'ppl':>8} {'bpb':>6} | expert usage, KL per sparse layer"
    lines = [header, "-" * len(header)]
    for r in results.values():
        bpb = f"{r.bits_per_byte:.3f}" if r.bits_per_byte is not None else "-"
        layers = "  ".join(f"{l['kind']} {l['usage']:.1%} {l['kl_uniform']:.3f}" for l in r.layers) or "-"
        lines.append(f"{r.name:<12} {r.num_windows:>7} {r.tokens:>9,} {r.loss:>7.4f} {r.perplexity:>8.2f} {bpb:>6} | {layers}")
    return "\n".join(lines)


def log_to_mlflow(record: dict, results: dict[str, SourceResult], json_path: str) -> str:
    """An MLflow run of this evaluation, linked to the training run by tag; returns its id."""
    import mlflow

    tracking, ckpt = record["tracking"], record["checkpoint"]
    uri = tracking["uri"]
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri[len("sqlite:///"):]) or ".", exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(tracking["experiment"])
    with mlflow.start_run(run_name=f"eval-{ckpt['run_name']}-step{ckpt['step']}") as run:
        tags = {"peer_lab.kind": "evaluation", "peer_lab.checkpoint": ckpt["source"],
                "peer_lab.checkpoint_step": str(ckpt["step"])}
        if ckpt.get("train_run_id"):
            tags["peer_lab.train_run_id"] = ckpt["train_run_id"]
        mlflow.set_tags(tags)
        metrics = {}
        for name, r in results.items():
            metrics.update(r.metrics(f"{name}_"))
        mlflow.log_metrics({k: v for k, v in metrics.items() if v == v}, step=int(ckpt["step"]))  # NaN KLs left out
        mlflow.log_artifact(json_path)
        return run.info.run_id


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else USER_ERROR_EXIT_CODE
    try:
        record, results = evaluate_checkpoint(argv[0], parse_overrides(argv[1:]))
        print(f"{record['checkpoint']['kind']} {record['checkpoint']['source']} step {record['checkpoint']['step']}; "
              f"seq_len {record['seq_len']}; {record['tokenizer']}; device {record['device']}")
        for r in results.values():
            w = r.windows
            print(f"{r.name}: {r.source} -> val split {w['val_documents']} docs {w['val_tokens']:,} tokens; "
                  f"{w['num_windows']} windows of {w['window_tokens']} tokens, starts {w['starts_rule']} "
                  f"(first {w['first_starts']}, sha256 {w['starts_sha256']})")
        print(format_table(results))
        path = record["output"]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({**record, "tracking": {**record["tracking"], "uri": redact(record["tracking"]["uri"])}}, f, indent=1)
        os.replace(tmp, path)  # whole or absent
        print(f"wrote {path}")
        if record["tracking"]["enabled"]:
            run_id = log_to_mlflow(record, results, path)
            print(f"mlflow: run {run_id} at {redact(record['tracking']['uri'])} (tag peer_lab.train_run_id="
                  f"{record['checkpoint'].get('train_run_id')})")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
