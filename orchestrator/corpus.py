"""Corpus sources and their one-time preparation into cached token files.

A source is 'stdlib' (the running Python's standard library .py files, always present) or an
fsspec URL / local path naming a file, a directory (every file under it) or a glob. Each file
is one document. `prepare_corpus` tokenizes every document (eos after each), splits documents
into train/val by a hash of their relative path, and writes

    <cache_dir>/<key>/train.bin, val.bin   raw token ids (uint16, or uint32 for big vocabularies)
                      documents.jsonl      one line per file: path, split, tokens
                      meta.json            counts, tokenizer, dtype, fingerprints (written last)

where key hashes the source location, every file's (path, size, mtime or etag), the tokenizer's
name, val_fraction and FORMAT_VERSION. The folder is built in a temporary sibling and renamed
into place, so a reader sees a complete cache or none, whatever other ranks or a kill do.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import shutil
import sysconfig
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np

from orchestrator.config import DataConfig
from orchestrator.errors import ConfigError
from orchestrator.storage import fsync_dir
from orchestrator.tokenizer import Tokenizer, token_dtype

# Bump when the layout or the meaning of the cached files changes: old caches then miss.
FORMAT_VERSION = 1
SPLITS = ("train", "val")
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})
# fsspec info keys that change when a file's content changes, by backend (local, s3, gcs, http, ...).
_STAMP_KEYS = ("mtime", "ETag", "etag", "md5Hash", "LastModified", "last_modified", "updated", "created")
_CHUNK_BYTES = 16 << 20  # text handed to the tokenizer at once
_SOURCE_FIX = "use data.source=stdlib, or a file, directory, glob or fsspec URL of text files"


@dataclass(frozen=True)
class SourceFile:
    rel: str  # '/'-separated path under the source root: names the document, decides its split
    path: str  # path for fs.cat_file
    size: int
    stamp: str  # mtime or an etag: part of the cache key


@dataclass
class Source:
    spec: str  # data.source as given
    location: str  # canonical URL of the root (or the glob), part of the cache key
    fs: fsspec.AbstractFileSystem
    files: list[SourceFile]  # sorted by rel


def list_source(spec: str) -> Source:
    """Resolve data.source to its sorted files; ConfigError when nothing is there."""
    if spec == "stdlib":
        return _list_stdlib()
    url = spec if "://" in spec else os.path.expanduser(spec)
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:  # unknown protocol, or its backend is not installed
        raise ConfigError("data.source", spec, f"cannot open ({str(e).splitlines()[0]})", _SOURCE_FIX) from None
    named_file = False  # a file named directly is taken even if hidden
    if _is_glob(path):
        root = _glob_root(path)
        infos: dict[str, dict] = {}
        for p, info in sorted(fs.glob(path, detail=True).items()):
            if info.get("type") == "directory":
                infos.update(_find(fs, p))
            else:
                infos[p] = info
    elif fs.isdir(path):
        root, infos = path, _find(fs, path)
    elif fs.isfile(path):
        root, infos, named_file = posixpath.dirname(path.rstrip("/")), {path: fs.info(path)}, True
    else:
        raise ConfigError("data.source", spec, "no such file, directory or glob match", _SOURCE_FIX)
    root = root.rstrip("/")
    files = [SourceFile(_relative(p, root), p, int(info.get("size") or 0), _stamp(info)) for p, info in infos.items()]
    # Hidden files and folders under the root (.git, .DS_Store) are skipped, as a shell glob would.
    files = sorted((f for f in files if named_file or not _is_hidden(f.rel)), key=lambda f: f.rel)
    if not files:
        raise ConfigError("data.source", spec, "matches no files", _SOURCE_FIX)
    return Source(spec, fs.unstrip_protocol(path), fs, files)


def _list_stdlib() -> Source:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Installed packages and the test suites are not "the standard library" and would make
        # the corpus depend on what happens to be installed (and grow it by hundreds of MB).
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                st = os.stat(path)
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                files.append(SourceFile(rel, path, st.st_size, f"mtime_ns={st.st_mtime_ns}"))
    files.sort(key=lambda f: f.rel)
    if not files:
        raise ConfigError("data.source", "stdlib", f"no .py files under {root} (a stripped Python?)",
                          "point data.source at a folder of text files")
    return Source("stdlib", "stdlib:" + Path(root).as_posix(), fsspec.filesystem("file"), files)


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _glob_root(path: str) -> str:
    parts = path.split("/")
    fixed = next(i for i, part in enumerate(parts) if _is_glob(part))
    return "/".join(parts[:fixed])


def _find(fs, path: str) -> dict[str, dict]:
    return {p: info for p, info in fs.find(path, detail=True).items() if info.get("type", "file") == "file"}


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _relative(path: str, root: str) -> str:
    if root and path.startswith(root + "/"):
        return path[len(root) + 1:]
    return path.lstrip("/") if not root else posixpath.basename(path)


def _stamp(info: dict) -> str:
    for key in _STAMP_KEYS:
        if info.get(key) is not None:
            return f"{key}={info[key]}"
    return ""  # backend reports nothing: the size alone keys the file


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def files_fingerprint(files: list[SourceFile]) -> str:
    return _sha(json.dumps([[f.rel, f.size, f.stamp] for f in files]))


def cache_key(source: Source, tokenizer: Tokenizer, val_fraction: float) -> str:
    payload = {"format": FORMAT_VERSION, "location": source.location, "files": files_fingerprint(source.files),
               "tokenizer": tokenizer.name, "val_fraction": repr(float(val_fraction))}
    return _sha(json.dumps(payload, sort_keys=True))[:20]


def hash_fraction(rel: str) -> float:
    """A document's stable position in [0, 1): it goes to val when below val_fraction."""
    return int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


@dataclass
class PreparedCorpus:
    dir: Path
    meta: dict
    from_cache: bool  # False when this call tokenized the corpus

    @property
    def train_path(self) -> Path:
        return self.dir / "train.bin"

    @property
    def val_path(self) -> Path:
        return self.dir / "val.bin"

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def load(self, split: str) -> np.memmap:
        """The split's tokens, memory-mapped read-only (pages load on demand, shared across ranks)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return np.memmap(self.dir / f"{split}.bin", dtype=self.dtype, mode="r",
                         shape=(self.meta[split]["num_tokens"],))

    def summary(self) -> str:
        """One line for the log."""
        m = self.meta
        notes = [f"{m['num_skipped_binary']} binary files skipped"] if m["num_skipped_binary"] else []
        if m["num_decoded_with_replacement"]:
            notes.append(f"{m['num_decoded_with_replacement']} files not valid UTF-8 (bad bytes replaced)")
        if m["split_by"] == "position":
            notes.append(f"one document: val is its last {m['val']['num_tokens']} tokens")
        return (f"data {m['source']}: train {m['train']['num_documents']} docs {m['train']['num_tokens']:,} tokens, "
                f"val {m['val']['num_documents']} docs {m['val']['num_tokens']:,} tokens; {m['tokenizer']} "
                f"({m['dtype']}); {'cached' if self.from_cache else 'prepared'} in {self.dir}"
                + "".join(f"; {n}" for n in notes))


def prepare_corpus(cfg: DataConfig, tokenizer: Tokenizer) -> PreparedCorpus:
    """Tokenize and split cfg.source once; later calls (any process) return the cached files."""
    source = list_source(cfg.source)
    key = cache_key(source, tokenizer, cfg.val_fraction)
    cache_root = Path(os.path.expanduser(cfg.cache_dir))
    final = cache_root / key
    found = _load_complete(final)
    if found is not None:
        return found
    _discard(final)  # a folder without a valid meta.json was not made by this code: rebuild it
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache_root))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would stay on the final folder after the rename
    try:
        meta = _build(source, tokenizer, cfg.val_fraction, key, tmp)
        try:
            os.rename(tmp, final)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            found = _load_complete(final)  # another rank won the race: use its (identical) files
            if found is None:
                raise
            return found
        fsync_dir(cache_root)
        return PreparedCorpus(final, meta, from_cache=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op after a successful rename


def _load_complete(folder: Path) -> PreparedCorpus | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        complete = meta["format_version"] == FORMAT_VERSION and all(
            (folder / f"{s}.bin").stat().st_size == meta[s]["num_tokens"] * itemsize for s in SPLITS)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return PreparedCorpus(folder, meta, from_cache=True) if complete else None


def _discard(folder: Path) -> None:
    """Remove a cache folder that is not complete (made by something else than prepare_corpus).

    Our folders only ever go from absent to complete (one rename), so checking existence before
    validity never mistakes another process's fresh folder for a broken one; a complete folder
    moved aside by a stalled process is put back."""
    if not folder.exists() or _load_complete(folder) is not None:
        return
    aside = folder.with_name(f".{folder.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(folder, aside)  # atomic: no reader sees a half-deleted folder under the key
    except FileNotFoundError:
        return  # another process moved it first
    if _load_complete(aside) is not None:
        try:
            os.rename(aside, folder)
            return
        except OSError:
            pass  # yet another complete one is in place already
    shutil.rmtree(aside, ignore_errors=True)


def _build(source: Source, tokenizer: Tokenizer, val_fraction: float, key: str, out: Path) -> dict:
    dtype = token_dtype(tokenizer.vocab_size)
    docs: list[tuple[str, int, int]] = []  # (rel, offset, num_tokens) in all.bin
    skipped, replaced, offset = [], 0, 0
    # Stage 1: every document's tokens, in path order, into one scratch file. Documents go to the
    # tokenizer in chunks of bounded size: memory stays flat, and a batch-capable tokenizer
    # (Hugging Face's encode_batch) uses every core.
    encode_batch = getattr(tokenizer, "encode_batch", None) or (lambda texts: [tokenizer.encode(t) for t in texts])
    with open(out / "all.bin", "wb") as f:
        for chunk in _chunks(source.files, _CHUNK_BYTES):
            texts = []
            for file in chunk:
                raw = source.fs.cat_file(file.path)
                if b"\x00" in raw:  # binary (image, archive, .pyc): would only feed the model noise
                    skipped.append(file.rel)
                    continue
                try:
                    texts.append((file.rel, raw.decode("utf-8")))
                except UnicodeDecodeError:
                    texts.append((file.rel, raw.decode("utf-8", errors="replace")))
                    replaced += 1
            for (rel, _), ids in zip(texts, encode_batch([text for _, text in texts])):
                tokens = np.empty(len(ids) + 1, dtype=dtype)
                tokens[:-1], tokens[-1] = ids, tokenizer.eos_id
                f.write(tokens.tobytes())
                docs.append((rel, offset, len(tokens)))
                offset += len(tokens)
    if not docs:
        raise ConfigError("data.source", source.spec, f"all {len(skipped)} files are binary (hold NUL bytes)",
                          _SOURCE_FIX)
    # Stage 2: choose each document's split, then copy the spans into train.bin and val.bin.
    moved, ranges = None, {s: [] for s in SPLITS}
    doc_split = {}
    if len(docs) >= 2:
        split_by = "document"
        fractions = [hash_fraction(rel) for rel, _, _ in docs]
        is_val = [h < val_fraction for h in fractions]
        # Few documents can hash all to one side. Both splits must exist (training needs train,
        # evaluation needs val), so the document nearest the threshold crosses over; its choice
        # depends on the paths only, hence stays deterministic.
        if not any(is_val):
            i = int(np.argmin(fractions))
            is_val[i], moved = True, docs[i][0]
        elif all(is_val):
            i = int(np.argmax(fractions))
            is_val[i], moved = False, docs[i][0]
        for (rel, start, n), v in zip(docs, is_val):
            split = "val" if v else "train"
            ranges[split].append((start, n))
            doc_split[rel] = split
    else:
        # One document (a single big text file) cannot be split by document: its tail is val.
        split_by = "position"
        rel, _, n = docs[0]
        if n < 2:
            raise ConfigError("data.source", source.spec, "holds a single empty document",
                              "point data.source at files with text in them")
        num_val = min(n - 1, max(1, round(n * val_fraction)))
        ranges = {"train": [(0, n - num_val)], "val": [(n - num_val, num_val)]}
        doc_split[rel] = "train+val"
    scratch = np.memmap(out / "all.bin", dtype=dtype, mode="r", shape=(offset,))
    for split in SPLITS:
        with open(out / f"{split}.bin", "wb") as f:
            for start, n in ranges[split]:
                f.write(scratch[start:start + n].tobytes())
            _fsync(f)
    del scratch
    os.remove(out / "all.bin")
    with open(out / "documents.jsonl", "w") as f:
        for rel, _, n in docs:
            f.write(json.dumps({"path": rel, "split": doc_split[rel], "num_tokens": n}) + "\n")
        for rel in skipped:
            f.write(json.dumps({"path": rel, "split": "skipped", "num_tokens": 0}) + "\n")
    counts = {s: {"num_documents": sum(v in (s, "train+val") for v in doc_split.values()),
                  "num_tokens": sum(n for _, n in ranges[s])} for s in SPLITS}
    meta = {"format_version": FORMAT_VERSION, "key": key, "source": source.spec, "location": source.location,
            "num_files": len(source.files), "files_fingerprint": files_fingerprint(source.files),
            "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "dtype": dtype.name, "val_fraction": val_fraction, "split_by": split_by, "moved_document": moved,
            "num_skipped_binary": len(skipped), "num_decoded_with_replacement": replaced, **counts}
    with open(out / "meta.json", "w") as f:  # last: its presence marks the folder complete
        json.dump(meta, f, indent=1)
        _fsync(f)
    return meta


def _chunks(files: list[SourceFile], max_bytes: int):
    chunk, size = [], 0
    for file in files:
        if chunk and size + file.size > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append(file)
        size += file.size
    if chunk:
        yield chunk


def _fsync(f) -> None:
    f.flush()
    os.fsync(f.fileno())
