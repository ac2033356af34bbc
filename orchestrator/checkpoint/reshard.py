"""Resuming a checkpoint from its portable, layout-free state (portable.py), under the layout that
wrote it or another one (another world size too): every rank reads only the pieces its slices
need, the LR schedule and train state come from the index; RNG states and per-rank buffers come
from the rank's own file under the same layout, from old rank min(r, old world - 1) under another.

The layout a checkpoint was written under is read from its config; what may change between save
and load is the layout (parallel.*, micro_batch_size, grad_accum_steps), never the global batch
(micro_batch_size x grad_accum_steps x dp): that would change the data order.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from typing import TYPE_CHECKING, Optional

import torch

from orchestrator.checkpoint.manager import (MANIFEST, CheckpointInfo, Loaded, UnsafeCheckpointError, _barrier, _gather,
                                             _rank, _safe_globals, describe_layout, global_batch, rank_file,
                                             set_rng_state, unpickling_refusal)
from orchestrator.checkpoint.portable import (ChunkReader, DamagedChunk, MissingTensor, ShapeMismatch, apply_local_state,
                                              build_index, read_local_state, storage_range_reader, write_rank_file)
from orchestrator.errors import ConfigError
from orchestrator.storage import redact

if TYPE_CHECKING:
    from orchestrator.checkpoint.manager import CheckpointManager


def check_reshardable(manager: "CheckpointManager", info: CheckpointInfo, saved: dict, now: dict) -> None:
    if "portable" not in info.manifest:
        raise ConfigError("checkpoint.dir", redact(manager.cfg.dir),
                          f"{info.tag} predates layout-free checkpoints and was written under "
                          f"{describe_layout(saved)}; this run is {describe_layout(now)}",
                          "resume it with its own parallel.* degrees and trainer batch settings once "
                          "(the next save is portable)")
    if global_batch(saved) != global_batch(now):
        raise ConfigError("trainer.grad_accum_steps", now["grad_accum_steps"],
                          f"{info.tag} was trained with a global batch of {global_batch(saved)} sequences "
                          f"(micro_batch_size {saved['micro_batch_size']} x grad_accum_steps "
                          f"{saved['grad_accum_steps']} x dp {saved['dp']}); this run's is {global_batch(now)} "
                          f"(micro_batch_size {now['micro_batch_size']} x grad_accum_steps "
                          f"{now['grad_accum_steps']} x dp {now['dp']})",
                          "keep micro_batch_size x grad_accum_steps x dp equal to resume, or start a new run "
                          "from it with checkpoint.init_from (a changed global batch changes the data order)")


def load_portable(manager: "CheckpointManager", engine, info: CheckpointInfo, saved: dict, now: dict,
                  same_layout: bool = False) -> Optional[Loaded]:
    """Load the portable state of `info` into this layout; None when a chunk is damaged.

    same_layout: the layout that wrote it (the usual resume): then this rank's own rank file
    supplies its RNG states, data position and per-rank buffers (its own BatchNorm statistics),
    so that the run continues bitwise as if uninterrupted; otherwise RNG comes from old rank
    min(r, old world - 1) and BatchNorm statistics are the pooled ones of the portable state."""
    portable = info.manifest["portable"]
    reader = ChunkReader(storage_range_reader(manager.storage, info.tag))
    problem, refusal = None, None
    try:
        values, _ = read_local_state(engine, portable, reader)
    except DamagedChunk as exc:
        problem = str(exc)
    except (MissingTensor, ShapeMismatch) as exc:
        refusal = f"{type(exc).__name__}: {exc}"
    rank = _rank()
    old_rank = min(rank, saved["world_size"] - 1)  # RNG: rank r takes old rank r's (see docs)
    rng, own, unsafe = None, None, None
    if problem is None and refusal is None:
        try:
            old_rank_state = _read_rank_file(manager, info, old_rank)
            rng = old_rank_state.get("rng")
            own = old_rank_state if same_layout else None
        except DamagedChunk as exc:
            problem = str(exc)
        except pickle.UnpicklingError as exc:  # raised on every rank below, not here alone
            unsafe = f"{rank_file(old_rank)}: {unpickling_refusal(exc)}"
    problems, refusals, unsafes = zip(*_gather((problem, refusal, unsafe)))
    if any(unsafes):
        raise UnsafeCheckpointError(f"refusing to load {info.tag} from {manager.storage.display()}: it holds "
                                    f"objects outside the weights-only allow-list ({next(u for u in unsafes if u)})")
    if any(refusals):
        raise ConfigError("checkpoint.dir", redact(manager.cfg.dir),
                          f"{info.tag} does not fit this model ({next(r for r in refusals if r)})",
                          "resume with the model config that wrote it, or start fresh with "
                          "checkpoint.resume=false or another run.name")
    if any(problems):
        if rank == 0:
            manager.log(f"checkpoint: {info.tag} in {manager.storage.display()} is damaged "
                     f"({next(p for p in problems if p)}); falling back to the previous complete checkpoint")
        return None
    apply_local_state(engine, values)
    _test_resave(engine, info)
    if engine.lr_scheduler is not None and portable.get("scheduler"):
        engine.lr_scheduler.load_state_dict(_per_group(portable["scheduler"], len(engine.optimizer.param_groups)))
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    train_state = portable.get("train_state") or {}
    if hasattr(engine, "global_steps") and "step" in train_state:
        engine.global_steps = int(train_state["step"])  # DeepSpeed's own step counter
    if rng is not None:
        set_rng_state(rng)
    read = _gather(reader.bytes_read)
    total = sum(rec["end"] - rec["begin"] for entry in portable["tensors"].values() for rec in entry["chunks"])
    bytes_read = f"bytes read per rank {min(read):,}-{max(read):,} of {total:,} (tensor bytes of the checkpoint)"
    client_state = portable.get("client_state") or {"train_state": train_state,
                                                     "mlflow_run_id": portable.get("mlflow_run_id")}
    if own is not None:
        return Loaded(info, client_state, {"data": own.get("data") or {}, "extra": own.get("extra") or {}},
                      bytes_read=bytes_read)
    line = f"resharded {info.tag} from {describe_layout(saved)} to {describe_layout(now)}; {bytes_read}"
    if rank == 0:
        manager.log(line)
    return Loaded(info, client_state, {"data": portable.get("data") or {}, "extra": {}}, resharded=line)


def _read_rank_file(manager: "CheckpointManager", info: CheckpointInfo, rank: int) -> dict:
    """Another layout's rank file (RNG states), checked against the manifest."""
    import io

    name = rank_file(rank)
    rec = info.manifest["files"].get(name)
    try:
        data = manager.storage.read_bytes(f"{info.tag}/{name}")
    except OSError as exc:
        raise DamagedChunk(f"{name}: {type(exc).__name__}: {exc}") from None
    if rec is None or len(data) != rec["size"] or hashlib.sha256(data).hexdigest() != rec["sha256"]:
        raise DamagedChunk(f"{name}: differs from the manifest")
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _per_group(scheduler_state: dict, num_groups: int) -> dict:
    """A scheduler state with one entry per optimizer group of this layout: expert parallelism
    splits each group in two (expert parameters apart), so the number of groups depends on the
    layout. Every group has the same base LR and factor here (orchestrator/engine.py), so the
    per-group lists are the first group's value repeated."""
    out = dict(scheduler_state)
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):
        if isinstance(out.get(key), list) and out[key]:
            out[key] = [out[key][0]] * num_groups
    return out


def _test_resave(engine, info: CheckpointInfo) -> None:
    """Test hook: PEERLAB_TEST_RESAVE_AFTER_RESHARD=<local dir> writes the portable state of this
    layout right after resharding (a step directory with only the portable part), so a test can
    compare the gathered state with the saved one. Never set in real runs."""
    target = os.environ.get("PEERLAB_TEST_RESAVE_AFTER_RESHARD")
    if not target:
        return
    os.makedirs(target, exist_ok=True)
    records = _gather(write_rank_file(engine, target, _rank(), _gather))
    if _rank() == 0:
        manifest = {"step": info.step, "config": info.manifest.get("config", {}), "portable": build_index(records)}
        with open(os.path.join(target, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f)
    _barrier()
