"""Where the j-th sequence of a source comes from: epochs, chunk permutations and document spans.

A source's canonical token stream is its documents in prepared order, each followed by EOS (``S``
tokens). For a job with sequence length ``L`` an epoch is that stream rotated by a seeded offset and cut
into ``M = ceil(S / L)`` chunks of ``L`` tokens (the last one wraps around to the start), served in a
seeded order (``epoch_order.py``: one global permutation, or shards permuted and chunks shuffled inside
windows of shards, or shards admitted one at a time into a sliding window of them). Every quantity here is
O(1) per sequence: no epoch is ever materialised.

Repetition invariant (the one place it lives): a document counts as seen once in an epoch when every chunk
that holds one of its tokens has been served in that epoch. All ``M`` chunks of epoch ``e`` are served
before any chunk of epoch ``e + 1``, so after any step every document has been seen ``e`` or ``e + 1``
times, where ``e`` is the number of completed epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mixer_contract.errors import InvalidInput, NotFound
from mixer_contract.job import OrderSpec
from mixer_service.engine.epoch_order import EpochOrder, GlobalOrder, SlidingOrder, WindowOrder
from mixer_service.engine.permutation import derive_key


class TokenSource(Protocol):
    """What the engine needs of a prepared source (``mixer_service.prepare.PreparedSource`` is one)."""

    @property
    def tokens(self) -> Any:
        """1-D, every document followed by its EOS: an array, or shards loaded when sliced."""

    @property
    def doc_offsets(self) -> Any:
        """int64, num_docs + 1: an array, or anything indexing and ``searchsorted`` like one
        (``sources.DocIndex`` verifies the blocks it reads)."""

    @property
    def shard_offsets(self) -> np.ndarray:
        """int64, num_shards + 1: shard k holds tokens [shard_offsets[k], shard_offsets[k + 1])."""


@dataclass(frozen=True)
class Span:
    """A run of ``length`` tokens of document ``doc`` starting at ``offset`` inside it."""

    doc: int
    offset: int
    length: int


class SourceLayout:
    """Epoch/chunk arithmetic for one source of one job."""

    def __init__(self, source: TokenSource, name: str, seq_len: int, seed: int, repeat: bool,
                 order: OrderSpec | None = None) -> None:
        self.source = source
        # A plain view of an in-memory array (slicing a memmap object costs ~10x more); a lazily sharded
        # source (``sources.ShardedTokens``) is kept as is, so only the shards a batch touches are loaded.
        tokens = source.tokens
        self._tokens: Any = np.asarray(tokens) if isinstance(tokens, np.ndarray) else tokens
        self.name = name
        self.seq_len = seq_len
        self.repeat = repeat
        self.num_tokens = int(source.doc_offsets[-1])
        if self.num_tokens < seq_len:
            raise InvalidInput(f"sources.{name}: has {self.num_tokens} tokens, fewer than seq_len={seq_len}")
        self.num_chunks = -(-self.num_tokens // seq_len)
        self._key = derive_key("layout", seed, name)
        # A source without shards (a flat token file) is one shard.
        shards = getattr(source, "shard_offsets", [0, self.num_tokens])
        self.shard_offsets = np.asarray(shards, dtype=np.int64)
        self.order: EpochOrder
        if order is None or order.kind == "global":
            self.order = GlobalOrder(self._key, self.num_chunks)
        else:
            sharded = SlidingOrder if order.kind == "sliding" else WindowOrder
            self.order = sharded(self._key, self.num_chunks, seq_len, self.shard_offsets, order.window_shards,
                                 self.rotation)

    @property
    def num_docs(self) -> int:
        return len(self.source.doc_offsets) - 1

    def rotation(self, epoch: int) -> int:
        """Token offset of epoch ``epoch``'s first chunk boundary: chunk edges move every epoch."""
        return derive_key(self._key, "rotation", epoch) % self.num_tokens if self.repeat else 0

    def sequence_starts(self, seq_ids: np.ndarray) -> np.ndarray:
        """Canonical start position of each sequence (its L tokens continue cyclically)."""
        seq_ids = np.asarray(seq_ids, dtype=np.int64)
        epochs, pos = np.divmod(seq_ids, self.num_chunks)
        if seq_ids.size and epochs.min() == epochs.max():  # the usual case: one epoch, no masks needed
            epoch = int(epochs[0])
            return (self.order.chunks(epoch, pos) * self.seq_len + self.rotation(epoch)) % self.num_tokens
        starts = np.empty_like(seq_ids)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            chunks = self.order.chunks(int(epoch), pos[sel])
            starts[sel] = (chunks * self.seq_len + self.rotation(int(epoch))) % self.num_tokens
        return starts

    def gather(self, starts: np.ndarray, out: np.ndarray, rows: np.ndarray) -> None:
        """Copy the ``L`` tokens from each canonical start (``sequence_starts``) into ``out[rows[i]]``.

        Rows inside one shard are copied shard by shard from that shard's array, so a lazily sharded
        source is asked for (and checks) each shard once per batch rather than once per row.
        """
        tokens, length, total = self._tokens, self.seq_len, self.num_tokens
        sharded = hasattr(tokens, "shard")  # e.g. ``sources.ShardedTokens``: shard k is ``tokens.shard(k)``
        bounds = tokens.shard_offsets if sharded else np.array([0, total], dtype=np.int64)
        shard = np.searchsorted(bounds, starts, side="right") - 1
        inside = starts + length <= bounds[shard + 1]
        for k in np.unique(shard[inside]).tolist():
            array, base = (tokens.shard(k), int(bounds[k])) if sharded else (tokens, 0)
            sel = np.flatnonzero(inside & (shard == k))
            if hasattr(array, "gather_rows"):  # checked reads: one read of the shard's blocks, not one a row
                array.gather_rows(starts[sel] - base, length, out, rows[sel])
                continue
            for row, start in zip(rows[sel].tolist(), (starts[sel] - base).tolist(), strict=True):
                out[row] = array[start:start + length]
        crossing = np.flatnonzero(~inside)  # runs into the next shard or wraps past the end of the stream
        for row, start in zip(rows[crossing].tolist(), starts[crossing].tolist(), strict=True):
            end = start + length
            if end <= total:
                out[row] = tokens[start:end]
            else:
                head = total - start
                out[row, :head] = tokens[start:]
                out[row, head:] = tokens[: length - head]

    def shards_touched(self, starts: np.ndarray) -> np.ndarray:
        """Sorted ids of the shards holding any token of the sequences starting at ``starts`` (what a cache
        must have)."""
        bounds, total = self.shard_offsets, self.num_tokens
        first = np.searchsorted(bounds, starts, side="right") - 1
        last = np.searchsorted(bounds, (starts + self.seq_len - 1) % total, side="right") - 1
        # Usually first == last or last == first + 1; a wrap past the end or shards shorter than L
        # take every shard in between.
        runs = [np.arange(a, b + 1) if b >= a else np.r_[np.arange(a, len(bounds) - 1), np.arange(0, b + 1)]
                for a, b in zip(first.tolist(), last.tolist(), strict=True) if a != b]
        return np.unique(np.concatenate([first, *runs])) if runs else np.unique(first)

    def spans(self, seq_id: int) -> list[Span]:
        """The document spans making up one sequence, in order (provenance)."""
        start = int(self.sequence_starts(np.array([seq_id]))[0])
        pieces = [(start, min(start + self.seq_len, self.num_tokens))]
        if start + self.seq_len > self.num_tokens:
            pieces.append((0, start + self.seq_len - self.num_tokens))
        offsets = self.source.doc_offsets
        out: list[Span] = []
        for lo, hi in pieces:
            doc = int(offsets.searchsorted(lo, side="right")) - 1
            while lo < hi:
                doc_end = int(offsets[doc + 1])
                take = min(hi, doc_end) - lo
                out.append(Span(doc, lo - int(offsets[doc]), take))
                lo += take
                doc += 1
        return out

    def repetition_counts(self, sequences_served: int) -> np.ndarray:
        """How many times each document has been fully seen after ``sequences_served`` sequences."""
        epoch, progress = divmod(sequences_served, self.num_chunks)
        counts = np.full(self.num_docs, epoch, dtype=np.int64)
        if progress:
            counts += self._served_in_epoch(epoch, progress, np.arange(self.num_docs))
        return counts

    def repetition_count(self, doc: int, sequences_served: int) -> int:
        if not 0 <= doc < self.num_docs:
            raise NotFound(f"source {self.name!r} has no document {doc} (it has {self.num_docs})")
        epoch, progress = divmod(sequences_served, self.num_chunks)
        if not progress:
            return epoch
        return epoch + int(self._served_in_epoch(epoch, progress, np.array([doc]))[0])

    def _served_in_epoch(self, epoch: int, progress: int, docs: np.ndarray) -> np.ndarray:
        """1 for each doc all of whose tokens are covered by the first ``progress`` chunks of ``epoch``.

        A token is covered by the chunk it falls in; the first ``M * L - S`` tokens of the epoch stream
        are also covered by the last chunk, which wraps around onto them.
        """
        served = np.zeros(self.num_chunks, dtype=np.int64)
        served[self.order.chunks(epoch, np.arange(progress))] = 1
        unserved_before = np.concatenate([[0], np.cumsum(1 - served)])  # prefix count of unserved chunks
        covered_by_wrap = self.num_chunks * self.seq_len - self.num_tokens if served[-1] else 0

        def missing(first: np.ndarray, last: np.ndarray) -> np.ndarray:
            """Unserved chunks under token positions [first, last] of the stream, outside the wrap."""
            first = np.maximum(first, covered_by_wrap)
            count = unserved_before[last // self.seq_len + 1] - unserved_before[first // self.seq_len]
            return np.where(first <= last, count, 0)

        offsets = self.source.doc_offsets
        begin = (offsets[docs] - self.rotation(epoch)) % self.num_tokens  # position in the epoch stream
        end = begin + (offsets[docs + 1] - offsets[docs]) - 1  # inclusive, may pass the end of the stream
        total = missing(begin, np.minimum(end, self.num_tokens - 1))
        wraps = end >= self.num_tokens
        total[wraps] += missing(np.zeros(int(wraps.sum()), dtype=np.int64), end[wraps] - self.num_tokens)
        return (total == 0).astype(np.int64)
