"""A source's token stream as a read-only array whose shards are loaded (and verified) on first touch.

The engine slices ``tokens[a:b]``; a slice inside one shard is a view of its resident copy or a checked read,
one that crosses shards is a small concatenation. Nothing is read at open, so opening costs O(1) in the
corpus size; ``np.asarray(tokens)`` still works (it loads every shard) for small sources and tests.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import numpy as np


class ShardedTokens:
    """Shard ``k`` holds tokens ``[shard_offsets[k], shard_offsets[k + 1])``, loaded by ``load(k)``."""

    def __init__(self, shard_offsets: np.ndarray, dtype: np.dtype, load: Callable[[int], np.ndarray]) -> None:
        self.shard_offsets = np.asarray(shard_offsets, dtype=np.int64)
        self.dtype = np.dtype(dtype)
        self._load = load
        self.size = int(self.shard_offsets[-1])
        self.shape = (self.size,)
        self.ndim = 1

    def __len__(self) -> int:
        return self.size

    def shard(self, k: int) -> np.ndarray:
        """Shard ``k``'s tokens (verified); raises ``MixerError`` naming the file if it cannot be had."""
        return self._load(k)

    def shards_for(self, start: int, stop: int) -> range:
        """Indices of the shards holding tokens ``[start, stop)``."""
        if stop <= start:
            return range(0)
        first = int(np.searchsorted(self.shard_offsets, start, side="right")) - 1
        last = int(np.searchsorted(self.shard_offsets, stop - 1, side="right")) - 1
        return range(first, last + 1)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` (clipped to the stream like a slice)."""
        start, stop = max(0, start), min(self.size, stop)
        pieces = []
        for k in self.shards_for(start, stop):
            base = int(self.shard_offsets[k])
            end = min(stop, int(self.shard_offsets[k + 1]))
            pieces.append(self._load(k)[max(start, base) - base : end - base])
        if not pieces:
            return np.zeros(0, dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.size)
            return self.read(start, stop) if step == 1 else self[np.arange(start, stop, step)]
        if isinstance(key, np.ndarray | Sequence) and not isinstance(key, str | bytes):
            idx = np.asarray(key, dtype=np.int64)
            idx = np.where(idx < 0, idx + self.size, idx)
            if idx.size and (idx.min() < 0 or idx.max() >= self.size):
                raise IndexError(f"token index out of range [0, {self.size})")
            out = np.empty(idx.shape, dtype=self.dtype)
            which = np.searchsorted(self.shard_offsets, idx, side="right") - 1
            for k in np.unique(which).tolist():
                sel = which == k
                out[sel] = self._load(k)[idx[sel] - self.shard_offsets[k]]
            return out
        i = operator.index(key)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"token {key} out of range [0, {self.size})")
        k = int(np.searchsorted(self.shard_offsets, i, side="right")) - 1
        return self._load(k)[i - int(self.shard_offsets[k])]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.read(0, self.size)
        return out.astype(dtype, copy=False) if dtype is not None else out

    def __repr__(self) -> str:
        return f"ShardedTokens({self.size} tokens, {len(self.shard_offsets) - 1} shards, {self.dtype})"
