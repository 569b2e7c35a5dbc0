"""Keyed pseudo-random permutations of ``[0, n)`` that need no memory.

Epoch order, the order of sequences inside a batch and per-epoch rotations must be random-access: the
engine asks for "position q of epoch e" without materialising the epoch. A balanced Feistel network over
the next even power of two, restricted to ``[0, n)`` by cycle walking, is a bijection computed in O(1)
per element (expected < 4 walks), vectorised with numpy, and identical on every machine.
"""

from __future__ import annotations

import hashlib

import numpy as np

_ROUNDS = 6
_TABLE_MAX = 1 << 16  # domains up to this size are tabulated once: a lookup beats six Feistel rounds
_WHOLE_DOMAIN_MAX = 1 << 18  # a table is built by encrypting the whole Feistel domain up to this size
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def derive_key(*parts: object) -> int:
    """A 64-bit key from any tuple of printable parts (seed, tag, epoch ...), stable across machines."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fast, well-distributed 64-bit mixer."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A bijection on ``[0, n)`` keyed by ``key``; ``apply`` and ``invert`` are inverse of each other."""

    def __init__(self, n: int, key: int, table_max: int = _TABLE_MAX) -> None:
        """``table_max`` (< 2^31): tabulate domains up to this size on first use (same bijection, faster
        lookups, 4 bytes per element)."""
        if n < 1:
            raise ValueError(f"permutation domain must be non-empty, got n={n}")
        self.n = n
        half = max(1, ((n - 1).bit_length() + 1) // 2)
        self._half = np.uint64(half)
        self._mask = np.uint64((1 << half) - 1)
        self._keys = [np.uint64(derive_key(key, r)) for r in range(_ROUNDS)]
        self._table: np.ndarray | None = None
        self._table_max = table_max

    def _round_f(self, right: np.ndarray, k: np.uint64) -> np.ndarray:
        return _mix(right ^ k) & self._mask

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for k in self._keys:
            left, right = right, left ^ self._round_f(right, k)
        return (left << self._half) | right

    def _decrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for k in reversed(self._keys):
            left, right = right ^ self._round_f(left, k), left
        return (left << self._half) | right

    def _walk(self, x: np.ndarray | int, step) -> np.ndarray:
        arr = np.atleast_1d(np.asarray(x, dtype=np.uint64))
        if arr.size and (arr.max() >= self.n):
            raise IndexError(f"permutation index out of range [0, {self.n})")
        out = step(arr)
        pending = out >= self.n
        while pending.any():
            out[pending] = step(out[pending])
            pending = out >= self.n
        return out.astype(np.int64)

    def _tabulate(self) -> np.ndarray:
        """``apply`` of every position (int32). A small domain is encrypted whole, once, and the cycle walk
        then follows that table: the same bijection as walking with Feistel rounds, without six rounds of
        numpy calls per walk step (a walk's tail repeats them on a few elements at a time)."""
        domain = 1 << (2 * int(self._half))
        if domain > _WHOLE_DOMAIN_MAX:
            return self._walk(np.arange(self.n), self._encrypt).astype(np.int32)
        whole = self._encrypt(np.arange(domain, dtype=np.uint64)).astype(np.int64)
        out = whole[: self.n].copy()
        pending = np.flatnonzero(out >= self.n)
        while pending.size:
            out[pending] = whole[out[pending]]
            pending = pending[out[pending] >= self.n]
        return out.astype(np.int32)

    def apply(self, x: np.ndarray | int) -> np.ndarray:
        """Position -> element (e.g. position q of an epoch -> chunk id)."""
        if self.n <= self._table_max:
            if self._table is None:  # int32 halves the memory; lookups come back as int64
                self._table = self._tabulate()
            positions = np.atleast_1d(np.asarray(x, dtype=np.int64))
            if positions.size and (positions.min() < 0 or positions.max() >= self.n):
                raise IndexError(f"permutation index out of range [0, {self.n})")
            return self._table[positions].astype(np.int64)
        return self._walk(x, self._encrypt)

    def invert(self, y: np.ndarray | int) -> np.ndarray:
        """Element -> position (e.g. chunk id -> when it is served in the epoch)."""
        return self._walk(y, self._decrypt)
