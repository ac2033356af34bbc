"""The training engine: one interface (`TrainEngine`) over the DeepSpeed engine of every layout.

    from orchestrator.engine import build_train_engine
    engine = build_train_engine(cfg, dims, device, bf16)      # plain DeepSpeed or pipeline
    result = engine.train_step(micro_batches, stop_requested)  # StepResult(loss, grad_norm, stop)

Modules: base (the interface, StepResult, Evaluation, stop vote, per-rank state), plain (dp/ep/tp/
ZeRO), pipeline (pp > 1), grad_norm (the one gradient norm), deepspeed_init (DeepSpeed's config,
optimizer and LR schedule), factory. docs/engine.md explains the design.
"""

from orchestrator.engine.base import Evaluation, StepResult, StopVote, TrainEngine, expert_usage_stats
from orchestrator.engine.deepspeed_init import (LRSchedule, build_engine, continue_schedule, decay_horizon,
                                                deepspeed_config, lr_lambda, param_groups, trainer_clips_gradients)
from orchestrator.engine.factory import build_train_engine

__all__ = ["Evaluation", "LRSchedule", "StepResult", "StopVote", "TrainEngine", "build_engine", "build_train_engine",
           "continue_schedule", "decay_horizon", "deepspeed_config", "expert_usage_stats", "lr_lambda", "param_groups",
           "trainer_clips_gradients"]
