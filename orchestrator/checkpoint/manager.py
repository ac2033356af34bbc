"""Exact, crash-safe checkpoints to any fsspec URL.

Layout under `checkpoint.dir` (a local path, file://, s3://, ...):

    step_00000200/
        state_rank_00000.safetensors, ...      per rank: its model and optimizer pieces, with global
                                               coordinates (portable.py; indexed in the manifest)
        rank_00000.pt, rank_00001.pt, ...      per rank: RNG states, data position, its own buffers
        manifest.json                          the commit marker, written last by rank 0

A save is collective. Each rank writes its two files into its own staging directory (beside the
checkpoints for local storage, so that moving a file is a rename; in a local temp directory for
remote storage), hashes them, and moves or uploads them. Only when every
rank has finished does rank 0 write manifest.json (one atomic rename or one object PUT) with the
size and SHA-256 of every file and the resolved config. A directory without a manifest is invisible
to resume, so a process killed at any moment of a save leaves nothing that a later run would load;
the next save of that step clears it.

Loading picks the newest complete checkpoint (or `checkpoint.load_step`), refuses a config that
changes what the checkpoint means, verifies sizes and checksums (every file is checked by one rank),
falls back to the previous complete checkpoint when a file is damaged, and loads rank files with
torch's weights-only unpickler and tensors from safetensors (raw numbers and a JSON header), so a
checkpoint cannot execute code. Every load, under the same layout or another, goes through the
portable state (reshard.py), each rank reading only the chunks it needs. Checkpoints written before
the portable state (DeepSpeed's own files) still resume under their own layout (`_try_load`, with
DeepSpeed's loader replaced by one that allow-lists only the few DeepSpeed types its files contain).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from orchestrator.checkpoint.portable import build_index, write_rank_file
from orchestrator.config import CheckpointConfig, flatten
from orchestrator.errors import ConfigError
from orchestrator.storage import Storage, redact

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
STAGING = ".staging"
TAG_PREFIX = "step_"

# Keys whose change does not change what a checkpoint means: they may differ on resume.
RESUMABLE_CHANGES = (
    "trainer.max_steps", "trainer.log_every", "trainer.eval_every", "trainer.eval_batches",
    "trainer.progress_bar", "trainer.device", "trainer.eval_sources.", "optim.decay_steps", "checkpoint.", "tracking.", "run.",
    "data.cache_dir", "model.peer.impl", "cluster.",
    "isoflop", "isoflop.",  # study metadata; a point's own overrides are ordinary keys, compared above
)


# Keys added after checkpoints were written without them: their value in such a checkpoint's config.
ABSENT_MEANS = {"optim.expert_tables": "adamw"}


# Keys that only say how the same training is laid out over processes: a change of these resumes
# through the portable state (resharding), as long as the global batch stays the same.
LAYOUT_KEYS = ("parallel.", "trainer.micro_batch_size", "trainer.grad_accum_steps")


def layout_of(config: dict) -> dict:
    """The parallel layout a resolved config describes (what a checkpoint records as its layout)."""
    p, t = config.get("parallel", {}), config.get("trainer", {})
    out = {k: p.get(k, 1) for k in ("dp", "ep", "tp", "pp")}
    out["zero_stage"] = p.get("zero_stage", 0)
    out["micro_batch_size"] = t.get("micro_batch_size")
    out["grad_accum_steps"] = t.get("grad_accum_steps")
    out["world_size"] = out["dp"] * out["tp"] * out["pp"]
    return out


def describe_layout(layout: dict) -> str:
    return (f"dp={layout['dp']} ep={layout['ep']} tp={layout['tp']} pp={layout['pp']} "
            f"({layout['world_size']} rank{'s' if layout['world_size'] != 1 else ''})")


def global_batch(layout: dict) -> int:
    return layout["micro_batch_size"] * layout["grad_accum_steps"] * layout["dp"]


def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def step_of(tag: str) -> Optional[int]:
    if tag.startswith(TAG_PREFIX) and tag[len(TAG_PREFIX):].isdigit():
        return int(tag[len(TAG_PREFIX):])
    return None


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every RNG that can decide the future of this rank, in weights-only-loadable types."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- safe loading


def _safe_globals() -> list:
    """The non-tensor types DeepSpeed puts into its checkpoint files (found by loading real ones)."""
    allowed: list = []
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler

        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    except ImportError:
        pass
    return allowed


def safe_load(path: str, map_location=None) -> Any:
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def _install_safe_loader(engine) -> None:
    """DeepSpeed's TorchCheckpointEngine loads with weights_only=False; route its loads (model,
    optimizer, ZeRO partitions, MoE experts) through the weights-only unpickler instead."""
    from compat import route_checkpoint_loads

    route_checkpoint_loads(engine, safe_load)


# ----------------------------------------------------------------------------- helpers


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def config_differences(saved: dict, current: dict, also_allowed: tuple = ()) -> list[str]:
    """`key (saved -> current)` for every key that differs and may not change on resume
    (RESUMABLE_CHANGES and also_allowed may)."""
    a, b = flatten(saved), flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == p or (p.endswith(".") and key.startswith(p)) for p in RESUMABLE_CHANGES + tuple(also_allowed)):
            continue
        if key.startswith("model.pkm") and "pkm" not in (a.get("model.ffn"), b.get("model.ffn")):
            continue  # a model without a PKM layer (configs saved before model.pkm existed lack the block)
        absent = ABSENT_MEANS.get(key, "<absent>")
        if a.get(key, absent) != b.get(key, absent):
            out.append(f"{key} ({a.get(key, absent)} -> {b.get(key, absent)})")
    return out


def test_kill_point(name: str) -> None:
    """Test hook: PEERLAB_TEST_KILL_AT='<point>[:<rank>[:<SIGNAL>]]' sends SIGNAL (default KILL) to
    this process when it reaches <point>: file<N> (a save has moved N of this rank's files),
    before_manifest, after_manifest, step<N> (the end of train step N). Never set in real runs;
    it lets the tests crash or signal a run at exact moments."""
    spec = os.environ.get("PEERLAB_TEST_KILL_AT")
    if not spec:
        return
    point, rank, sig = (spec.split(":") + ["", ""])[:3]
    if point == name and (not rank or int(rank) == _rank()):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), getattr(signal, f"SIG{sig or 'KILL'}"))


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast(obj: Any) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj: Any) -> list:
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _any(flag: bool) -> bool:
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _json_safe(state: dict) -> dict:
    """A scheduler's state_dict as JSON numbers (LambdaLR's lr_lambdas are None for functions)."""
    return json.loads(json.dumps(state, default=lambda v: None))



# ----------------------------------------------------------------------------- manager


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank; `str()` is one line naming the rank and the cause, the same on
    every rank. The previous complete checkpoint is left as it was."""


def _attempt(action: Callable[[], Any]) -> Optional[BaseException]:
    """Run `action`; return the exception it raised (None when it succeeded)."""
    try:
        action()
    except Exception as exc:
        return exc
    return None


def _attempt_value(action: Callable[[], Any]) -> Any:
    """`action()`, or None when it raised."""
    try:
        return action()
    except Exception:
        return None


def _write_failure_cause(exc: BaseException, staging: Optional[str]) -> str:
    """The cause of a failed write, in one line. torch.save reports a full disk without its errno
    ("unexpected pos ..."), so the free space where this rank wrote, measured now, goes with it."""
    text = _one_line(exc)
    free = _attempt_value(lambda: shutil.disk_usage(staging).free) if staging else None
    if free is None:
        return text
    if free < 64 * 2**20:
        return f"{text} (the disk is full: {free / 2**20:.1f} MiB free where rank {_rank()} wrote)"
    return f"{text} ({free / 2**20:.0f} MiB free where rank {_rank()} wrote)"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file asks to run code (or to build an object we do not allow) when loaded."""


def unpickling_refusal(exc: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler refused, in a few words (its message is many lines)."""
    return str(exc).split("Unsupported global: ")[-1].splitlines()[0][:200]


@dataclass
class CheckpointInfo:
    tag: str
    step: int
    manifest: dict


@dataclass
class Loaded:
    info: CheckpointInfo
    client_state: dict
    rank_state: dict
    resharded: Optional[str] = None  # the line saying from which layout, when it was resharded
    bytes_read: Optional[str] = None  # what each rank read (said in the start line)


class CheckpointManager:
    """Save and load checkpoints of one run; every method is collective unless noted."""

    def __init__(self, cfg: CheckpointConfig, log=print):
        self.cfg = cfg
        self.storage = Storage(cfg.dir)
        self.log = log  # rank 0 prints; one line per event

    # ------------------------------------------------------------------ listing
    def complete_checkpoints(self) -> list[CheckpointInfo]:
        """Checkpoints with a manifest, oldest first. Collective: rank 0 lists, all receive."""
        infos = None
        if _rank() == 0:
            infos = []
            for name in self.storage.list_dirs():
                step = step_of(name)
                if step is None or not self.storage.exists(f"{name}/{MANIFEST}"):
                    continue
                try:
                    manifest = json.loads(self.storage.read_bytes(f"{name}/{MANIFEST}"))
                except (ValueError, OSError):
                    continue  # an unreadable manifest is no commit
                infos.append(CheckpointInfo(name, step, manifest))
            infos.sort(key=lambda i: i.step)
        return _broadcast(infos)

    # ------------------------------------------------------------------ save
    def save(self, engine, step: int, client_state: dict, rank_state: dict, config: dict) -> str:
        tag = tag_for_step(step)
        rank = _rank()
        exists = self.storage.exists(f"{tag}/{MANIFEST}") if rank == 0 else None
        if _broadcast(exists):
            return tag  # the same step is already committed (a save right after resuming)
        if rank == 0:
            self.storage.remove_tree(tag)  # leftovers of a save that died before its commit
        _barrier()

        started = time.perf_counter()
        # A write that fails on one rank (disk full, permission denied, a store that errors) is
        # recorded, not raised, until every rank has passed the save's collectives; then every rank
        # raises the same one-line CheckpointSaveError. Raising at once on one rank would leave the
        # others waiting at the next barrier until the collective timeout.
        failure: Optional[BaseException] = None
        try:
            staging = self._staging_dir(tag, rank)
            local_dir = os.path.join(staging, tag)
            os.makedirs(local_dir, exist_ok=True)
        except Exception as exc:
            failure, staging = exc, None
            local_dir = os.path.join(tempfile.gettempdir(), "peerlab-unwritable-staging")  # never written to
        if failure is None:
            failure = _attempt(lambda: torch.save({**rank_state, "rng": rng_state()}, os.path.join(local_dir, rank_file(rank))))
        # The model and optimizer state, layout-free (portable.py): every resume (same layout or
        # another), warm start and export reads it. write_rank_file gathers before it writes: it
        # runs on every rank whatever failed before.
        portable_records: list = []
        failure = failure or _attempt(lambda: portable_records.append(write_rank_file(engine, local_dir, rank, _gather)))
        portable_records = _gather(portable_records[0] if portable_records else None)

        records = {}
        if failure is None:
            for i, name in enumerate(sorted(os.listdir(local_dir)), start=1):
                path = os.path.join(local_dir, name)
                failure = _attempt(lambda: records.__setitem__(name, {"size": os.path.getsize(path),
                                                                      "sha256": sha256_file(path), "rank": rank}))
                failure = failure or _attempt(lambda: self.storage.put_file(path, f"{tag}/{name}", move=self.storage.local))
                if failure is not None:
                    break
                test_kill_point(f"file{i}")
        if os.environ.get("PEERLAB_TEST_SAVE_DELAY_S"):  # tests: a save that takes long (a slow store)
            time.sleep(float(os.environ["PEERLAB_TEST_SAVE_DELAY_S"]))
        cause = _write_failure_cause(failure, staging) if failure is not None else None
        if staging:
            shutil.rmtree(staging, ignore_errors=True)

        everything = _gather((records, cause))
        self._raise_if_any_failed(tag, [cause for _, cause in everything])
        test_kill_point("before_manifest")
        commit_failure = None
        if rank == 0:
            commit_failure = _attempt(lambda: self._commit(tag, step, started, [r for r, _ in everything],
                                                           portable_records, client_state, rank_state, engine, config))
        commit_cause = _broadcast(_one_line(commit_failure) if commit_failure is not None else None)
        self._raise_if_any_failed(tag, [commit_cause] + [None] * (_world() - 1))
        return tag

    def _commit(self, tag, step, started, everything, portable_records, client_state, rank_state, engine, config):
        """Rank 0: write the manifest that makes `tag` a complete checkpoint, then apply retention."""
        files: dict[str, dict] = {}
        for per_rank in everything:
            for name, rec in per_rank.items():
                if name in files and files[name]["sha256"] != rec["sha256"]:
                    raise RuntimeError(f"ranks {files[name]['rank']} and {rec['rank']} wrote different {name}")
                files.setdefault(name, rec)
        manifest = {
            "format": FORMAT_VERSION, "tag": tag, "step": step, "world_size": _world(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds_to_write": time.perf_counter() - started,
            "bytes": sum(r["size"] for r in files.values()), "files": files, "config": config,
            "portable": {**build_index([r for r in portable_records if r is not None]), "layout": layout_of(config),
                         "train_state": client_state.get("train_state"),
                         "mlflow_run_id": client_state.get("mlflow_run_id"),
                         "client_state": _json_safe(client_state),
                         "scheduler": _json_safe(engine.lr_scheduler.state_dict()) if engine.lr_scheduler else None,
                         "data": rank_state.get("data")},
        }
        self.storage.write_bytes_atomic(f"{tag}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        test_kill_point("after_manifest")
        try:
            self._apply_retention()
        except Exception as exc:  # the checkpoint is committed; an old one left behind loses nothing
            self.log(f"warning: checkpoint.keep_last: could not remove older checkpoints: {_one_line(exc)}")

    def _raise_if_any_failed(self, tag: str, causes: list) -> None:
        """Collective in effect (every rank passes the same `causes`, one per rank): when a rank
        failed, remove what this save wrote and raise CheckpointSaveError on every rank."""
        failed = [(r, c) for r, c in enumerate(causes) if c is not None]
        if not failed:
            return
        if _rank() == 0:
            _attempt(lambda: self.storage.remove_tree(tag))  # uncommitted: no resume can pick it
        last = [i.tag for i in self.complete_checkpoints()]
        rank, cause = failed[0]
        others = f" (and on rank {', '.join(str(r) for r, _ in failed[1:])})" if len(failed) > 1 else ""
        kept = f"the last complete checkpoint {last[-1]} is intact" if last else "no earlier checkpoint exists"
        raise CheckpointSaveError(
            f"checkpoint.dir={self.storage.display()}: saving {tag} failed on rank {rank}{others}: {cause}; "
            f"{kept}; fix: free space or grant write access there (or set checkpoint.dir to another place), "
            "then run the same command again to resume")

    def _staging_dir(self, tag: str, rank: int) -> str:
        if self.storage.local:
            path = self.storage.path(STAGING, f"{tag}.rank{rank}")
            shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path)
            return path
        base = os.path.expanduser(self.cfg.staging_dir) if self.cfg.staging_dir else None
        if base:
            os.makedirs(base, exist_ok=True)
        return tempfile.mkdtemp(prefix=f"peerlab-{tag}-rank{rank}-", dir=base)

    def _apply_retention(self) -> None:
        """Rank 0, after a commit: keep the newest keep_last complete checkpoints (never fewer than
        one), and drop uncommitted directories older than the newest commit."""
        names = self.storage.list_dirs()
        complete = sorted((step_of(n), n) for n in names
                          if step_of(n) is not None and self.storage.exists(f"{n}/{MANIFEST}"))
        if not complete:
            return
        newest = complete[-1][0]
        keep = max(1, self.cfg.keep_last) if self.cfg.keep_last else len(complete)
        for _, name in complete[:-keep]:
            self.storage.remove_tree(name)
        for name in names:
            step = step_of(name)
            if step is not None and step < newest and (step, name) not in complete:
                self.storage.remove_tree(name)

    # ------------------------------------------------------------------ load
    def load(self, engine, current_config: dict) -> Optional[Loaded]:
        """Load the newest complete, intact checkpoint (or checkpoint.load_step); None if none."""
        infos = self.complete_checkpoints()
        if self.cfg.load_step is not None:
            wanted = [i for i in infos if i.step == self.cfg.load_step]
            if not wanted:
                available = ", ".join(str(i.step) for i in infos) or "none"
                raise ConfigError("checkpoint.load_step", self.cfg.load_step,
                                  f"no complete checkpoint of that step in {self.storage.display()} (steps: {available})",
                                  "pick one of the listed steps, or checkpoint.load_step=null for the latest")
            infos = wanted
        for info in reversed(infos):
            saved_config = info.manifest.get("config", {})
            differences = config_differences(saved_config, current_config, also_allowed=LAYOUT_KEYS)
            if differences:
                raise ConfigError("checkpoint.dir", redact(self.cfg.dir),
                                  f"{info.tag} was written with another config: {'; '.join(differences)}",
                                  "restore those values, or start fresh with checkpoint.resume=false "
                                  "or another run.name")
            saved, now = layout_of(saved_config), layout_of(current_config)
            same_layout = saved == now and info.manifest.get("world_size") == _world()
            if same_layout and "portable" not in info.manifest:
                loaded = self._try_load(engine, info)  # written before the portable state: DeepSpeed's files
            else:
                from orchestrator.checkpoint.reshard import check_reshardable, load_portable

                if not same_layout:
                    check_reshardable(self, info, saved, now)
                loaded = load_portable(self, engine, info, saved, now, same_layout=same_layout)
            if loaded is not None:
                return loaded
        return None

    def maybe_warm_start(self, engine, resumed: Optional[Loaded]) -> None:
        """checkpoint.init_from: initialise a fresh run from another run's state (warm_start.py);
        once this run has its own checkpoint (a requeued fine-tune), say that it is ignored."""
        if not self.cfg.init_from:
            return
        if resumed is not None:
            self.log(f"checkpoint.init_from={redact(self.cfg.init_from)} ignored: this run resumes its own "
                     f"checkpoint {resumed.info.tag}")
            return
        from orchestrator.checkpoint.warm_start import init_from

        self.log(init_from(engine, self.cfg, self.log, _rank(), _gather))

    def _try_load(self, engine, info: CheckpointInfo) -> Optional[Loaded]:
        """A checkpoint written before the portable state: DeepSpeed's own files, same layout."""
        rank = _rank()
        files = info.manifest["files"]
        mine = rank_file(rank)
        temp_dir = None
        if self.storage.local:
            parent, problem = self.storage.root, None
            to_check = [n for n, rec in files.items() if rec["rank"] == rank]
        else:
            # Every rank needs DeepSpeed's shared files and its own rank file locally.
            temp_dir = self._staging_dir(info.tag + ".load", rank)
            parent = temp_dir
            to_check = [n for n in files if not n.startswith("rank_") or n == mine]
        problem = None
        for name in to_check:
            rec = files[name]
            try:
                if temp_dir is not None:
                    self.storage.get_file(f"{info.tag}/{name}", os.path.join(temp_dir, info.tag, name))
                path = os.path.join(parent, info.tag, name)
                size = os.path.getsize(path)
                if size != rec["size"]:
                    problem = f"{name}: {size} bytes, manifest says {rec['size']}"
                elif sha256_file(path) != rec["sha256"]:
                    problem = f"{name}: SHA-256 differs from the manifest"
            except (OSError, FileNotFoundError) as exc:
                problem = f"{name}: {type(exc).__name__}: {exc}"
            if problem:
                break
        if mine not in files:
            problem = problem or f"{mine} is missing"
        problems = _gather(problem)
        bad = [p for p in problems if p]
        if bad:
            if rank == 0:
                self.log(f"checkpoint: {info.tag} in {self.storage.display()} is damaged ({bad[0]}); "
                         f"falling back to the previous complete checkpoint")
            if temp_dir:
                shutil.rmtree(temp_dir, ignore_errors=True)
            return None
        _install_safe_loader(engine)
        try:
            path, client_state = engine.load_checkpoint(parent, tag=info.tag, load_optimizer_states=True,
                                                        load_lr_scheduler_states=True)
            rank_state = safe_load(os.path.join(parent, info.tag, mine))
        except pickle.UnpicklingError as exc:
            reason = unpickling_refusal(exc)
            raise UnsafeCheckpointError(f"refusing to load {info.tag} from {self.storage.display()}: it holds "
                                        f"objects outside the weights-only allow-list ({reason})") from None
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {info.tag} from {self.storage.display()}")
        set_rng_state(rank_state.pop("rng"))
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
        return Loaded(info, client_state, rank_state)


