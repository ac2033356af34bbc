"""Every use of another library's private API, in one place.

Each function below reaches into a name that its library does not promise to keep (a leading
underscore, a module under `_internal`, a method replaced on an object). Each says why no public
API does the job, and tests/unit/test_compat.py checks, against the installed library, that the
name still exists with the shape this code relies on: when a library changes under us, that file
fails with the name of the function here, not a training run with an AttributeError.

The versions these were written against are pinned exactly in pyproject.toml (deepspeed 0.19.8,
submitit 1.5.4; torch 2.13.0 is installed first). Moving a pin: run
`python -m pytest tests/unit/test_compat.py` with the new version first.

A top-level module, not part of orchestrator/, because both orchestrator/ (DeepSpeed, torch) and
cluster/ (submitit) need it and cluster/ imports nothing of orchestrator/ or model/. It imports no
project module itself. Imports of the libraries are late: `import deepspeed` costs seconds and a
launcher's `--help` or a Slurm submission needs none of it. Hydra needs nothing here: launch.py
expands sweeps with Hydra's public override API.

Not here, on purpose: the expert-parallel all-to-all with autograd
(orchestrator/parallel/expert_parallel.py) is the project's own autograd function over the public
dist.all_to_all_single. torch 2.13's public `torch.distributed.nn.functional.all_to_all_single`
gives the same values and gradients with gloo and uneven splits (checked on 2 processes), but is
deprecated in favour of the private `torch.distributed._functional_collectives`; neither is a gain.
model/kernels/chunked.py asks torch's private `_get_current_dispatch_mode`; model/ imports only
torch, so that one use stays there (tested in tests/unit/test_compat.py).
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Callable, Iterator

# ============================================================================= DeepSpeed 0.19


@contextlib.contextmanager
def expert_params_count_as_moe(model) -> Iterator[None]:
    """DeepSpeed turns on its expert-parameter handling (gradient all-reduce over the
    expert-data-parallel group, ZeRO partitions over it) only when it finds its own MoE class in
    the model (`engine.has_moe_layers`, set in the private `DeepSpeedEngine._configure_distributed_model`,
    before the optimizer is built). Expert-parallel PEER layers carry the same parameter marks but
    are not that class, and no public switch exists; for the duration of deepspeed.initialize,
    set the flag for them too."""
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.engine import DeepSpeedEngine

    if not any(is_moe_param(p) for p in model.parameters()):
        yield
        return
    original = DeepSpeedEngine._configure_distributed_model

    def configure(self, module):
        original(self, module)
        self.has_moe_layers = True

    DeepSpeedEngine._configure_distributed_model = configure
    try:
        yield
    finally:
        DeepSpeedEngine._configure_distributed_model = original


def run_before_model_step(engine, before: Callable[[], None]) -> None:
    """Call `before()` right before every optimizer step of a DeepSpeed engine. The pipeline
    engine computes no gradient norm the trainer can read without ZeRO, and offers no hook
    between its gradient reduction and its step: its private `_take_model_step` is that point."""
    original = engine._take_model_step

    def take_model_step(lr_kwargs=None):
        before()
        original(lr_kwargs)

    engine._take_model_step = take_model_step


def route_checkpoint_loads(engine, load: Callable[..., Any]) -> None:
    """Make every file load of a DeepSpeed engine's checkpoint engine (model, optimizer, ZeRO
    partitions, MoE experts) go through `load(path, map_location=None)`. DeepSpeed's
    TorchCheckpointEngine loads with weights_only=False and takes no loader option; its instance
    (the public attribute `engine.checkpoint_engine`) gets its `load` method replaced."""
    ckpt_engine = engine.checkpoint_engine

    def routed(self, path: str, map_location=None):
        return load(path, map_location=map_location)

    ckpt_engine.load = types.MethodType(routed, ckpt_engine)


def expert_groups(ep: int, group_name: str, mpu=None) -> tuple[Any, Any]:
    """(expert-parallel group, expert-data-parallel group) named `group_name` (DeepSpeed's
    `ep_size_<ep>`), created on first use (collective: every rank must call it). DeepSpeed creates
    these groups only inside its MoE layer's constructor; PEER layers need the same groups (so that
    its engine reduces and partitions their expert parameters) without being that layer, and the
    functions that create and look them up are private (`deepspeed.utils.groups._...`). With `mpu`
    (a grid with tensor or pipeline axes) the groups are made inside each model-parallel slice."""
    from deepspeed.utils import groups

    if group_name not in groups._get_expert_parallel_group_dict():
        if mpu is None:
            groups._create_expert_and_data_parallel(ep)
        else:
            groups._create_expert_data_and_model_parallel(ep, mpu=mpu)
    return groups._get_expert_parallel_group(group_name), groups._get_expert_data_parallel_group(group_name)


def use_gloo_safe_token_gather() -> None:
    """DeepSpeed 0.19's MoE all-gathers the tp ranks' capacity slots (the private
    `deepspeed.moe.mappings._gather_tokens`) into a flat 1-D buffer with all_gather_into_tensor,
    which gloo refuses ("invalid tensor size": it wants the output shaped [world * n, ...]). Replace
    it by the same gather as a list all_gather and a concatenation (same values, same layout), so
    MoE under tp runs on CPU too. _GatherTokens and _DropTokens look the function up by module
    name, so replacing the module attribute is enough. Idempotent."""
    import deepspeed.moe.mappings as mappings
    import torch
    import torch.distributed as dist

    if getattr(mappings._gather_tokens, "_peer_lab", False):
        return

    def _gather_tokens(input_, dim=0):
        from deepspeed.utils.bwc import bwc_tensor_model_parallel_group, bwc_tensor_model_parallel_world_size

        mpu = mappings.deepspeed.utils.groups.mpu
        input_ = input_.contiguous()
        world_size = bwc_tensor_model_parallel_world_size(mpu)
        if world_size == 1:
            return input_
        parts = [torch.empty_like(input_) for _ in range(world_size)]
        dist.all_gather(parts, input_, group=bwc_tensor_model_parallel_group(mpu))
        return torch.cat(parts, dim=dim).contiguous()

    _gather_tokens._peer_lab = True
    mappings._gather_tokens = _gather_tokens


def synchronize_tied_weights(pipeline_module) -> None:
    """Copy a DeepSpeed PipelineModule's tied weights from their owner stage to the others
    (collective). The broadcast exists only as the private `_synchronize_tied_weights`, which
    DeepSpeed calls itself after loading layer files; the trainer needs it after every load."""
    pipeline_module._synchronize_tied_weights()

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

# ============================================================================= submitit 1.5


# The module submitit's own batch scripts run (`python -u -m submitit.core._submit <folder>`): a
# batch script written by submitit's private template must call the same entry point.
SUBMITIT_ENTRY_MODULE = "submitit.core._submit"


def make_sbatch_string(command: str, folder, **params) -> str:
    """The batch script text submitit would submit for these parameters. submitit builds it only
    inside `SlurmExecutor._make_submission_file_text` (needs a live executor) from the private
    `_make_sbatch_string`; dry runs and the pre-submission `sbatch --test-only` need the same text
    without an executor, so that both show exactly what would be submitted."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=command, folder=folder, **params)


# ============================================================================= torch 2.13


def set_default_collective_timeout(seconds: float) -> None:
    """Make every process group created from now on time out after `seconds` when a peer never
    joins a collective (a rank that died or hangs). init_process_group takes a timeout, but
    dist.new_group without one (DeepSpeed's data-, expert- and model-parallel groups) falls back
    to the module defaults of torch.distributed.distributed_c10d (30 min for gloo, 10 for NCCL),
    which `_get_default_timeout` reads: set those."""
    import datetime

    import torch.distributed.distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=seconds)
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout
