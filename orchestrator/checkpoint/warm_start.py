"""Reading a model out of any checkpoint or export, whatever layout wrote it.

A *source* is one of
- a run's checkpoint directory (the newest complete step in it is used),
- one step directory (`.../step_00000400`, it has a manifest.json),
- an export (`python -m orchestrator.export`: config.json with "format": "peer-lab-export"),
local or any fsspec URL. `open_source` turns each into one index of tensors by global name in the
format of portable.py, so reading (`read_model_state`), warm starting (`init_from`) and exporting
share one path and read only the bytes they need.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Optional

import torch

from orchestrator.checkpoint.manager import MANIFEST, step_of
from orchestrator.checkpoint.portable import (ChunkReader, DamagedChunk, MissingTensor, ShapeMismatch, apply_local_state,
                                              read_local_state, read_whole, storage_range_reader)
from orchestrator.errors import ConfigError
from orchestrator.storage import Storage, redact

EXPORT_FORMAT = "peer-lab-export"
EXPORT_VERSION = 1
EXPORT_INDEX = "model.safetensors.index.json"
EXPORT_CONFIG = "config.json"


class SourceError(Exception):
    """The source is not a checkpoint or export this code can read; str() says why."""


@dataclass
class Source:
    kind: str        # "step" (a checkpoint's step directory) or "export"
    url: str         # the directory holding the files
    storage: Storage
    index: dict      # {"tensors": {"model/<name>": {...}, "exp_avg/<name>": ...}} as portable.py
    config: dict     # the run's resolved config (URLs redacted)
    step: int

    @property
    def display(self) -> str:
        return redact(self.url)

    def reader(self) -> ChunkReader:
        return ChunkReader(storage_range_reader(self.storage))

    def model_names(self) -> list[str]:
        return [k[len("model/"):] for k in self.index["tensors"] if k.startswith("model/")]


def open_source(url: str) -> Source:
    url = url.rstrip("/")
    storage = Storage(url)
    if storage.exists(EXPORT_CONFIG):
        try:
            meta = json.loads(storage.read_bytes(EXPORT_CONFIG))
        except ValueError as exc:
            raise SourceError(f"{EXPORT_CONFIG} is not JSON ({exc})") from None
        if meta.get("format") == EXPORT_FORMAT:
            return _open_export(url, storage, meta)
    if storage.exists(MANIFEST):
        return _open_step(url, storage)
    steps = sorted((step_of(n), n) for n in storage.list_dirs()
                   if step_of(n) is not None and storage.exists(f"{n}/{MANIFEST}"))
    if steps:
        return _open_step(f"{url}/{steps[-1][1]}", Storage(f"{url}/{steps[-1][1]}"))
    raise SourceError("neither an export (config.json), a step directory (manifest.json) nor a checkpoint "
                      "directory with a complete step")


def _open_step(url: str, storage: Storage) -> Source:
    try:
        manifest = json.loads(storage.read_bytes(MANIFEST))
    except (ValueError, OSError) as exc:
        raise SourceError(f"its {MANIFEST} cannot be read ({exc})") from None
    if "portable" not in manifest:
        raise SourceError("this checkpoint predates layout-free checkpoints (no portable state in its manifest); "
                          "resume it once with its own layout and use a later step")
    return Source("step", url, storage, manifest["portable"], manifest.get("config", {}), int(manifest["step"]))


def _open_export(url: str, storage: Storage, meta: dict) -> Source:
    if meta.get("version") != EXPORT_VERSION:
        raise SourceError(f"export version {meta.get('version')}; this code reads version {EXPORT_VERSION}")
    try:
        weight_map = json.loads(storage.read_bytes(EXPORT_INDEX))["weight_map"]
    except (ValueError, OSError, KeyError) as exc:
        raise SourceError(f"{EXPORT_INDEX} is missing or damaged ({type(exc).__name__}: {exc})") from None
    read = storage_range_reader(storage)
    tensors: dict[str, dict] = {}
    for file in sorted(set(weight_map.values())):
        try:
            (length,) = struct.unpack("<Q", read(file, 0, 8))
            header = json.loads(read(file, 8, 8 + length))
        except (OSError, ValueError, struct.error) as exc:
            raise SourceError(f"{file} is missing or damaged ({type(exc).__name__}: {exc})") from None
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            shape = list(entry["shape"])
            tensors[f"model/{name}"] = {"shape": shape, "dtype": entry["dtype"], "chunks": [
                {"file": file, "offsets": [0] * len(shape), "sizes": shape, "begin": 8 + length + begin,
                 "end": 8 + length + end, "sha256": None}]}
    missing = [n for n in weight_map if f"model/{n}" not in tensors]
    if missing:
        raise SourceError(f"{len(missing)} tensor(s) of {EXPORT_INDEX} are in no file, e.g. {missing[0]} "
                          f"(expected in {weight_map[missing[0]]})")
    return Source("export", url, storage, {"tensors": tensors}, meta.get("config", {}), int(meta.get("step", 0)))


def read_model_state(source: str) -> tuple[dict, dict[str, torch.Tensor], int]:
    """(config, state_dict, step) of the single-process model (ep = tp = pp = 1), fp32 master
    weights and persistent buffers, from a checkpoint dir, step dir or export, local or URL,
    whatever layout wrote it. The keys are those of `model.lm.build_model(cfg.model).state_dict()`.
    Raises SourceError (not a readable source) or DamagedChunk (bytes differ from the index)."""
    src = open_source(source)
    reader = src.reader()
    state = {name: read_whole(src.index, f"model/{name}", reader) for name in src.model_names()}
    return src.config, state, src.step


def read_full_state(source: str) -> tuple[dict[str, torch.Tensor], int]:
    """Every tensor of a checkpoint, gathered whole: {"model/<name>", "exp_avg/<name>",
    "exp_avg_sq/<name>", "step/<name>": tensor}, and the step. For tests and tools; the whole
    state is in memory."""
    src = open_source(source)
    reader = src.reader()
    return {key: read_whole(src.index, key, reader) for key in src.index["tensors"]}, src.step


def init_from(engine, cfg, log, rank: int, gather) -> str:
    """Warm start: load the model (and with cfg.init_optimizer the optimizer moments and step
    counts) of cfg.init_from into this run's engine, each rank reading only its own pieces.
    Collective. Returns the line that says what was loaded; bad input raises ConfigError on every
    rank before anything is written into the engine."""
    key = "checkpoint.init_from"
    problem, src, values, skipped, needed = None, None, [], [], set()
    try:
        src = open_source(cfg.init_from)
        if cfg.init_optimizer and src.kind == "export":
            raise SourceError("an export holds no optimizer state")
        values, skipped = read_local_state(engine, src.index, src.reader(), want_optimizer=cfg.init_optimizer,
                                           strict=cfg.init_strict)
        needed = {lt.key for lt, _ in values}
    except (SourceError, DamagedChunk, MissingTensor, ShapeMismatch, OSError) as exc:
        problem = f"{type(exc).__name__}: {exc}" if not isinstance(exc, SourceError) else str(exc)
    results = gather((problem, sorted(needed), skipped))
    problems = [p for p, _, _ in results if p]
    if problems:
        fix = ("check the path, or pass a model of the same shape; checkpoint.init_strict=false loads only the "
               "tensors that match" if "Mismatch" in problems[0] or "Missing" in problems[0]
               else "point it at a run's checkpoint dir, a step dir or an export")
        if cfg.init_optimizer and "optimizer" in problems[0]:
            fix = "set checkpoint.init_optimizer=false, or warm start from a checkpoint"
        raise ConfigError(key, redact(cfg.init_from), problems[0], fix)
    apply_local_state(engine, values)
    loaded = set().union(*(set(n) for _, n, _ in results))
    new = sorted(set().union(*(set(s) for _, _, s in results)))
    unused = sorted(k for k in src.index["tensors"] if k.startswith("model/") and k not in loaded)
    what = "model and optimizer" if cfg.init_optimizer else "model weights"
    line = (f"warm start: {what} from {src.display} (step {src.step}, {src.kind}); "
            f"{sum(1 for k in loaded if k.startswith('model/'))} model tensors loaded; training starts at step 0")
    if new:
        line += f"; new (kept as initialised): {', '.join(new)}"
    if unused:
        line += f"; unused: {', '.join(unused)}"
    return line
