"""Dense MLP: the FFN of dense blocks and the expert of DeepSpeed MoE layers.

Its own module so that model/lm.py and model/moe.py can both use it without importing each other.

Legend (shape suffixes): D d_model, F d_ff; leading dims (e.g. B, T) pass through unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DenseMLP(nn.Module):
    """Linear d -> d_ff, GELU, Linear d_ff -> d, no biases.

    `init_std` initialises the up projection, `output_init_std` the down projection (the LM
    passes a depth-scaled std for the latter, see model/lm.py).
    """

    def __init__(self, d_model: int, d_ff: int, init_std: float, output_init_std: float | None = None) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)
        self.init_std = init_std
        self.output_init_std = init_std if output_init_std is None else output_init_std
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        nn.init.normal_(self.up.weight, mean=0.0, std=self.init_std, generator=generator)
        nn.init.normal_(self.down.weight, mean=0.0, std=self.output_init_std, generator=generator)

    def forward(self, x_D: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x_D)))
