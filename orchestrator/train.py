"""One training process: process group -> data -> model -> DeepSpeed engine -> train loop.

`train_main(cfg_dict)` is what launchers run in every rank (cluster/ hands it the validated config
as a plain dict). Metrics go through the rank-0 Reporter; checkpoints through orchestrator/checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from orchestrator.checkpoint import CheckpointManager, test_kill_point
from orchestrator.config import TrainConfig, flatten, load_config, to_dict
from orchestrator.errors import REQUEUE_EXIT_CODE, USER_ERROR_EXIT_CODE, ConfigError
from orchestrator.storage import redact
from orchestrator.tracking import Reporter, Stopwatch


def train_main(cfg_dict: dict) -> None:
    """Entry point of a rank. A user error found here exits with code 2 and one line."""
    try:
        cfg = load_config(cfg_dict)
        stopped = Trainer(cfg).run()
    except ConfigError as exc:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank refuses alike; one line is enough
            print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT_CODE)
    if stopped:
        sys.exit(REQUEUE_EXIT_CODE)


# Signals that ask a run to stop at the next step boundary after a collective save: SIGTERM
# (Slurm's and most schedulers' stop signal) and SIGUSR2 (what submitit asks Slurm to send before
# preemption or the time limit).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


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

        deepspeed.init_distributed(dist_backend="nccl" if self.use_cuda else "gloo", auto_mpi_discovery=False, timeout=__import__("datetime").timedelta(seconds=self.cfg.cluster.collective_timeout_s))  # h17: bounded wait for a dead peer
        # Data comes by data-parallel rank: the tp ranks and pp stages of one replica read the same
        # batches (the first and last stage of a pipeline both need them: inputs and targets).
        from orchestrator.parallel.dims import ParallelDims

        mesh = ParallelDims.from_config(self.cfg.parallel)
        self.dp_rank, self.dp_size = mesh.coords(dist.get_rank()).dp, mesh.dp

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

        from model.peer import defer_expert_tables
        from orchestrator.parallel.dims import ParallelDims
        from orchestrator.parallel.parallelize import parallelize

        # Every rank builds from the same seed; with ep > 1 the PEER tables are deferred and
        # parallelize() builds only this rank's columns (equal to the same columns of the
        # unsharded init, never the whole table), and re-draws MoE experts by global index.
        torch.manual_seed(self.cfg.trainer.seed)
        self.dims = ParallelDims.from_config(self.cfg.parallel)
        # With pp > 1 too: a stage builds only its own layers' tables (pipeline.to_pipeline).
        # With tp > 1 too: a tp rank builds only its d/tp columns (tensor_parallel.py).
        with defer_expert_tables(enabled=self.dims.ep > 1 or self.dims.pp > 1 or self.dims.tp > 1):
            model = build_model(self.cfg.model, expert_parallel_size=self.cfg.parallel.ep)
        model = parallelize(model, self.dims)
        self.counts = count_model(self.cfg.model, self.cfg.data.seq_len)
        self.counts_text = format_counts(self.counts)
        if self.dims.pp > 1:
            from orchestrator.parallel.pipeline import build_pipeline_engine

            self.engine, self.scheduler = build_pipeline_engine(model.to(self.device), self.cfg, self.bf16, self.dims)
        else:
            # tp > 1: DeepSpeed must know the groups (data-parallel reduction, ZeRO, norms, files).
            mpu = self.dims.grid() if self.dims.tp > 1 else None
            self.engine, self.scheduler = build_engine(model.to(self.device), self.cfg, self.bf16, mpu=mpu)

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.trainer
        return t.micro_batch_size * t.grad_accum_steps * self.dp_size * self.cfg.data.seq_len

    # ------------------------------------------------------------------ run
    def run(self) -> bool:
        """Train to max_steps; True when a stop signal ended the run early (after a save)."""
        self._stop_signal: Optional[int] = None
        previous_handlers = {s: signal.signal(s, self._on_stop_signal) for s in STOP_SIGNALS}
        self._init_distributed()
        status = "FAILED"
        self.reporter: Optional[Reporter] = None
        try:
            self._prepare_data()
            self._build()
            self.checkpoints = CheckpointManager(self.cfg.checkpoint, log=self._rank0_print)
            resumed = self._maybe_resume()
            c = self.cfg
            self.reporter = Reporter(self.rank, c.run.dir, c.tracking, c.run.root, c.run.name,
                                     c.trainer.max_steps, c.trainer.progress_bar)
            self.reporter.start(self.state.step, resumed.client_state.get("mlflow_run_id") if resumed else None)
            self._announce(resumed)
            stopped = self._loop()
            # KILLED marks a preempted run in MLflow; resuming sets it back to RUNNING.
            status = "KILLED" if stopped else "FINISHED"
            return stopped
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if self.reporter is not None:
                self.reporter.close(status)
            if dist.is_initialized():
                dist.destroy_process_group()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)

    def _on_stop_signal(self, signum, frame) -> None:
        # Only a flag: the loop checks it at the step boundary, where all ranks agree to stop.
        self._stop_signal = signum

    def _rank0_print(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def _config_record(self) -> dict:
        """The resolved config as saved with checkpoints and shown to users: URLs redacted."""
        return _redact_urls(to_dict(self.cfg))

    def _maybe_resume(self):
        if not self.cfg.checkpoint.resume:
            return None
        loaded = self.checkpoints.load(self.engine, self._config_record())
        if loaded is None:
            return None
        self.state = TrainState(**loaded.client_state["train_state"])
        self.batches.load_state_dict(loaded.rank_state["data"])
        self._load_rank_state(loaded.rank_state.get("extra", {}))
        return loaded

    def _rank_state(self) -> dict:
        """Extra state this rank saves in its own checkpoint file (beside RNG and data position);
        for state that differs per rank and that DeepSpeed does not save."""
        # Buffers (PEER's BatchNorm running statistics) are updated from each rank's own batches
        # and differ across data-parallel ranks; DeepSpeed saves rank 0's module only.
        persistent = self.engine.module.state_dict().keys()  # not rotary tables or usage counters
        buffers = {n: b.detach().cpu().clone() for n, b in self.engine.module.named_buffers() if n in persistent}
        return {"expert_parallel": self._expert_rank_state(), "buffers": buffers}

    def _load_rank_state(self, state: dict) -> None:
        """Restore what _rank_state() saved, after DeepSpeed has loaded its part."""
        if self.dims.pp > 1:
            self.engine.module.synchronize_tied_weights()
        self._load_expert_rank_state(state.get("expert_parallel", {}))
        saved = state.get("buffers", {})
        with torch.no_grad():
            for name, buf in self.engine.module.named_buffers():
                if name in saved:
                    buf.copy_(saved[name].to(buf.device))

    def _announce(self, resumed: bool) -> None:
        r, c = self.reporter, self.cfg
        r.print(f"run dir: {os.path.abspath(c.run.dir)}")
        r.print(self.corpus.summary())
        r.print(f"model: {self.counts_text}")
        r.print(f"parallel: world={self.world_size} dp={c.parallel.dp} ep={c.parallel.ep} tp={c.parallel.tp} "
                f"pp={c.parallel.pp} zero={c.parallel.zero_stage} device={self.device.type} "
                f"precision={'bf16' if self.bf16 else 'fp32'}")
        if c.parallel.pp > 1:
            from orchestrator.parallel.pipeline import describe_stages

            m = c.parallel.pp_microbatches
            r.print(f"{describe_stages(c.model.num_layers, c.parallel.pp, c.model.tie_embeddings)}; "
                    f"{c.trainer.grad_accum_steps * m} pipeline micro-batches of "
                    f"{c.trainer.micro_batch_size // m} sequences per step and data-parallel rank")
        if self.world_size > 1:
            r.print(self.dims.layout())
        if c.parallel.ep > 1 and c.model.ffn == "peer":
            from orchestrator.parallel.parallelize import expert_parameters

            held = sum(p.numel() for p in expert_parameters(self.engine.module))
            full = sum(2 * layer.num_experts * layer.d_model for layer in self.engine.module.peer_layers())
            who = "this rank holds"
            if c.parallel.pp > 1:  # a rank holds one stage's layers: count rank 0's whole pipeline
                counts = torch.tensor([held, full], dtype=torch.int64, device=self.device)
                dist.all_reduce(counts, group=self.engine.grid.get_pipe_parallel_group())
                held, full, who = int(counts[0]), int(counts[1]), "the ranks of this pipeline (one per stage) hold"
            r.print(f"expert parallel: {who} {held:,} of {full:,} expert numbers "
                    f"(PEER U/V columns, 1/{c.parallel.ep * c.parallel.tp}; sharding=dims)")
        if c.parallel.tp > 1:
            from orchestrator.parallel.tensor_parallel import is_tensor_parallel

            params = list(self.engine.module.parameters())
            sharded = sum(p.numel() for p in params if is_tensor_parallel(p))
            where = " (its stage's layers)" if c.parallel.pp > 1 else ""
            r.print(f"tensor parallel: this rank holds {sum(p.numel() for p in params):,} parameters{where}, "
                    f"{sharded:,} of them 1/{c.parallel.tp} shards (attention heads, MLP and expert hidden "
                    f"units, PEER U/V columns); embeddings, norms, gates, routing and PKM memories replicated")
        if resumed:
            r.print(f"resumed from {resumed.info.tag} in {self.checkpoints.storage.display()}")
            if self.state.step >= c.trainer.max_steps:
                r.print(f"nothing to train: the run is already at step {self.state.step} "
                        f"(trainer.max_steps={c.trainer.max_steps}); raise trainer.max_steps to continue, "
                        f"or use another run.name (or checkpoint.resume=false) to start over")
        if self.rank == 0:
            os.makedirs(c.run.dir, exist_ok=True)
            path = os.path.join(c.run.dir, "config.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(self._config_record(), f, indent=2)
            r.log_artifact(path)
        params = flatten(self._config_record())
        params.update({f"counts.{k}": v for k, v in vars(self.counts).items() if not isinstance(v, dict)})
        r.log_params(params)

    def _loop(self) -> bool:
        """The train loop; returns True when a stop signal ended it (after a checkpoint)."""
        c, r = self.cfg, self.reporter
        t = c.trainer
        window_losses: list[float] = []
        watch, window_steps = Stopwatch(), 0
        self.engine.train()
        while self.state.step < t.max_steps:
            lr = self.scheduler.get_last_lr()[0]
            loss, stop = self._train_step()
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
            if (every and step % every == 0) or final or stop:
                self._save(step)
                watch.lap()
            test_kill_point(f"step{step}")
            if stop:
                r.print(f"stopped by a signal after step {step}; checkpoint saved; exiting with code "
                        f"{REQUEUE_EXIT_CODE} (run the same command again to resume)")
                return True
        return False

    def _save(self, step: int) -> None:
        started = time.perf_counter()
        rank_state = {"data": self.batches.state_dict(), "extra": self._rank_state()}
        tag = self.checkpoints.save(self.engine, step, self._client_state(), rank_state, self._config_record())
        self.reporter.print(f"saved checkpoint {tag} to {self.checkpoints.storage.display()} "
                            f"in {time.perf_counter() - started:.1f}s")

    def _train_step(self) -> tuple[float, bool]:
        """One optimizer step over grad_accum_steps micro-batches; returns the global mean loss and
        whether any rank received a stop signal (decided together, so all ranks stop together)."""
        if self.dims.pp > 1:
            return self._train_step_pipeline()
        total = torch.zeros((), dtype=torch.float64)
        micro_batches = self.batches.next_step()
        self._grad_norm = float("nan")
        for i, (inputs, targets) in enumerate(micro_batches):
            out = self.engine(inputs.to(self.device), targets.to(self.device))
            self.engine.backward(out.loss)
            if i == len(micro_batches) - 1 and self.cfg.parallel.zero_stage == 0:
                # DeepSpeed computes the norm for ZeRO 1/2 but drops it when it clips without ZeRO.
                self._grad_norm = self._reduced_grad_norm()
                self._clip_gradients(self._grad_norm)
            self.engine.step()
            total += out.loss.detach().double().cpu()
        if self.cfg.parallel.zero_stage > 0:
            self._grad_norm = _as_float(self.engine.get_global_grad_norm())
        stop_flag = 1.0 if self._stop_signal is not None else 0.0
        summed = torch.tensor([float(total) / len(micro_batches), stop_flag], dtype=torch.float64,
                              device=self.device)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        # The tp ranks of a replica hold the same loss: the world sum counts each replica tp times.
        return float(summed[0]) / (self.dp_size * self.dims.tp), bool(summed[1] > 0)

    def _reduced_grad_norm(self) -> float:
        """Global L2 norm of the (already data-parallel-averaged) gradients, before clipping,
        each number of the model counted once: expert parameters are sharded over the
        expert-parallel group (squares summed across it), tp-sharded ones (`tensor_model_parallel`,
        tensor_parallel.py) over the tp group (summed across it; PEER tables under ep x tp over
        both); everything else is replicated and counted here alone (every rank of a tp or ep
        group holds the same copy and the same gradient)."""
        from deepspeed.moe.utils import is_moe_param

        from orchestrator.parallel.tensor_parallel import is_tensor_parallel

        buckets: dict[tuple[bool, bool], list] = {}
        for p in self.engine.module.parameters():
            if p.grad is not None:
                buckets.setdefault((is_moe_param(p), is_tensor_parallel(p)), []).append(p.grad.detach())

        def sq(expert: bool, sharded: bool) -> float:
            grads = buckets.get((expert, sharded))
            return float(torch.nn.utils.get_total_norm(grads)) ** 2 if grads else 0.0

        # [expert, not tp-sharded], [expert, tp-sharded]: summed over the ep group first.
        expert_sq = torch.tensor([sq(True, False), sq(True, True)], dtype=torch.float64, device=self.device)
        if self.cfg.parallel.ep > 1:
            from deepspeed.utils import groups

            dist.all_reduce(expert_sq, group=groups._get_expert_parallel_group(f"ep_size_{self.cfg.parallel.ep}"))
        tp_sq = torch.tensor(sq(False, True) + float(expert_sq[1]), dtype=torch.float64, device=self.device)
        if self.dims.tp > 1:
            dist.all_reduce(tp_sq, group=self.dims.tp_group())
        return math.sqrt(sq(False, False) + float(expert_sq[0]) + float(tp_sq))

    def _clip_gradients(self, norm: float) -> None:
        """Without ZeRO the trainer clips, with the norm it has just computed for the log line
        (orchestrator.engine.trainer_clips_gradients): coef = min(1, clip / (norm + 1e-6)), as
        DeepSpeed and torch do."""
        from orchestrator.engine import trainer_clips_gradients

        if not trainer_clips_gradients(self.cfg):
            return
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        torch.nn.utils.clip_grads_with_norm_(params, self.cfg.optim.grad_clip, torch.tensor(norm))

    # ------------------------------------------------------------------ expert parallelism
    def _expert_rank_state(self) -> dict:
        """This rank's expert shards (DeepSpeed without ZeRO saves the model and optimizer from
        rank 0 only), with the layout they were saved under."""
        from deepspeed.moe.utils import is_moe_param

        if self.cfg.parallel.ep == 1:
            return {}
        named = {n: p for n, p in self.engine.module.named_parameters() if is_moe_param(p)}
        state = {"ep": self.cfg.parallel.ep, "zero_stage": self.cfg.parallel.zero_stage,
                 "params": {n: p.detach().cpu().clone() for n, p in named.items()}}
        if self.cfg.parallel.zero_stage == 0:
            opt_state = self.engine.optimizer.state
            state["optimizer"] = {n: {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                                      for k, v in opt_state[p].items()}
                                  for n, p in named.items() if p in opt_state}
        return state

    def _load_expert_rank_state(self, state: dict) -> None:
        # A checkpoint of another ep never gets here: CheckpointManager.load refuses any change of
        # parallel.* (expert shards are not resharded on resume).
        if self.cfg.parallel.ep == 1:
            return
        from deepspeed.moe.utils import is_moe_param

        named = {n: p for n, p in self.engine.module.named_parameters() if is_moe_param(p)}
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(state["params"][n].to(p.device))
        if "optimizer" in state:
            opt_state = self.engine.optimizer.state
            for n, p in named.items():
                if n in state["optimizer"]:
                    opt_state[p] = {k: (v.to(p.device) if torch.is_tensor(v) and v.dim() > 0 else v)
                                    for k, v in state["optimizer"][n].items()}

    def _client_state(self) -> dict:
        """Saved by DeepSpeed in rank 0's model file: what is the same on every rank."""
        return {
            "train_state": vars(self.state).copy(),
            "mlflow_run_id": self.reporter.mlflow_run_id if self.reporter else None,
        }

    # ------------------------------------------------------------------ pipeline parallelism
    def _train_step_pipeline(self) -> tuple[float, bool]:
        """`_train_step` under pp > 1: DeepSpeed's pipeline schedule runs the step's
        grad_accum_steps x pp_microbatches micro-batches (orchestrator/parallel/pipeline.py).
        Every stage draws the step's batches (the first stage feeds the inputs, the last the
        targets). The loss is the last stage's, averaged over micro-batches and data-parallel
        ranks by DeepSpeed and broadcast to every stage, so rank 0 (stage 0) reports it."""
        from orchestrator.parallel.pipeline import split_micro_batches

        pieces = split_micro_batches(self.batches.next_step(), self.cfg.parallel.pp_microbatches)
        loss = self.engine.train_batch(iter([(x.to(self.device), y.to(self.device)) for x, y in pieces]))
        if self.cfg.parallel.zero_stage == 0:
            self._grad_norm = self.engine.peerlab_grad_norm
        else:
            self._grad_norm = _as_float(self.engine.get_global_grad_norm())
        stop = torch.tensor([1.0 if self._stop_signal is not None else 0.0], device=self.device)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        return float(loss), bool(stop.item() > 0)

    @torch.no_grad()
    def _evaluate_and_log_pipeline(self, step: int) -> None:
        """`_evaluate_and_log` under pp > 1. Each validation batch goes through the pipeline as
        pp_microbatches micro-batches; DeepSpeed averages the last stage's LM loss over them and
        the data-parallel ranks and broadcasts it to every stage. PEER usage counters are summed
        over the data-parallel group of the stage that holds the layer; each stage's statistics
        then reach rank 0 with an all-gather over the pipeline group."""
        from orchestrator.parallel.pipeline import split_micro_batches

        module, m = self.engine.module, self.cfg.parallel.pp_microbatches
        local = module.usage_layers_by_block()
        for _, layer in local:
            layer.reset_usage()
            layer.track_usage = True
        started = time.perf_counter()
        total = 0.0
        for batch in self.val_batches:
            pieces = [(x.to(self.device), y.to(self.device)) for x, y in split_micro_batches([batch], m)]
            total += float(self.engine.eval_batch(iter(pieces), num_micro_batches=m))
        val_loss = total / max(len(self.val_batches), 1)
        grid = self.engine.grid
        stats = []
        for block, layer in local:
            layer.track_usage = False
            counts = layer.usage_counts.clone()
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=grid.get_data_parallel_group())
            stats.append((block, *expert_usage_stats(counts)))
        gathered: list = [None] * grid.get_pipe_parallel_world_size()
        dist.all_gather_object(gathered, stats, group=grid.get_pipe_parallel_group())
        ordered = sorted(s for per_stage in gathered for s in per_stage)
        self.engine.train()
        self._log_evaluation(step, val_loss, [u for _, u, _ in ordered], [k for _, _, k in ordered], started)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _evaluate_and_log(self, step: int) -> None:
        if self.dims.pp > 1:
            return self._evaluate_and_log_pipeline(step)
        usage_layers = list(self.engine.module.usage_layers())
        for layer in usage_layers:
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
        usages, kls = [], []
        for layer in usage_layers:
            layer.track_usage = False
            counts = layer.usage_counts.clone()
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            usage, kl = expert_usage_stats(counts)
            usages.append(usage)
            kls.append(kl)
        self.engine.train()
        self._log_evaluation(step, val_loss, usages, kls, started)

    def _log_evaluation(self, step: int, val_loss: float, usages: list[float], kls: list[float],
                        started: float) -> None:
        """Rank 0's report of an evaluation: usages and kls per sparse layer (PEER, PKM, MoE), in model order."""
        metrics = {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0))}
        if usages:
            metrics["expert_usage"] = sum(usages) / len(usages)
            metrics["expert_kl_uniform"] = sum(kls) / len(kls)
            if len(usages) > 1:
                for i, (u, k) in enumerate(zip(usages, kls)):
                    metrics[f"expert_usage_{i}"], metrics[f"expert_kl_uniform_{i}"] = u, k
        self.reporter.log_metrics(step, metrics)
        extra = (f" | expert usage {metrics['expert_usage']:.1%} | KL(usage||uniform) {metrics['expert_kl_uniform']:.3f}"
                 if usages else "")
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


def _redact_urls(d):
    if isinstance(d, dict):
        return {k: _redact_urls(v) for k, v in d.items()}
    return redact(d) if isinstance(d, str) else d


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _as_float(value) -> float:
    if value is None:
        return float("nan")
    return float(value.item() if torch.is_tensor(value) else value)
