"""A split's tokens as one virtual array over its memory-mapped shards.

Index i of the split is token i of the shards laid end to end in index order, so a window may
start in one shard and end in the next; reading a window touches only the pages it covers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class ShardedTokens:
    def __init__(self, shards: list[tuple[Path, int]], dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        self._paths = [Path(p) for p, n in shards if n > 0]
        sizes = [n for _, n in shards if n > 0]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]) if sizes else np.zeros(1, np.int64)
        self._maps: list[np.memmap | None] = [None] * len(self._paths)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_shards(self) -> int:
        return len(self._paths)

    def _shard(self, i: int) -> np.memmap:
        if self._maps[i] is None:  # opened on first use: a rank maps only what it reads
            n = int(self._starts[i + 1] - self._starts[i])
            self._maps[i] = np.memmap(self._paths[i], dtype=self.dtype, mode="r", shape=(n,))
        return self._maps[i]

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            return self.take(np.arange(start, stop, step, dtype=np.int64))
        if isinstance(index, (int, np.integer)):
            i = int(index) + (len(self) if index < 0 else 0)
            return self.take(np.array([i]))[0]
        return self.take(np.asarray(index))

    def take(self, index: np.ndarray) -> np.ndarray:
        """Tokens at the global positions `index` (any shape), as this split's dtype."""
        flat = np.asarray(index, dtype=np.int64).ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"token index out of range [0, {len(self)})")
        out = np.empty(flat.shape, dtype=self.dtype)
        if len(self._paths) == 1:
            out[:] = self._shard(0)[flat]
            return out.reshape(np.shape(index))
        shard_of = np.searchsorted(self._starts, flat, side="right") - 1
        for s in np.unique(shard_of):
            mask = shard_of == s
            out[mask] = self._shard(int(s))[flat[mask] - self._starts[s]]
        return out.reshape(np.shape(index))

    def __array__(self, dtype=None, copy=None):
        whole = np.concatenate([self._shard(i) for i in range(len(self._paths))]) if self._paths \
            else np.empty(0, self.dtype)
        return whole.astype(dtype) if dtype is not None else whole

    def tolist(self) -> list[int]:
        return np.asarray(self).tolist()

    def tobytes(self) -> bytes:
        return np.asarray(self).tobytes()
