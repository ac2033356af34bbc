"""The interface the train loop talks to: `TrainEngine`, what a step and an evaluation return, and
what every layout shares (stop agreement, per-rank checkpoint state, save/load, state_dict).

The two implementations differ only in how a step and an evaluation run (orchestrator/engine/
plain.py: forward/backward per micro-batch; orchestrator/engine/pipeline.py: DeepSpeed's
pipeline schedule) and in which groups their numbers are reduced over; docs/engine.md.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from orchestrator.config import TrainConfig
from orchestrator.parallel.dims import ParallelDims

NAN = float("nan")


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step returns, without waiting for the host or for other ranks.

    loss:      0-dim float64 on the device; its global mean comes from
               `TrainEngine.global_mean_losses` (one collective for a whole log window).
    grad_norm: the global gradient norm before clipping, the same on every rank (a 0-dim tensor
               or a float; NaN when the step did not need it); read it with `grad_norm_value()`.
    stop:      True on every rank at the same step when any rank asked to stop (see StopVote).
    """

    loss: torch.Tensor
    grad_norm: Union[torch.Tensor, float, None]
    stop: bool

    def grad_norm_value(self) -> float:
        value = self.grad_norm
        if value is None:
            return NAN
        return float(value.item() if torch.is_tensor(value) else value)


@dataclass(frozen=True)
class Evaluation:
    """Validation loss (mean LM loss over every rank's batches) and, per sparse layer (PEER, PKM,
    MoE) in model order, the share of experts used and KL(usage || uniform)."""

    loss: float
    usages: list[float] = field(default_factory=list)
    kls: list[float] = field(default_factory=list)
    by_source: dict[str, float] = field(default_factory=dict)  # a mixture's per-source val losses

    def metrics(self) -> dict[str, float]:
        """val_loss, val_perplexity; with sparse layers their mean usage and KL, and per layer
        (expert_usage_i, expert_kl_uniform_i) when there are several."""
        out = {"val_loss": self.loss, "val_perplexity": math.exp(min(self.loss, 50.0))}
        out.update({f"val_loss/{name}": loss for name, loss in self.by_source.items()})
        if self.usages:
            out["expert_usage"] = sum(self.usages) / len(self.usages)
            out["expert_kl_uniform"] = sum(self.kls) / len(self.kls)
            if len(self.usages) > 1:
                for i, (u, k) in enumerate(zip(self.usages, self.kls)):
                    out[f"expert_usage_{i}"], out[f"expert_kl_uniform_{i}"] = u, k
        return out

    def summary(self) -> str:
        m = self.metrics()
        by_source = " (" + ", ".join(f"{n} {v:.4f}" for n, v in self.by_source.items()) + ")" if self.by_source else ""
        text = f"val loss {self.loss:.4f}{by_source} | val ppl {m['val_perplexity']:.2f}"
        if self.usages:
            text += f" | expert usage {m['expert_usage']:.1%} | KL(usage||uniform) {m['expert_kl_uniform']:.3f}"
        return text


def named_batch_sets(batches) -> list[tuple[str, Sequence]]:
    """The validation sets of an evaluation as (name, batches): a mixture's ValSets (one per source,
    orchestrator/data) or one unnamed set."""
    sets = getattr(batches, "sets", None)
    return list(sets.items()) if sets is not None else [("", batches)]


def expert_usage_stats(counts) -> tuple[float, float]:
    """The paper's Table 2 measures over an evaluation window: the share of experts retrieved at
    least once, and KL(usage distribution || uniform) = sum_i p_i log(p_i N) (0 when uniform)."""
    counts = counts.double()
    total = float(counts.sum())
    n = counts.numel()
    if total == 0:
        return 0.0, NAN
    p = counts / total
    used = p > 0
    kl = float((p[used] * torch.log(p[used] * n)).sum())
    return float(used.double().mean()), kl


class StopVote:
    """All ranks agree on a stop request without a blocking collective per step.

    At the start of a step each rank casts its flag (a signal seen so far) into an asynchronous
    MAX all-reduce; the engine waits for it at the end of the step, when it has long arrived, and
    every rank gets the same answer for the same step. A signal is therefore acted on at the end
    of the step after the one during which it arrived at the latest (at the end of the same step
    when it arrived between steps). The flag travels on a CPU (gloo) group, so reading it never
    waits for an accelerator stream.
    """

    def __init__(self, group=None, enabled: bool = True):
        self.group, self.enabled = group, enabled and dist.is_initialized() and dist.get_world_size() > 1

    def cast(self, stop_requested: bool) -> Callable[[], bool]:
        if not self.enabled:
            return lambda: stop_requested
        flag = torch.tensor([1.0 if stop_requested else 0.0])
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)

        def result() -> bool:
            work.wait()
            return bool(flag.item() > 0)

        return result


class TrainEngine(ABC):
    """One model + optimizer + LR schedule under one parallel layout. Every method is collective
    (all ranks call it, in the same order) unless noted."""

    def __init__(self, ds_engine, scheduler, cfg: TrainConfig, dims: ParallelDims, device: torch.device,
                 stop_vote: StopVote):
        self._ds, self._scheduler = ds_engine, scheduler
        self.cfg, self.dims, self.device = cfg, dims, device
        self._stop_vote = stop_vote
        self._ds.train()

    # ------------------------------------------------------------------ accessors (local)
    @property
    def module(self) -> torch.nn.Module:
        """This rank's model (its shards and, under pp, its stage)."""
        return self._ds.module

    @property
    def optimizer(self):
        return self._ds.optimizer

    @property
    def scheduler(self):
        return self._scheduler

    @property
    def lr(self) -> float:
        """The learning rate the next step uses."""
        return self._scheduler.get_last_lr()[0]

    @property
    def lr_schedule(self):
        """The LR multiplier (orchestrator.engine.deepspeed_init.LRSchedule) the scheduler follows."""
        return self._scheduler.lr_lambdas[0]

    @property
    def deepspeed_engine(self):
        """The DeepSpeed engine underneath (for the checkpoint format; the loop never needs it)."""
        return self._ds

    @property
    def clips_gradients(self) -> bool:
        """True when this engine clips with `global_grad_norm` (without ZeRO); with ZeRO 1/2
        DeepSpeed clips inside its optimizer (orchestrator/engine/deepspeed_init.py)."""
        from orchestrator.engine.deepspeed_init import trainer_clips_gradients

        return trainer_clips_gradients(self.cfg)

    # ------------------------------------------------------------------ training
    def train_step(self, micro_batches: Sequence, stop_requested: bool, need_grad_norm: bool = True) -> StepResult:
        """One optimizer step over this rank's micro-batches of the step ((inputs_BT, targets_BT)
        pairs on the CPU). need_grad_norm=False lets a step that clips nothing skip the norm."""
        stop = self._stop_vote.cast(stop_requested)
        loss, grad_norm = self._step(micro_batches, need_grad_norm)
        return StepResult(loss, grad_norm, stop())

    @abstractmethod
    def _step(self, micro_batches: Sequence, need_grad_norm: bool):
        """(loss tensor as StepResult.loss, grad norm as StepResult.grad_norm)."""

    @abstractmethod
    def global_mean_losses(self, results: Sequence[StepResult]) -> list[float]:
        """The global mean training loss of each step (over micro-batches and data-parallel
        ranks). Collective; one reduction for the whole sequence."""

    # ------------------------------------------------------------------ evaluation
    @abstractmethod
    def evaluate(self, batches) -> Evaluation:
        """Validation loss and expert-usage statistics over `batches` (this rank's share of the
        validation set); leaves the model in training mode."""

    def eval_loss(self, batches) -> float:
        return self.evaluate(batches).loss

    # ------------------------------------------------------------------ description (collective)
    def describe(self) -> list[str]:
        """Start-up lines about the layout: mesh, what this rank holds of experts and tp shards."""
        from orchestrator.parallel.parallelize import expert_parameters
        from orchestrator.parallel.tensor_parallel import is_tensor_parallel

        c, lines = self.cfg, []
        if self.dims.world_size > 1:
            lines.append(self.dims.layout())
        if c.parallel.ep > 1 and c.model.ffn == "peer":
            held = sum(p.numel() for p in expert_parameters(self.module))
            full = sum(2 * layer.num_experts * layer.d_model for layer in self.module.peer_layers())
            held, full, who = self._expert_numbers(held, full)
            lines.append(f"expert parallel: {who} {held:,} of {full:,} expert numbers "
                         f"(PEER U/V columns, 1/{c.parallel.ep * c.parallel.tp}; sharding=dims)")
        if c.parallel.tp > 1:
            params = list(self.module.parameters())
            sharded = sum(p.numel() for p in params if is_tensor_parallel(p))
            where = " (its stage's layers)" if c.parallel.pp > 1 else ""
            lines.append(f"tensor parallel: this rank holds {sum(p.numel() for p in params):,} parameters{where}, "
                         f"{sharded:,} of them 1/{c.parallel.tp} shards (attention heads, MLP and expert hidden "
                         f"units, PEER U/V columns); embeddings, norms, gates, routing and PKM memories replicated")
        return lines

    def _expert_numbers(self, held: int, full: int) -> tuple[int, int, str]:
        return held, full, "this rank holds"

    # ------------------------------------------------------------------ checkpoints
    def save(self, checkpoints, step: int, client_state: dict, rank_state: dict, config: dict) -> str:
        """Save through `checkpoints` (orchestrator.checkpoint.CheckpointManager); rank_state is the
        caller's per-rank state (data position), to which the engine adds its own. Returns the tag."""
        rank_state = {**rank_state, "extra": self._extra_rank_state()}
        return checkpoints.save(self._ds, step, client_state, rank_state, config)

    def load(self, checkpoints, config: dict):
        """Load the checkpoint `checkpoints` picks (or None when there is none) into the model,
        optimizer and schedule, and restore this engine's per-rank state; returns
        orchestrator.checkpoint.Loaded (client_state, the caller's rank_state) or None."""
        loaded = checkpoints.load(self._ds, config)
        if loaded is not None and not loaded.resharded:  # resharding restores buffers and expert shards itself
            self._load_extra_rank_state(loaded.rank_state.get("extra", {}))
        return loaded

    def state_dict(self) -> dict:
        """This rank's model, optimizer and schedule state (DeepSpeed's and torch's own formats)."""
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self._scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._scheduler.load_state_dict(state["scheduler"])

    # ------------------------------------------------------------------ per-rank state
    def _extra_rank_state(self) -> dict:
        """State this rank saves in its own checkpoint file because it differs per rank: buffers
        (PEER's BatchNorm running statistics are updated from each rank's own batches; the
        portable state holds them pooled over the ranks, which a same-layout resume must not use
        if it is to continue bitwise)."""
        persistent = self.module.state_dict().keys()  # not rotary tables or usage counters
        buffers = {n: b.detach().cpu().clone() for n, b in self.module.named_buffers() if n in persistent}
        return {"buffers": buffers}

    def _load_extra_rank_state(self, state: dict) -> None:
        """Restore what _extra_rank_state() saved, after the model and optimizer are loaded.
        Checkpoints written before the portable state also carry this rank's expert shards
        ("expert_parallel": DeepSpeed without ZeRO saved the model and optimizer from rank 0 only)."""
        self._load_expert_rank_state(state.get("expert_parallel", {}))
        saved = state.get("buffers", {})
        with torch.no_grad():
            for name, buf in self.module.named_buffers():
                if name in saved:
                    buf.copy_(saved[name].to(buf.device))

    def _expert_parameters(self) -> dict:
        from deepspeed.moe.utils import is_moe_param

        return {n: p for n, p in self.module.named_parameters() if is_moe_param(p)}

    def _load_expert_rank_state(self, state: dict) -> None:
        # Only checkpoints written before the portable state have these (and only same-layout
        # resumes read them: such a checkpoint cannot be resharded).
        if self.cfg.parallel.ep == 1 or not state:
            return
        named = self._expert_parameters()
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(state["params"][n].to(p.device))
        if "optimizer" in state:
            opt_state = self.optimizer.state
            for n, p in named.items():
                if n in state["optimizer"]:
                    opt_state[p] = {k: (v.to(p.device) if torch.is_tensor(v) and v.dim() > 0 else v)
                                    for k, v in state["optimizer"][n].items()}

    # ------------------------------------------------------------------ gradient norm
    def _grad_norm_groups(self) -> dict:
        """The groups `global_grad_norm` reduces over in this layout (None: degree 1)."""
        return {"ep_group": self.dims.expert_groups()[0] if self.dims.ep > 1 else None,
                "tp_group": self.dims.tp_group() if self.dims.tp > 1 else None,
                "pipe_group": None}

    def _norm_and_clip(self, need_grad_norm: bool) -> Optional[torch.Tensor]:
        """Without ZeRO, right before the optimizer step: the global norm of the averaged
        gradients, and clipping with it. None when nothing needs it."""
        from orchestrator.engine.grad_norm import clip_gradients, global_grad_norm

        clip = self.clips_gradients
        if not (clip or need_grad_norm):
            return None
        norm = global_grad_norm(self.module.parameters(), device=self.device, **self._grad_norm_groups())
        if clip:
            clip_gradients(self.module.parameters(), self.cfg.optim.grad_clip, norm)
        return norm
