"""Sources: what `data.source` (or one `data.mixture` entry) names, resolved to files and formats,
and cut into work units that the preparation workers tokenize one at a time.

A source is 'stdlib' (the running Python's standard library .py files, always present) or an
fsspec URL / local path naming a file, a directory (every file under it) or a glob. The format of
each file follows its name:

    *.jsonl *.json *.ndjson (+ .gz or .zst)   JSON Lines, one document per record (data.text_field)
    *.parquet                                 Parquet, one document per row of the text column
    a folder with state.json + dataset_info.json   a Hugging Face dataset (save_to_disk), one per row
    anything else                             plain text, the whole file is one document

Units depend on the listing only (never on data.num_workers), so the prepared tokens are the same
whichever number of processes made them.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import fsspec

from orchestrator.errors import ConfigError

STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})
# fsspec info keys that change when a file's content changes, by backend (local, s3, gcs, http, ...).
_STAMP_KEYS = ("mtime", "ETag", "etag", "md5Hash", "LastModified", "last_modified", "updated", "created")
SOURCE_FIX = "use data.source=stdlib, or a file, directory, glob or fsspec URL of text, JSON Lines or Parquet files"
# Input bytes per work unit: plain-text files are grouped, uncompressed JSON Lines files cut at line
# boundaries, into units of about this size (one token shard each). Part of the cache key.
UNIT_BYTES = 64 << 20
TEXT_UNIT_BYTES = 16 << 20
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
_HF_MARKERS = ("state.json", "dataset_info.json")


@dataclass(frozen=True)
class SourceFile:
    rel: str  # '/'-separated path under the source root: names the file (and a text document)
    path: str  # path for the filesystem
    size: int
    stamp: str  # mtime or an etag: part of the cache key
    format: str = "text"  # text | jsonl | parquet | hf_dataset
    compression: str | None = None  # gzip | zstd for JSON Lines


@dataclass
class Source:
    spec: str  # data.source as given
    location: str  # canonical URL of the root (or the glob), part of the cache key
    fs: fsspec.AbstractFileSystem
    files: list[SourceFile]  # sorted by rel
    key: str = "data.source"  # the config key that named it (for error messages)


@dataclass(frozen=True)
class Unit:
    """One worker task: some whole text files, a byte range of one JSON Lines file, one compressed
    or Parquet file, or a row range of a Hugging Face dataset."""

    index: int
    files: tuple[SourceFile, ...]
    start: int = 0  # byte offset (JSON Lines) or row (dataset)
    end: int | None = None  # exclusive; None: to the end
    input_bytes: int = 0  # for the progress bar


class DataError(Exception):
    """Bad input found while reading, also in a worker process (so it pickles by its fields)."""

    def __init__(self, rel: str, where: str, problem: str, fix: str):
        super().__init__(rel, where, problem, fix)
        self.rel, self.where, self.problem, self.fix = rel, where, problem, fix  # where: 'line 12', 'row 3' or ''

    def to_config_error(self, key: str, spec: str) -> ConfigError:
        at = f"{self.rel} {self.where}".strip()
        return ConfigError(key, spec, f"{at}: {self.problem}", self.fix)


def file_format(name: str) -> tuple[str, str | None]:
    lower = name.lower()
    compression = next((c for suffix, c in _COMPRESSIONS.items() if lower.endswith(suffix)), None)
    base = lower[: -len(next(s for s, c in _COMPRESSIONS.items() if c == compression))] if compression else lower
    if base.endswith(_JSONL_SUFFIXES):
        return "jsonl", compression
    if lower.endswith(".parquet"):
        return "parquet", None
    return "text", None


def list_source(spec: str, key: str = "data.source") -> Source:
    """Resolve a source to its sorted files; ConfigError when nothing is there or it cannot be reached."""
    if spec == "stdlib":
        return _list_stdlib()
    url = spec if "://" in spec else os.path.expanduser(spec)
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:  # unknown protocol, or its backend is not installed
        raise ConfigError(key, spec, f"cannot open ({_first_line(e)})", SOURCE_FIX) from None
    try:
        root, infos, named_file = _resolve(fs, path)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001  any backend's connection or permission failure
        raise ConfigError(key, spec, f"cannot be reached ({type(e).__name__}: {_first_line(e)})",
                          "check the URL, the network and the credentials of this storage") from None
    if root is None:
        raise ConfigError(key, spec, "no such file, directory or glob match", SOURCE_FIX)
    root = root.rstrip("/")
    files = _group_datasets(fs, [(_relative(p, root), p, info) for p, info in infos.items()], key, spec)
    # Hidden files and folders under the root (.git, .DS_Store) are skipped, as a shell glob would.
    files = sorted((f for f in files if named_file or not _is_hidden(f.rel)), key=lambda f: f.rel)
    if not files:
        raise ConfigError(key, spec, "matches no files", SOURCE_FIX)
    return Source(spec, fs.unstrip_protocol(path), fs, files, key)


def _resolve(fs, path: str):
    if _is_glob(path):
        infos: dict[str, dict] = {}
        for p, info in sorted(fs.glob(path, detail=True).items()):
            if info.get("type") == "directory":
                infos.update(_find(fs, p))
            else:
                infos[p] = info
        return _glob_root(path), infos, False
    if fs.isdir(path):
        return path, _find(fs, path), False
    if fs.isfile(path):
        return posixpath.dirname(path.rstrip("/")), {path: fs.info(path)}, True  # taken even if hidden
    return None, {}, False


def _group_datasets(fs, entries: list[tuple[str, str, dict]], key: str, spec: str) -> list[SourceFile]:
    """Files -> SourceFiles; the files of a Hugging Face dataset folder become one entry."""
    by_dir: dict[str, set[str]] = {}
    for rel, _, _ in entries:
        by_dir.setdefault(posixpath.dirname(rel), set()).add(posixpath.basename(rel))
    for folder, names in by_dir.items():
        if "dataset_dict.json" in names:
            raise ConfigError(key, spec, f"{folder or '.'} is a DatasetDict (several splits)",
                              f"point the source at one split's folder, e.g. {posixpath.join(folder, 'train')}")
    dataset_dirs = {d for d, names in by_dir.items() if all(m in names for m in _HF_MARKERS)}
    out, grouped = [], {}
    for rel, path, info in entries:
        folder = next((d for d in dataset_dirs if d == "" or rel == d or rel.startswith(d + "/")), None)
        if folder is not None:
            grouped.setdefault(folder, []).append((rel, path, info))
            continue
        fmt, compression = file_format(rel)
        out.append(SourceFile(rel, path, int(info.get("size") or 0), _stamp(info), fmt, compression))
    for folder, members in grouped.items():
        rel0, path0, _ = members[0]
        prefix = path0[: len(path0) - len(rel0)]  # the root's path, with its trailing '/'
        folder_path = (prefix + folder) if folder else prefix.rstrip("/")
        size = sum(int(i.get("size") or 0) for _, _, i in members)
        stamp = hashlib.sha256(json.dumps(sorted((r, _stamp(i)) for r, _, i in members)).encode()).hexdigest()[:16]
        out.append(SourceFile(folder or posixpath.basename(folder_path), folder_path, size, f"files={stamp}", "hf_dataset"))
    return out


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


def plan_units(source: Source, dataset_rows=None) -> list[Unit]:
    """Cut the source into work units, in file order. `dataset_rows(file) -> (rows, bytes)` sizes
    a Hugging Face dataset (it needs the optional package, so the caller supplies it)."""
    units: list[Unit] = []
    pending: list[SourceFile] = []
    pending_bytes = 0

    def add(files, start=0, end=None, size=0):
        units.append(Unit(len(units), tuple(files), start, end, size))

    for f in source.files:
        if f.format == "text":
            if pending and pending_bytes + f.size > TEXT_UNIT_BYTES:
                add(pending, size=pending_bytes)
                pending, pending_bytes = [], 0
            pending.append(f)
            pending_bytes += f.size
            continue
        if pending:
            add(pending, size=pending_bytes)
            pending, pending_bytes = [], 0
        if f.format == "jsonl" and f.compression is None and f.size > UNIT_BYTES:
            for start in range(0, f.size, UNIT_BYTES):
                add([f], start, min(start + UNIT_BYTES, f.size), min(UNIT_BYTES, f.size - start))
        elif f.format == "hf_dataset" and dataset_rows is not None:
            rows, nbytes = dataset_rows(f)
            per_unit = max(1, rows * UNIT_BYTES // max(nbytes, 1))
            for start in range(0, max(rows, 1), per_unit):
                end = min(start + per_unit, rows)
                add([f], start, end, nbytes * (end - start) // max(rows, 1))
        else:
            add([f], size=f.size)
    if pending:
        add(pending, size=pending_bytes)
    return units


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def files_fingerprint(files: list[SourceFile]) -> str:
    payload = json.dumps([[f.rel, f.size, f.stamp, f.format, f.compression] for f in files])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
