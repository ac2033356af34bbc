"""One training process: process group -> data -> engine (model, optimizer, layout) -> resume ->
train loop -> logs and checkpoints.

`train_main(cfg_dict)` is what launchers run in every rank (cluster/ hands it the validated config
as a plain dict). The loop talks to one `TrainEngine` (orchestrator/engine/, docs/engine.md)
whatever the layout; metrics go through the rank-0 Reporter; checkpoints through
orchestrator/checkpoint.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from orchestrator.checkpoint import CheckpointManager, CheckpointSaveError, abandon_checkpoints_after, test_kill_point
from orchestrator.config import TrainConfig, flatten, load_config, to_dict
from orchestrator.errors import REQUEUE_EXIT_CODE, USER_ERROR_EXIT_CODE, ConfigError
from orchestrator import faults
from compat import set_default_collective_timeout
from orchestrator.preflight import check_on_node
from orchestrator.storage import redact
from orchestrator.tracking import Reporter, Stopwatch


def train_main(cfg_dict: dict) -> None:
    """Entry point of a rank. A user error found here exits with code 2 and one line."""
    try:
        cfg = load_config(cfg_dict)
        check_on_node(cfg)  # Slurm: this node has what the job asked for (orchestrator/preflight.py)
        stopped = Trainer(cfg).run()
    except ConfigError as exc:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank refuses alike; one line is enough
            print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT_CODE)
    except CheckpointSaveError as exc:  # every rank raises it alike, with the failing rank named
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)  # a fault, not bad input; not sys.exit: nothing is left to tear down cleanly
    except Exception as exc:  # a rank that died or hangs, or ran out of memory: one line (orchestrator/faults.py)
        if faults.is_out_of_memory(exc):
            print(f"error: {faults.out_of_memory_message(exc, faults.PHASE, int(os.environ.get('RANK', '0')))}",
                  file=sys.stderr, flush=True)
            os._exit(1)  # the peers stop at their next collective (the launcher stops them first)
        if not faults.is_collective_timeout(exc):
            raise
        print(f"error: {faults.timeout_message(faults.CURRENT, cfg.cluster.collective_timeout_s)}", file=sys.stderr, flush=True)
        os._exit(1)  # not sys.exit: gloo's teardown would wait on the dead peer again
    if stopped:
        sys.exit(REQUEUE_EXIT_CODE)


# Signals that ask a run to stop at a step boundary after a collective save: SIGTERM (Slurm's and
# most schedulers' stop signal) and SIGUSR2 (what submitit asks Slurm to send before preemption or
# the time limit).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        t = cfg.trainer
        self.use_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and self.use_cuda)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cuda", local_rank) if self.use_cuda else torch.device("cpu")
        self.state = TrainState()
        self.start_lines: list[str] = []  # what resuming decided, printed with the start lines

    def run(self) -> bool:
        """Train to max_steps; True when a stop signal ended the run early (after a save)."""
        self._stop_signal: Optional[int] = None
        previous_handlers = {s: signal.signal(s, self._on_stop_signal) for s in STOP_SIGNALS}
        self._init_distributed()
        status, self.reporter = "FAILED", None
        try:
            faults.PHASE = "data preparation"
            self._prepare_data()
            faults.PHASE = "building the model"
            self._build()
            self.checkpoints = CheckpointManager(self.cfg.checkpoint, log=self._rank0_print)
            faults.PHASE = "loading the checkpoint"
            resumed = self._resume()
            c = self.cfg
            self.reporter = Reporter(self.rank, c.run.dir, c.tracking, c.run.root, c.run.name,
                                     c.trainer.max_steps, c.trainer.progress_bar)
            self.reporter.start(self.state.step, resumed.client_state.get("mlflow_run_id") if resumed else None)
            self._announce(resumed)
            stopped = self._loop()
            status = "KILLED" if stopped else "FINISHED"  # KILLED marks a preempted run in MLflow
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
        # Only a flag: the engine's stop vote turns it into one decision for all ranks.
        self._stop_signal = signum

    def _rank0_print(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    # ------------------------------------------------------------------ setup
    def _init_distributed(self) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if self.use_cuda else "cpu")
        if self.use_cuda:
            torch.cuda.set_device(self.device)
        import deepspeed

        from orchestrator.parallel.dims import ParallelDims

        set_default_collective_timeout(self.cfg.cluster.collective_timeout_s)  # DeepSpeed's groups too (compat)
        deepspeed.init_distributed(dist_backend="nccl" if self.use_cuda else "gloo", auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=self.cfg.cluster.collective_timeout_s))
        self.dims = ParallelDims.from_config(self.cfg.parallel)
        # Data comes by data-parallel rank: the tp ranks and pp stages of one replica read the same
        # batches (the first and last stage of a pipeline both need them: inputs and targets).
        self.dp_rank = self.dims.coords(dist.get_rank()).dp

    def _prepare_data(self) -> None:
        from orchestrator.data import make_batches, prepare_sources
        from orchestrator.evaluate import evaluator_for_training
        from orchestrator.tokenizer import check_model_vocab, load_tokenizer

        d, t, dp = self.cfg.data, self.cfg.trainer, self.dims.dp
        tokenizer = load_tokenizer(d.tokenizer)
        check_model_vocab(tokenizer, self.cfg.model.vocab_size)
        # Rank 0 tokenizes (data.num_workers processes, a progress bar); the others then find the
        # finished cache. self.val_batches holds every source's validation set (ValSets); their
        # windows do not depend on trainer.seed, so runs with different seeds see the same text.
        corpora = prepare_sources(d, tokenizer, progress=t.progress_bar) if self.rank == 0 else None
        dist.barrier()
        self.corpora = corpora if corpora is not None else prepare_sources(d, tokenizer)
        self.batches, self.val_batches = make_batches(self.corpora, d, t, self.dp_rank, dp)
        self.source_evaluator = evaluator_for_training(self.cfg, tokenizer, self.dp_rank, dp)  # trainer.eval_sources

    def _build(self) -> None:
        from model.flops import count_model, format_counts
        from orchestrator.engine import build_train_engine

        self.engine = build_train_engine(self.cfg, self.dims, self.device, self.bf16)
        self.counts = count_model(self.cfg.model, self.cfg.data.seq_len)
        self.counts_text = format_counts(self.counts)
        self.tokens_per_step = self.batches.tokens_per_step

    def _config_record(self) -> dict:
        """The resolved config as saved with checkpoints and shown to users: URLs redacted."""
        return _redact_urls(to_dict(self.cfg))

    # ------------------------------------------------------------------ resume
    def _resume(self):
        """Load the checkpoint to continue from (None: start at step 0). Then the checkpoints newer
        than the start are moved aside (a rollback starts a new branch) and the LR schedule keeps
        the decay horizon it was trained with unless optim.decay_steps says otherwise."""
        from orchestrator.engine import continue_schedule

        loaded = self.engine.load(self.checkpoints, self._config_record()) if self.cfg.checkpoint.resume else None
        self.checkpoints.maybe_warm_start(self.engine.deepspeed_engine, resumed=loaded)  # checkpoint.init_from
        if loaded is not None:
            self.state = TrainState(**loaded.client_state["train_state"])
            self.batches.load_state_dict(loaded.rank_state["data"])
            line = continue_schedule(self.engine.lr_schedule, self.cfg.optim, self.cfg.trainer.max_steps,
                                     self.state.step, loaded.client_state.get("lr_decay_steps"),
                                     loaded.info.manifest.get("config", {}))
            self.start_lines += [line] if line else []
        abandoned = abandon_checkpoints_after(self.checkpoints, self.state.step)
        self.start_lines += [abandoned] if abandoned else []
        return loaded

    def _announce(self, resumed) -> None:
        r, c = self.reporter, self.cfg
        r.print(f"run dir: {os.path.abspath(c.run.dir)}")
        for name, corpus in self.corpora.items():
            r.print(corpus.summary(name))
        r.print(f"model: {self.counts_text}")
        r.print(f"parallel: world={self.world_size} dp={c.parallel.dp} ep={c.parallel.ep} tp={c.parallel.tp} "
                f"pp={c.parallel.pp} zero={c.parallel.zero_stage} device={self.device.type} "
                f"precision={'bf16' if self.bf16 else 'fp32'}")
        for line in self.engine.describe():
            r.print(line)
        if resumed:
            r.print(f"resumed from {resumed.info.tag} in {self.checkpoints.storage.display()}"
                    + (f"; {resumed.bytes_read}" if resumed.bytes_read else ""))
            if self.state.step >= c.trainer.max_steps:
                r.print(f"nothing to train: the run is already at step {self.state.step} "
                        f"(trainer.max_steps={c.trainer.max_steps}); raise trainer.max_steps to continue, "
                        f"or use another run.name (or checkpoint.resume=false) to start over")
        for line in self.start_lines:
            r.print(line)
        if self.rank == 0:
            os.makedirs(c.run.dir, exist_ok=True)
            path = os.path.join(c.run.dir, "config.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(self._config_record(), f, indent=2)
            r.log_artifact(path)
        params = flatten(self._config_record())
        params.update({f"counts.{k}": v for k, v in vars(self.counts).items() if not isinstance(v, dict)})
        r.log_params(params)

    # ------------------------------------------------------------------ loop
    def _loop(self) -> bool:
        """The train loop; returns True when a stop signal ended it (after a checkpoint)."""
        c, r, t = self.cfg, self.reporter, self.cfg.trainer
        window, watch = [], Stopwatch()  # the StepResults since the last log line
        self.heartbeat = faults.CURRENT = faults.Heartbeat(c.run.dir, self.rank, self.world_size)
        while self.state.step < t.max_steps:
            lr = self.engine.lr
            step = self.state.step + 1
            faults.PHASE = f"step {step}"  # evaluation and the save of a step count as the step
            log_due = step % t.log_every == 0 or step == t.max_steps
            result = self.engine.train_step(self.batches.next_step(), self._stop_signal is not None,
                                            need_grad_norm=log_due)
            self.state.step, self.state.tokens_seen = step, self.state.tokens_seen + self.tokens_per_step
            window.append(result)
            r.advance(step)
            if log_due:
                # One collective for the window's losses; the logged loss is their mean.
                losses = self.engine.global_mean_losses(window)
                self._log_step(step, sum(losses) / len(losses), lr, result.grad_norm_value(), len(window),
                               watch.lap())
                window = []
            final = step == t.max_steps
            if (t.eval_every and step % t.eval_every == 0) or final:
                self._evaluate_and_log(step)
                if self.source_evaluator is not None:
                    from orchestrator.evaluate import evaluate_for_training

                    evaluate_for_training(self.source_evaluator, self.engine.deepspeed_engine, self.device,
                                          self.reporter, step)
                watch.lap()  # evaluation time is not training throughput
            every = c.checkpoint.every_steps
            if (every and step % every == 0) or final or result.stop:
                self._save(step)
                watch.lap()
            self.heartbeat.beat(step)
            test_kill_point(f"step{step}")
            if result.stop:
                r.print(f"stopped by a signal after step {step}; checkpoint saved; exiting with code "
                        f"{REQUEUE_EXIT_CODE} (run the same command again to resume)")
                return True
        return False

    def _log_step(self, step: int, loss: float, lr: float, grad_norm: float, steps: int, elapsed: float) -> None:
        t = self.cfg.trainer
        tokens_per_s = steps * self.tokens_per_step / max(elapsed, 1e-9)
        metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                   "flops_per_s": tokens_per_s * self.counts.flops_per_token_train,
                   "tokens_seen": self.state.tokens_seen}
        self.reporter.log_metrics(step, metrics)
        eta = (t.max_steps - step) * elapsed / steps
        self.reporter.print(f"step {step}/{t.max_steps} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                            f"{tokens_per_s / 1e3:.1f}k tok/s | {metrics['flops_per_s'] / 1e9:.2f} GFLOP/s | "
                            f"eta {_duration(eta)}")

    def _save(self, step: int) -> None:
        started = time.perf_counter()
        client_state = {"train_state": vars(self.state).copy(), "lr_decay_steps": self.engine.lr_schedule.decay_steps,
                        "mlflow_run_id": self.reporter.mlflow_run_id if self.reporter else None}
        with faults.save_in_progress(self.rank):  # a launcher's SIGTERM grace waits for it
            tag = self.engine.save(self.checkpoints, step, client_state, {"data": self.batches.state_dict()},
                                   self._config_record())
        self.reporter.print(f"saved checkpoint {tag} to {self.checkpoints.storage.display()} "
                            f"in {time.perf_counter() - started:.1f}s")

    def _evaluate_and_log(self, step: int) -> None:
        """Rank 0's report of an evaluation: usage and KL per sparse layer (PEER, PKM, MoE), in model order."""
        started = time.perf_counter()
        evaluation = self.engine.evaluate(self.val_batches)
        self.reporter.log_metrics(step, evaluation.metrics())
        self.reporter.print(f"eval step {step} | {evaluation.summary()} | {time.perf_counter() - started:.1f}s")


def _redact_urls(d):
    if isinstance(d, dict):
        return {k: _redact_urls(v) for k, v in d.items()}
    return redact(d) if isinstance(d, str) else d


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
