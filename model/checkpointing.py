"""Activation checkpointing for the LM's blocks: keep a region's inputs, recompute it in the backward.

`checkpointed(module_fn, modules, *inputs)` runs `module_fn(*inputs)` under
torch.utils.checkpoint (non-reentrant). The recompute must not change state a second time:
PEER's and PKM's query BatchNorm update their running statistics in every training forward, so
during the recompute those statistics are saved and put back (the normalisation itself uses the
batch statistics and is recomputed exactly). Everything else in the blocks is a pure function of
the inputs and parameters (no dropout), so the recompute gives bitwise the values of the forward.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

CHECKPOINT_MODES = ("none", "blocks", "sparse")


@contextlib.contextmanager
def batchnorm_stats_frozen(module: nn.Module):
    """Running mean, var and batch count of every BatchNorm in `module` unchanged on exit."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def checkpointed(fn, module: nn.Module, *inputs):
    """fn(*inputs) with its activations recomputed in the backward instead of kept.

    Outside training or without autograd it is a plain call. The first call of `fn` is the
    forward; any later one is torch's recompute, run with `module`'s BatchNorm statistics frozen.
    """
    if not (module.training and torch.is_grad_enabled()):
        return fn(*inputs)
    calls = [0]

    def run(*args):
        calls[0] += 1
        if calls[0] == 1:
            return fn(*args)
        with batchnorm_stats_frozen(module):
            return fn(*args)

    return checkpoint(run, *inputs, use_reentrant=False)
