"""`build_train_engine`: the one place that picks an engine for the layout and builds the model.

Every rank builds from the same seed; with ep, tp or pp > 1 the PEER tables are deferred and
parallelize() builds only this rank's columns (equal to the same columns of the unsharded init,
never the whole table) and re-draws MoE experts by global index; a pipeline stage builds only its
own layers' tables (orchestrator/parallel/pipeline.to_pipeline), a tp rank only its d/tp columns.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from orchestrator.config import TrainConfig
from orchestrator.engine.base import StopVote, TrainEngine
from orchestrator.parallel.dims import ParallelDims


def build_train_engine(cfg: TrainConfig, dims: ParallelDims, device: torch.device, bf16: bool) -> TrainEngine:
    """The model of `cfg` under `dims`, wrapped in its engine. Collective; torch.distributed (and
    DeepSpeed's distributed setup) must be initialised."""
    from model.lm import build_model
    from model.peer import defer_expert_tables
    from orchestrator.parallel.parallelize import parallelize

    torch.manual_seed(cfg.trainer.seed)
    with defer_expert_tables(enabled=dims.ep > 1 or dims.pp > 1 or dims.tp > 1):
        model = build_model(cfg.model, expert_parallel_size=cfg.parallel.ep)
    # Before parallelize, which replaces the dense MLPs this call tells apart from sparse FFNs.
    model.set_activation_checkpointing(cfg.trainer.activation_checkpointing)
    model = parallelize(model, dims).to(device)
    # Control values (the stop vote) travel on CPU tensors: a gloo group when the default one is not.
    control_group = None
    if dist.get_backend() != "gloo":
        control_group = dist.new_group(backend="gloo")
    stop_vote = StopVote(control_group)
    if dims.pp > 1:
        from orchestrator.engine.pipeline import PipelineTrainEngine, build_pipeline_deepspeed

        ds_engine, scheduler = build_pipeline_deepspeed(model, cfg, bf16)
        return PipelineTrainEngine(ds_engine, scheduler, cfg, dims, device, stop_vote)
    from orchestrator.engine.deepspeed_init import build_engine
    from orchestrator.engine.plain import DeepSpeedTrainEngine

    # tp > 1: DeepSpeed must know the groups (data-parallel reduction, ZeRO, norms, files).
    ds_engine, scheduler = build_engine(model, cfg, bf16, mpu=dims.grid() if dims.tp > 1 else None)
    return DeepSpeedTrainEngine(ds_engine, scheduler, cfg, dims, device, stop_vote)
