"""Every use of another library's private API, in one place (see tests/unit/test_compat*.py).

MERGE NOTE (h12-state): h16's branch creates this module with the project's other private uses;
the section below is self-contained and goes after theirs unchanged.
"""

from __future__ import annotations

# ============================================================================= DeepSpeed 0.19: ZeRO 1/2 state per parameter
# Checkpoints under another layout read and write optimizer moments per model parameter through
# DeepSpeed's public deepspeed.utils.safe_get_full_optimizer_state / safe_set_full_optimizer_state
# (and the fp32 variants). Two things they need have no public API: which model parameters each
# ZeRO group holds (the order the collective gathers go in), and optimizer state that exists
# before the first step (ZeRO creates AdamW's state lazily at the first step, and the setters
# fail on a fresh engine; a load into a fresh engine is exactly what resuming is).


def zero_param_groups(zero_optimizer) -> list[list]:
    """The model parameters of each ZeRO 1/2 param group, in DeepSpeed's order (`bit16_groups`)."""
    return [list(group) for group in zero_optimizer.bit16_groups]


def zero_init_optimizer_states(zero_optimizer, keys=("exp_avg", "exp_avg_sq")) -> None:
    """Create AdamW's state (zeros, step 0) for every flat fp32 partition of a ZeRO 1/2 optimizer
    that has none yet, and link every parameter's fragment mapping to it, as DeepSpeed's own first
    step does (`single_partition_of_fp32_groups`, lazy_init_hp_params_optimizer_state).

    Also needed after training: DeepSpeed 0.19 links the fragments once, right after the first
    param group's first step (`_optimizer_step(0)`), when the other groups have no state yet, so
    their fragments stay empty and safe_get_full_optimizer_state raises "exp_avg not found in
    optimizer state fragment" for every parameter outside group 0. Linking again is harmless: the
    fragments are views of the state tensors."""
    import torch
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    base = zero_optimizer.optimizer
    for i, flat in enumerate(zero_optimizer.single_partition_of_fp32_groups):
        if not base.state.get(flat):
            base.state[flat] = {"step": torch.tensor(0.0), **{k: torch.zeros_like(flat) for k in keys}}
        lazy_init_hp_params_optimizer_state(zero_optimizer.bit16_groups[i], flat, base.state)
