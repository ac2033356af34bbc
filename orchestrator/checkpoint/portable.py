"""The layout-free part of a checkpoint: every tensor as pieces with global coordinates.

Each rank writes one safetensors file, `state_rank_<r>.safetensors`, holding the pieces of the
model (fp32 master weights and persistent buffers) and of the optimizer (AdamW's exp_avg,
exp_avg_sq and step per parameter) that it holds and that no lower rank holds too (a replicated
tensor is written once). The manifest's `portable` entry indexes them:

    tensors: {"model/<name>": {"shape": [...], "dtype": "F32",
                               "chunks": [{"file", "offsets", "sizes", "begin", "end", "sha256"}]}}

`<name>` is the tensor's name in the single-process model (orchestrator/parallel/shards.py says
how each wrapper's tensors map there), `offsets`/`sizes` the chunk's box in the global tensor,
`begin`/`end` its bytes in the file. A reader under any layout takes, for each box it needs, the
chunks that overlap it, and reads only their bytes (one ranged read each, locally or through
fsspec), checking each chunk's SHA-256. safetensors holds raw numbers and a JSON header: loading
runs no code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

from orchestrator.parallel.shards import Piece, TensorDeclaration, declarations, local_view
from orchestrator.row_sparse_adamw import ROW_STATE_KEYS  # optim.expert_tables=row_sparse

PORTABLE_VERSION = 1
OPTIMIZER_KEYS = ("exp_avg", "exp_avg_sq")
_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16", torch.float16: "F16",
           torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
_TORCH_DTYPES = {v: k for k, v in _DTYPES.items()}


def portable_file(rank: int) -> str:
    return f"state_rank_{rank:05d}.safetensors"


class DamagedChunk(Exception):
    """A chunk's bytes are missing or differ from the index (size or SHA-256)."""


# ----------------------------------------------------------------------------- what a rank holds


@dataclass
class LocalTensor:
    key: str                 # "model/<global name>", "exp_avg/<global name>", ...
    tensor: Optional[torch.Tensor]
    declaration: TensorDeclaration
    param: Optional[torch.nn.Parameter] = None
    state_key: Optional[str] = None  # optimizer state key, None for model tensors
    shape: tuple = ()                # the local tensor's shape


def _zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else 0


def _base_optimizer(engine):
    """The torch optimizer holding the moments: DeepSpeed's ZeRO optimizer wraps it."""
    opt = engine.optimizer
    return opt.optimizer if _zero_stage(engine) > 0 else opt


def local_tensors(engine, with_values: bool = True) -> list[LocalTensor]:
    """Every tensor of this rank's model and optimizer with its declaration, in an order that is
    the same on every rank of a group (ZeRO's full-state gathers are collective over them).
    with_values=False: no gathers, only the list (for loading)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    module = engine.module
    decls = declarations(module)
    zero = _zero_stage(engine)
    if zero > 0 and with_values:
        from compat import zero_init_optimizer_states

        zero_init_optimizer_states(engine.optimizer)  # links every group's state (see there)
    out: list[LocalTensor] = []
    names_of: dict[int, list[str]] = {}
    for local_name, t in module.state_dict(keep_vars=True).items():
        decl = decls[local_name]
        value = None
        if with_values:
            value = t.detach()
            if zero > 0 and isinstance(t, torch.nn.Parameter):
                full = safe_get_full_fp32_param(t)  # fp32 master (ZeRO 1/2 keep it apart)
                value = full.detach() if full is not None else value
        out.append(LocalTensor(f"model/{decl.name}", value, decl, t if isinstance(t, torch.nn.Parameter) else None,
                               shape=tuple(t.shape)))
        if isinstance(t, torch.nn.Parameter):
            names_of.setdefault(id(t), []).append(local_name)
    base = _base_optimizer(engine)
    seen: set[int] = set()
    groups = [g["params"] for g in engine.optimizer.param_groups] if zero == 0 else _zero_param_groups(engine)
    for group in groups:
        for p in group:
            if id(p) in seen or id(p) not in names_of:
                continue
            seen.add(id(p))
            decl = decls[names_of[id(p)][0]]
            for key in OPTIMIZER_KEYS:
                value = None
                if with_values:
                    if zero > 0:
                        value = safe_get_full_optimizer_state(p, key)
                    elif p in base.state and key in base.state[p]:
                        value = base.state[p][key].detach()
                    if value is None:
                        continue  # no step taken yet
                out.append(LocalTensor(f"{key}/{decl.name}", value, decl, p, key, shape=tuple(p.shape)))
            # Per-row state (optim.expert_tables=row_sparse: row_step [N]), declared as the rows of
            # the table: every rank holding a column slice holds all rows, the same values.
            for key in getattr(base, "per_row_state_keys", lambda _: ())(p):
                value = base.state[p][key].detach() if with_values and key in base.state.get(p, {}) else None
                if with_values and value is None:
                    continue  # no step taken yet
                out.append(LocalTensor(f"{key}/{decl.name}", value, _rows_of(decl), p, key, shape=tuple(p.shape[:1])))
            step = _step_of(engine, p) if with_values else None
            if not with_values or step is not None:
                out.append(LocalTensor(f"step/{decl.name}", step, TensorDeclaration(decl.name, (), (Piece((), (), ()),)),
                                       p, "step"))
    return out


def _rows_of(decl: TensorDeclaration) -> TensorDeclaration:
    """The declaration of a per-row vector of a table declared by `decl`: its pieces' dim 0."""
    pieces = {(p.local_offsets[0], p.global_offsets[0], p.sizes[0]) for p in decl.pieces}
    return TensorDeclaration(decl.name, decl.global_shape[:1],
                             tuple(Piece((lo,), (go,), (size,)) for lo, go, size in sorted(pieces)))


def _zero_param_groups(engine) -> list[list]:
    from compat import zero_param_groups

    return zero_param_groups(engine.optimizer)


def _step_of(engine, p) -> Optional[torch.Tensor]:
    base = _base_optimizer(engine)
    if _zero_stage(engine) > 0:
        steps = [s["step"] for s in base.state.values() if "step" in s]
        return torch.as_tensor(steps[0], dtype=torch.float32).reshape(()) if steps else None
    state = base.state.get(p, {})
    return torch.as_tensor(state["step"], dtype=torch.float32).reshape(()).clone() if "step" in state else None


# ----------------------------------------------------------------------------- writing


def write_rank_file(engine, directory: str, rank: int, gather: Callable) -> list[dict]:
    """Collective. Write this rank's pieces that no lower rank holds; returns their chunk records
    (rank 0 assembles the index from every rank's). `gather` all-gathers a picklable object."""
    held = local_tensors(engine)
    mine = [(lt.key, p.global_offsets) for lt in held for p in lt.declaration.pieces]
    everyone = gather(mine)
    first_holder: dict = {}
    for r, items in enumerate(everyone):
        for item in items:
            first_holder.setdefault((item[0], tuple(item[1])), r)
    held = _with_pooled_batchnorm_statistics(held, gather)
    blocks: list[tuple[str, torch.Tensor, tuple]] = []  # (entry name, block view, order)
    records: list[dict] = []
    for lt in held:
        order = lt.declaration.storage_order
        for i, piece in enumerate(lt.declaration.pieces):
            if first_holder[(lt.key, piece.global_offsets)] != rank:
                continue
            for j, (block, offsets) in enumerate(_blocks(local_view(lt.tensor, piece), piece.global_offsets, order)):
                name = f"{lt.key}#{i}.{j}"
                blocks.append((name, block, order))
                records.append({"key": lt.key, "shape": list(lt.declaration.global_shape), "dtype": _DTYPES[block.dtype],
                                "offsets": list(offsets), "sizes": list(block.shape),
                                "order": list(order) if order else None})
    spans, digests = write_safetensors_streaming(os.path.join(directory, portable_file(rank)), blocks)
    for rec, (name, _, _) in zip(records, blocks):
        rec["file"] = portable_file(rank)
        rec["begin"], rec["end"] = spans[name]
        rec["sha256"] = digests[name]
    return records


def write_safetensors_streaming(path: str, blocks: list[tuple[str, torch.Tensor, tuple]]):
    """Write `blocks` (name, tensor view, storage order) as one safetensors file, one block at a
    time: the header first (every block's dtype, stored shape and byte range are known from the
    views), then each block's bytes. A save then holds at most one block's copy (when a block
    must be made contiguous or moved off the GPU), where building the dict that
    safetensors.torch.save_file takes would copy the rank's whole state (and that function refuses
    views of one tensor: they share memory). Returns {name: (begin, end)} absolute byte ranges and
    {name: sha256 of those bytes}. The file is standard safetensors: safetensors.safe_open reads it."""
    header: dict = {}
    offset = 0
    for name, block, order in blocks:
        stored = [block.shape[d] for d in order] if order else list(block.shape)
        size = block.numel() * block.element_size()
        header[name] = {"dtype": _DTYPES[block.dtype], "shape": stored, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    base = 8 + len(text)
    spans, digests = {}, {}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, block, order in blocks:
            data = (block.permute(order) if order else block).contiguous().cpu()
            raw = data.reshape(-1).view(torch.uint8).numpy() if data.numel() else b""
            f.write(raw)
            begin, end = header[name]["data_offsets"]
            spans[name] = (base + begin, base + end)
            digests[name] = hashlib.sha256(raw).hexdigest()
    return spans, digests


def pool_batchnorm_statistics(rank_buffers: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One set of BatchNorm running statistics from several data-parallel ranks' own: mean of the
    means; mean of the variances plus the variance of the means (population, so that identical
    ranks give back their own statistics exactly). That is the variance of the union of the ranks'
    batches: what one process seeing the whole global batch would have tracked. Other buffers
    (num_batches_tracked) are the same on every rank: the first rank's."""
    if not rank_buffers or not rank_buffers[0]:
        return {}
    pooled: dict[str, torch.Tensor] = {}
    for name, first in rank_buffers[0].items():
        stacked = torch.stack([b[name] for b in rank_buffers if name in b])
        if name.endswith("running_mean"):
            pooled[name] = stacked.double().mean(0).to(first.dtype)
        elif name.endswith("running_var"):
            means = torch.stack([b[name[:-len("running_var")] + "running_mean"] for b in rank_buffers]).double()
            spread = means.var(0, unbiased=False) if len(rank_buffers) > 1 else torch.zeros_like(means[0])
            pooled[name] = (stacked.double().mean(0) + spread).to(first.dtype)
        else:
            pooled[name] = first
    return pooled


_BATCHNORM_STATISTICS = (".running_mean", ".running_var")


def _with_pooled_batchnorm_statistics(held: list[LocalTensor], gather: Callable) -> list[LocalTensor]:
    """Collective. BatchNorm running statistics are per rank (each data-parallel rank tracks its
    own batches; its rank file keeps them for an exact same-layout resume). The layout-free state
    holds one copy of each, so it holds them pooled over every rank that holds the same tensor
    (pool_batchnorm_statistics): a resume under another layout, an export and evaluation then
    start from the statistics of the whole global batch, not from rank 0's. Ranks that saw the
    same data (tensor-parallel peers, one rank) pool to their own values exactly."""
    def is_statistic(lt: LocalTensor) -> bool:
        return lt.param is None and lt.key.startswith("model/") and lt.key.endswith(_BATCHNORM_STATISTICS)

    mine = {lt.key: (tuple(p.global_offsets for p in lt.declaration.pieces), lt.tensor.cpu())
            for lt in held if is_statistic(lt)}
    everyone = gather(mine)  # every rank takes part, holding statistics or not
    if not mine:
        return held
    where = {key: offsets for key, (offsets, _) in mine.items()}
    # The same tensors at the same global offsets: replicas of one module's statistics.
    holders = [{key: t for key, (_, t) in r.items()} for r in everyone
               if r and {key: offsets for key, (offsets, _) in r.items()} == where]
    if len(holders) < 2:
        return held
    pooled = pool_batchnorm_statistics(holders)
    return [dataclasses.replace(lt, tensor=pooled[lt.key].to(lt.tensor.device)) if lt.key in pooled else lt
            for lt in held]


# A piece is written as up to MAX_BLOCKS blocks along its outermost stored dim (at least
# MIN_BLOCK_BYTES each), so that a reader under another layout that needs part of it reads the
# blocks that overlap its part, not the whole piece: a 1024^2 x 1024 PEER table held whole (4 GiB)
# becomes 64 blocks of 16 columns, and each of 8 expert-parallel ranks reads its 8 blocks.
MAX_BLOCKS = 64
MIN_BLOCK_BYTES = 1 << 16


def _blocks(view: torch.Tensor, global_offsets, order):
    """(block, its global offsets) along the piece's outermost stored dim."""
    if view.dim() == 0:
        yield view, tuple(global_offsets)
        return
    dim = order[0] if order else 0
    size = view.shape[dim]
    count = max(1, min(MAX_BLOCKS, size, view.numel() * view.element_size() // MIN_BLOCK_BYTES))
    step = -(-size // count)
    for start in range(0, size, step):
        width = min(step, size - start)
        offsets = list(global_offsets)
        offsets[dim] += start
        yield view.narrow(dim, start, width), tuple(offsets)


def build_index(per_rank_records: Iterable[list[dict]]) -> dict:
    tensors: dict[str, dict] = {}
    for records in per_rank_records:
        for rec in records:
            entry = tensors.setdefault(rec["key"], {"shape": rec["shape"], "dtype": rec["dtype"], "chunks": []})
            entry["chunks"].append({k: rec[k] for k in ("file", "offsets", "sizes", "order", "begin", "end", "sha256")})
    return {"version": PORTABLE_VERSION, "tensors": tensors}


# ----------------------------------------------------------------------------- reading


@dataclass
class ChunkReader:
    """Reads chunks of one step directory by byte range and checks them; counts what it read."""
    read_range: Callable[[str, int, int], bytes]  # (file, begin, end) -> bytes
    bytes_read: int = 0
    files: set = field(default_factory=set)

    def read(self, chunk: dict, dtype: str) -> torch.Tensor:
        try:
            data = self.read_range(chunk["file"], chunk["begin"], chunk["end"])
        except (OSError, FileNotFoundError) as exc:
            raise DamagedChunk(f"{chunk['file']}: {type(exc).__name__}: {exc}") from None
        self.bytes_read += len(data)
        self.files.add(chunk["file"])
        if len(data) != chunk["end"] - chunk["begin"]:
            raise DamagedChunk(f"{chunk['file']}: {len(data)} bytes at {chunk['begin']}, index says "
                               f"{chunk['end'] - chunk['begin']}")
        if chunk.get("sha256") and hashlib.sha256(data).hexdigest() != chunk["sha256"]:
            raise DamagedChunk(f"{chunk['file']}: bytes {chunk['begin']}-{chunk['end']} differ from their SHA-256")
        t = torch.frombuffer(bytearray(data), dtype=_TORCH_DTYPES[dtype]) if data else torch.empty(0, dtype=_TORCH_DTYPES[dtype])
        order = chunk.get("order")
        if not order:
            return t.reshape(chunk["sizes"])
        stored = t.reshape([chunk["sizes"][d] for d in order])
        inverse = [order.index(d) for d in range(len(order))]
        return stored.permute(inverse)  # back to the tensor's own dims (a view)


def storage_range_reader(storage, tag: Optional[str] = None) -> Callable[[str, int, int], bytes]:
    """(file, begin, end) -> those bytes of <storage>/<tag>/<file>: a seek locally, one ranged GET
    (fsspec cat_file with start/end) remotely."""
    def where(name: str) -> str:
        return storage.path(tag, name) if tag else storage.path(name)

    if storage.local:
        def read(name: str, begin: int, end: int) -> bytes:
            with open(where(name), "rb") as f:
                f.seek(begin)
                return f.read(end - begin)
    else:
        def read(name: str, begin: int, end: int) -> bytes:
            return storage.fs.cat_file(where(name), start=begin, end=end)
    return read


class MissingTensor(Exception):
    pass


def assemble(index: dict, key: str, pieces: Iterable[Piece], local_shape, reader: ChunkReader) -> torch.Tensor:
    """A tensor of local_shape whose pieces are filled from the chunks that overlap them."""
    entry = index["tensors"].get(key)
    if entry is None:
        raise MissingTensor(key)
    out = torch.empty(tuple(local_shape), dtype=_TORCH_DTYPES[entry["dtype"]])
    cache: dict = {}
    for piece in pieces:
        target = local_view(out, piece)
        covered = 0
        for chunk in entry["chunks"]:
            lo = [max(a, b) for a, b in zip(piece.global_offsets, chunk["offsets"])]
            hi = [min(a + s, b + t) for a, s, b, t in zip(piece.global_offsets, piece.sizes, chunk["offsets"], chunk["sizes"])]
            if any(l >= h for l, h in zip(lo, hi)):
                continue
            where = (chunk["file"], chunk["begin"])
            if where not in cache:
                cache[where] = reader.read(chunk, entry["dtype"])
            src, dst = cache[where], target
            for dim, (l, h) in enumerate(zip(lo, hi)):
                src = src.narrow(dim, l - chunk["offsets"][dim], h - l)
                dst = dst.narrow(dim, l - piece.global_offsets[dim], h - l)
            dst.copy_(src)
            covered += dst.numel()
        if covered != target.numel():
            raise DamagedChunk(f"{key}: the index covers {covered} of the {target.numel()} numbers needed")
    return out


def whole_pieces(shape) -> tuple[Piece]:
    shape = tuple(shape)
    return (Piece((0,) * len(shape), (0,) * len(shape), shape),)


def read_whole(index: dict, key: str, reader: ChunkReader) -> torch.Tensor:
    shape = index["tensors"][key]["shape"]
    return assemble(index, key, whole_pieces(shape), shape, reader)


# ----------------------------------------------------------------------------- applying


class ShapeMismatch(Exception):
    pass


def read_local_state(engine, index: dict, reader: ChunkReader, want_optimizer: bool = True,
                     strict: bool = True) -> tuple[list[tuple[LocalTensor, torch.Tensor]], list[str]]:
    """(tensor, value) for every tensor this rank needs, read from the index; and the keys left
    out: missing from the index or of another shape (only with strict=False; strict raises
    MissingTensor or ShapeMismatch). Every shape is checked before any byte is read."""
    wanted, skipped = [], []
    for lt in local_tensors(engine, with_values=False):
        if lt.state_key is not None and not want_optimizer:
            continue
        entry = index["tensors"].get(lt.key)
        problem = None
        if entry is None and lt.state_key in ROW_STATE_KEYS:
            continue  # a dense AdamW's state (warm start): the row optimizer counts every row from `step`
        if entry is None:
            problem = MissingTensor(lt.key)
        elif tuple(entry["shape"]) != tuple(lt.declaration.global_shape):
            problem = ShapeMismatch(f"{lt.key}: the source holds {tuple(entry['shape'])}, this model "
                                    f"{tuple(lt.declaration.global_shape)}")
        if problem is not None:
            if strict:
                raise problem
            skipped.append(lt.key if entry is None else f"{lt.key} {tuple(entry['shape'])} -> "
                                                        f"{tuple(lt.declaration.global_shape)}")
            continue
        wanted.append(lt)
    return [(lt, assemble(index, lt.key, lt.declaration.pieces, lt.shape, reader)) for lt in wanted], skipped


def apply_local_state(engine, values: list[tuple[LocalTensor, torch.Tensor]]) -> None:
    """Write what read_local_state returned into the model and optimizer of this rank (collective
    under ZeRO: its setters are per parameter, in the same order on every rank)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero = _zero_stage(engine)
    base = _base_optimizer(engine)
    state_dict = engine.module.state_dict(keep_vars=True)
    decls = declarations(engine.module)
    by_key: dict[str, list] = {}
    for name, t in state_dict.items():
        by_key.setdefault(f"model/{decls[name].name}", []).append(t)
    steps = []
    if zero > 0 and any(lt.state_key is not None for lt, _ in values):
        from compat import zero_init_optimizer_states

        zero_init_optimizer_states(engine.optimizer)  # a fresh engine has no optimizer state yet
    with torch.no_grad():
        for lt, value in values:
            if lt.state_key is None:
                for t in by_key[lt.key]:
                    t.copy_(value.to(t.device, t.dtype))
                    if zero > 0 and isinstance(t, torch.nn.Parameter):
                        safe_set_full_fp32_param(t, value.to(t.device))
            elif lt.state_key == "step":
                steps.append((lt.param, value))
            elif zero > 0:
                safe_set_full_optimizer_state(lt.param, value.to(lt.param.device), lt.state_key)
            else:
                base.state.setdefault(lt.param, {})[lt.state_key] = value.to(lt.param.device).clone()
        for p, value in steps:
            if zero > 0:
                for s in base.state.values():
                    if "step" in s:
                        s["step"] = value.clone() if torch.is_tensor(s["step"]) else int(value)
            elif p in base.state:
                base.state[p]["step"] = value.clone()
