"""Before training starts: can this machine reach every store and service the run names?

    check_stores(cfg)      # raises ConfigError: one line naming the key, exit 2
    check_on_node(cfg)     # inside a Slurm job: this node has what the job asked for, and the stores

checkpoint.dir, data.source (and data.tokenizer) and tracking.uri are each opened the way the run
will open them (fsspec for stores, MLflow's URI schemes for tracking). The causes a user meets are
told apart: no credentials, access denied, no such bucket (or file), an unreachable endpoint, an
unsupported scheme. launch.py runs this before anything starts or is submitted (so a refused run
leaves no run directory behind); a Slurm job runs it again on its node (train.py), where the
network, the credentials and the mounted filesystems may differ from the login node's.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from typing import Callable

from orchestrator.config import TrainConfig
from orchestrator.errors import ConfigError
from orchestrator.storage import is_local, redact

# MLflow's tracking stores (mlflow.tracking's registry): a local path, file://, a database URL
# (SQLAlchemy dialects, optionally with a driver: postgresql+psycopg2://), an HTTP(S) server, Databricks.
_TRACKING_SCHEMES = {"", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc"}
_CONNECT_TIMEOUT_S = 5.0


def check_stores(cfg: TrainConfig) -> None:
    """ConfigError for the first store or service of `cfg` that this machine cannot use."""
    _check_store("checkpoint.dir", cfg.checkpoint.dir, must_exist=False)
    from orchestrator.data import list_source, mixture_sources

    for source in mixture_sources(cfg.data):  # data.source, or every source of data.mixture
        if source.source != "stdlib":
            _check_store(source.key, source.source, must_exist=True)
            _refusing(source.key, source.source, lambda: list_source(source.source, source.key))
    if cfg.data.tokenizer != "bytes":
        from orchestrator.tokenizer import load_tokenizer

        load_tokenizer(cfg.data.tokenizer)
    if cfg.tracking.enabled and cfg.tracking.uri:
        _check_tracking(cfg.tracking.uri)


def _check_store(key: str, url: str, must_exist: bool) -> None:
    if is_local(url):
        return  # a local path: the run creates it (checkpoints) or lists it (data) with its own errors
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        text = str(exc).splitlines()[0]
        if "Protocol not known" in text:
            raise ConfigError(key, redact(url), f"unsupported scheme {protocol}://",
                              "use a local path or a URL of a filesystem fsspec knows (s3://, gs://, file://, ...)") from None
        raise ConfigError(key, redact(url), f"cannot be opened here ({text})",
                          "pip install s3fs" if protocol in ("s3", "s3a") else f"install fsspec's {protocol}:// package") from None
    bucket = path.split("/", 1)[0]
    if protocol in ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"):
        # The bucket (container) first: its absence reads differently from a missing prefix.
        _refusing(key, url, lambda: fs.ls(bucket), bucket=bucket)
    if must_exist:
        _refusing(key, url, lambda: fs.exists(path) or _raise(FileNotFoundError(path)))
    else:
        _refusing(key, url, lambda: fs.exists(path))


def _raise(exc: BaseException):
    raise exc


def _refusing(key: str, url: str, probe: Callable[[], object], bucket: str | None = None) -> None:
    """Run `probe`; turn what a store raises into one ConfigError line naming `key`."""
    shown = redact(url)
    try:
        probe()
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - every store error must become one line
        names = {c.__name__ for c in type(exc).__mro__}
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "NoCredentialsError" in names or "PartialCredentialsError" in names:
            raise ConfigError(key, shown, "no credentials for this store", "export its credentials (AWS_ACCESS_KEY_ID "
                              "and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) or use a local path") from None
        if isinstance(exc, PermissionError):
            raise ConfigError(key, shown, f"access denied ({text})",
                              "use credentials that may list and write this location") from None
        if isinstance(exc, FileNotFoundError):
            if bucket is not None:
                raise ConfigError(key, shown, f"no such bucket '{bucket}'", "create the bucket or fix the URL") from None
            raise ConfigError(key, shown, "no such file or directory", "fix the URL") from None
        if "ConnectionError" in names or "EndpointConnectionError" in names or isinstance(exc, (OSError, TimeoutError)):
            endpoint = os.environ.get("FSSPEC_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or ""
            raise ConfigError(key, shown, "endpoint unreachable" + (f" ({endpoint})" if endpoint else f" ({text})"),
                              "check the network, the endpoint (FSSPEC_S3_ENDPOINT_URL) and the URL") from None
        raise ConfigError(key, shown, f"cannot be used: {type(exc).__name__}: {text}", "fix the URL or the store") from None


def _check_tracking(uri: str) -> None:
    key, shown = "tracking.uri", redact(uri)
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if scheme not in _TRACKING_SCHEMES:
        raise ConfigError(key, shown, f"unsupported scheme {scheme}:// for MLflow",
                          "use sqlite:///<path>, a local path, http(s)://<tracking server> or a database URL") from None
    if scheme in ("http", "https"):
        parsed = urllib.parse.urlsplit(uri)
        port = parsed.port or (443 if scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname, port), timeout=_CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise ConfigError(key, shown, f"tracking server unreachable ({parsed.hostname}:{port}: "
                              f"{exc.strerror or type(exc).__name__})",
                              "start the MLflow server, fix the URI, or set tracking.enabled=false") from None


def check_on_node(cfg: TrainConfig) -> None:
    """Inside a Slurm job, before training: what launch.py judged from the request on the login
    node, checked on the node the job landed on (its GPUs for trainer.device=cuda or bf16), and
    the stores again (this node's network and credentials). A no-op outside Slurm jobs."""
    if cfg.cluster.kind != "slurm" or "SLURM_JOB_ID" not in os.environ:
        return
    import torch

    where = f"node {socket.gethostname()} of Slurm job {os.environ['SLURM_JOB_ID']}"
    visible = torch.cuda.device_count()
    wants_gpu = cfg.trainer.device == "cuda" or cfg.trainer.precision == "bf16"
    if wants_gpu and visible == 0:
        key, value = ("trainer.device", cfg.trainer.device) if cfg.trainer.device == "cuda" else \
            ("trainer.precision", cfg.trainer.precision)
        raise ConfigError(key, value, f"no CUDA device is visible on {where} (cluster.gpus_per_node="
                          f"{cfg.cluster.gpus_per_node}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r})",
                          "pick a partition whose nodes have GPUs (cluster.partition; sinfo -o '%P %G') "
                          "or set trainer.device=auto and trainer.precision=auto")
    check_stores(cfg)
