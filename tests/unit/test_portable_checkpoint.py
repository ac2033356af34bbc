"""The portable checkpoint format in one process: two "ranks" that each hold a declared half of a
weight (as a tensor-parallel or expert-parallel wrapper declares it) write their files; a whole
model reads them back bitwise, ranged reads fetch only the overlapping blocks, and damaged or
incomplete sources are refused. The engine here is a plain container of a real torch module and a
real AdamW (what portable.py reads from DeepSpeed's engine: module, optimizer, lr_scheduler)."""

from __future__ import annotations

import json
import types

import pytest
import torch
from torch import nn

from orchestrator.checkpoint.export import export
from orchestrator.checkpoint.portable import (ChunkReader, DamagedChunk, apply_local_state, build_index,
                                              read_local_state, read_whole, storage_range_reader, write_rank_file)
from orchestrator.checkpoint.warm_start import SourceError, open_source, read_model_state
from orchestrator.parallel.shards import Piece, declare_storage_order, declare_tensor, slice_along
from orchestrator.storage import Storage

ROWS, COLS = 64, 1024  # 256 KiB: each half (128 KiB) is written as two blocks of 64 KiB


def _engine(model: nn.Module):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.ones(2, model[0].in_features)).sum().backward()
    opt.step()
    return types.SimpleNamespace(module=model, optimizer=opt, lr_scheduler=None)


def _whole() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(COLS, ROWS, bias=False))
    declare_storage_order(model[0], "weight", (1, 0))
    return model


def _half(whole: nn.Sequential, rank: int) -> nn.Sequential:
    """Columns [rank * COLS/2, + COLS/2) of the whole weight, declared as such."""
    half = COLS // 2
    model = nn.Sequential(nn.Linear(half, ROWS, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(whole[0].weight[:, rank * half:(rank + 1) * half])
    declare_tensor(model[0], "weight", (ROWS, COLS), slice_along((ROWS, COLS), 1, rank * half, half))
    declare_storage_order(model[0], "weight", (1, 0))
    return model


def _save_two_ranks(tmp_path, engines) -> dict:
    """Both ranks' files in tmp_path and the manifest's index (the gather both ranks would see)."""
    from orchestrator.checkpoint.portable import local_tensors

    held = [[(lt.key, p.global_offsets) for lt in local_tensors(e) for p in lt.declaration.pieces] for e in engines]
    records = [write_rank_file(e, str(tmp_path), r, lambda _: held) for r, e in enumerate(engines)]
    index = build_index(records)
    (tmp_path / "manifest.json").write_text(json.dumps({"step": 7, "config": {}, "portable": index}))
    return index


def test_halves_written_by_two_ranks_load_whole_bitwise_and_read_only_needed_blocks(tmp_path):
    whole = _whole()
    halves = [_half(whole, r) for r in (0, 1)]
    engines = [_engine(h) for h in halves]
    index = _save_two_ranks(tmp_path, engines)
    chunks = index["tensors"]["model/0.weight"]["chunks"]
    assert len(chunks) == 2 * 2 and all(c["order"] == [1, 0] for c in chunks), chunks  # 2 blocks per half

    target = _engine(_whole())
    reader = ChunkReader(storage_range_reader(Storage(str(tmp_path))))
    values, skipped = read_local_state(target, index, reader)
    apply_local_state(target, values)
    assert not skipped
    expected = torch.cat([h[0].weight for h in halves], dim=1)
    assert torch.equal(target.module[0].weight, expected)
    p = target.module[0].weight
    for key in ("exp_avg", "exp_avg_sq"):
        saved = torch.cat([e.optimizer.state[e.module[0].weight][key] for e in engines], dim=1)
        assert torch.equal(target.optimizer.state[p][key], saved), key
    assert float(target.optimizer.state[p]["step"]) == 1.0

    # A rank that needs a quarter of the columns reads only the block that holds them.
    quarter = ChunkReader(storage_range_reader(Storage(str(tmp_path))))
    from orchestrator.checkpoint.portable import assemble

    got = assemble(index, "model/0.weight", slice_along((ROWS, COLS), 1, 0, COLS // 4), (ROWS, COLS // 4), quarter)
    assert torch.equal(got, expected[:, :COLS // 4])
    assert quarter.bytes_read == ROWS * COLS * 4 // 4


def test_pieces_of_one_local_tensor_map_to_disjoint_global_rows(tmp_path):
    """A tensor-parallel qkv: this rank's rows of q, k and v are three pieces of the global weight."""
    whole = nn.Linear(4, 12, bias=False)
    model = nn.Sequential(whole)
    engine = _engine(model)
    index = _save_two_ranks(tmp_path, [engine])
    local = nn.Sequential(nn.Linear(4, 6, bias=False))  # rows 2..3 of each of q, k, v (width 2 of 4)
    declare_tensor(local[0], "weight", (12, 4), [Piece((j * 2, 0), (j * 4 + 2, 0), (2, 4)) for j in range(3)])
    target = _engine(local)
    values, _ = read_local_state(target, index, ChunkReader(storage_range_reader(Storage(str(tmp_path)))))
    apply_local_state(target, values)
    rows = [2, 3, 6, 7, 10, 11]
    assert torch.equal(local[0].weight, whole.weight[rows])


def test_damaged_chunk_and_incomplete_export_are_refused(tmp_path):
    engine = _engine(_whole())
    step = tmp_path / "step_00000007"
    step.mkdir()
    index = _save_two_ranks(step, [engine])
    out = tmp_path / "export"
    export(str(step), str(out), max_shard_bytes=1 << 20, log=lambda m: None)
    config, state, got_step = read_model_state(str(out))
    assert got_step == 7 and torch.equal(state["0.weight"], engine.module[0].weight)
    _, from_dir, _ = read_model_state(str(tmp_path))  # the checkpoint dir: its newest step
    assert torch.equal(from_dir["0.weight"], state["0.weight"])

    meta = json.loads((out / "model.safetensors.index.json").read_text())
    meta["weight_map"]["1.weight"] = meta["weight_map"]["0.weight"]  # listed, but in no file
    (out / "model.safetensors.index.json").write_text(json.dumps(meta))
    with pytest.raises(SourceError, match="1.weight"):
        open_source(str(out))

    chunk = index["tensors"]["model/0.weight"]["chunks"][0]
    path = step / chunk["file"]
    data = bytearray(path.read_bytes())
    data[chunk["begin"]] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedChunk, match="SHA-256"):
        read_whole(index, "model/0.weight", ChunkReader(storage_range_reader(Storage(str(step)))))


def test_rank_files_are_standard_safetensors_written_block_by_block(tmp_path):
    """write_rank_file streams its blocks (no whole-state copy); the file is still one that
    safetensors itself opens, each entry holding exactly the bytes the index points at."""
    from safetensors import safe_open

    whole = _engine(_whole())
    index = _save_two_ranks(tmp_path, [whole])
    chunks = [c for entry in index["tensors"].values() for c in entry["chunks"]]
    assert len(chunks) > 3  # the weight and its two moments in blocks, and the step counts
    data = (tmp_path / chunks[0]["file"]).read_bytes()
    import hashlib

    with safe_open(str(tmp_path / chunks[0]["file"]), framework="pt") as f:
        stored = [f.get_tensor(name).contiguous() for name in f.keys()]
    digests = sorted(hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest() for t in stored)
    assert digests == sorted(c["sha256"] for c in chunks)  # safetensors sees what the index points at
    weight = whole.module[0].weight.detach()
    assert torch.equal(read_whole(index, "model/0.weight", ChunkReader(lambda n, b, e: data[b:e])), weight)
