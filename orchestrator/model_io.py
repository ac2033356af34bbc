"""Load a trained model into one process for evaluation and generation, whatever trained it.

`read_model_state(source) -> ModelState` accepts, as a local path or any fsspec URL:

    (a) today's checkpoints: a run dir (its checkpoints/ folder), a checkpoint dir, or one step dir
        (step_XXXXXXXX/ with manifest.json). The newest *complete* step is taken (a manifest is the
        commit marker); every file read is checked against the manifest's size and SHA-256, and
        loaded with torch's weights-only unpickler (orchestrator.checkpoint.safe_load).
    (b) exports: a folder with config.json {"format": "peer-lab-export", "version": 1, "step",
        "source", "config"}, model.safetensors.index.json {"metadata": {"total_size"}, "weight_map"}
        and the model-0000i-of-0000K.safetensors shards it names; tensor names are the keys of
        `model.lm.build_model(cfg.model).state_dict()` (one process, ep = 1, buffers included).

Checkpoints are gathered from their layout-free shards by `orchestrator.checkpoint.read_model_state`
(any layout), which hold the BatchNorm statistics pooled over the data-parallel ranks (below) when
the checkpoint was saved. Checkpoints written before the portable state, with the whole model in
DeepSpeed's mp_rank_00_model_states.pt (parallel.ep = tp = pp = 1, any data-parallel degree and
ZeRO stage 0-2), are read from that file's 'module' plus the layer_*_expert_*_model_states.pt files
in which DeepSpeed keeps MoE experts, pooling every rank file's BatchNorm statistics.

BatchNorm running statistics (PEER's and PKM's query norm). Each data-parallel rank updates its
own from its own batches, and the trainer saves every rank's copy in that rank's file (so resume
is exact); DeepSpeed's model file holds rank 0's. Decision: for inference the reader pools the
ranks' statistics: mean = average of the ranks' means, var = average of the ranks' variances plus
the variance of their means (the variance of the union of the ranks' batches, what one process
seeing the whole global batch would have tracked). Training is untouched by this; with one rank it
is rank 0's statistics exactly. An export carries the pooled statistics.

Every problem a user can cause (no such path, no complete checkpoint, a damaged file, a layout
this reader cannot merge) raises ConfigError with key `source`: one line, exit code 2 at the CLIs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

import torch

from orchestrator.errors import ConfigError
from orchestrator.storage import Storage, redact

EXPORT_FORMAT = "peer-lab-export"
EXPORT_VERSION = 1
EXPORT_CONFIG = "config.json"
EXPORT_INDEX = "model.safetensors.index.json"
MODEL_FILE = "mp_rank_00_model_states.pt"
_EXPERT_FILE = re.compile(r"^layer_\d+_expert_\d+_mp_rank_00_model_states\.pt$")
_RANK_FILE = re.compile(r"^rank_\d+\.pt$")
_FIX_SOURCE = ("give a run dir, a checkpoint dir, a step_XXXXXXXX dir holding manifest.json, "
               "or an export folder holding config.json")


@dataclass
class ModelState:
    config: dict  # the full resolved run config (dict form of orchestrator.config.TrainConfig)
    state_dict: dict[str, torch.Tensor]  # keys of build_model(cfg.model).state_dict()
    step: int
    source: str  # what was read, URL redacted (the step dir or the export folder)
    kind: str  # "checkpoint" or "export"
    train_run_id: Optional[str] = None  # the training run's MLflow run id, when it was recorded
    tokenizer_file: Optional[str] = None  # a local copy of an export's tokenizer.json


def _refuse(source: str, problem: str, fix: str = _FIX_SOURCE) -> ConfigError:
    return ConfigError("source", redact(source), problem, fix)


def read_model_state(source: str) -> ModelState:
    """Config, whole-model state dict and step of a checkpoint or an export (see the module doc)."""
    storage = Storage(source)
    try:
        if storage.exists(EXPORT_CONFIG) and storage.exists(EXPORT_INDEX):
            return _read_export(storage, source)
        step_dir = _find_step_dir(storage, source)
        return _read_checkpoint(step_dir, source)
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, pickle.UnpicklingError, RuntimeError) as exc:
        raise _refuse(source, f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
                      "check the path; a damaged checkpoint cannot be used: pick another step dir") from None


# ----------------------------------------------------------------------------- checkpoints


def _find_step_dir(storage: Storage, source: str) -> Storage:
    from orchestrator.checkpoint import MANIFEST, step_of

    if storage.exists(MANIFEST):
        return storage
    if not storage.exists(""):
        raise _refuse(source, "no such file or directory")
    for folder in (storage, Storage(storage.url + "/checkpoints")):
        steps = sorted((step_of(n), n) for n in folder.list_dirs() if step_of(n) is not None)
        complete = [(s, n) for s, n in steps if folder.exists(f"{n}/{MANIFEST}")]
        if complete:
            return Storage(folder.url + "/" + complete[-1][1])
        if steps:
            raise _refuse(source, f"no complete checkpoint ({len(steps)} step folders, none with {MANIFEST}: "
                                  "interrupted saves)", "wait for the run's next save, or point at another run")
    raise _refuse(source, "neither a checkpoint nor an export (no manifest.json, step_* folders, checkpoints/ "
                          "or config.json + model.safetensors.index.json)")


def _read_checkpoint(step_dir: Storage, source: str) -> ModelState:
    # safe_load's allow-list imports deepspeed, which warns unless told its accelerator.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from orchestrator.checkpoint import MANIFEST, safe_load, sha256_file
    from orchestrator.checkpoint.manager import unpickling_refusal
    from orchestrator.checkpoint.portable import pool_batchnorm_statistics

    shown = step_dir.display()
    manifest = json.loads(step_dir.read_bytes(MANIFEST))
    config = manifest.get("config") or {}
    par = config.get("parallel", {})
    layout = {k: par.get(k, 1) for k in ("ep", "tp", "pp")}
    if "portable" in manifest or any(v != 1 for v in layout.values()):
        return _read_portable(step_dir, shown, manifest)
    files = manifest["files"]  # written before the portable state: DeepSpeed's model file
    wanted = [n for n in files if n == MODEL_FILE or _EXPERT_FILE.match(n) or _RANK_FILE.match(n)]
    if MODEL_FILE not in files:
        raise _refuse(shown, f"the manifest lists no {MODEL_FILE}", "pick another step dir")
    temp_dir = tempfile.mkdtemp(prefix="peerlab-read-")
    try:
        loaded = {}
        for name in sorted(wanted):
            path = step_dir.path(name) if step_dir.local else os.path.join(temp_dir, name)
            if not step_dir.local:
                step_dir.get_file(name, path)
            if not os.path.exists(path):
                raise _refuse(shown, f"{name} is missing", "pick another step dir (this one is damaged)")
            size, rec = os.path.getsize(path), files[name]
            if size != rec["size"] or sha256_file(path) != rec["sha256"]:
                problem = (f"{name}: {size} bytes, manifest says {rec['size']}" if size != rec["size"]
                           else f"{name}: SHA-256 differs from the manifest")
                raise _refuse(shown, f"damaged ({problem})", "pick another step dir, e.g. the previous step")
            try:
                loaded[name] = safe_load(path, map_location="cpu")
            except pickle.UnpicklingError as exc:
                reason = unpickling_refusal(exc)
                raise _refuse(shown, f"holds objects outside the weights-only allow-list ({reason})",
                              "only load checkpoints written by peer-lab") from None
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    model_file = loaded.pop(MODEL_FILE)
    state = dict(model_file["module"])
    for name in [n for n in loaded if _EXPERT_FILE.match(n)]:
        state.update(loaded.pop(name))  # DeepSpeed keeps MoE experts apart, under global ids
    rank_buffers = [loaded[n].get("extra", {}).get("buffers", {}) for n in sorted(loaded)]
    state.update(pool_batchnorm_statistics(rank_buffers))
    return ModelState(config=config, state_dict=state, step=int(manifest["step"]), source=shown,
                      kind="checkpoint", train_run_id=model_file.get("mlflow_run_id"))


def _read_portable(step_dir: Storage, shown: str, manifest: dict) -> ModelState:
    """A checkpoint written under ep, tp or pp > 1: its layout-free index (global names, shapes and
    each rank's pieces, orchestrator/checkpoint/portable.py) gathered into the one-process model.
    Its BatchNorm statistics were pooled over the data-parallel ranks when it was saved."""
    from orchestrator.checkpoint.warm_start import read_model_state as read_portable
    from orchestrator.checkpoint.portable import DamagedChunk

    if "portable" not in manifest:
        raise _refuse(shown, "written before checkpoints held layout-free shards (no portable index)",
                      "resume it once under its own layout and save again, or evaluate another step")
    try:
        config, state, step = read_portable(step_dir.url)
    except DamagedChunk as exc:
        raise _refuse(shown, f"damaged ({exc})", "pick another step dir, e.g. the previous step") from None
    return ModelState(config=config, state_dict=state, step=step, source=shown, kind="checkpoint",
                      train_run_id=manifest["portable"].get("mlflow_run_id"))


# ----------------------------------------------------------------------------- exports


def _read_export(storage: Storage, source: str) -> ModelState:
    from safetensors.torch import load as load_safetensors

    shown = storage.display()
    header = json.loads(storage.read_bytes(EXPORT_CONFIG))
    if header.get("format") != EXPORT_FORMAT or header.get("version") != EXPORT_VERSION:
        raise _refuse(shown, f"config.json is not a {EXPORT_FORMAT} version {EXPORT_VERSION} header "
                             f"(format={header.get('format')!r}, version={header.get('version')!r})",
                      "export the checkpoint again with this version of peer-lab")
    index = json.loads(storage.read_bytes(EXPORT_INDEX))
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        if not storage.exists(shard):
            raise _refuse(shown, f"{shard} is missing", "copy the whole export folder")
        try:
            tensors = load_safetensors(storage.read_bytes(shard))
        except Exception as exc:  # safetensors raises its own SafetensorError for a bad header
            raise _refuse(shown, f"{shard} is damaged ({str(exc).splitlines()[0][:160]})",
                          "export the checkpoint again") from None
        state.update(tensors)
    names = set(index["weight_map"])
    if set(state) != names:
        raise _refuse(shown, f"the shards hold other tensors than the index names "
                             f"({len(names ^ set(state))} differ, e.g. {sorted(names ^ set(state))[0]})",
                      "export the checkpoint again")
    total = sum(t.numel() * t.element_size() for t in state.values())
    expected = index.get("metadata", {}).get("total_size")
    if expected is not None and int(expected) != total:
        raise _refuse(shown, f"tensors hold {total} bytes, the index says {expected}", "export the checkpoint again")
    tokenizer_file = None
    if storage.exists("tokenizer.json"):
        local = tempfile.mkdtemp(prefix="peerlab-tok-")
        tokenizer_file = os.path.join(local, "tokenizer.json")
        storage.get_file("tokenizer.json", tokenizer_file)
    return ModelState(config=header["config"], state_dict=state, step=int(header["step"]), source=shown,
                      kind="export", train_run_id=header.get("train_run_id"), tokenizer_file=tokenizer_file)


# ----------------------------------------------------------------------------- models


def model_config(config: dict):
    """The ModelConfig of a run config dict (checked like a training config)."""
    from model.config import ModelConfig
    from orchestrator.config import load_section

    return load_section(ModelConfig, config["model"], "model")


def build_loaded_model(state: ModelState, device: torch.device | str = "cpu", route_every_token: bool = False):
    """The single-process model of `state`, weights loaded, in eval mode, on `device`.

    route_every_token: give MoE layers an evaluation capacity that no token can overflow (every
    token reaches its experts, as a one-token decode step always does). Generation sets it so that
    the output does not depend on how many tokens a call holds; evaluation keeps the trained
    eval_capacity_factor so that it reproduces the training run's validation loss.
    """
    from model.lm import build_model

    cfg = model_config(state.config)
    if route_every_token and cfg.ffn == "moe":
        # top-k x T assignments at most per expert: capacity = ceil(k T / E * factor) >= k T.
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, eval_capacity_factor=float(cfg.moe.num_experts)))
    if cfg.ffn == "moe":
        ensure_moe_world()
    torch.manual_seed(0)  # the init is overwritten; a fixed seed keeps MoE's expert seeds quiet
    model = build_model(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state.state_dict))
    unexpected = sorted(set(state.state_dict) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise _refuse(state.source, f"its tensors do not match the model of its config "
                                    f"({len(missing)} missing, {len(unexpected)} unexpected; {what})",
                      "pick a checkpoint or export written by this version of peer-lab")
    for name, tensor in expected.items():
        if tuple(state.state_dict[name].shape) != tuple(tensor.shape):
            raise _refuse(state.source, f"{name} has shape {tuple(state.state_dict[name].shape)}, the config's "
                                        f"model needs {tuple(tensor.shape)}", "pick a matching checkpoint or export")
    model.load_state_dict(state.state_dict, strict=True)
    if cfg.ffn == "moe":
        from model.moe import init_moe_process_groups

        init_moe_process_groups(model)
    return model.to(device).eval()


def ensure_moe_world() -> None:
    """DeepSpeed's MoE layers need a process group even in one process: make a one-rank gloo world
    (on a free local port) unless one exists."""
    import socket

    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    if dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False, verbose=False)
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                           WORLD_SIZE="1").items():
        os.environ[key] = value
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)


def tokenizer_spec(state: ModelState) -> str:
    """What to pass to load_tokenizer: an export's own tokenizer.json copy, else the run's data.tokenizer."""
    return state.tokenizer_file or state.config["data"]["tokenizer"]


def resolve_device(name: str) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError("device", name, "unknown device", "use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "no CUDA device is visible", "use device=cpu")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def describe_state(state: ModelState) -> dict[str, Any]:
    return {"source": state.source, "kind": state.kind, "step": state.step, "train_run_id": state.train_run_id,
            "run_name": state.config.get("run", {}).get("name")}
