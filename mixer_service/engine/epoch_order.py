"""The order in which one epoch serves a source's chunks: position ``q`` of epoch ``e`` -> chunk id.

Both orders are keyed bijections on ``[0, M)`` per epoch, computed per position without materialising the
epoch, so the repetition invariant (every chunk once per epoch, e or e+1 views) holds for either.

* ``GlobalOrder``: one Feistel permutation over all ``M`` chunks. Best mixing, but consecutive positions
  land anywhere in the corpus, so every step touches random shards (a bounded cache thrashes).
* ``WindowOrder``: shards are permuted per epoch, the permuted shard list is cut into windows of ``W``
  consecutive shards, and the chunks of one window are served in a permutation of their own before the
  next window starts. A stretch of positions then reads from ``W`` shards only (plus a neighbour shard
  for a chunk that runs past the end of its shard), so a cache of about ``2 W`` shards per source serves
  the epoch with each shard fetched once. A chunk belongs to the shard holding its first token.

Lookup cost of ``WindowOrder``: O(num_shards) once per epoch (a shard permutation and a prefix sum of the
chunks each shard starts), then O(log num_shards) per position; memory O(num_shards), never O(M).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from mixer_service.engine.permutation import Permutation, derive_key

_EPOCHS_KEPT = 64  # per-epoch state kept per source: batches straddle at most a couple of epochs
# A window's permutation is used for ~1,000 consecutive steps, so it is tabulated (4 bytes per chunk of the
# window: 2 MiB for 16 shards of 2^26 tokens at L=2048; larger windows fall back to per-position Feistel
# rounds, bounding the one-off build); two windows are kept for a batch that straddles them.
_WINDOW_TABLE_MAX = 1 << 20
_WINDOWS_KEPT = 2


class EpochOrder(Protocol):
    def chunks(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Chunk ids served at ``positions`` (int64 array, each in ``[0, M)``) of ``epoch``."""
        ...


def _bounded_cache(store: dict, key: Any, make: Callable[[], Any], keep: int = _EPOCHS_KEPT) -> Any:
    value = store.get(key)
    if value is None:
        if len(store) >= keep:
            store.clear()
        value = store[key] = make()
    return value


class GlobalOrder:
    """All chunks of an epoch in one keyed permutation (every job's order before issue 10)."""

    def __init__(self, key: int, num_chunks: int) -> None:
        self._key, self._num_chunks = key, num_chunks
        self._perms: dict[int, Permutation] = {}

    def chunks(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        perm = _bounded_cache(self._perms, epoch, lambda: Permutation(
            self._num_chunks, derive_key(self._key, "epoch", epoch)))
        return perm.apply(positions)


class _WindowEpoch:
    """One epoch of a ``WindowOrder``: shard permutation, chunk prefix sums and per-window permutations."""

    def __init__(self, key: int, first_chunk: np.ndarray) -> None:
        num_shards = len(first_chunk) - 1
        self.first_chunk = first_chunk  # canonical-order index of each shard's first chunk, M at the end
        self.shard_at = Permutation(num_shards, derive_key(key, "shards")).apply(np.arange(num_shards))
        counts = np.diff(first_chunk)[self.shard_at]  # chunks per shard, in permuted shard order
        self.before = np.concatenate([[0], np.cumsum(counts)])  # epoch position of each permuted shard
        self._key = key
        self._perms: dict[int, Permutation] = {}

    def window_perm(self, w: int, size: int) -> Permutation:
        return _bounded_cache(self._perms, w, lambda: Permutation(
            size, derive_key(self._key, "window", w), table_max=_WINDOW_TABLE_MAX), keep=_WINDOWS_KEPT)


class WindowOrder:
    """Shards permuted per epoch, chunks shuffled inside windows of ``window`` consecutive shards."""

    def __init__(self, key: int, num_chunks: int, seq_len: int, shard_offsets: np.ndarray, window: int,
                 rotation: Callable[[int], int]) -> None:
        self._key, self._num_chunks, self._seq_len = key, num_chunks, seq_len
        self._bounds = np.asarray(shard_offsets, dtype=np.int64)
        self._num_tokens = int(self._bounds[-1])
        self._window = window
        self._rotation = rotation
        self._epochs: dict[int, _WindowEpoch] = {}

    def _wrap(self, rot: int) -> int:
        """First chunk id whose start passes the end of the stream and wraps to its beginning."""
        return min(self._num_chunks, -(-(self._num_tokens - rot) // self._seq_len))

    def _first_chunks(self, rot: int) -> np.ndarray:
        """For each shard boundary ``a``: how many chunks start at a canonical token before ``a``.

        Chunk ``c`` starts at canonical token ``(c L + rot) mod S``: ``c L + rot`` for ids below ``wrap``,
        ``c L + rot - S`` (before all of those) for the rest. So in canonical order chunk ``c`` has rank
        ``(c - wrap) mod M``.
        """
        length, m, s = self._seq_len, self._num_chunks, self._num_tokens
        wrap = self._wrap(rot)
        a = self._bounds
        unwrapped = np.clip(-(-(a - rot) // length), 0, wrap)
        wrapped = np.clip(-(-(a - rot + s) // length), wrap, m) - wrap
        return unwrapped + wrapped

    def _epoch(self, epoch: int) -> _WindowEpoch:
        return _bounded_cache(self._epochs, epoch, lambda: _WindowEpoch(
            derive_key(self._key, "window-epoch", epoch), self._first_chunks(self._rotation(epoch))))

    def chunks(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        state = self._epoch(epoch)
        positions = np.asarray(positions, dtype=np.int64)
        before, num_shards = state.before, len(state.shard_at)
        slot = np.searchsorted(before, positions, side="right") - 1  # permuted shard holding the position
        windows = slot // self._window
        shuffled = np.empty_like(positions)
        for w in np.unique(windows).tolist():
            sel = windows == w
            lo = int(before[w * self._window])
            hi = int(before[min((w + 1) * self._window, num_shards)])
            shuffled[sel] = lo + state.window_perm(w, hi - lo).apply(positions[sel] - lo)
        slot = np.searchsorted(before, shuffled, side="right") - 1
        shard = state.shard_at[slot]
        rank = state.first_chunk[shard] + (shuffled - before[slot])  # index in canonical chunk order
        return (rank + self._wrap(self._rotation(epoch))) % self._num_chunks
