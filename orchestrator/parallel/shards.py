"""What each tensor a rank holds is, in the single-process model: its name there, its global shape,
and which part of it this rank holds. Parallel wrappers declare it when they split or rename
something; checkpoints (orchestrator/checkpoint/) read only these declarations, so saving, loading
under another layout and exporting never need to know the layouts.

Two kinds of declaration, both made by the module that does the splitting or renaming:

- `declare_tensor(module, name, global_shape, pieces)`: the module's own tensor `name` holds
  `pieces` of a tensor of `global_shape`. A piece is a box: `sizes` numbers starting at
  `local_offsets` in the local tensor and at `global_offsets` in the global one. Most shards are one
  piece (a column slice of a PEER table, a row slice of a tensor-parallel MLP); a tensor-parallel
  qkv weight is three (this rank's heads of q, of k and of v).
- `declare_child_names(module, {local child name: global child name})`: a pipeline stage's layer
  `3` is the model's `blocks.2`; a rank's local MoE expert `0` is global expert `ep_rank * L`.
  An empty global name means the child's tensors sit directly under the parent's global name.

Anything undeclared is what the single-process model holds, whole, under the same name.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass(frozen=True)
class Piece:
    local_offsets: tuple[int, ...]
    global_offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class TensorDeclaration:
    """One local tensor: the global tensor's name and shape, and the pieces of it held here."""
    name: str
    global_shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    storage_order: Optional[tuple[int, ...]] = None  # dims outermost first in files; None: as is

    @property
    def whole(self) -> bool:
        return len(self.pieces) == 1 and self.pieces[0].sizes == self.global_shape


_TENSORS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_CHILD_NAMES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_ORDERS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def declare_tensor(module: nn.Module, name: str, global_shape, pieces) -> None:
    _TENSORS.setdefault(module, {})[name] = (tuple(global_shape), tuple(pieces))


def declare_child_names(module: nn.Module, names: dict[str, str]) -> None:
    _CHILD_NAMES.setdefault(module, {}).update(names)


def declare_storage_order(module: nn.Module, name: str, order: tuple[int, ...]) -> None:
    """Checkpoints store the module's tensor `name` with dims permuted to `order` (outermost
    first), so that the dim layouts split it along is outermost: a rank's slice along it is then
    a contiguous byte range of the file, read with one ranged read. Declared alike in every
    layout (it is a property of the tensor, not of a layout)."""
    _ORDERS.setdefault(module, {})[name] = tuple(order)


def slice_along(global_shape, dim: int, start: int, size: int) -> tuple[Piece]:
    """The one piece of a tensor split along `dim`: numbers [start, start + size) of that dim."""
    sizes = list(global_shape)
    sizes[dim] = size
    offsets = [0] * len(global_shape)
    offsets[dim] = start
    return (Piece(tuple([0] * len(global_shape)), tuple(offsets), tuple(sizes)),)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def declarations(root: nn.Module) -> dict[str, TensorDeclaration]:
    """local name (as in root.state_dict()) -> declaration, for every parameter and persistent
    buffer of root."""
    out: dict[str, TensorDeclaration] = {}

    def visit(module: nn.Module, local_prefix: str, global_prefix: str) -> None:
        declared = _TENSORS.get(module, {})
        tensors = list(module._parameters.items()) + [
            (n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set]
        for name, tensor in tensors:
            if tensor is None:
                continue
            local = _join(local_prefix, name)
            global_name = _join(global_prefix, name)
            if name in declared:
                shape, pieces = declared[name]
            else:
                shape = tuple(tensor.shape)
                pieces = (Piece((0,) * tensor.dim(), (0,) * tensor.dim(), shape),)
            out[local] = TensorDeclaration(global_name, shape, pieces, _ORDERS.get(module, {}).get(name))
        renames = _CHILD_NAMES.get(module, {})
        for child_name, child in module._modules.items():
            if child is None:
                continue
            visit(child, _join(local_prefix, child_name), _join(global_prefix, renames.get(child_name, child_name)))

    visit(root, "", "")
    return out


def local_view(tensor: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The part of a local tensor that `piece` describes (a view: writes go to the tensor)."""
    view = tensor
    for dim, (start, size) in enumerate(zip(piece.local_offsets, piece.sizes)):
        view = view.narrow(dim, start, size)
    return view
