"""Record formats (JSON Lines plain/gz/zst, Parquet, Hugging Face datasets, s3://), parallel and
resumable preparation, and every refusal of bad input. Every input file is written by the test."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.config import DataConfig
from orchestrator.data import check_mixture, prepare_corpus
from orchestrator.data import sources as sources_mod
from orchestrator.errors import ConfigError
from orchestrator.tokenizer import ByteTokenizer
from tests.helpers import ROOT, moto_server, until_up

BYTES = ByteTokenizer()
# Unicode, newlines inside a document, quotes, and an empty record (skipped in every format).
DOCS = [f"document {i}: " + "naïve café ✓ \"quoted\"\nsecond line " * (i % 5 + 1) for i in range(60)] + [""]


def _cfg(source, cache_dir, **more):
    fields = {"tokenizer": "bytes", "seq_len": 8, "val_fraction": 0.3, "text_field": "text", "num_workers": 1,
              "mixture": [], **more}
    return DataConfig(source=str(source), cache_dir=str(cache_dir), **fields)


def _jsonl_bytes(docs, field="text") -> bytes:
    return "".join(json.dumps({"id": i, field: d}, ensure_ascii=False) + "\n" for i, d in enumerate(docs)).encode()


def _write(path: Path, fmt: str, docs=DOCS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.write_bytes(_jsonl_bytes(docs))
    elif fmt == "json.gz":
        path.write_bytes(gzip.compress(_jsonl_bytes(docs)))
    elif fmt == "jsonl.zst":
        zstandard = pytest.importorskip("zstandard")
        path.write_bytes(zstandard.ZstdCompressor().compress(_jsonl_bytes(docs)))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=7)
    else:
        raise AssertionError(fmt)
    return path


def _tokens(corpus) -> dict[str, bytes]:
    return {s: corpus.load(s).tobytes() for s in ("train", "val")}


def _leftovers(cache: Path) -> list[str]:
    """What a refused preparation left in the cache folder besides lock files (must be nothing)."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) if cache.exists() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    return _tokens(prepare_corpus(_cfg(_write(root / "docs.jsonl", "jsonl"), root / "cache"), BYTES))


@pytest.mark.parametrize("fmt", ["json.gz", "jsonl.zst", "parquet"])
def test_every_format_gives_the_same_tokens(tmp_path, reference, fmt):
    path = _write(tmp_path / f"docs.{fmt}", fmt)
    corpus = prepare_corpus(_cfg(path, tmp_path / "cache"), BYTES)
    assert _tokens(corpus) == reference
    assert corpus.meta["num_skipped_empty"] == 1 and corpus.meta["train"]["num_documents"] + \
        corpus.meta["val"]["num_documents"] == len(DOCS) - 1


def test_records_hold_exactly_their_documents(tmp_path, reference):
    tokens = np.frombuffer(reference["train"] + reference["val"], dtype=np.uint16)
    docs = [BYTES.decode(d) for d in np.split(tokens, np.flatnonzero(tokens == BYTES.eos_id) + 1)[:-1]]
    assert sorted(docs) == sorted(d for d in DOCS if d)
    # A plain-text file per document gives the same documents (its split follows its path instead).
    for i, d in enumerate(DOCS):
        (tmp_path / "txt" / f"{i:03d}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "txt" / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    plain = prepare_corpus(_cfg(tmp_path / "txt", tmp_path / "cache"), BYTES)
    t = np.frombuffer(b"".join(_tokens(plain).values()), dtype=np.uint16)
    plain_docs = [BYTES.decode(d) for d in np.split(t, np.flatnonzero(t == BYTES.eos_id) + 1)[:-1]]
    assert sorted(plain_docs) == sorted(DOCS)  # a plain-text file is a document even when empty


def test_hugging_face_dataset_gives_the_same_tokens(tmp_path, reference):
    datasets = pytest.importorskip("datasets", reason="the datasets package is not installed (pip install datasets)")
    folder = tmp_path / "hf"
    datasets.Dataset.from_dict({"id": list(range(len(DOCS))), "text": DOCS}).save_to_disk(str(folder))
    corpus = prepare_corpus(_cfg(folder, tmp_path / "cache"), BYTES)
    assert corpus.meta["formats"] == ["hf_dataset"] and _tokens(corpus) == reference
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ConfigError, match=r"DatasetDict.*fix: point the source at one split's folder"):
        prepare_corpus(_cfg(tmp_path / "dd", tmp_path / "cache"), BYTES)


def test_units_and_workers_do_not_change_the_tokens(tmp_path, reference, monkeypatch):
    """A JSON Lines file cut into many byte ranges (lines straddle every cut), tokenized by two
    spawned worker processes: the same tokens as one unit in one process."""
    path = _write(tmp_path / "docs.jsonl", "jsonl")
    monkeypatch.setattr(sources_mod, "UNIT_BYTES", 997)  # a prime: cuts fall mid-line
    one = prepare_corpus(_cfg(path, tmp_path / "c1"), BYTES)
    assert len(sources_mod.plan_units(sources_mod.list_source(str(path)))) > 5
    assert _tokens(one) == reference
    two = prepare_corpus(_cfg(path, tmp_path / "c2", num_workers=2), BYTES)
    assert _tokens(two) == reference and two.meta["num_workers"] == 2
    assert len(two.load("train").take(np.arange(len(two.load("train"))))) == len(reference["train"]) // 2
    assert "MB/s" in two.summary()


@pytest.mark.slow
def test_interrupted_preparation_resumes_its_finished_shards(tmp_path, reference):
    """A preparer killed with SIGKILL after 3 shards leaves no cache, only finished shards in its
    partial folder; the next run reuses them (same files, by inode) and gives the reference tokens."""
    path = _write(tmp_path / "docs.jsonl", "jsonl")
    script = ("import sys; from orchestrator.data import sources; sources.UNIT_BYTES = 997\n"
              "from tests.unit.test_data_formats import _cfg, BYTES; from orchestrator.data import prepare_corpus\n"
              f"prepare_corpus(_cfg({str(path)!r}, {str(tmp_path / 'cache')!r}), BYTES)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PEERLAB_TEST_KILL_PREP_AFTER": "3"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (partial,) = [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".partial")]
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]  # no cache visible
    finished = sorted((partial / "shards").glob("*.json"))
    assert len(finished) == 3
    inode = (partial / "shards" / "000000.train.bin").stat().st_ino
    env.pop("PEERLAB_TEST_KILL_PREP_AFTER")
    proc = subprocess.run([sys.executable, "-c", script + "print('ok')"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    (final,) = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert not partial.exists() and (final / "shards" / "000000.train.bin").stat().st_ino == inode
    sources_unit = sources_mod.UNIT_BYTES
    try:
        sources_mod.UNIT_BYTES = 997
        corpus = prepare_corpus(_cfg(path, tmp_path / "cache"), BYTES)
    finally:
        sources_mod.UNIT_BYTES = sources_unit
    assert corpus.from_cache and corpus.dir == final and _tokens(corpus) == reference


def test_shard_boundaries_are_invisible_to_windows(tmp_path):
    from orchestrator.data.tokens import ShardedTokens

    whole = np.arange(100, dtype=np.uint16)
    pieces = [whole[:10], whole[10:11], whole[11:60], whole[60:]]
    paths = []
    for i, piece in enumerate(pieces):
        paths.append((tmp_path / f"{i}.bin", len(piece)))
        piece.tofile(paths[-1][0])
    tokens = ShardedTokens(paths + [(tmp_path / "empty.bin", 0)], np.uint16)
    idx = np.array([[0, 9, 10, 11], [59, 60, 61, 99]])
    assert len(tokens) == 100 and (tokens[idx] == whole[idx]).all() and tokens[5:15].tolist() == list(range(5, 15))
    with pytest.raises(IndexError):
        tokens.take(np.array([100]))


# ----------------------------------------------------------------------------- remote sources


@pytest.mark.slow
def test_s3_source_through_motos_server(tmp_path, reference, monkeypatch):
    pytest.importorskip("s3fs")
    import fsspec
    import s3fs

    with moto_server() as endpoint:
        for k, v in {"AWS_ACCESS_KEY_ID": "test-key-id", "AWS_SECRET_ACCESS_KEY": "sup3r-s3cret-value",
                     "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        until_up(lambda: fs.mkdir("corpus-bucket"))
        fs.pipe("corpus-bucket/web/part-0.jsonl", _jsonl_bytes(DOCS))
        corpus = prepare_corpus(_cfg("s3://corpus-bucket/web", tmp_path / "cache"), BYTES)
        assert _tokens(corpus) == reference and corpus.meta["location"] == "s3://corpus-bucket/web"
        with pytest.raises(ConfigError, match="no such file"):
            prepare_corpus(_cfg("s3://corpus-bucket/nothing-here", tmp_path / "cache"), BYTES)
    s3fs.S3FileSystem.clear_instance_cache()


# ----------------------------------------------------------------------------- bad input


def _refused(tmp_path, source, match, **more) -> str:
    cache = tmp_path / "cache-refused"
    with pytest.raises(ConfigError) as excinfo:
        prepare_corpus(_cfg(source, cache, **more), BYTES)
    message = str(excinfo.value)
    assert "\n" not in message and "; fix: " in message, message
    assert _leftovers(cache) == [], "a refused preparation left files behind"
    import re

    assert re.search(match, message), message
    return message


def test_record_without_the_text_field(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(_jsonl_bytes(DOCS[:3]) + b'{"body": "x"}\n')
    _refused(tmp_path, path, r"a.jsonl line 4: has no field 'text' \(found \['body'\]\); fix: set data.text_field")
    _refused(tmp_path, path, r"a.jsonl line 1: field 'id' is int, not a string", text_field="id")


def test_text_field_selects_the_field(tmp_path, reference):
    path = tmp_path / "b.jsonl"
    path.write_bytes(_jsonl_bytes(DOCS, field="content"))
    assert _tokens(prepare_corpus(_cfg(path, tmp_path / "cache", text_field="content"), BYTES)) == reference
    _refused(tmp_path, path, r"line 1: has no field 'text'")


def test_invalid_utf8_and_bad_json_name_the_line(tmp_path, monkeypatch):
    path = tmp_path / "a.jsonl"
    path.write_bytes(_jsonl_bytes(DOCS[:5]) + b'{"text": "caf\xe9"}\n')
    _refused(tmp_path, path, r"a.jsonl line 6: is not valid UTF-8.*fix: re-encode a.jsonl as UTF-8")
    path.write_bytes(_jsonl_bytes(DOCS[:2]) + b'{"text": \n')
    _refused(tmp_path, path, r"a.jsonl line 3: is not JSON")
    # The line number is the file's even when the error lies in a later unit of the file.
    monkeypatch.setattr(sources_mod, "UNIT_BYTES", 500)
    path.write_bytes(_jsonl_bytes(DOCS[:40]) + b'{"text": 3}\n')
    _refused(tmp_path, path, r"a.jsonl line 41: field 'text' is int, not a string")
    # Found by a spawned worker process, the error reaches the user the same way.
    _refused(tmp_path, path, r"a.jsonl line 41: field 'text' is int, not a string", num_workers=2)


def test_corrupt_compressed_streams(tmp_path):
    good = gzip.compress(_jsonl_bytes(DOCS))
    (tmp_path / "t.jsonl.gz").write_bytes(good[: len(good) // 2])  # truncated download
    _refused(tmp_path, tmp_path / "t.jsonl.gz", r"t.jsonl.gz line \d+: corrupt gzip stream.*fix: re-create or re-download")
    (tmp_path / "t.jsonl.gz").unlink()
    (tmp_path / "g.json.gz").write_bytes(b"this is not gzip at all\n")
    _refused(tmp_path, tmp_path / "g.json.gz", r"g.json.gz line 1: corrupt gzip stream")
    zstandard = pytest.importorskip("zstandard")
    z = bytearray(zstandard.ZstdCompressor().compress(_jsonl_bytes(DOCS)))
    z[len(z) // 2:len(z) // 2 + 16] = b"\xff" * 16
    (tmp_path / "z.jsonl.zst").write_bytes(bytes(z))
    _refused(tmp_path, tmp_path / "z.jsonl.zst", r"z.jsonl.zst line \d+: corrupt zstd stream")


def test_corrupt_parquet_and_missing_column(tmp_path):
    path = _write(tmp_path / "p.parquet", "parquet")
    data = path.read_bytes()
    (tmp_path / "broken.parquet").write_bytes(data[: len(data) // 2])
    _refused(tmp_path, tmp_path / "broken.parquet", r"broken.parquet: is not a readable Parquet file")
    _refused(tmp_path, path, r"p.parquet: has no column 'body' \(columns: \['id', 'text'\]\); fix: set data.text_field",
             text_field="body")


def test_empty_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    _refused(tmp_path, tmp_path / "empty", r"matches no files")
    (tmp_path / "blank.jsonl").write_bytes(_jsonl_bytes(["", ""]))
    _refused(tmp_path, tmp_path / "blank.jsonl", r"holds no documents")
    (tmp_path / "zero.jsonl").write_bytes(b"")
    _refused(tmp_path, tmp_path / "zero.jsonl", r"holds no documents")


def test_unreachable_url(tmp_path):
    pytest.importorskip("aiohttp")
    from cluster.local import free_port

    _refused(tmp_path, f"http://127.0.0.1:{free_port()}/corpus/part-0.jsonl", r"cannot be reached \(ClientConnectorError.*fix: check the URL, the network")


@pytest.mark.parametrize("mixture,match", [
    ([{"name": "a", "source": "x", "weight": -1}], r"data.mixture\[0\].weight=-1: must be a finite number >= 0"),
    ([{"name": "a", "source": "x", "weight": 0}, {"name": "b", "source": "y", "weight": 0}], r"weights sum to zero"),
    ([{"name": "a", "source": "x"}], r"data.mixture\[0\].weight=None: missing"),
    ([{"name": "a", "source": "x", "weight": 1}, {"name": "a", "source": "y", "weight": 1}], r"must be unique"),
    ([{"name": "a", "source": "x", "weight": 1, "color": 2}], r"data.mixture\[0\].color=2: unknown key"),
])
def test_bad_mixtures_are_refused_at_launch(mixture, match):
    with pytest.raises(ConfigError, match=match) as excinfo:
        check_mixture(_cfg("stdlib", "/nonexistent", mixture=mixture))
    assert "\n" not in str(excinfo.value) and "; fix: " in str(excinfo.value)
