"""Readers: one work unit (orchestrator/data/sources.py) -> its documents, streamed.

Each reader yields `(name, text)`: `name` is the file's relative path for a plain-text document
(its split is chosen by that name, as before records existed) and None for a record (JSON Lines,
Parquet, dataset row), whose split is chosen by its text. Nothing holds more than one batch of
records; bad input raises DataError naming the file and the line or row.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from typing import Iterator

from orchestrator.data.sources import DataError, SourceFile, Unit

_ROWS_PER_BATCH = 1024  # Parquet / dataset rows decoded at once
Document = tuple[str | None, str | None]  # (name, text); text None: a binary file, skipped


def read_unit(unit: Unit, fs, text_field: str, stats: dict) -> Iterator[Document]:
    for f in unit.files:
        if f.format == "text":
            yield from _read_text(f, fs, stats)
        elif f.format == "jsonl":
            yield from _read_jsonl(f, fs, text_field, unit.start, unit.end)
        elif f.format == "parquet":
            yield from _read_parquet(f, fs, text_field)
        elif f.format == "hf_dataset":
            yield from _read_dataset(f, text_field, unit.start, unit.end)
        else:  # pragma: no cover - sources.py only makes the formats above
            raise AssertionError(f.format)


def _read_text(f: SourceFile, fs, stats: dict) -> Iterator[Document]:
    raw = fs.cat_file(f.path)
    if b"\x00" in raw:  # binary (image, archive, .pyc): would only feed the model noise
        stats["binary_skipped"].append(f.rel)
        yield f.rel, None
        return
    try:
        yield f.rel, raw.decode("utf-8")
    except UnicodeDecodeError:
        stats["decoded_with_replacement"] += 1
        yield f.rel, raw.decode("utf-8", errors="replace")


def _open_stream(f: SourceFile, fs):
    raw = fs.open(f.path, "rb")
    if f.compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if f.compression == "zstd":
        try:
            import zstandard
        except ImportError:
            raise DataError(f.rel, "", "is zstd-compressed and the 'zstandard' package is not installed",
                            "pip install zstandard (peer-lab's zstd extra), or decompress the file") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
    return raw


def _decompress_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [gzip.BadGzipFile, EOFError, zlib.error]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def _read_jsonl(f: SourceFile, fs, text_field: str, start: int, end: int | None) -> Iterator[Document]:
    fix_json = f"make every line of {f.rel} one JSON object with a string field {text_field!r}"
    stream = _open_stream(f, fs)
    line_no = 0  # within this unit; turned into the file's line number only when reporting
    try:
        if start:
            stream.seek(start - 1)
            stream.readline()  # the line that holds byte start-1 belongs to the previous unit
        pos = first = stream.tell() if start else 0
        while end is None or pos < end:
            try:
                line = stream.readline()
            except _decompress_errors() as e:
                raise DataError(f.rel, f"line {line_no + 1}",
                                f"corrupt {f.compression} stream ({type(e).__name__}: {e})",
                                f"re-create or re-download {f.rel}") from None
            if not line:
                break
            pos += len(line)
            line_no += 1
            if not line.strip():
                continue  # blank lines separate nothing in JSON Lines
            try:
                text_line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f.rel, _line(f, fs, first, line_no),
                                f"is not valid UTF-8 (byte {e.start} of the line)",
                                f"re-encode {f.rel} as UTF-8") from None
            try:
                record = json.loads(text_line)
            except json.JSONDecodeError as e:
                raise DataError(f.rel, _line(f, fs, first, line_no), f"is not JSON ({e.msg})", fix_json) from None
            if not isinstance(record, dict) or text_field not in record:
                found = sorted(record)[:5] if isinstance(record, dict) else type(record).__name__
                raise DataError(f.rel, _line(f, fs, first, line_no), f"has no field {text_field!r} (found {found})",
                                f"set data.text_field to the field that holds the text, or {fix_json}")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f.rel, _line(f, fs, first, line_no),
                                f"field {text_field!r} is {type(text).__name__}, not a string", fix_json)
            yield None, text
    finally:
        stream.close()


def _line(f: SourceFile, fs, start: int, line_in_unit: int) -> str:
    """'line N' of the whole file, the unit's first line starting at byte `start`: count the lines
    before it (only when reporting an error)."""
    before = 0
    if start:
        with fs.open(f.path, "rb") as raw:
            remaining = start
            while remaining > 0:
                block = raw.read(min(remaining, 1 << 20))
                if not block:
                    break
                before += block.count(b"\n")
                remaining -= len(block)
    return f"line {before + line_in_unit}"


def _read_parquet(f: SourceFile, fs, text_field: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open(f.path, "rb") as raw:
        try:
            pf = pq.ParquetFile(raw)
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
            raise DataError(f.rel, "", f"is not a readable Parquet file ({e})", f"re-create or re-download {f.rel}") from None
        names = pf.schema_arrow.names
        if text_field not in names:
            raise DataError(f.rel, "", f"has no column {text_field!r} (columns: {names[:8]})",
                            "set data.text_field to the column that holds the text")
        column_type = pf.schema_arrow.field(text_field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise DataError(f.rel, "", f"column {text_field!r} is {column_type}, not a string column",
                            "set data.text_field to the column that holds the text")
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=_ROWS_PER_BATCH, columns=[text_field]):
                for text in batch.column(0).to_pylist():
                    row += 1
                    if text is None:
                        raise DataError(f.rel, f"row {row}", f"column {text_field!r} is null",
                                        "drop null rows, or fill them with text")
                    yield None, text
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
            raise DataError(f.rel, f"row {row + 1}", f"cannot be decoded ({e})", f"re-create or re-download {f.rel}") from None


def dataset_rows(f: SourceFile) -> tuple[int, int]:
    ds = _load_dataset(f)
    return len(ds), int(ds.data.nbytes)


def _load_dataset(f: SourceFile):
    try:
        import datasets
    except ImportError:
        raise DataError(f.rel, "", "is a Hugging Face dataset folder and the 'datasets' package is not installed",
                        "pip install datasets (peer-lab's datasets extra)") from None
    try:
        return datasets.load_from_disk(f.path)
    except Exception as e:  # noqa: BLE001  the library raises many types for damaged folders
        raise DataError(f.rel, "", f"cannot be loaded with datasets.load_from_disk ({type(e).__name__}: {e})",
                        "re-save it with Dataset.save_to_disk, or point the source elsewhere") from None


def _read_dataset(f: SourceFile, text_field: str, start: int, end: int | None) -> Iterator[Document]:
    ds = _load_dataset(f)
    if text_field not in ds.column_names:
        raise DataError(f.rel, "", f"has no column {text_field!r} (columns: {ds.column_names[:8]})",
                        "set data.text_field to the column that holds the text")
    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    end = len(ds) if end is None else end
    column = table.column(text_field)
    for first in range(start, end, _ROWS_PER_BATCH):
        # Zero-copy slices of the memory-mapped Arrow file: only this batch becomes Python strings.
        for i, text in enumerate(column.slice(first, min(_ROWS_PER_BATCH, end - first)).to_pylist()):
            if not isinstance(text, str):
                raise DataError(f.rel, f"row {first + i + 1}", f"column {text_field!r} is {type(text).__name__}, not a string",
                                "drop or fill rows without text")
            yield None, text
