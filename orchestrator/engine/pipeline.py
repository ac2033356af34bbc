"""The pipeline engine (pp > 1): DeepSpeed's PipelineEngine over this rank's stage
(orchestrator/parallel/pipeline.py builds the stage; this module trains it).

A step hands DeepSpeed the step's grad_accum_steps x pp_microbatches pipeline micro-batches
(`split_micro_batches`); its schedule runs forward and backward through the stages, sums the tied
embedding's two gradients, averages over the data-parallel group and takes the optimizer step.
Every stage draws the step's batches (the first stage feeds the inputs, the last the targets).
The loss DeepSpeed returns is the last stage's, averaged over micro-batches and data-parallel
ranks and broadcast to every stage: no further reduction.

Without ZeRO the norm and clipping run inside DeepSpeed's schedule, right before its optimizer
step (`compat.run_before_model_step`), through the same `global_grad_norm` as the plain engine, with the
pipe group added; the value goes to this engine object, never onto DeepSpeed's.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from compat import run_before_model_step
from orchestrator.engine.base import Evaluation, StepResult, TrainEngine, expert_usage_stats, named_batch_sets
from orchestrator.parallel.dims import ParallelDims


def pipeline_deepspeed_config(cfg, bf16: bool) -> dict:
    """DeepSpeed's config under pp: micro-batches of micro_batch_size / pp_microbatches sequences,
    grad_accum_steps x pp_microbatches of them per step, the same global batch."""
    from orchestrator.engine.deepspeed_init import deepspeed_config

    t, p = cfg.trainer, cfg.parallel
    config = deepspeed_config(cfg, bf16)
    config["train_micro_batch_size_per_gpu"] = t.micro_batch_size // p.pp_microbatches
    config["gradient_accumulation_steps"] = t.grad_accum_steps * p.pp_microbatches
    config["train_batch_size"] = t.micro_batch_size * t.grad_accum_steps * p.dp
    # With tp > 1 DeepSpeed would by default send 1/tp of the first activation tensor between
    # stages and all-gather it over the tp group ("pipe_partitioned"), and the same for its
    # gradient ("grad_partitioned"). Its partitioned path asserts that the other tensors a stage
    # sends do not require grad, and our carried aux loss does (MoE load-balancing losses flow
    # back through the stages). Send whole activations instead: exact, tp times the p2p bytes.
    config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    return config


def build_pipeline_deepspeed(module: nn.Module, cfg, bf16: bool):
    """deepspeed.initialize for a PipelineModule (DeepSpeed takes the module's own grid as mpu);
    returns (engine, scheduler)."""
    from orchestrator.engine.deepspeed_init import initialize

    engine, scheduler = initialize(module, cfg, pipeline_deepspeed_config(cfg, bf16))
    if cfg.parallel.zero_stage == 1:
        _sum_zero_norm_over_stages(engine)
    return engine, scheduler


class PipelineTrainEngine(TrainEngine):
    def __init__(self, ds_engine, scheduler, cfg, dims: ParallelDims, device, stop_vote):
        super().__init__(ds_engine, scheduler, cfg, dims, device, stop_vote)
        self._need_grad_norm = True
        self._grad_norm = None
        if cfg.parallel.zero_stage == 0:
            run_before_model_step(ds_engine, self._norm_before_step)

    def _norm_before_step(self) -> None:
        self._grad_norm = self._norm_and_clip(self._need_grad_norm)

    def _grad_norm_groups(self) -> dict:
        return {**super()._grad_norm_groups(), "pipe_group": self._ds.grid.get_pipe_parallel_group()}

    def _step(self, micro_batches: Sequence, need_grad_norm: bool):
        from orchestrator.parallel.pipeline import split_micro_batches

        self._need_grad_norm, self._grad_norm = need_grad_norm, None
        pieces = split_micro_batches(micro_batches, self.cfg.parallel.pp_microbatches)
        loss = self._ds.train_batch(iter([(x.to(self.device), y.to(self.device)) for x, y in pieces]))
        grad_norm = self._grad_norm if self.cfg.parallel.zero_stage == 0 else self._ds.get_global_grad_norm()
        return loss.detach().double(), grad_norm

    def global_mean_losses(self, results: Sequence[StepResult]) -> list[float]:
        return [float(r.loss) for r in results]  # DeepSpeed reduced and broadcast them already

    @torch.no_grad()
    def evaluate(self, batches) -> Evaluation:
        """Each validation batch goes through the pipeline as pp_microbatches micro-batches;
        DeepSpeed averages the last stage's LM loss over them and the data-parallel ranks and
        broadcasts it to every stage. Usage counters are summed over the data-parallel group of
        the stage that holds the layer; each stage's statistics then reach every rank with an
        all-gather over the pipeline group."""
        from orchestrator.parallel.pipeline import split_micro_batches

        m = self.cfg.parallel.pp_microbatches
        local = self.module.usage_layers_by_block()
        for _, layer in local:
            layer.reset_usage()
            layer.track_usage = True
        by_source, total, count = {}, 0.0, 0
        for name, source_batches in named_batch_sets(batches):
            source_total = 0.0
            for batch in source_batches:
                pieces = [(x.to(self.device), y.to(self.device)) for x, y in split_micro_batches([batch], m)]
                source_total += float(self._ds.eval_batch(iter(pieces), num_micro_batches=m))
            total, count = total + source_total, count + len(source_batches)
            if name:
                by_source[name] = source_total / max(len(source_batches), 1)
        val_loss = total / max(count, 1)
        grid = self._ds.grid
        stats = []
        for block, layer in local:
            layer.track_usage = False
            counts = layer.usage_counts.clone()
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=grid.get_data_parallel_group())
            stats.append((block, *expert_usage_stats(counts)))
        gathered: list = [None] * grid.get_pipe_parallel_world_size()
        dist.all_gather_object(gathered, stats, group=grid.get_pipe_parallel_group())
        ordered = sorted(s for per_stage in gathered for s in per_stage)
        self._ds.train()
        return Evaluation(val_loss, [u for _, u, _ in ordered], [k for _, _, k in ordered], by_source)

    def describe(self) -> list[str]:
        from orchestrator.parallel.pipeline import describe_stages

        c = self.cfg
        m = c.parallel.pp_microbatches
        stages = (f"{describe_stages(c.model.num_layers, c.parallel.pp, c.model.tie_embeddings)}; "
                  f"{c.trainer.grad_accum_steps * m} pipeline micro-batches of "
                  f"{c.trainer.micro_batch_size // m} sequences per step and data-parallel rank")
        return [stages] + super().describe()

    def _expert_numbers(self, held: int, full: int) -> tuple[int, int, str]:
        # A rank holds one stage's layers: count the whole pipeline of this rank's replica.
        counts = torch.tensor([held, full], dtype=torch.int64, device=self.device)
        dist.all_reduce(counts, group=self._ds.grid.get_pipe_parallel_group())
        return int(counts[0]), int(counts[1]), "the ranks of this pipeline (one per stage) hold"

    def _load_extra_rank_state(self, state: dict) -> None:
        # The stage loader skips the tied-table broadcast (LMPipelineModule.load_state_dir): do it
        # here, on every rank, before the per-rank state.
        self.module.synchronize_tied_weights()
        super()._load_extra_rank_state(state)


def _sum_zero_norm_over_stages(engine) -> None:
    """ZeRO-1 computes one norm per optimizer param group and all-reduces each over the pipeline
    (its "model parallel" group). Stages hold different param groups (MoE or expert-parallel PEER
    layers add 'moe' groups on the stages that hold them), so those per-group collectives do not
    pair up across stages: a hang. Compute this stage's norm without them, then sum the squares over
    the stages once."""
    optimizer, pipe_group = engine.optimizer, engine.grid.get_pipe_parallel_group()
    stage_norm = optimizer.scaled_global_norm
    # With tp > 1 the stage norm is still reduced over the stage's tp group (every tp rank of a
    # stage holds the same param groups): ZeRO counts tp-sharded parameters on every tp rank and
    # replicated ones on tp rank 0 only (its model_parallel_rank is the grid's tp rank).
    tp_group = engine.grid.get_slice_parallel_group() if engine.grid.get_slice_parallel_world_size() > 1 else None

    def scaled_global_norm(norm_type=2):
        saved, optimizer.model_parallel_group = optimizer.model_parallel_group, tp_group
        try:
            norm = stage_norm(norm_type)
        finally:
            optimizer.model_parallel_group = saved
        # inf and NaN survive the sum, so an invalid norm on any stage stays invalid everywhere.
        total = norm.double().pow(2) if float(norm) >= 0 else torch.tensor(float("inf"), dtype=torch.float64)
        total = total.to(norm.device)
        dist.all_reduce(total, group=pipe_group)
        return total.sqrt().to(norm.dtype)

    optimizer.scaled_global_norm = scaled_global_norm
