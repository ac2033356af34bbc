"""Remote stores and services a run cannot use are refused before anything starts: one line that
names the key, exit 2, no run directory. Against a real S3 API (moto's server on 127.0.0.1, one
open and one with IAM authorisation enforced) and an unused loopback port for "unreachable"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.local import free_port
from tests.helpers import moto_server, until_up

ROOT = Path(__file__).resolve().parents[2]
REGION = "us-east-1"


def _client(service: str, endpoint: str, key: str = "test-key-id", secret: str = "test-secret"):
    import boto3

    return boto3.client(service, endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                        region_name=REGION)


@pytest.fixture(scope="module")
def stores():
    """An open S3 API with bucket `ckpt-bucket`, and one that enforces IAM where the bucket `locked`
    exists and the key of a user without any policy is refused."""
    pytest.importorskip("s3fs")
    # The first 3 requests run unauthenticated (make the bucket, the user, its key); then IAM applies.
    with moto_server() as open_url, moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "3"}) as locked_url:
        until_up(lambda: _client("s3", open_url).create_bucket(Bucket="ckpt-bucket"))
        until_up(lambda: _client("s3", locked_url).create_bucket(Bucket="locked"))
        iam = _client("iam", locked_url)
        iam.create_user(UserName="nobody")
        key = iam.create_access_key(UserName="nobody")["AccessKey"]
        yield {"open": open_url, "locked": locked_url, "nobody": (key["AccessKeyId"], key["SecretAccessKey"])}


def _launch(tmp_path: Path, args: list[str], env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_"))}
    base.update({"PYTHONPATH": str(ROOT), "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent",
                 "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_DEFAULT_REGION": REGION})
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), f"run.root={tmp_path}/runs", "trainer.max_steps=2",
                           *args], cwd=tmp_path, env={**base, **env}, capture_output=True, text=True, timeout=180)


def _creds(key="test-key-id", secret="test-secret"):
    return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}


CASES = [
    # (name, overrides, env(stores), key in the message, problem in the message)
    ("no credentials", ["checkpoint.dir=s3://ckpt-bucket/ck"],
     lambda s: {"FSSPEC_S3_ENDPOINT_URL": s["open"]}, "checkpoint.dir=", "no credentials"),
    ("access denied", ["checkpoint.dir=s3://locked/ck"],
     lambda s: {"FSSPEC_S3_ENDPOINT_URL": s["locked"], **_creds(*s["nobody"])}, "checkpoint.dir=", "access denied"),
    ("no such bucket", ["checkpoint.dir=s3://no-such-bucket/ck"],
     lambda s: {"FSSPEC_S3_ENDPOINT_URL": s["open"], **_creds()}, "checkpoint.dir=", "no such bucket 'no-such-bucket'"),
    ("unreachable endpoint", ["checkpoint.dir=s3://ckpt-bucket/ck"],
     lambda s: {"FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", **_creds()}, "checkpoint.dir=",
     "endpoint unreachable"),
    ("data without credentials", ["data=files", "data.source=s3://ckpt-bucket/corpus/*.txt"],
     lambda s: {"FSSPEC_S3_ENDPOINT_URL": s["open"]}, "data.source=", "no credentials"),
    ("data not there", ["data=files", "data.source=s3://ckpt-bucket/corpus/*.txt"],
     lambda s: {"FSSPEC_S3_ENDPOINT_URL": s["open"], **_creds()}, "data.source=", "no such file"),
    ("data in a missing local folder", ["data=files", "data.source=/nonexistent/corpus"],
     lambda s: {}, "data.source=", "no such file"),
    ("unsupported tracking scheme", ["tracking.uri=ftp://host/x"], lambda s: {}, "tracking.uri='ftp://host/x'",
     "unsupported scheme ftp://"),
    ("unreachable tracking server", [f"tracking.uri=http://127.0.0.1:{free_port()}"], lambda s: {}, "tracking.uri=",
     "tracking server unreachable"),
    ("unsupported store scheme", ["checkpoint.dir=bogus://x/y"], lambda s: {}, "checkpoint.dir=", "bogus://"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, overrides, env, key, problem", CASES, ids=[c[0] for c in CASES])
def test_unusable_store_is_refused_in_one_line_before_anything_starts(tmp_path, stores, name, overrides, env, key,
                                                                      problem):
    proc = _launch(tmp_path, overrides, env(stores))
    assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: " + key) and problem in lines[0] and "; fix: " in lines[0], lines[0]
    assert "secret" not in proc.stderr.lower() or "test-secret" not in proc.stderr
    assert not (tmp_path / "runs").exists(), "a refused run leaves no run directory behind"
