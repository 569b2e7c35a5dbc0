"""The order in which one epoch serves a source's chunks: position ``q`` of epoch ``e`` -> chunk id.

Every order is a keyed bijection on ``[0, M)`` per epoch, computed per position without materialising the
epoch, so the repetition invariant (every chunk once per epoch, e or e+1 views) holds for each.

* ``GlobalOrder``: one Feistel permutation over all ``M`` chunks. Best mixing, but consecutive positions
  land anywhere in the corpus, so every step touches random shards (a bounded cache thrashes).
* ``WindowOrder``: shards are permuted per epoch, the permuted shard list is cut into windows of ``W``
  consecutive shards, and the chunks of one window are served in a permutation of their own before the
  next window starts. A stretch of positions then reads from ``W`` shards only (plus a neighbour shard
  for a chunk that runs past the end of its shard), so a cache of about ``2 W`` shards per source serves
  the epoch with each shard fetched once. A chunk belongs to the shard holding its first token.
* ``SlidingOrder`` (what new jobs get): the same permuted shards, admitted one at a time. Each shard's
  chunks are cut into ``W`` slices; output block ``j`` serves, in a permutation of its own, slice ``t`` of
  permuted shard ``j - t`` for every ``t < W``. The epoch's first block reads one shard (the window
  order's first step reads ``W``), a block reads ``W``, each shard is read during ``W`` consecutive
  blocks, and a cache of ``W + 2`` shards serves the epoch (docs/epoch_order.md).

Lookup cost of the shard-local orders: once per epoch a shard permutation and a prefix sum of the chunks
each shard starts (O(num_shards)); the sliding order also sums its block sizes (O(num_shards * W) numpy
work). Then O(log num_shards) per position; memory O(num_shards + W), never O(M).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mixer_service.engine.permutation import Permutation, derive_key

_EPOCHS_KEPT = 64  # per-epoch state kept per source: batches straddle at most a couple of epochs
# A window's permutation is used for ~1,000 consecutive steps, so it is tabulated (4 bytes per chunk of the
# window: 2 MiB for 16 shards of 2^26 tokens at L=2048; larger windows fall back to per-position Feistel
# rounds, bounding the one-off build); two windows are kept for a batch that straddles them.
_WINDOW_TABLE_MAX = 1 << 20
_WINDOWS_KEPT = 2
# A sliding block reads W shards' scrambles, tabulated when a shard has up to 2^16 chunks (256 KiB), and
# the next block W - 1 of the same ones; at most 64 are kept per epoch.
_SCRAMBLE_TABLE_MAX = 1 << 16
_SCRAMBLES_KEPT = 64


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


class _ShardSequence:
    """One epoch's chunks with its shards in a keyed order and each shard's chunks in stream order: the
    sequence both shard-local orders cut up."""

    def __init__(self, key: int, first_chunk: np.ndarray) -> None:
        num_shards = len(first_chunk) - 1
        self.key = key
        self.first_chunk = first_chunk  # canonical-order index of each shard's first chunk, M at the end
        self.shard_at = Permutation(num_shards, derive_key(key, "shards")).apply(np.arange(num_shards))
        self.counts = np.diff(first_chunk)[self.shard_at]  # chunks per shard, in permuted shard order
        self.before = np.concatenate([[0], np.cumsum(self.counts)])  # epoch position of each permuted shard

    def rank(self, slot: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """Index in canonical chunk order of chunk ``offset`` (stream order) of permuted shard ``slot``."""
        return self.first_chunk[self.shard_at[slot]] + offset


class _WindowEpoch(_ShardSequence):
    """One epoch of a ``WindowOrder``: the shard sequence and per-window permutations."""

    def __init__(self, key: int, first_chunk: np.ndarray) -> None:
        super().__init__(key, first_chunk)
        self._perms: dict[int, Permutation] = {}

    def window_perm(self, w: int, size: int) -> Permutation:
        return _bounded_cache(self._perms, w, lambda: Permutation(
            size, derive_key(self.key, "window", w), table_max=_WINDOW_TABLE_MAX), keep=_WINDOWS_KEPT)


class _ShardedOrder(ABC):
    """What the shard-local orders share: where each shard's chunks fall in an epoch whose chunk edges are
    rotated, per-epoch state kept in a bounded cache, and the last step from canonical rank to chunk id."""

    _EPOCH_TAG: str

    def __init__(self, key: int, num_chunks: int, seq_len: int, shard_offsets: np.ndarray, window: int,
                 rotation: Callable[[int], int]) -> None:
        self._key, self._num_chunks, self._seq_len = key, num_chunks, seq_len
        self._bounds = np.asarray(shard_offsets, dtype=np.int64)
        self._num_tokens = int(self._bounds[-1])
        self._window = window
        self._rotation = rotation
        self._epochs: dict[int, _ShardSequence] = {}

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

    @abstractmethod
    def _new_epoch(self, key: int, first_chunk: np.ndarray) -> _ShardSequence: ...

    @abstractmethod
    def _ranks(self, state: Any, positions: np.ndarray) -> np.ndarray:
        """Canonical rank of the chunk served at each position of the epoch ``state`` describes."""

    def _epoch(self, epoch: int) -> Any:
        return _bounded_cache(self._epochs, epoch, lambda: self._new_epoch(
            derive_key(self._key, self._EPOCH_TAG, epoch), self._first_chunks(self._rotation(epoch))))

    def chunks(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        rank = self._ranks(self._epoch(epoch), np.asarray(positions, dtype=np.int64))
        return (rank + self._wrap(self._rotation(epoch))) % self._num_chunks


class WindowOrder(_ShardedOrder):
    """Shards permuted per epoch, chunks shuffled inside windows of ``window`` consecutive shards."""

    _EPOCH_TAG = "window-epoch"

    def _new_epoch(self, key: int, first_chunk: np.ndarray) -> _WindowEpoch:
        return _WindowEpoch(key, first_chunk)

    def _ranks(self, state: _WindowEpoch, positions: np.ndarray) -> np.ndarray:
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
        return state.rank(slot, shuffled - before[slot])


@dataclass
class _Block:
    """One output block of a sliding epoch: a permutation of its positions, and its slices in order of
    ``t``: the ``k``-th is chunks ``start[k]...`` (scrambled order) of permuted shard ``slot[k]``, at
    in-block indices ``[cum[k], cum[k + 1])``. ``ranks``: the canonical rank at each in-block index,
    tabulated when the block is built (a block is read over several steps, each chunk of it once)."""

    perm: Permutation
    slot: np.ndarray
    start: np.ndarray
    cum: np.ndarray
    ranks: np.ndarray | None = None


class _SlidingEpoch(_ShardSequence):
    """One epoch of a ``SlidingOrder``: the shard sequence, where each output block starts, and the blocks
    and per-shard scrambles in use."""

    def __init__(self, key: int, first_chunk: np.ndarray, window: int) -> None:
        super().__init__(key, first_chunk)
        nb = len(self.counts)
        self.window = w = min(window, nb)  # W >= num_shards keeps every shard open: the same order
        # Block j holds slice j - i of permuted shard i; slice t of n chunks is [t n // W, (t + 1) n // W).
        # Sizes are summed over the shorter of the two axes: O(num_shards * W) numpy work, O(W) calls.
        sizes = np.zeros(nb + w - 1, dtype=np.int64)
        if w <= nb:
            for t in range(w):
                sizes[t:t + nb] += (t + 1) * self.counts // w - t * self.counts // w
        else:
            edges = np.arange(w + 1)
            for i, n in enumerate(self.counts.tolist()):
                sizes[i:i + w] += np.diff(edges * n // w)
        self.block_start = np.concatenate([[0], np.cumsum(sizes)])
        self._blocks: dict[int, _Block] = {}
        self._scrambles: dict[int, Permutation] = {}
        # A block reads W scrambles; tabulate them only when the blocks in reach (2 W + 2) fit the bound,
        # else each rebuild would cost a whole shard for a slice of it: Feistel rounds per chunk then.
        self._scramble_table_max = _SCRAMBLE_TABLE_MAX if 2 * w + 2 <= _SCRAMBLES_KEPT else 0

    def block(self, j: int) -> _Block:
        return _bounded_cache(self._blocks, j, lambda: self._make_block(j), keep=_WINDOWS_KEPT)

    def _make_block(self, j: int) -> _Block:
        w, nb = self.window, len(self.counts)
        t = np.arange(max(0, j - nb + 1), min(w, j + 1))
        slot = j - t
        n = self.counts[slot]
        start = t * n // w
        cum = np.concatenate([[0], np.cumsum((t + 1) * n // w - start)])
        size = int(self.block_start[j + 1] - self.block_start[j])
        block = _Block(Permutation(size, derive_key(self.key, "block", j), table_max=_WINDOW_TABLE_MAX),
                       slot, start, cum)
        if size <= _WINDOW_TABLE_MAX:
            block.ranks = self.ranks_in(block, np.arange(size))
        return block

    def ranks_in(self, block: _Block, inside: np.ndarray) -> np.ndarray:
        """Canonical rank of the chunk at each in-block index (before the block's permutation)."""
        if block.ranks is not None:
            return block.ranks[inside]
        k = np.searchsorted(block.cum, inside, side="right") - 1
        offset = np.empty_like(inside)
        for slice_ in np.unique(k).tolist():  # one slice per shard in a block
            sel = k == slice_
            offset[sel] = self._unscramble(int(block.slot[slice_]),
                                           block.start[slice_] + inside[sel] - block.cum[slice_])
        return self.rank(block.slot[k], offset)

    def _unscramble(self, slot: int, index: np.ndarray) -> np.ndarray:
        """Stream-order offset in permuted shard ``slot`` of the chunk at ``index`` of its scrambled order.

        The scramble spreads neighbouring chunks over the shard's ``W`` slices (so a block holds no more
        adjacent pairs than a window would), and keeps the shard's last chunk, the only one that can run
        into the next shard, last: the neighbour shard is read only in the shard's last block."""
        last = int(self.counts[slot]) - 1
        if last < 2:
            return index
        perm = _bounded_cache(self._scrambles, slot, lambda: Permutation(
            last, derive_key(self.key, "scramble", slot), table_max=self._scramble_table_max),
            keep=_SCRAMBLES_KEPT)
        out = index.copy()
        inner = index < last
        out[inner] = perm.apply(index[inner])
        return out


class SlidingOrder(_ShardedOrder):
    """Shards permuted per epoch and admitted one at a time: output block ``j`` serves, shuffled, the
    ``t``-th ``W``-th of the ``j - t``-th permuted shard for every ``t < W``, so each shard is read during
    ``W`` consecutive blocks and the epoch starts reading one shard, not ``W``."""

    _EPOCH_TAG = "sliding-epoch"

    def _new_epoch(self, key: int, first_chunk: np.ndarray) -> _SlidingEpoch:
        return _SlidingEpoch(key, first_chunk, self._window)

    def _ranks(self, state: _SlidingEpoch, positions: np.ndarray) -> np.ndarray:
        block_start = state.block_start
        blocks = np.searchsorted(block_start, positions, side="right") - 1  # skips empty blocks
        ranks = np.empty_like(positions)
        for j in np.unique(blocks).tolist():
            sel = blocks == j
            block = state.block(j)
            ranks[sel] = state.ranks_in(block, block.perm.apply(positions[sel] - block_start[j]))
        return ranks
