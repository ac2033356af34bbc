"""Top-k mixture-of-experts FFN through deepspeed.moe.layer.MoE.

deepspeed is imported inside MoEFeedForward.__init__ so that `import model` stays torch-only.

Process groups: DeepSpeed's MoE needs its expert-parallel group before the first forward with
ep_size > 1. `deepspeed.initialize` calls `set_deepspeed_parallelism()` on every submodule that
has that method; without the engine (tests, tools), call `init_moe_process_groups(model)` after
`deepspeed.init_distributed()`. This wrapper deliberately has no method of that name: the engine
would call it as well as the inner MoE's, and DeepSpeed's gate asserts its group is set once.

Expert parameters carry DeepSpeed's marks (`param.allreduce = False`, `param.group_name`), which
the optimizer set-up needs to reduce them over the expert-data-parallel group only.

Legend (shape suffixes): B batch, T tokens, D d_model.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import MoEConfig
from model.mlp import DenseMLP


class MoEFeedForward(nn.Module):
    """x [..., D] -> (y [..., D], aux_loss_coef * load-balancing loss).

    `ep_size` is the expert-parallel degree: each rank holds num_experts / ep_size experts.
    """

    def __init__(
        self,
        d_model: int,
        cfg: MoEConfig,
        init_std: float,
        ep_size: int = 1,
        output_init_std: float | None = None,
    ) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        if cfg.top_k not in (1, 2):
            raise ValueError(f"MoE top_k must be 1 or 2 (DeepSpeed's gating), got {cfg.top_k}")
        if ep_size < 1 or cfg.num_experts % ep_size:
            raise ValueError(f"MoE num_experts ({cfg.num_experts}) must be divisible by ep_size ({ep_size})")
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.ep_size = ep_size
        self.aux_loss_coef = cfg.aux_loss_coef
        self.init_std = init_std
        # Evaluation metrics, as PEER's: with track_usage set, every forward adds the tokens the
        # gate routed to each expert (DeepSpeed's counts, before capacity drops; top-2 counts a
        # token for both of its experts) to the non-persistent buffer usage_counts [E].
        self.track_usage = False
        self.register_buffer("usage_counts", torch.zeros(cfg.num_experts, dtype=torch.int64), persistent=False)

        # The template expert is passed, not stored: DeepSpeed deep-copies it per local expert,
        # and keeping it as a submodule would add a set of unused parameters.
        expert = DenseMLP(d_model, cfg.d_ff, init_std, output_init_std)
        self.moe = MoE(
            hidden_size=d_model,
            expert=expert,
            num_experts=cfg.num_experts,
            ep_size=ep_size,
            k=cfg.top_k,
            capacity_factor=cfg.capacity_factor,
            eval_capacity_factor=cfg.eval_capacity_factor,
            min_capacity=cfg.min_capacity,
            use_residual=False,
            top2_2nd_expert_sampling=cfg.second_expert_sampling,
            use_rts=cfg.random_token_selection,
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # DeepSpeed deep-copies one expert, so all experts start identical; only the gate's
        # routing would break the symmetry. Re-draw each expert independently instead: expert e
        # from its own generator seeded by (one draw of the global stream) + e, so that expert e
        # starts the same whatever ep is and the global stream advances by the same amount.
        self.expert_seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
        self.reset_local_experts(ep_rank=0)
        # DeepSpeed leaves the gate at nn.Linear's default (kaiming-uniform); use the model's std.
        nn.init.normal_(self.gate_weight(), mean=0.0, std=self.init_std)

    @torch.no_grad()
    def reset_local_experts(self, ep_rank: int) -> None:
        """Initialise the local experts as the global experts ep_rank * L .. ep_rank * L + L - 1
        (L = num_experts / ep_size, DeepSpeed's placement). The constructor does not know the rank
        and uses 0; orchestrator.parallel.parallelize calls this with the real one."""
        local = self.local_experts()
        for j, expert in enumerate(local):
            gen = torch.Generator(device="cpu").manual_seed(self.expert_seed + ep_rank * len(local) + j)
            expert.reset_parameters(generator=gen)

    def local_experts(self) -> list[DenseMLP]:
        return list(self.moe.deepspeed_moe.experts.deepspeed_experts)

    def gate_weight(self) -> torch.Tensor:
        return self.moe.deepspeed_moe.gate.wg.weight

    def reset_usage(self) -> None:
        self.usage_counts.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, l_aux, expert_counts = self.moe(x)
        if self.track_usage:
            self.usage_counts += expert_counts.to(self.usage_counts.device, torch.int64)
        return y, l_aux * self.aux_loss_coef


def init_moe_process_groups(module: nn.Module) -> int:
    """Give every DeepSpeed MoE inside `module` its expert-parallel group; return how many.

    For use without `deepspeed.initialize` (which does this itself). Needs an initialised
    DeepSpeed comm backend (`deepspeed.init_distributed`). Layers that already have a group are
    skipped, so calling it twice is harmless.
    """
    from deepspeed.moe.layer import MoE

    num_set = 0
    for sub in module.modules():
        if isinstance(sub, MoE) and sub.deepspeed_moe.ep_group is None:
            sub.set_deepspeed_parallelism()
            num_set += 1
    return num_set
