"""DeepSpeed's engine built from our config: its config dict, AdamW param groups, the LR schedule
(warmup + cosine decay, and how it continues on resume), deepspeed.initialize.

We hand DeepSpeed a torch AdamW (a "client optimizer") rather than DeepSpeed's own Adam: the latter
compiles a C++ op on first use (about a minute on this CPU), and torch's is the same math.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from compat import expert_params_count_as_moe
from orchestrator.config import OptimConfig, TrainConfig


def deepspeed_config(cfg: TrainConfig, bf16: bool) -> dict[str, Any]:
    t, p = cfg.trainer, cfg.parallel
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * p.dp,
        # Without ZeRO the engine clips (see trainer_clips_gradients); with ZeRO, DeepSpeed does.
        "gradient_clipping": 0.0 if trainer_clips_gradients(cfg) else cfg.optim.grad_clip,
        "zero_optimization": {"stage": p.zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        # We print and log ourselves (orchestrator/tracking.py).
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def trainer_clips_gradients(cfg: TrainConfig) -> bool:
    """True when the engine clips (orchestrator/engine/grad_norm.py) instead of DeepSpeed: without
    ZeRO. The engine needs the global norm there anyway (DeepSpeed computes it for clipping and drops it), and DeepSpeed's
    ZeRO-0 clipping averages per-rank norms, which is wrong once experts are sharded over ep ranks;
    one norm, computed once, serves the log line and the clipping. With ZeRO 1/2 DeepSpeed clips
    inside its optimizer (counting each expert partition once) and reports the norm."""
    return cfg.parallel.zero_stage == 0 and cfg.optim.grad_clip > 0


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices of linear layers; not norms, biases, embeddings, product keys or expert
    tables (PEER's U and V rows are embeddings: decaying every row each step would shrink the
    experts that a batch did not retrieve)."""
    decay, no_decay = [], []
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.LayerNorm, nn.BatchNorm1d)) or "Norm" in type(module).__name__:
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in no_decay_ids or "key" in name.split(".")[-1]:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


class LRSchedule:
    """Multiplier of optim.lr at a step: linear warmup, then cosine over decay_steps to
    min_lr_ratio, then flat. A callable object rather than a closure: LambdaLR saves an object's
    attributes with the scheduler state, so a checkpoint carries its own decay horizon."""

    def __init__(self, warmup_steps: int, decay_steps: int, min_lr_ratio: float):
        self.warmup_steps, self.decay_steps, self.min_lr_ratio = warmup_steps, decay_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        warmup = self.warmup_steps
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / self.decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


def decay_horizon(optim: OptimConfig, max_steps: int) -> int:
    """Steps of cosine decay after warmup: optim.decay_steps, or until trainer.max_steps when null."""
    return optim.decay_steps if optim.decay_steps is not None else max(1, max_steps - optim.warmup_steps)


def lr_lambda(optim: OptimConfig, max_steps: int) -> LRSchedule:
    return LRSchedule(optim.warmup_steps, decay_horizon(optim, max_steps), optim.min_lr_ratio)


def continue_schedule(schedule: LRSchedule, optim: OptimConfig, max_steps: int, step: int,
                      saved_decay_steps: Optional[int], saved_config: dict) -> Optional[str]:
    """After a resume at `step`: the decay horizon the schedule continues with, and a line saying
    so when it is not what this run's config alone would give (None otherwise).

    optim.decay_steps set: that horizon (an explicit choice; it takes effect from the next LR
    update). Unset: the horizon the checkpoint was trained with, so that extending a finished run
    (a larger trainer.max_steps) continues the schedule instead of stretching the cosine, which
    would raise the LR at the resume step. `saved_decay_steps` is what the checkpoint recorded;
    checkpoints that predate the record give it through their config (trainer.max_steps,
    optim.decay_steps, optim.warmup_steps)."""
    if saved_decay_steps is None:
        saved_optim, saved_trainer = saved_config.get("optim", {}), saved_config.get("trainer", {})
        if saved_optim.get("decay_steps") is not None:
            saved_decay_steps = int(saved_optim["decay_steps"])
        elif saved_trainer.get("max_steps") is not None:
            saved_decay_steps = max(1, int(saved_trainer["max_steps"]) - int(saved_optim.get("warmup_steps", 0)))
    own = decay_horizon(optim, max_steps)
    if optim.decay_steps is not None or saved_decay_steps is None:
        schedule.decay_steps = own
        if saved_decay_steps is not None and saved_decay_steps != own:
            return (f"LR schedule: optim.decay_steps={own} replaces the checkpoint's decay horizon of "
                    f"{saved_decay_steps} steps from step {step + 1} on")
        return None
    schedule.decay_steps = saved_decay_steps
    if saved_decay_steps != own:
        end = schedule.warmup_steps + saved_decay_steps
        after = (f"decayed at step {end}, flat at {schedule.min_lr_ratio:g} x optim.lr from there"
                 if end <= max_steps else f"decaying until step {end}")
        change = "extending" if own > saved_decay_steps else "shortening"
        return (f"{change} run: LR schedule continues from step {step} with the checkpoint's decay horizon "
                f"({saved_decay_steps} steps after {schedule.warmup_steps} warmup: {after}) instead of "
                f"refitting it to trainer.max_steps={max_steps}; set optim.decay_steps to decay over another horizon")
    return None


def initialize(model: nn.Module, cfg: TrainConfig, ds_config: dict, mpu=None):
    """deepspeed.initialize with our optimizer (orchestrator/optim.py: fused AdamW at ZeRO 0) and LR
    schedule, for the plain and the pipeline engine alike; returns (engine, scheduler)."""
    import deepspeed
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    from orchestrator.optim import build_optimizer

    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if any(is_moe_param(p) for p in model.parameters()):
        # ZeRO reduces and partitions expert parameters over the expert-data-parallel group only;
        # it finds them through param groups marked 'moe'.
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    optimizer = build_optimizer(groups, o, cfg.parallel.zero_stage, model=model,
                                dp_group=mpu.get_data_parallel_group() if mpu is not None else None,
                                dp_size=cfg.parallel.dp)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o, cfg.trainer.max_steps))
    with expert_params_count_as_moe(model):
        engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                       config=ds_config, mpu=mpu)
    if o.expert_tables == "row_sparse" and engine.optimizer is not optimizer:
        # A wrapper (ZeRO, bf16) steps flat buffers, not the tables' rows; validation refuses those
        # layouts, this catches any other DeepSpeed setting that wraps the optimizer.
        raise RuntimeError(f"optim.expert_tables=row_sparse: DeepSpeed wrapped the optimizer in "
                           f"{type(engine.optimizer).__name__}, which would not step the table rows")
    return engine, scheduler


def build_engine(model: nn.Module, cfg: TrainConfig, bf16: bool, mpu=None):
    """deepspeed.initialize with our optimizer and schedule; returns (engine, scheduler).

    mpu: the layout's process groups (ParallelDims.grid()) when tp > 1. DeepSpeed then reduces
    gradients and partitions ZeRO state over the data-parallel group only, names its files per
    tp rank (mp_rank_XX), and its gradient norm counts tp-sharded parameters (marked
    `tensor_model_parallel`) on every tp rank and replicated ones once."""
    engine, scheduler = initialize(model, cfg, deepspeed_config(cfg, bf16), mpu=mpu)
    if cfg.parallel.dp == 1 and cfg.parallel.zero_stage == 0:
        # No data-parallel peer: DeepSpeed's all-reduce would only flatten and copy every gradient
        # twice. Not under ZeRO, whose reduce_gradients also fills its partitioned gradient buffers.
        engine.enable_backward_allreduce = False
    return engine, scheduler

