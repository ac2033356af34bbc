"""The plain DeepSpeed engine: data, expert and tensor parallelism and ZeRO (pp = 1).

A step runs forward, backward and DeepSpeed's `step` per micro-batch (DeepSpeed averages the
gradients over the data-parallel group at the last one, the accumulation boundary). Without ZeRO
the engine then computes the global norm and clips before that last `step` (orchestrator/engine/
grad_norm.py); with ZeRO 1/2 DeepSpeed does both inside its optimizer and reports the norm.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from orchestrator.engine.base import Evaluation, StepResult, TrainEngine, expert_usage_stats, named_batch_sets


class DeepSpeedTrainEngine(TrainEngine):
    def _step(self, micro_batches: Sequence, need_grad_norm: bool):
        ds, device = self._ds, self.device
        # The losses stay on the device (float64, summed as before in float64): no host
        # synchronisation per micro-batch.
        total = torch.zeros((), dtype=torch.float64, device=device)
        grad_norm = None
        last = len(micro_batches) - 1
        for i, (inputs, targets) in enumerate(micro_batches):
            out = ds(inputs.to(device), targets.to(device))
            ds.backward(out.loss)
            if i == last and self.cfg.parallel.zero_stage == 0:
                grad_norm = self._norm_and_clip(need_grad_norm)
            ds.step()
            total += out.loss.detach().double()
        if self.cfg.parallel.zero_stage > 0:
            grad_norm = ds.get_global_grad_norm()
        return total / len(micro_batches), grad_norm

    def global_mean_losses(self, results: Sequence[StepResult]) -> list[float]:
        if not results:
            return []
        summed = torch.stack([r.loss for r in results])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        # The tp ranks of a replica hold the same loss: the world sum counts each replica tp times.
        return (summed / (self.dims.dp * self.dims.tp)).tolist()

    @torch.no_grad()
    def evaluate(self, batches) -> Evaluation:
        usage_layers = list(self.module.usage_layers())
        for layer in usage_layers:
            layer.reset_usage()
            layer.track_usage = True
        self._ds.eval()
        named = named_batch_sets(batches)
        sums = torch.zeros(len(named), 2, dtype=torch.float64)  # [source, (loss sum, batches)]
        for i, (_, source_batches) in enumerate(named):
            for inputs, targets in source_batches:
                out = self._ds(inputs.to(self.device), targets.to(self.device))
                sums[i] += torch.tensor([float(out.lm_loss), 1.0], dtype=torch.float64)
        sums = sums.to(self.device)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        total = sums.sum(0)
        by_source = {n: float(sums[i, 0] / sums[i, 1]) for i, (n, _) in enumerate(named) if n}
        usages, kls = [], []
        for layer in usage_layers:
            layer.track_usage = False
            counts = layer.usage_counts.clone()
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            usage, kl = expert_usage_stats(counts)
            usages.append(usage)
            kls.append(kl)
        self._ds.train()
        return Evaluation(float(total[0] / total[1]), usages, kls, by_source)
