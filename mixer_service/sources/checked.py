"""Bytes read from disk on every access and checked against per-block checksums taken from verified bytes.

A sha256 proves a file once; bit rot or a stray write after that is invisible to a memory map, and a
file truncated under a map kills the whole process with SIGBUS. Here every read is a ``pread`` of whole
4 KiB blocks, each compared with the xxh3 it had when its bytes were verified (kept in memory: 8 bytes a
block, 0.2 % of the data). A wrong byte is never served, and a short file is an error naming it, never a
crash. xxh3 costs ~0.8 us a block here (zlib crc32 2.5 us, crc32c 1.0 us); a 64 x 2048-token batch of
uint16 reads ~128 blocks (``bench/bench_verified_read.py``).
"""

from __future__ import annotations

import array
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from mixer_contract.errors import CorruptData

CHECK_BLOCK = 4096  # bytes a checksum covers: a 2048-token uint16 row touches at most 2 blocks
_sum = xxhash.xxh3_64_intdigest


def block_sums(data: bytes | memoryview) -> np.ndarray:
    """xxh3 of each ``CHECK_BLOCK`` bytes of ``data`` (the last block may be shorter)."""
    view = memoryview(data).cast("B")
    return np.fromiter((_sum(view[i : i + CHECK_BLOCK]) for i in range(0, len(view), CHECK_BLOCK)),
                       dtype=np.uint64, count=-(-len(view) // CHECK_BLOCK))


class Digest:
    """Block sums (and the largest token id) of a byte stream fed in chunks of any size, computed from
    the very bytes a sha256 is proving at the same time, so the sums inherit the proof."""

    def __init__(self, dtype: np.dtype | None = None) -> None:
        self._dtype = dtype
        self._pending = b""
        self._sums: list[np.ndarray] = []
        self.max_token = -1

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        data = self._pending + bytes(chunk) if self._pending else memoryview(chunk).cast("B")
        whole = len(data) - len(data) % CHECK_BLOCK
        if whole:
            self._take(data[:whole])
        self._pending = bytes(data[whole:])

    def finish(self) -> np.ndarray:
        """The sums of everything fed (call once, after the last chunk)."""
        if self._pending:
            self._take(self._pending)
            self._pending = b""
        return np.concatenate(self._sums) if self._sums else np.zeros(0, np.uint64)

    def _take(self, data: bytes | memoryview) -> None:
        self._sums.append(block_sums(data))
        if self._dtype is not None and len(data):
            self.max_token = max(self.max_token, int(np.frombuffer(data, dtype=self._dtype).max()))


def open_handle(path: Path, label: str) -> io.FileIO:
    """An unbuffered read handle (closed when the last region using it is gone); a missing file is
    ``CorruptData`` naming it."""
    try:
        return io.FileIO(path, "r")
    except OSError as exc:
        raise CorruptData(f"{label}: cannot open ({exc.strerror or exc})") from exc


def pread_exact(handle: io.FileIO, start: int, size: int, label: str) -> bytes:
    """Exactly ``size`` bytes at ``start``: a short read (truncated file) is ``CorruptData`` naming the
    file and offset."""
    try:
        data = os.pread(handle.fileno(), size, start)
    except OSError as exc:
        raise CorruptData(f"{label}: cannot read at byte {start} ({exc.strerror or exc})") from exc
    if len(data) != size:
        raise CorruptData(f"{label}: file ends at byte {start + len(data)}, {size} bytes were expected at "
                          f"byte {start} (truncated?)")
    return data


class CheckedRegion:
    """``length`` bytes at byte ``offset`` of an open file, read on every access and checked block by block
    against ``sums`` (None: ``--verify off``, length-checked only)."""

    def __init__(self, handle: io.FileIO, offset: int, length: int, sums: np.ndarray | None, label: str):
        self.handle = handle
        self.offset = offset
        self.length = length
        # array('Q'): indexing gives a plain int (a numpy scalar compares ~5x slower), 8 bytes a block
        self.sums = None if sums is None else array.array("Q", np.asarray(sums, dtype=np.uint64).tobytes())
        self.label = label
        self._fd = handle.fileno()

    def read(self, start: int, stop: int) -> memoryview:
        """Bytes ``[start, stop)`` of the region (clipped to it), every block they touch checked."""
        start, stop = max(0, start), min(stop, self.length)
        if stop <= start:
            return memoryview(b"")
        if self.sums is None:
            return memoryview(pread_exact(self.handle, self.offset + start, stop - start, self.label))
        first, last = start // CHECK_BLOCK, (stop - 1) // CHECK_BLOCK
        base = first * CHECK_BLOCK
        size = min((last + 1) * CHECK_BLOCK, self.length) - base
        try:
            data = os.pread(self._fd, size, self.offset + base)
        except OSError as exc:
            raise CorruptData(f"{self.label}: cannot read at byte {self.offset + base} "
                              f"({exc.strerror or exc})") from exc
        if len(data) != size:
            pread_exact(self.handle, self.offset + base, size, self.label)  # raises, naming the offset
        sums = self.sums
        if first == last:  # most reads: one block, no slicing
            if _sum(data) != sums[first]:
                self._mismatch(first)
            return memoryview(data)[start - base : stop - base]
        view = memoryview(data)
        for j in range(last - first + 1):
            if _sum(view[j * CHECK_BLOCK : (j + 1) * CHECK_BLOCK]) != sums[first + j]:
                self._mismatch(first + j)
        return view[start - base : stop - base]

    def read_blocks(self, blocks: list[int]) -> tuple[np.ndarray, list[int]]:
        """Blocks ``blocks`` (ascending, unique) of the region, each checked once, with one ``pread`` per run
        of adjacent blocks instead of one per caller: the bytes of the blocks back to back (uint8) and
        where each run starts in them. Plain Python on purpose: a batch reads tens of blocks, where numpy's
        per-call overhead would cost more than the reads."""
        runs: list[list[int]] = []  # [first block, last block]
        for blk in blocks:
            if runs and blk == runs[-1][1] + 1:
                runs[-1][1] = blk
            else:
                runs.append([blk, blk])
        sizes = [min((last + 1) * CHECK_BLOCK, self.length) - first * CHECK_BLOCK for first, last in runs]
        buf = np.empty(sum(sizes), dtype=np.uint8)
        view = memoryview(buf)
        at, p, fd, offset, sums = [], 0, self._fd, self.offset, self.sums
        for (first, last), size in zip(runs, sizes, strict=True):
            start = offset + first * CHECK_BLOCK
            try:
                got = os.preadv(fd, [view[p:p + size]], start)
            except OSError as exc:
                raise CorruptData(
                    f"{self.label}: cannot read at byte {start} ({exc.strerror or exc})") from exc
            if got != size:
                pread_exact(self.handle, start, size, self.label)  # raises, naming the offset
            if sums is not None:
                for blk in range(first, last + 1):
                    q = p + (blk - first) * CHECK_BLOCK
                    if _sum(view[q:q + CHECK_BLOCK]) != sums[blk]:
                        self._mismatch(blk)
            at.append(p)
            p += size
        return buf, at

    def _mismatch(self, b: int) -> None:
        at = self.offset + b * CHECK_BLOCK
        raise CorruptData(f"{self.label}: checksum mismatch in bytes {at}..{at + CHECK_BLOCK} "
                          "(changed on disk after it was verified)")


class CheckedTokens:
    """One shard's (or block's) tokens, read through a ``CheckedRegion`` on every access and sliced like a
    1-D array. ``recover`` (a cache entry) is asked once for a fresh region when a read fails its check."""

    def __init__(self, region: CheckedRegion, dtype: np.dtype, size: int,
                 recover: Callable[[CheckedRegion], CheckedRegion] | None = None) -> None:
        self.region = region
        self.dtype = np.dtype(dtype)
        self._item = self.dtype.itemsize
        self.size = size
        self.shape = (size,)
        self.ndim = 1
        self._recover = recover

    def __len__(self) -> int:
        return self.size

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)``, clipped like a slice."""
        start, stop = max(0, start), min(stop, self.size)
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        item = self._item
        data = self._recovering(lambda region: region.read(start * item, stop * item))
        return np.frombuffer(data, dtype=self.dtype)

    def _recovering(self, read: Callable[[CheckedRegion], Any]) -> Any:
        """``read(region)``; when it fails its check, once more on the region ``recover`` makes anew."""
        try:
            return read(self.region)
        except CorruptData as exc:
            if self._recover is None:
                raise
            try:
                self.region = self._recover(self.region)
            except CorruptData as again:
                raise CorruptData(f"{exc}; {again}") from exc
            return read(self.region)

    def gather_rows(self, starts: np.ndarray, length: int, out: np.ndarray, rows: np.ndarray) -> None:
        """``out[rows[i]] = tokens[starts[i]:starts[i] + length]``: the blocks all the rows touch are read
        together (``CheckedRegion.read_blocks``) and each is checked once, however many rows share it."""
        item, nbytes = self._item, length * self._item
        pairs = sorted(zip(np.asarray(starts).tolist(), np.asarray(rows).tolist(), strict=True))
        if pairs and (pairs[0][0] < 0 or pairs[-1][0] + length > self.size):
            raise IndexError(f"rows outside [0, {self.size}) tokens")
        blocks: list[int] = []
        for start, _ in pairs:
            for blk in range(max(start * item // CHECK_BLOCK, blocks[-1] + 1 if blocks else 0),
                             (start * item + nbytes - 1) // CHECK_BLOCK + 1):
                blocks.append(blk)
        buf, at = self._recovering(lambda region: region.read_blocks(blocks))
        # Where each row starts in ``buf``: the runs of adjacent blocks lie back to back in block order.
        firsts = [blk for i, blk in enumerate(blocks) if i == 0 or blk != blocks[i - 1] + 1]
        run_first, pos = list(zip(firsts, at, strict=True)), 0
        same = out.dtype == self.dtype and out.flags.c_contiguous and out.shape[1] == length
        flat, raw = (memoryview(out).cast("B"), memoryview(buf)) if same else (None, None)
        tokens = buf[: len(buf) - len(buf) % item].view(self.dtype)
        for start, row in pairs:
            byte = start * item
            while pos + 1 < len(run_first) and run_first[pos + 1][0] * CHECK_BLOCK <= byte:
                pos += 1
            first, p = run_first[pos]
            a = p + byte - first * CHECK_BLOCK
            if flat is not None:  # a byte copy: no numpy call per row
                flat[row * nbytes:(row + 1) * nbytes] = raw[a:a + nbytes]
            else:
                out[row] = tokens[a // item:a // item + length]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            if key.step is None and key.start is not None and key.stop is not None and 0 <= key.start:
                return self.read(key.start, key.stop)  # the engine's row slice: no indices() round trip
            start, stop, step = key.indices(self.size)
            return self.read(start, stop) if step == 1 else self.read(0, self.size)[key]
        if isinstance(key, int | np.integer):
            i = int(key) + self.size if key < 0 else int(key)
            if not 0 <= i < self.size:
                raise IndexError(f"token {key} out of range [0, {self.size})")
            return self.read(i, i + 1)[0]
        idx = np.asarray(key, dtype=np.int64)
        if idx.size == 0:
            return np.zeros(idx.shape, dtype=self.dtype)
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.size:
            raise IndexError(f"token index out of range [0, {self.size})")
        return self.read(lo, hi + 1)[idx - lo]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.read(0, self.size)
        return out.astype(dtype, copy=False) if dtype is not None else out

    def __repr__(self) -> str:
        return f"CheckedTokens({self.region.label!r}, {self.size} tokens)"


def find_token_above(tokens: CheckedTokens | np.ndarray, limit: int,
                     chunk: int = 1 << 22) -> tuple[int, int] | None:
    """The first (position, id) of a token id >= ``limit``, or None (used only to name one that is)."""
    for a in range(0, tokens.size, chunk):
        part = tokens[a:a + chunk]
        bad = np.flatnonzero(part >= limit)
        if bad.size:
            return a + int(bad[0]), int(part[bad[0]])
    return None
