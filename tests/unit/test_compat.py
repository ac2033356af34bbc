"""Each private API that compat.py uses, checked against the installed library.

A failure here names the compat function whose library changed under it: fix that function (or
the pin in pyproject.toml), not the caller. The DeepSpeed checks run a real engine (one gloo
process, in a subprocess so DeepSpeed's process-wide groups do not leak into other tests).
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import compat

ROOT = Path(__file__).resolve().parents[2]


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


# ----------------------------------------------------------------------------- DeepSpeed


def test_deepspeed_private_names_have_the_shapes_compat_relies_on():
    import deepspeed.moe.mappings as mappings
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.module import PipelineModule
    from deepspeed.utils import groups

    assert _params(DeepSpeedEngine._configure_distributed_model) == ["self", "model"], \
        "expert_params_count_as_moe wraps DeepSpeedEngine._configure_distributed_model(self, model)"
    assert "has_moe_layers" in inspect.getsource(DeepSpeedEngine._configure_distributed_model), \
        "expert_params_count_as_moe: has_moe_layers is no longer set in _configure_distributed_model"
    assert _params(DeepSpeedEngine._take_model_step)[:2] == ["self", "lr_kwargs"], \
        "run_before_model_step calls _take_model_step(lr_kwargs)"
    assert "self._take_model_step(" in inspect.getsource(DeepSpeedEngine.step), \
        "run_before_model_step: DeepSpeedEngine.step no longer goes through _take_model_step"
    assert "self._synchronize_tied_weights()" in inspect.getsource(PipelineModule.load_state_dir), \
        "pipeline.py's override of PipelineModule._synchronize_tied_weights is no longer what loading calls"
    assert _params(PipelineModule._synchronize_tied_weights) == ["self"]
    for name in ("_get_expert_parallel_group_dict", "_create_expert_and_data_parallel",
                 "_create_expert_data_and_model_parallel", "_get_expert_parallel_group",
                 "_get_expert_data_parallel_group"):
        assert callable(getattr(groups, name, None)), f"expert_groups uses deepspeed.utils.groups.{name}"
    assert _params(groups._create_expert_data_and_model_parallel)[:2] == ["expert_parallel_size_", "mpu"]
    assert _params(mappings._gather_tokens.__wrapped__ if hasattr(mappings._gather_tokens, "__wrapped__")
                   else mappings._gather_tokens) == ["input_", "dim"]
    # _GatherTokens and _DropTokens must look the gather up through the module (so the replacement
    # takes effect), not hold a reference taken at import.
    assert "_gather_tokens(" in inspect.getsource(mappings._GatherTokens.forward)


_ENGINE_SCRIPT = textwrap.dedent("""
    import os, sys, json, tempfile
    import torch, torch.distributed as dist
    from torch import nn
    tmp = sys.argv[1]
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    import deepspeed.moe.mappings as mappings
    import compat

    ep_group, edp_group = compat.expert_groups(1, "ep_size_1")
    assert dist.get_world_size(ep_group) == 1 and dist.get_world_size(edp_group) == 1
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    for p in model[1].parameters():  # the marks DeepSpeed's MoE layer gives its expert parameters
        p.allreduce, p.group_name = False, "ep_size_1"
    groups_ = split_params_into_different_moe_groups_for_optimizer([{"name": "all", "params": list(model.parameters())}])
    optimizer = torch.optim.SGD(groups_, lr=0.1)
    original = DeepSpeedEngine._configure_distributed_model
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0}}
    with compat.expert_params_count_as_moe(model):
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    assert DeepSpeedEngine._configure_distributed_model is original, "not restored"
    result = {"has_moe_layers": bool(engine.has_moe_layers)}
    calls = []
    compat.run_before_model_step(engine, lambda: calls.append("before"))
    loss = engine(torch.randn(2, 4)).sum()
    engine.backward(loss)
    engine.step()
    result["before_step_calls"] = len(calls)
    loads = []
    def load(path, map_location=None):
        loads.append(path)
        return torch.load(path, map_location=map_location, weights_only=False)
    compat.route_checkpoint_loads(engine, load)
    engine.save_checkpoint(os.path.join(tmp, "ck"), tag="t")
    engine.load_checkpoint(os.path.join(tmp, "ck"), tag="t")
    result["routed_loads"] = len(loads)
    compat.use_gloo_safe_token_gather()
    compat.use_gloo_safe_token_gather()  # idempotent
    result["gather_replaced"] = getattr(mappings._gather_tokens, "_peer_lab", False)
    x = torch.randn(3, 2)
    result["gather_world1_identity"] = bool(torch.equal(mappings._gather_tokens(x, 0), x))
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)
""")


@pytest.mark.slow
def test_deepspeed_hooks_work_on_a_real_engine(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port)}
    proc = subprocess.run([sys.executable, "-c", _ENGINE_SCRIPT, str(tmp_path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, f"engine script failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    import json

    result = json.loads(line[len("RESULT "):])
    assert result["has_moe_layers"], "expert_params_count_as_moe no longer makes the engine see MoE parameters"
    assert result["before_step_calls"] == 1, "run_before_model_step's hook did not run before the step"
    assert result["routed_loads"] >= 1, "route_checkpoint_loads: DeepSpeed's loads no longer go through checkpoint_engine.load"
    assert result["gather_replaced"] and result["gather_world1_identity"]


# ----------------------------------------------------------------------------- DeepSpeed: ZeRO state per parameter
# (compat.zero_param_groups, compat.zero_init_optimizer_states; their behaviour is checked end to end
# under ZeRO-1 by tests/e2e/test_layout_change.py)


def test_zero_optimizer_keeps_its_groups_and_fp32_partitions_under_these_names():
    import inspect

    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    source = inspect.getsource(DeepSpeedZeroOptimizer.__init__)
    assert "self.bit16_groups" in source and "self.single_partition_of_fp32_groups" in source, \
        "zero_param_groups / zero_init_optimizer_states: ZeRO's group attributes were renamed"


def test_lazy_optimizer_state_linking_takes_params_partition_and_state():
    import inspect

    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    assert list(inspect.signature(lazy_init_hp_params_optimizer_state).parameters) == [
        "lp_param_list", "flat_hp_partition", "optimizer_state"], \
        "zero_init_optimizer_states: lazy_init_hp_params_optimizer_state changed its signature"


# ----------------------------------------------------------------------------- submitit


def test_submitit_sbatch_string_and_entry_module():
    import importlib.util

    text = compat.make_sbatch_string("python -u -m " + compat.SUBMITIT_ENTRY_MODULE + " /f", "/f",
                                     job_name="j", ntasks_per_node=2, nodes=1, time=5, partition="p",
                                     additional_parameters={"requeue": True})
    assert text.startswith("#!/bin/bash"), "make_sbatch_string: submitit's script template changed"
    for line in ("#SBATCH --job-name=j", "#SBATCH --ntasks-per-node=2", "#SBATCH --partition=p",
                 "#SBATCH --requeue", "python -u -m submitit.core._submit /f"):
        assert line in text, f"make_sbatch_string: {line!r} missing from submitit's script"
    assert importlib.util.find_spec(compat.SUBMITIT_ENTRY_MODULE) is not None, \
        "submitit's batch entry module moved"


# ----------------------------------------------------------------------------- torch


def test_torch_dispatch_mode_probe_used_by_model_kernels():
    """model/kernels/chunked.py (which may import only torch, so it cannot use this module) asks
    torch.utils._python_dispatch._get_current_dispatch_mode() whether a dispatch mode is active
    before taking its torch.compile path."""
    from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode

    assert _get_current_dispatch_mode() is None

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert _get_current_dispatch_mode() is not None


def test_default_collective_timeout_reaches_new_groups():
    import datetime

    import torch.distributed.distributed_c10d as c10d

    saved = c10d.default_pg_timeout
    try:
        compat.set_default_collective_timeout(17)
        # What dist.new_group(timeout=None) uses (DeepSpeed's groups are made that way).
        assert c10d._get_default_timeout(c10d.Backend.GLOO) == datetime.timedelta(seconds=17)
        assert "timeout = _get_default_timeout(backend)" in __import__("inspect").getsource(c10d._new_group_with_tag)
    finally:
        c10d.default_pg_timeout = saved
