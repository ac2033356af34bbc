"""The one place that talks to storage: local paths keep the fast path, anything else goes through
fsspec (s3://, gs://, file://, ...). Credentials come from the usual places (AWS_* variables,
~/.aws, FSSPEC_<PROTOCOL>_<OPTION> variables such as FSSPEC_S3_ENDPOINT_URL), never from our config,
so they cannot end up in config files, logs or MLflow params. `redact()` strips user:password@ from
any URL that is shown or saved anyway.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Optional

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+@)")


def redact(url: str) -> str:
    """'s3://KEY:SECRET@bucket/x' -> 's3://***@bucket/x'; other strings unchanged."""
    return _USERINFO.sub(lambda m: m.group("scheme") + "***@", url) if isinstance(url, str) else url


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    path = url[len("file://"):] if url.startswith("file://") else url
    return os.path.abspath(os.path.expanduser(path))


def check_url(url: str) -> Optional[str]:
    """None when fsspec can open `url`'s protocol here, else the reason (e.g. a missing package)."""
    if is_local(url):
        return None
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        return str(exc).splitlines()[0]
    return None


class Storage:
    """A directory on some filesystem. Paths given to methods are relative to it."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.local = is_local(url)
        if self.local:
            self.root = _local_path(url)
            self.fs = None
        else:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(self.url)
            self.root = self.root.rstrip("/")

    def __repr__(self) -> str:
        return f"Storage({redact(self.url)!r})"

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts]) if not self.local else os.path.join(self.root, *parts)

    def display(self, *parts: str) -> str:
        return redact("/".join([self.url, *parts]))

    # ------------------------------------------------------------------ queries
    def list_dirs(self) -> list[str]:
        """Names of the entries directly under the root (empty if the root does not exist)."""
        if self.local:
            return sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []
        self.fs.invalidate_cache()
        if not self.fs.exists(self.root):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))

    def exists(self, rel: str) -> bool:
        if self.local:
            return os.path.exists(self.path(rel))
        self.fs.invalidate_cache()
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        if self.local:
            with open(self.path(rel), "rb") as f:
                return f.read()
        return self.fs.cat_file(self.path(rel))

    # ------------------------------------------------------------------ writes
    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Readers see the whole file or nothing: a local rename, or one object PUT remotely."""
        if self.local:
            target = self.path(rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            fsync_dir(os.path.dirname(target))
        else:
            self.fs.pipe_file(self.path(rel), data)

    def put_file(self, local_path: str, rel: str, move: bool) -> None:
        """Copy (or, for local storage with move=True, rename) a finished local file into place."""
        if self.local:
            target = self.path(rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if move:
                os.replace(local_path, target)
            else:
                shutil.copyfile(local_path, target)
        else:
            self.fs.put_file(local_path, self.path(rel))

    def get_file(self, rel: str, local_path: str) -> None:
        os.makedirs(os.path.dirname(local_path), exist_ok=True)
        if self.local:
            shutil.copyfile(self.path(rel), local_path)
        else:
            self.fs.get_file(self.path(rel), local_path)

    def remove_tree(self, rel: str) -> None:
        if self.local:
            shutil.rmtree(self.path(rel), ignore_errors=True)
        else:
            self.fs.invalidate_cache()
            if self.fs.exists(self.path(rel)):
                self.fs.rm(self.path(rel), recursive=True)


def fsync_dir(path) -> None:
    """Make a rename inside `path` durable (best effort: some filesystems refuse fsync on a
    directory; the rename itself is still atomic)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
