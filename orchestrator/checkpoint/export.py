"""Export: a consolidated, layout-free model from any checkpoint, in the Hugging Face convention.

    <out>/config.json                      {"format": "peer-lab-export", "version": 1, "step": N,
                                            "source": "<redacted source>", "config": <run config>}
    <out>/model.safetensors.index.json     {"metadata": {"total_size": bytes}, "weight_map": {name: file}}
    <out>/model-0000i-of-0000K.safetensors  shards of at most checkpoint.export_max_shard_gb
    <out>/tokenizer.json                   only when data.tokenizer is a tokenizer.json file

Tensor names are the keys of `model.lm.build_model(cfg.model).state_dict()` (ep = tp = pp = 1),
persistent buffers included, fp32 master weights. Streaming: the exporter reads one shard's
tensors (each assembled from the chunks of whatever layout wrote it, by ranged reads), writes that
file, uploads it, and frees it before the next: peak memory is one output shard plus the chunks of
the tensor being assembled (a tensor larger than the shard limit gets a file of its own and sets the
bound). config.json is written last, so a directory without it is no export; an existing export is
never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from orchestrator.checkpoint.portable import DamagedChunk, read_whole
from orchestrator.checkpoint.warm_start import (EXPORT_CONFIG, EXPORT_FORMAT, EXPORT_INDEX, EXPORT_VERSION, SourceError,
                                                open_source)
from orchestrator.storage import Storage, redact

_BYTES = {"F32": 4, "F64": 8, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}


class ExportError(Exception):
    """(key, value, problem, fix) of a refusal; nothing was left in the output."""


def plan_shards(tensors: dict[str, dict], max_shard_bytes: int) -> list[list[str]]:
    """Names per output file, in the index's order, each file at most max_shard_bytes unless one
    tensor alone is bigger."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, entry in tensors.items():
        n = _BYTES[entry["dtype"]] * _numel(entry["shape"])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def export(source: str, out: str, max_shard_bytes: int, log=print) -> dict:
    """Write the export of `source` (checkpoint dir, step dir or export; local or URL) to `out`.
    Returns {"files", "bytes", "tensors", "step"}. Raises ExportError with nothing left in out."""
    from safetensors.torch import save_file

    try:
        src = open_source(source)
    except (SourceError, OSError) as exc:
        raise ExportError("source", redact(source), str(exc),
                          "give a run's checkpoint dir, a step dir (step_XXXXXXXX) or an export") from None
    target = Storage(out)
    if target.exists(EXPORT_CONFIG) or target.exists(EXPORT_INDEX):
        raise ExportError("out", redact(out), "already holds an export", "choose an empty or new directory")
    model = {k[len("model/"):]: v for k, v in src.index["tensors"].items() if k.startswith("model/")}
    shards = plan_shards(model, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    reader = src.reader()
    weight_map, total = {}, 0
    scratch = tempfile.mkdtemp(prefix="peerlab-export-")
    written: list[str] = []
    try:
        for file, members in zip(names, shards):
            tensors = {name: read_whole(src.index, f"model/{name}", reader).contiguous() for name in members}
            path = os.path.join(scratch, file)
            save_file(tensors, path, metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
            target.put_file(path, file, move=target.local)
            written.append(file)
            if os.path.exists(path):
                os.remove(path)
            weight_map.update({name: file for name in members})
            log(f"export: wrote {file} ({len(members)} tensors)")
        tokenizer = (src.config.get("data") or {}).get("tokenizer")
        if isinstance(tokenizer, str) and tokenizer.endswith(".json"):
            local = os.path.join(scratch, "tokenizer.json")
            Storage(os.path.dirname(tokenizer) or ".").get_file(os.path.basename(tokenizer), local)
            target.put_file(local, "tokenizer.json", move=target.local)
            written.append("tokenizer.json")
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        target.write_bytes_atomic(EXPORT_INDEX, json.dumps(index, indent=1).encode())
        written.append(EXPORT_INDEX)
        meta = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "step": src.step, "source": redact(src.url),
                "config": src.config}
        target.write_bytes_atomic(EXPORT_CONFIG, json.dumps(meta, indent=1).encode())
    except (DamagedChunk, OSError) as exc:
        for file in written:  # nothing half-written stays behind
            try:
                target.remove_tree(file) if not target.local else os.remove(target.path(file))
            except OSError:
                pass
        raise ExportError("source", redact(source), f"{type(exc).__name__}: {exc}",
                          "export an intact step (an older step dir of the same run)") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"files": len(names), "bytes": total, "tensors": len(weight_map), "step": src.step}


def _peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM belongs to the process image and starts
    afresh at exec; ru_maxrss does not (a child started by a big parent reports the parent's)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    import argparse
    import sys
    import time

    parser = argparse.ArgumentParser(prog="python -m orchestrator.export",
                                     description="Write a consolidated safetensors export of a checkpoint (any layout).")
    parser.add_argument("source", help="a run's checkpoint dir, a step dir or an export; local path or URL")
    parser.add_argument("out", help="output directory (local path or URL); must not hold an export")
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="largest output file in GB (default 2.0)")
    args = parser.parse_args(argv)
    if args.max_shard_gb <= 0:
        print(f"error: --max-shard-gb={args.max_shard_gb}: must be positive; fix: give a size in GB such as 2.0",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        result = export(args.source, args.out, int(args.max_shard_gb * 1e9))
    except ExportError as exc:
        key, value, problem, fix = exc.args
        print(f"error: {key}={value!r}: {problem}; fix: {fix}", file=sys.stderr)
        return 2
    peak_mb = _peak_rss_mb()
    print(f"exported step {result['step']} of {redact(args.source)} to {redact(args.out)}: {result['tensors']} tensors, "
          f"{result['bytes']:,} bytes in {result['files']} file(s), {time.perf_counter() - started:.1f}s, "
          f"peak memory {peak_mb:.0f} MB")
    return 0
