"""The document index of a source (int64[num_docs + 1]), memory-mapped and verified block by block.

At 10^12 tokens the index is ~2·10^9 documents, 16 GB: hashing it whole at every start, or copying it
from object storage, is the one cost that would grow with the corpus. Here a block (``IndexBlocks``,
8 MiB) is hashed the first time a lookup touches it; for a remote source, a block whose local bytes do
not match is fetched with one ranged read into a sparse local file and hashed on arrival. Opening costs
O(1); serving touches the few blocks around the documents a batch reads. Entry 0 and the last entry are
known from ``meta.json`` (0 and the token count) and cost nothing.

The engine uses the index through ``len``, integer, slice and integer-array indexing, and
``searchsorted`` (a binary search that reads one block), exactly like a numpy array; ``np.asarray`` of the
whole index verifies every block first (repetition histograms over all documents are O(documents) anyway).
"""

from __future__ import annotations

import bisect
import hashlib
import io
import operator
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mixer_service.errors import CorruptData
from mixer_service.prepare.meta import IndexBlocks
from mixer_service.sources.verify import FileStamp, VerifyMode

Fetch = Callable[[int, int], bytes]  # byte range [a, b) of the index file at its origin


class DocIndex:
    """``doc_offsets`` of one source: a verified, lazily checked view of a memory-mapped ``.npy`` file.

    ``fetch`` makes the file a cache of a remote index: a block that does not hash right locally is read
    from the origin, checked and written in place (the file is sparse until then). Without ``fetch`` the
    file is the source's own and a block that does not hash right is ``CorruptData`` naming it.
    """

    def __init__(self, path: Path, num_docs: int, num_tokens: int, blocks: IndexBlocks, mode: VerifyMode,
                 fetch: Fetch | None = None, label: str | None = None) -> None:
        self.path = Path(path)
        self.label = label or str(path)
        self.blocks = blocks
        self.mode = mode
        self.num_tokens = num_tokens
        self._n = num_docs + 1
        self._fetch = fetch
        self._lock = threading.Lock()
        self._firsts = np.asarray(blocks.firsts, dtype=np.int64)
        self._first_list = list(blocks.firsts)
        self._verified: set[int] = set()
        self.faults: dict[int, str] = {}  # block -> why it failed, for readiness; cleared when it verifies
        self._map()

    # -- numpy-like surface used by the engine ------------------------------------------------------------

    @property
    def shape(self) -> tuple[int]:
        return (self._n,)

    @property
    def dtype(self) -> np.dtype:
        return self._array.dtype

    @property
    def size(self) -> int:
        return self._n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(self._n)
            if step > 0 and stop > start:
                self._ensure_range(start, stop - 1)
            elif step < 0 and start > stop:
                self._ensure_range(stop + 1, start)
            return self._array[key]
        if isinstance(key, (int, np.integer)):
            i = operator.index(key)
            i = i + self._n if i < 0 else i
            if i == 0:
                return np.int64(0)
            if i == self._n - 1:
                return np.int64(self.num_tokens)
            if 0 < i < self._n:
                self._ensure(i // self.blocks.entries)
            return self._array[i]  # out of range: numpy's IndexError
        idx = np.asarray(key)
        if idx.dtype == bool or idx.size == 0:
            self._ensure_range(0, self._n - 1)
            return self._array[idx]
        idx = np.where(idx < 0, idx + self._n, idx)
        if idx.size >= 64:  # a large request: every block between its ends (no sort of the indices)
            self._ensure_range(int(idx.min()), int(idx.max()))
        else:
            for b in np.unique(idx // self.blocks.entries).tolist():
                self._ensure(b)
        return self._array[idx]

    def searchsorted(self, values: Any, side: Literal["left", "right"] = "left") -> Any:
        """``np.searchsorted(index, values, side)``, reading only the block each value falls in."""
        if np.ndim(values) == 0:  # the per-row provenance path: keep it a few microseconds
            b = min(max(bisect.bisect_right(self._first_list, values) if side == "right"
                        else bisect.bisect_left(self._first_list, values), 1), len(self._first_list)) - 1
            self._ensure(b)
            a, z = self.blocks.span(b, self._n)
            return a + self._array[a:z].searchsorted(values, side=side)
        v = np.asarray(values, dtype=np.int64)
        if len(self._verified) == len(self._first_list):  # all checked: one search, no routing
            return self._array.searchsorted(v, side=side)
        flat = v.reshape(-1)
        block = np.clip(np.searchsorted(self._firsts, flat, side=side) - 1, 0, len(self._firsts) - 1)
        out = np.empty(flat.shape, dtype=np.intp)
        for b in np.unique(block).tolist():
            self._ensure(b)
            a, z = self.blocks.span(b, self._n)
            sel = block == b
            out[sel] = a + np.searchsorted(self._array[a:z], flat[sel], side=side)
        return out.reshape(v.shape) if v.ndim else out[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        self._ensure_range(0, self._n - 1)
        return np.asarray(self._array, dtype=dtype)

    def __repr__(self) -> str:
        return (f"DocIndex({self.label!r}, {self._n - 1} documents, "
                f"{len(self._verified)}/{len(self._firsts)} blocks verified)")

    # -- verification -------------------------------------------------------------------------------------

    @property
    def verified_blocks(self) -> int:
        """How many blocks this process has checked (and, for a remote index, holds locally)."""
        return len(self._verified)

    @property
    def is_cache(self) -> bool:
        """Whether the file is a local cache of a remote index (blocks fetched on demand)."""
        return self._fetch is not None

    def verify_all(self) -> None:
        """Check every block now (``--verify full``)."""
        self._ensure_range(0, self._n - 1)

    def verify_ends(self) -> None:
        """Check the first and the last block now."""
        self._ensure(0)
        self._ensure(len(self._firsts) - 1)

    def revalidate(self) -> bool:
        """After the file changed: map it again and re-check the blocks in use (others are checked on
        their first use; blocks that failed are tried again). True when every one of them holds the bytes this
        source was opened with."""
        try:
            self._map()
        except CorruptData:
            return False
        in_use, self._verified = sorted(self._verified | set(self.faults)), set()
        try:
            for b in in_use:
                self._ensure(b)
        except CorruptData:
            return False
        return True

    def refresh(self) -> None:
        """For a cache file (remote index): if something else changed it, forget which blocks were checked,
        so each is hashed (and fetched again if need be) before its next use. One stat."""
        if self.is_cache and FileStamp.of(self.path) != self._stamp:
            with self._lock:
                sparse_index_file(self.path, self._header, self._n)
                self._follow_file()

    def _map(self) -> None:
        array = map_index(self.path, self._n, self.label)
        self._array = np.asarray(array)  # a plain view: slicing a memmap object costs ~10x more
        if self._fetch is not None:
            with open(self.path, "rb") as fh:
                self._header = fh.read(array.offset)
        self._stamp = FileStamp.of(self.path)

    def _follow_file(self) -> None:
        """Map the file now at ``path`` and trust none of it until its blocks are checked again."""
        self._map()
        self._verified = set()

    def _ensure_range(self, first: int, last: int) -> None:
        per = self.blocks.entries
        for b in range(max(first, 0) // per, min(last, self._n - 1) // per + 1):
            self._ensure(b)

    def _ensure(self, b: int) -> None:
        if b in self._verified or self.mode == VerifyMode.OFF and self._fetch is None:
            return
        try:
            self._check(b)
        except CorruptData as exc:
            self.faults[b] = str(exc)
            raise
        self.faults.pop(b, None)
        self._verified.add(b)

    def _check(self, b: int) -> None:
        a, z = self.blocks.span(b, self._n)
        if not self._hash_ok(b, self._array[a:z]):
            if self._fetch is None:
                raise CorruptData(f"{self.label}: document index hash mismatch in block {b} "
                                  "(corrupt or edited)")
            self._fill(self._fetch, b, a, z)
        data = self._array[a:z]
        last = b + 1 == len(self._firsts)
        if data[0] != self._firsts[b] or (last and data[-1] != self.num_tokens) or (
                not last and data[-1] != self._firsts[b + 1]):
            raise CorruptData(f"{self.label}: document index block {b} does not agree with meta.json")

    def _hash_ok(self, b: int, data: np.ndarray) -> bool:
        return hashlib.sha256(np.ascontiguousarray(data).data).hexdigest() == self.blocks.sha256[b]

    def _fill(self, fetch: Fetch, b: int, a: int, z: int) -> None:
        """Fetch block ``b`` from the origin, check it, and write it into the local file (outside the lock:
        two threads fetching one block write the same verified bytes)."""
        start = self.blocks.data_offset + 8 * a
        data = fetch(start, start + 8 * (z - a))
        if len(data) != 8 * (z - a) or not self._hash_ok(b, np.frombuffer(data, dtype="<i8")):
            raise CorruptData(f"{self.label}: document index block {b} hash mismatch on arrival")
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                if self._stamp is None or os.fstat(fd).st_ino != self._stamp.inode:
                    self._follow_file()  # another process replaced the file
                os.pwrite(fd, data, start)
            finally:
                os.close(fd)
            self._stamp = FileStamp.of(self.path)  # our own write is not a foreign change
        if not self._hash_ok(b, self._array[a:z]):  # the file was replaced under us: never trust the map
            raise CorruptData(f"{self.label}: document index block {b} did not reach the mapped file")


def map_index(path: Path, num_entries: int, label: str) -> np.memmap:
    """Memory-map an int64 index of ``num_entries``; a missing, unreadable or misshapen file is
    ``CorruptData`` naming ``label``."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise CorruptData(f"{label}: unreadable document index ({exc})") from exc
    if array.dtype != np.dtype("<i8") or array.shape != (num_entries,):
        raise CorruptData(f"{label}: document index does not match the source's description "
                          f"({num_entries - 1} documents)")
    return array


def sparse_index_file(path: Path, header: bytes, num_entries: int) -> None:
    """Make ``path`` an ``.npy`` file of ``num_entries`` int64 whose data is a hole until blocks are
    fetched: no disk used for blocks never read. An existing file of the right header and size is kept
    (its blocks are re-hashed before use, so whatever it holds is safe)."""
    size = len(header) + 8 * num_entries
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == size and fh.read(len(header)) == header:
                return
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as fh:
        fh.write(header)
        fh.truncate(size)
    try:
        if path.exists():
            os.replace(tmp, path)  # wrong size or header: another source's index, or damaged
        else:
            os.link(tmp, path)  # never replaces a file another worker process just made and uses
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def npy_header(num_entries: int) -> bytes:
    """The ``.npy`` header ``prepare`` writes for an int64 index of ``num_entries`` (no round trip to ask
    the origin; a header of another length means another writer, and the caller fetches the real one)."""
    out = io.BytesIO()
    header = {"descr": "<i8", "fortran_order": False, "shape": (num_entries,)}
    np.lib.format.write_array_header_1_0(out, header)
    return out.getvalue()
