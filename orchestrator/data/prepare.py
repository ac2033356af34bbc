"""One-time preparation of a source into cached, indexed token shards.

`prepare_corpus` cuts the source into work units (orchestrator/data/sources.py), and
data.num_workers processes tokenize them (eos after each document), each unit into one shard:

    <cache_dir>/<key>/shards/<unit>.train.bin, <unit>.val.bin   token ids (uint16, or uint32)
                      files.jsonl    one line per input file: format, documents, tokens, split
                      meta.json      the index (shards and their token counts), counts, tokenizer,
                                     fingerprints; written last

key hashes the source location, every file's (path, size, mtime or etag, format), the tokenizer's
name, val_fraction, text_field, the unit size and FORMAT_VERSION. A plain-text document goes to val
when a hash of its path falls below val_fraction; a record (JSON Lines, Parquet, dataset row) when
a hash of its text does, so duplicates never straddle the splits and the same records give the same
tokens whatever format they come in. Empty records are skipped (counted); plain-text files with NUL
bytes are skipped as binary.

Atomicity: shards are built in `.<key>.partial/` under an exclusive lock (`.<key>.lock`, released
by the kernel when its holder dies), each shard renamed into place after fsync and then recorded
by its own small json; the folder is renamed to <key> once meta.json is written. A reader sees a
complete cache or none; a killed preparation leaves only finished shards, which the next run of
the same key reuses, and bad input removes the partial folder (nothing half-made survives).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.data import sources as src_mod
from orchestrator.data.readers import dataset_rows, read_unit
from orchestrator.data.sources import DataError, Source, Unit, files_fingerprint, list_source, plan_units
from orchestrator.data.tokens import ShardedTokens
from orchestrator.errors import ConfigError
from orchestrator.storage import fsync_dir
from orchestrator.tokenizer import Tokenizer, token_dtype

# Bump when the layout or the meaning of the cached files changes: old caches then miss.
FORMAT_VERSION = 2
SPLITS = ("train", "val")
_BATCH_BYTES = 1 << 20  # text handed to the tokenizer at once (bounds a worker's memory)
# Test hook: a preparer that finished this many shards kills itself with SIGKILL (a real crash).
_KILL_ENV = "PEERLAB_TEST_KILL_PREP_AFTER"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_fraction(name: str) -> float:
    """A document's stable position in [0, 1): it goes to val when below val_fraction."""
    return _fraction(name.encode("utf-8"))


def _fraction(data: bytes) -> float:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") / 2.0 ** 64


def cache_key(source: Source, tokenizer: Tokenizer, val_fraction: float, text_field: str = "text") -> str:
    payload = {"format": FORMAT_VERSION, "location": source.location, "files": files_fingerprint(source.files),
               "tokenizer": tokenizer.name, "val_fraction": repr(float(val_fraction)), "text_field": text_field,
               "unit_bytes": [src_mod.UNIT_BYTES, src_mod.TEXT_UNIT_BYTES]}
    return _sha(json.dumps(payload, sort_keys=True))[:20]


@dataclass
class PreparedCorpus:
    dir: Path
    meta: dict
    from_cache: bool  # False when this call tokenized the corpus

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def load(self, split: str) -> ShardedTokens:
        """The split's tokens across its shards, memory-mapped read-only (pages load on demand)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        shards = [(self.dir / "shards" / s["file"], s["num_tokens"]) for s in self.meta["shards"][split]]
        return ShardedTokens(shards, self.dtype)

    def summary(self, name: str = "") -> str:
        """One line for the log; name: the mixture source's."""
        m = self.meta
        notes = []
        if m["num_skipped_binary"]:
            notes.append(f"{m['num_skipped_binary']} binary files skipped")
        if m["num_skipped_empty"]:
            notes.append(f"{m['num_skipped_empty']} empty records skipped")
        if m["num_decoded_with_replacement"]:
            notes.append(f"{m['num_decoded_with_replacement']} files not valid UTF-8 (decoded with replacement)")
        if m.get("moved_document"):
            notes.append(f"moved {m['moved_document']!r} across splits so that both are non-empty")
        if not self.from_cache and m.get("prepare_seconds"):
            s = m["prepare_seconds"]
            notes.append(f"{m['input_bytes'] / 1e6 / s:.1f} MB/s, {m['train']['num_tokens'] + m['val']['num_tokens']:,} "
                         f"tokens in {s:.1f}s with {m['num_workers']} worker{'s' if m['num_workers'] > 1 else ''}")
        return (f"data{f'[{name}]' if name else ''}: {m['source']}: {m['num_files']} files, {m['train']['num_documents']:,} train / "
                f"{m['val']['num_documents']:,} val documents, {m['train']['num_tokens']:,} / {m['val']['num_tokens']:,} "
                f"tokens in {sum(len(v) for v in m['shards'].values())} shards; {m['tokenizer']} ({m['dtype']}); "
                f"{'cached' if self.from_cache else 'prepared'} in {self.dir}" + "".join(f"; {n}" for n in notes))


def prepare_corpus(cfg, tokenizer: Tokenizer, *, source: str | None = None, key: str = "data.source",
                   text_field: str | None = None, progress: bool = False) -> PreparedCorpus:
    """Tokenize and split one source once; later calls (any process) return the cached shards.

    cfg is the DataConfig; source/key/text_field name a mixture entry instead of data.source."""
    spec = cfg.source if source is None else source
    field = getattr(cfg, "text_field", "text") if text_field is None else text_field
    listed = list_source(spec, key)
    cache_key_ = cache_key(listed, tokenizer, cfg.val_fraction, field)
    cache_root = Path(os.path.expanduser(cfg.cache_dir))
    final = cache_root / cache_key_
    found = _load_complete(final)
    if found is not None:
        return found
    cache_root.mkdir(parents=True, exist_ok=True)
    with open(cache_root / f".{cache_key_}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one preparer per key; others wait, then find it complete
        found = _load_complete(final)
        if found is not None:
            return found
        _discard(final)  # a folder without a valid meta.json was not made by this code: rebuild it
        partial = cache_root / f".{cache_key_}.partial"
        try:
            meta = _build(listed, tokenizer, cfg, field, cache_key_, partial, max(1, getattr(cfg, "num_workers", 1)),
                          progress)
        except DataError as e:
            shutil.rmtree(partial, ignore_errors=True)  # bad input: nothing of this key survives
            raise e.to_config_error(key, spec) from None
        except ConfigError:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        os.rename(partial, final)
        fsync_dir(cache_root)
        return PreparedCorpus(final, meta, from_cache=False)


def _load_complete(folder: Path) -> PreparedCorpus | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        complete = meta["format_version"] == FORMAT_VERSION and all(
            (folder / "shards" / s["file"]).stat().st_size == s["num_tokens"] * itemsize
            for split in SPLITS for s in meta["shards"][split])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return PreparedCorpus(folder, meta, from_cache=True) if complete else None


def _discard(folder: Path) -> None:
    """Move aside and remove a folder under the key that is not a complete cache (called under the lock)."""
    if not folder.exists():
        return
    aside = folder.with_name(f".{folder.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(folder, aside)  # atomic: no reader sees a half-deleted folder under the key
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


# ----------------------------------------------------------------------------- building


@dataclass(frozen=True)
class _Job:
    out_dir: str
    fs: object
    text_field: str
    val_fraction: float
    dtype: str


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends the pool
    _WORKER_TOKENIZER = tokenizer


def _shard_name(index: int, split: str) -> str:
    return f"{index:06d}.{split}.bin"


def _tokenize_unit(job: _Job, unit: Unit, tokenizer: Tokenizer | None = None) -> dict:
    """Tokenize one unit into its two shard files; return its record (also written as <unit>.json)."""
    tokenizer = tokenizer or _WORKER_TOKENIZER
    dtype = np.dtype(job.dtype)
    out = Path(job.out_dir)
    encode_batch = getattr(tokenizer, "encode_batch", None) or (lambda texts: [tokenizer.encode(t) for t in texts])
    stats = {"binary_skipped": [], "decoded_with_replacement": 0}
    counts = {s: {"num_documents": 0, "num_tokens": 0} for s in SPLITS}
    # The document nearest the threshold on each side: moved across when a split ends up empty.
    edge = {"train": None, "val": None}  # (fraction, offset, num_tokens, name)
    text_docs, num_empty = [], 0
    files = {s: open(out / (_shard_name(unit.index, s) + ".tmp"), "wb") for s in SPLITS}
    eos = np.array([tokenizer.eos_id], dtype=dtype)

    def flush(batch):
        for (name, text, frac), ids in zip(batch, encode_batch([t for _, t, _ in batch])):
            split = "val" if frac < job.val_fraction else "train"
            n = len(ids) + 1
            c = counts[split]
            e = edge[split]
            if e is None or (frac < e[0] if split == "train" else frac > e[0]):
                edge[split] = (frac, c["num_tokens"], n, name)
            files[split].write(np.asarray(ids, dtype=dtype).tobytes())
            files[split].write(eos.tobytes())
            c["num_documents"] += 1
            c["num_tokens"] += n
            if name is not None:
                text_docs.append({"path": name, "split": split, "num_tokens": n})

    try:
        batch, batch_bytes = [], 0
        for name, text in read_unit(unit, job.fs, job.text_field, stats):
            if text is None:
                continue  # binary file, counted in stats
            if name is None:
                if not text:
                    num_empty += 1
                    continue
                frac = _fraction(text.encode("utf-8", errors="surrogatepass"))
            else:
                frac = hash_fraction(name)
            batch.append((name, text, frac))
            batch_bytes += len(text)
            if batch_bytes >= _BATCH_BYTES:
                flush(batch)
                batch, batch_bytes = [], 0
        if batch:
            flush(batch)
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()
    for s in SPLITS:
        os.replace(out / (_shard_name(unit.index, s) + ".tmp"), out / _shard_name(unit.index, s))
    record = {"unit": unit.index, "counts": counts, "edge": edge, "text_docs": text_docs, "num_empty": num_empty,
              "binary_skipped": stats["binary_skipped"], "decoded_with_replacement": stats["decoded_with_replacement"],
              "input_bytes": unit.input_bytes,
              "files": [{"path": f.rel, "format": f.format} for f in unit.files]}
    _write_json_atomic(out / f"{unit.index:06d}.json", record)  # last: marks the shard finished
    return record


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _finished(out: Path, unit: Unit, dtype: np.dtype) -> dict | None:
    """A shard left by an interrupted preparation of this key, if it is complete."""
    try:
        record = json.loads((out / f"{unit.index:06d}.json").read_text())
        ok = all((out / _shard_name(unit.index, s)).stat().st_size == record["counts"][s]["num_tokens"] * dtype.itemsize
                 for s in SPLITS)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if ok else None


def _build(source: Source, tokenizer: Tokenizer, cfg, text_field: str, key: str, partial: Path,
           num_workers: int, progress: bool) -> dict:
    started = time.perf_counter()
    dtype = token_dtype(tokenizer.vocab_size)
    units = plan_units(source, dataset_rows=dataset_rows)
    shards_dir = partial / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(partial, 0o755)
    for leftover in shards_dir.glob("*.tmp"):  # a killed worker's unfinished files
        leftover.unlink()
    records = {u.index: r for u in units if (r := _finished(shards_dir, u, dtype)) is not None}
    todo = [u for u in units if u.index not in records]
    job = _Job(str(shards_dir), source.fs, text_field, float(cfg.val_fraction), dtype.name)
    bar = _Progress(progress, sum(u.input_bytes for u in units), sum(r["input_bytes"] for r in records.values()),
                    source.spec)
    kill_after = int(os.environ.get(_KILL_ENV, "0") or 0)
    try:
        for record in _run_units(job, todo, tokenizer, num_workers):
            records[record["unit"]] = record
            bar.update(record)
            if kill_after and len(records) >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        bar.close()
    ordered = [records[u.index] for u in units]
    num_workers = _num_processes(todo, num_workers)  # processes that actually ran
    moved = _make_both_splits(ordered, shards_dir, dtype, float(cfg.val_fraction), source.spec, source.key)
    return _write_meta(partial, ordered, source, tokenizer, cfg, text_field, key, dtype, moved,
                       time.perf_counter() - started, num_workers)


def _num_processes(units: list[Unit], num_workers: int) -> int:
    # Starting a worker costs seconds (spawn, imports): less than one unit's worth of input is
    # tokenized in this process.
    if len(units) <= 1 or sum(u.input_bytes for u in units) < src_mod.UNIT_BYTES:
        return 1
    return max(1, min(num_workers, len(units)))


def _run_units(job: _Job, units: list[Unit], tokenizer: Tokenizer, num_workers: int):
    num_workers = _num_processes(units, num_workers)
    if num_workers <= 1:
        for unit in units:
            yield _tokenize_unit(job, unit, tokenizer)
        return
    # spawn, not fork: the caller may be a training process with threads (gloo, OpenMP, tokenizers).
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        yield from pool.imap_unordered(_call_unit, [(job, u) for u in units])


def _call_unit(args) -> dict:
    return _tokenize_unit(*args)


def _make_both_splits(records: list[dict], shards: Path, dtype: np.dtype, val_fraction: float,
                      spec: str, key: str) -> str | None:
    """Both splits must hold tokens (training needs train, evaluation val). Few documents can hash
    all to one side: then the one nearest the threshold crosses over (a choice that depends on the
    documents only); a single document is split by position, its tail going to val."""
    total = {s: sum(r["counts"][s]["num_documents"] for r in records) for s in SPLITS}
    if total["train"] + total["val"] == 0:
        raise ConfigError(key, spec, "holds no documents (every file binary or every record empty)",
                          "point the source at files with text in them")
    if total["train"] + total["val"] == 1:
        r = next(r for r in records if r["counts"]["train"]["num_documents"] + r["counts"]["val"]["num_documents"])
        side = "train" if r["counts"]["train"]["num_documents"] else "val"
        n = r["counts"][side]["num_tokens"]
        if n < 2:
            raise ConfigError(key, spec, "holds a single empty document", "point the source at files with text in them")
        tokens = np.fromfile(shards / _shard_name(r["unit"], side), dtype=dtype)
        num_val = min(n - 1, max(1, round(n * val_fraction)))
        _rewrite(shards, r["unit"], dtype, tokens[:n - num_val], tokens[n - num_val:])
        r["counts"] = {"train": {"num_documents": 1, "num_tokens": n - num_val}, "val": {"num_documents": 1, "num_tokens": num_val}}
        for d in r["text_docs"]:
            d["split"] = "train+val"
        r["split_by"] = "position"
        return None
    if total["val"] and total["train"]:
        return None
    side, other = ("train", "val") if total["val"] == 0 else ("val", "train")
    pick = min if side == "train" else max
    r = pick((r for r in records if r["edge"][side] is not None), key=lambda r: r["edge"][side][0])
    frac, offset, n, name = r["edge"][side]
    tokens = np.fromfile(shards / _shard_name(r["unit"], side), dtype=dtype)
    mover = tokens[offset:offset + n]
    rest = np.concatenate([tokens[:offset], tokens[offset + n:]])
    other_tokens = np.fromfile(shards / _shard_name(r["unit"], other), dtype=dtype)
    parts = {side: rest, other: np.concatenate([other_tokens, mover])}
    _rewrite(shards, r["unit"], dtype, parts["train"], parts["val"])
    r["counts"][side] = {"num_documents": r["counts"][side]["num_documents"] - 1, "num_tokens": len(rest)}
    r["counts"][other] = {"num_documents": r["counts"][other]["num_documents"] + 1, "num_tokens": len(parts[other])}
    for d in r["text_docs"]:
        if d["path"] == name and name is not None:
            d["split"] = other
    return name if name is not None else f"a record of {r['files'][0]['path']}"


def _rewrite(shards: Path, unit: int, dtype: np.dtype, train: np.ndarray, val: np.ndarray) -> None:
    for split, tokens in (("train", train), ("val", val)):
        tmp = shards / (_shard_name(unit, split) + ".tmp")
        with open(tmp, "wb") as f:
            f.write(np.asarray(tokens, dtype=dtype).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, shards / _shard_name(unit, split))


def _write_meta(partial: Path, records: list[dict], source: Source, tokenizer: Tokenizer, cfg, text_field: str,
                key: str, dtype: np.dtype, moved: str | None, seconds: float, num_workers: int) -> dict:
    with open(partial / "files.jsonl", "w") as f:
        for r in records:
            for d in r["text_docs"]:
                f.write(json.dumps({"path": d["path"], "format": "text", "split": d["split"],
                                    "num_tokens": d["num_tokens"]}) + "\n")
            for rel in r["binary_skipped"]:
                f.write(json.dumps({"path": rel, "format": "text", "split": "skipped", "num_tokens": 0}) + "\n")
            if not r["text_docs"] and not r["binary_skipped"]:
                f.write(json.dumps({"unit": r["unit"], "paths": [x["path"] for x in r["files"]],
                                    "format": r["files"][0]["format"], "counts": r["counts"],
                                    "num_empty": r["num_empty"]}) + "\n")
    shards = {s: [{"file": _shard_name(r["unit"], s), "num_tokens": r["counts"][s]["num_tokens"]}
                  for r in records if r["counts"][s]["num_tokens"]] for s in SPLITS}
    counts = {s: {"num_documents": sum(r["counts"][s]["num_documents"] for r in records),
                  "num_tokens": sum(r["counts"][s]["num_tokens"] for r in records)} for s in SPLITS}
    for r in records:  # the index keeps only non-empty shards; remove the empty files
        for s in SPLITS:
            if not r["counts"][s]["num_tokens"]:
                (partial / "shards" / _shard_name(r["unit"], s)).unlink(missing_ok=True)
        (partial / "shards" / f"{r['unit']:06d}.json").unlink(missing_ok=True)
    split_by = next((r["split_by"] for r in records if "split_by" in r), "document")
    meta = {"format_version": FORMAT_VERSION, "key": key, "source": source.spec, "location": source.location,
            "num_files": len(source.files), "files_fingerprint": files_fingerprint(source.files),
            "formats": sorted({f.format for f in source.files}), "text_field": text_field,
            "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "dtype": dtype.name, "val_fraction": cfg.val_fraction, "split_by": split_by, "moved_document": moved,
            "num_skipped_binary": sum(len(r["binary_skipped"]) for r in records),
            "num_skipped_empty": sum(r["num_empty"] for r in records),
            "num_decoded_with_replacement": sum(r["decoded_with_replacement"] for r in records),
            "input_bytes": sum(r["input_bytes"] for r in records), "prepare_seconds": seconds,
            "num_workers": num_workers, "shards": shards, **counts}
    _write_json_atomic(partial / "meta.json", meta)  # last: its presence marks the folder complete
    fsync_dir(partial / "shards")
    fsync_dir(partial)
    return meta


class _Progress:
    """Rank 0's progress bar of a preparation: documents/s, MB/s and ETA (tqdm); silent otherwise."""

    def __init__(self, enabled: bool, total_bytes: int, done_bytes: int, name: str):
        self.bar, self.docs, self.t0 = None, 0, time.perf_counter()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, unit_divisor=1000,
                            desc=f"tokenizing {name}", dynamic_ncols=True, mininterval=1.0)

    def update(self, record: dict) -> None:
        if self.bar is None:
            return
        self.docs += sum(c["num_documents"] for c in record["counts"].values())
        self.bar.update(record["input_bytes"])
        self.bar.set_postfix_str(f"{self.docs / max(time.perf_counter() - self.t0, 1e-9):,.0f} docs/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
