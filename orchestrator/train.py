"""One training process: process group -> data -> model -> DeepSpeed engine -> train loop.

`train_main(cfg_dict)` is what launchers run in every rank (cluster/ hands it the validated config
as a plain dict). Metrics go through the rank-0 Reporter; checkpoints through orchestrator/checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from orchestrator import checkpoint
from orchestrator.config import TrainConfig, flatten, load_config, to_dict
from orchestrator.errors import USER_ERROR_EXIT_CODE, ConfigError
from orchestrator.tracking import Reporter, Stopwatch


def train_main(cfg_dict: dict) -> None:
    """Entry point of a rank. A user error found here exits with code 2 and one line."""
    try:
        cfg = load_config(cfg_dict)
        Trainer(cfg).run()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT_CODE)


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        t = cfg.trainer
        self.use_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and self.use_cuda)
        self.device = torch.device("cuda", self.local_rank) if self.use_cuda else torch.device("cpu")
        self.state = TrainState()

    # ------------------------------------------------------------------ setup
    def _init_distributed(self) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if self.use_cuda else "cpu")
        if self.use_cuda:
            torch.cuda.set_device(self.device)
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if self.use_cuda else "gloo", auto_mpi_discovery=False)
        # dp x tp x pp = world with tp = pp = 1 for now: every rank is its own data-parallel shard.
        self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()

    def _prepare_data(self):
        from orchestrator.data import TrainBatches, ValBatches, prepare_corpus
        from orchestrator.tokenizer import check_model_vocab, load_tokenizer

        d, t = self.cfg.data, self.cfg.trainer
        tokenizer = load_tokenizer(d.tokenizer)
        check_model_vocab(tokenizer, self.cfg.model.vocab_size)
        # Rank 0 tokenizes; the others then find the finished cache.
        if self.rank == 0:
            corpus = prepare_corpus(d, tokenizer)
        dist.barrier()
        if self.rank != 0:
            corpus = prepare_corpus(d, tokenizer)
        self.corpus = corpus
        self.batches = TrainBatches(corpus.load("train"), d.seq_len, t.micro_batch_size, t.grad_accum_steps,
                                    self.dp_rank, self.dp_size, t.seed)
        # The validation windows do not depend on trainer.seed, so runs with different seeds are
        # evaluated on the same text.
        self.val_batches = ValBatches(corpus.load("val"), d.seq_len, t.micro_batch_size, t.eval_batches,
                                      self.dp_rank, self.dp_size)

    def _build(self):
        from model.flops import count_model, format_counts
        from model.lm import build_model
        from orchestrator.engine import build_engine

        torch.manual_seed(self.cfg.trainer.seed)
        model = build_model(self.cfg.model, expert_parallel_size=self.cfg.parallel.ep)
        self.counts = count_model(self.cfg.model, self.cfg.data.seq_len)
        self.counts_text = format_counts(self.counts)
        self.engine, self.scheduler = build_engine(model.to(self.device), self.cfg, self.bf16)

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.trainer
        return t.micro_batch_size * t.grad_accum_steps * self.dp_size * self.cfg.data.seq_len

    # ------------------------------------------------------------------ run
    def run(self) -> None:
        self._init_distributed()
        status = "FAILED"
        self.reporter: Optional[Reporter] = None
        try:
            self._prepare_data()
            self._build()
            resumed = self._maybe_resume()
            c = self.cfg
            self.reporter = Reporter(self.rank, c.run.dir, c.tracking, c.run.root, c.run.name,
                                     c.trainer.max_steps, c.trainer.progress_bar)
            self.reporter.start(self.state.step, resumed.get("mlflow_run_id") if resumed else None)
            self._announce(resumed is not None)
            self._loop()
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if self.reporter is not None:
                self.reporter.close(status)
            if dist.is_initialized():
                dist.destroy_process_group()

    def _maybe_resume(self) -> Optional[dict]:
        if not self.cfg.checkpoint.resume:
            return None
        client = checkpoint.load(self.engine, self.cfg.checkpoint.dir)
        if client is None:
            return None
        self.state = TrainState(**client["train_state"])
        self.batches.load_state_dict(client["data"])
        return client

    def _announce(self, resumed: bool) -> None:
        r, c = self.reporter, self.cfg
        r.print(f"run dir: {os.path.abspath(c.run.dir)}")
        r.print(self.corpus.summary())
        r.print(f"model: {self.counts_text}")
        r.print(f"parallel: world={self.world_size} dp={c.parallel.dp} ep={c.parallel.ep} tp={c.parallel.tp} "
                f"pp={c.parallel.pp} zero={c.parallel.zero_stage} device={self.device.type} "
                f"precision={'bf16' if self.bf16 else 'fp32'}")
        if resumed:
            r.print(f"resumed from {checkpoint.tag_for_step(self.state.step)} in {c.checkpoint.dir}")
        if self.rank == 0:
            os.makedirs(c.run.dir, exist_ok=True)
            path = os.path.join(c.run.dir, "config.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(to_dict(c), f, indent=2)
            r.log_artifact(path)
        params = flatten(to_dict(c))
        params.update({f"counts.{k}": v for k, v in vars(self.counts).items() if not isinstance(v, dict)})
        r.log_params(params)

    def _loop(self) -> None:
        c, r = self.cfg, self.reporter
        t = c.trainer
        window_losses: list[float] = []
        watch, window_steps = Stopwatch(), 0
        self.engine.train()
        while self.state.step < t.max_steps:
            lr = self.scheduler.get_last_lr()[0]
            loss = self._train_step()
            self.state.step += 1
            self.state.tokens_seen += self.tokens_per_step
            window_losses.append(loss)
            window_steps += 1
            step = self.state.step
            r.advance(step)
            if step % t.log_every == 0 or step == t.max_steps:
                elapsed = watch.lap()
                tokens_per_s = window_steps * self.tokens_per_step / max(elapsed, 1e-9)
                metrics = {
                    "loss": sum(window_losses) / len(window_losses),
                    "lr": lr,
                    "grad_norm": self._grad_norm,
                    "tokens_per_s": tokens_per_s,
                    "flops_per_s": tokens_per_s * self.counts.flops_per_token_train,
                    "tokens_seen": self.state.tokens_seen,
                }
                r.log_metrics(step, metrics)
                eta = (t.max_steps - step) * elapsed / window_steps
                r.print(f"step {step}/{t.max_steps} | loss {metrics['loss']:.4f} | lr {lr:.2e} | "
                        f"grad norm {metrics['grad_norm']:.3f} | {tokens_per_s / 1e3:.1f}k tok/s | "
                        f"{metrics['flops_per_s'] / 1e9:.2f} GFLOP/s | eta {_duration(eta)}")
                window_losses, window_steps = [], 0
            final = step == t.max_steps
            if (t.eval_every and step % t.eval_every == 0) or final:
                self._evaluate_and_log(step)
                watch.lap()  # evaluation time is not training throughput
            every = c.checkpoint.every_steps
            if (every and step % every == 0) or final:
                checkpoint.save(self.engine, c.checkpoint.dir, step, self._client_state())
                r.print(f"saved checkpoint {checkpoint.tag_for_step(step)}")
                watch.lap()

    def _train_step(self) -> float:
        """One optimizer step over grad_accum_steps micro-batches; returns the global mean loss."""
        total = torch.zeros((), dtype=torch.float64)
        micro_batches = self.batches.next_step()
        self._grad_norm = float("nan")
        for i, (inputs, targets) in enumerate(micro_batches):
            out = self.engine(inputs.to(self.device), targets.to(self.device))
            self.engine.backward(out.loss)
            if i == len(micro_batches) - 1 and self.cfg.parallel.zero_stage == 0:
                # DeepSpeed computes the norm for ZeRO 1/2 but drops it when it clips without ZeRO.
                self._grad_norm = self._reduced_grad_norm()
            self.engine.step()
            total += out.loss.detach().double().cpu()
        if self.cfg.parallel.zero_stage > 0:
            self._grad_norm = _as_float(self.engine.get_global_grad_norm())
        mean = (total / len(micro_batches)).to(self.device)
        dist.all_reduce(mean, op=dist.ReduceOp.SUM)
        return float(mean) / self.dp_size

    def _reduced_grad_norm(self) -> float:
        """Global L2 norm of the (already data-parallel-averaged) gradients, before clipping.
        Expert parameters are sharded over the expert-parallel group, so their squares are summed
        across it; every other gradient is replicated."""
        from deepspeed.moe.utils import is_moe_param

        dense_sq = torch.zeros((), dtype=torch.float64, device=self.device)
        expert_sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.engine.module.parameters():
            if p.grad is None:
                continue
            sq = p.grad.detach().double().pow(2).sum()
            if is_moe_param(p):
                expert_sq += sq
            else:
                dense_sq += sq
        if self.cfg.parallel.ep > 1:
            from deepspeed.utils import groups

            dist.all_reduce(expert_sq, group=groups._get_expert_parallel_group(f"ep_size_{self.cfg.parallel.ep}"))
        return math.sqrt(float(dense_sq + expert_sq))

    def _client_state(self) -> dict:
        return {
            "train_state": vars(self.state).copy(),
            "data": self.batches.state_dict(),
            "mlflow_run_id": self.reporter.mlflow_run_id if self.reporter else None,
            "config": to_dict(self.cfg),
        }

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _evaluate_and_log(self, step: int) -> None:
        peer_layers = list(self.engine.module.peer_layers())
        for layer in peer_layers:
            layer.reset_usage()
            layer.track_usage = True
        self.engine.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        started = time.perf_counter()
        for inputs, targets in self.val_batches:
            out = self.engine(inputs.to(self.device), targets.to(self.device))
            sums += torch.tensor([float(out.lm_loss), 1.0], dtype=torch.float64)
        sums = sums.to(self.device)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        val_loss = float(sums[0] / sums[1])
        metrics = {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0))}
        usages, kls = [], []
        for layer in peer_layers:
            layer.track_usage = False
            counts = layer.usage_counts.clone()
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            usage, kl = expert_usage_stats(counts)
            usages.append(usage)
            kls.append(kl)
        if peer_layers:
            metrics["peer_usage"] = sum(usages) / len(usages)
            metrics["peer_kl_uniform"] = sum(kls) / len(kls)
            if len(peer_layers) > 1:
                for i, (u, k) in enumerate(zip(usages, kls)):
                    metrics[f"peer_usage_{i}"], metrics[f"peer_kl_uniform_{i}"] = u, k
        self.engine.train()
        self.reporter.log_metrics(step, metrics)
        extra = (f" | expert usage {metrics['peer_usage']:.1%} | KL(usage||uniform) {metrics['peer_kl_uniform']:.3f}"
                 if peer_layers else "")
        self.reporter.print(f"eval step {step} | val loss {val_loss:.4f} | val ppl {metrics['val_perplexity']:.2f}"
                            f"{extra} | {time.perf_counter() - started:.1f}s")


def expert_usage_stats(counts) -> tuple[float, float]:
    """The paper's Table 2 measures over an evaluation window: the share of experts retrieved at
    least once, and KL(usage distribution || uniform) = sum_i p_i log(p_i N) (0 when uniform)."""
    counts = counts.double()
    total = float(counts.sum())
    n = counts.numel()
    if total == 0:
        return 0.0, float("nan")
    p = counts / total
    used = p > 0
    kl = float((p[used] * torch.log(p[used] * n)).sum())
    return float(used.double().mean()), kl


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _as_float(value) -> float:
    if value is None:
        return float("nan")
    return float(value.item() if torch.is_tensor(value) else value)
