"""The document index of a source (int64[num_docs + 1]), read with ``pread`` and verified block by block.

At 10^12 tokens the index is ~2·10^9 documents, 16 GB: hashing it whole at every start, or copying it
from object storage, is the one cost that would grow with the corpus. Here a block (``IndexBlocks``,
8 MiB) is hashed the first time a lookup touches it; for a remote source, a block whose local bytes do
not match is fetched with one ranged read into a sparse local file and hashed on arrival. Opening costs
O(1); serving touches the few blocks around the documents a batch reads. Entry 0 and the last entry are
known from ``meta.json`` (0 and the token count) and cost nothing.

Hashing a block also takes its 4 KiB checksums and every 512th entry (``checked``; 0.4 % of the block,
kept in memory), and every later lookup reads the 4 KiB it needs from disk and checks it: bit rot after
verification is refused (a cached remote block is fetched again), and a truncated file is an error naming
it, never the SIGBUS a memory map would raise. A binary search routes through the kept entries and reads
one 4 KiB block.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mixer_contract.errors import CorruptData
from mixer_service.sources.checked import CHECK_BLOCK, CheckedRegion, block_sums, open_handle, pread_exact
from mixer_service.sources.disk_budget import DiskBudget, block_size, on_disk, punch_hole
from mixer_service.sources.source_format import IndexBlocks
from mixer_service.sources.verify import FileStamp, VerifyMode

Fetch = Callable[[int, int], bytes]  # byte range [a, b) of the index file at its origin
SUB = CHECK_BLOCK // 8  # entries a checksum covers; a binary search reads one such run


@dataclass(frozen=True)
class _Block:
    """A verified block: where its entries lie (``region``, entries ``a`` on) and every ``SUB``-th entry."""

    a: int
    region: CheckedRegion
    samples: np.ndarray


class DocIndex:
    """``doc_offsets`` of one source: a verified, lazily checked view of an ``.npy`` file read in place.

    ``fetch`` makes the file a cache of a remote index: a block that does not hash right locally is read
    from the origin, checked and written in place (the file is sparse until then). Without ``fetch`` the
    file is the source's own and a block that does not hash right is ``CorruptData`` naming it. A cache file
    under a ``DiskBudget``'s root allocates each block within the limit before fetching it, and gives blocks
    back (holes again, fetched on their next use) when a request needs the room and no shard can go.
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
        self._checked: dict[int, _Block] = {}
        self.faults: dict[int, str] = {}  # block -> why it failed, for readiness; cleared when it verifies
        self._punched: set[int] = set()  # blocks this process made holes again (not yet fetched back)
        self._open_file()
        self._budget = DiskBudget.covering(self.path) if fetch is not None else None
        if self._budget is not None:
            self._budget.add_tenant(self)

    # -- numpy-like surface used by the engine ------------------------------------------------------------

    @property
    def shape(self) -> tuple[int]:
        return (self._n,)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype("<i8")

    @property
    def size(self) -> int:
        return self._n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(self._n)
            if step == 1:
                return self._entries(start, stop)
            return self[np.arange(start, stop, step)]
        if isinstance(key, (int, np.integer)):
            i = operator.index(key)
            i = i + self._n if i < 0 else i
            if i == 0:
                return np.int64(0)
            if i == self._n - 1:
                return np.int64(self.num_tokens)
            if not 0 < i < self._n:
                raise IndexError(f"index {key} is out of bounds for a document index of size {self._n}")
            return self._entries(i, i + 1)[0]
        idx = np.asarray(key)
        if idx.dtype == bool:
            return self._entries(0, self._n)[idx]
        idx = np.where(idx < 0, idx + self._n, idx).astype(np.int64)
        if idx.size == 0:
            return np.zeros(idx.shape, dtype=np.int64)
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self._n:
            raise IndexError(f"index out of bounds for a document index of size {self._n}")
        if idx.size >= 64 or hi - lo < 8 * SUB:  # one read of the covering range
            return self._entries(lo, hi + 1)[idx - lo]
        return np.array([self._entries(i, i + 1)[0] for i in idx.reshape(-1).tolist()],
                        dtype=np.int64).reshape(idx.shape)

    def searchsorted(self, values: Any, side: Literal["left", "right"] = "left") -> Any:
        """``np.searchsorted(index, values, side)``, reading one 4 KiB run of entries per value."""
        if np.ndim(values) == 0:  # the per-row provenance path: keep it a few microseconds
            b = min(max(bisect.bisect_right(self._first_list, values) if side == "right"
                        else bisect.bisect_left(self._first_list, values), 1), len(self._first_list)) - 1
            blk = self._block(b)
            j = max(int(blk.samples.searchsorted(values, side=side)) - 1, 0)
            return blk.a + j * SUB + int(self._run(b, j).searchsorted(values, side=side))
        v = np.asarray(values, dtype=np.int64)
        flat = v.reshape(-1)
        block, runs = self._route(flat, side)
        out = np.empty(flat.shape, dtype=np.intp)
        for b in np.unique(block).tolist():
            sel = np.flatnonzero(block == b)
            for j in np.unique(runs[sel]).tolist():
                here = sel[runs[sel] == j]
                out[here] = self._block(b).a + j * SUB + self._run(b, j).searchsorted(flat[here], side=side)
        return out.reshape(v.shape) if v.ndim else out[0]

    def window(self, values: Any) -> IndexWindow:
        """The entries lookups of ``values`` (and slices between them) need, read at once: see
        ``IndexWindow``."""
        return IndexWindow(self, np.asarray(values, dtype=np.int64).reshape(-1))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self._entries(0, self._n), dtype=dtype)

    def __repr__(self) -> str:
        return (f"DocIndex({self.label!r}, {self._n - 1} documents, "
                f"{len(self._checked)}/{len(self._firsts)} blocks verified)")

    # -- verification -------------------------------------------------------------------------------------

    @property
    def verified_blocks(self) -> int:
        """How many blocks this process has checked (and, for a remote index, holds locally)."""
        return len(self._checked)

    @property
    def is_cache(self) -> bool:
        """Whether the file is a local cache of a remote index (blocks fetched on demand)."""
        return self._fetch is not None

    def verify_all(self) -> None:
        """Check every block now (``--verify full``)."""
        for b in range(len(self._firsts)):
            self._block(b)

    def verify_ends(self) -> None:
        """Check the first and the last block now."""
        self._block(0)
        self._block(len(self._firsts) - 1)

    def revalidate(self) -> bool:
        """After the file changed: open it again and re-check the blocks in use (others are checked on
        their first use; blocks that failed are tried again). True when every one of them holds the bytes this
        source was opened with."""
        try:
            self._open_file()
        except CorruptData:
            return False
        in_use, self._checked = sorted(set(self._checked) | set(self.faults)), {}
        try:
            for b in in_use:
                self._block(b)
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

    def _open_file(self) -> None:
        handle = open_handle(self.path, self.label)
        self._offset = index_data_offset(handle, self._n, self.label)
        self._handle = handle
        if self._fetch is not None:
            self._header = pread_exact(handle, 0, self._offset, self.label)
        self._stamp = FileStamp.of(self.path)

    def _follow_file(self) -> None:
        """Open the file now at ``path`` and trust none of it until its blocks are checked again."""
        self._open_file()
        self._checked = {}

    # -- reading ------------------------------------------------------------------------------------------

    def _entries(self, first: int, stop: int) -> np.ndarray:
        """Entries ``[first, stop)``, each 4 KiB they lie in checked as it is read."""
        if stop <= first:
            return np.zeros(0, dtype=np.int64)
        per = self.blocks.entries
        b = first // per
        if (stop - 1) // per == b:  # the usual case: inside one block
            return self._read(b, first - b * per, stop - b * per)
        pieces = []
        for b in range(first // per, (stop - 1) // per + 1):
            a = b * per
            pieces.append(self._read(b, max(first, a) - a, min(stop, a + per) - a))
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _route(self, flat: np.ndarray, side: str) -> tuple[np.ndarray, np.ndarray]:
        """The block and the run (4 KiB of entries) a binary search for each value ends in, from the
        entries kept in memory (verifies the blocks it routes through)."""
        if len(self._firsts) == 1:  # a small index (< 1 M documents): no block to choose
            return np.zeros(flat.shape, dtype=np.int64), \
                np.maximum(self._block(0).samples.searchsorted(flat, side=side) - 1, 0)
        block = np.maximum(np.searchsorted(self._firsts, flat, side=side) - 1, 0)
        runs = np.empty(flat.shape, dtype=np.int64)
        for b in np.unique(block).tolist():
            sel = block == b
            runs[sel] = np.maximum(self._block(b).samples.searchsorted(flat[sel], side=side) - 1, 0)
        return block, runs

    def _read_runs(self, b: int, runs: list[int]) -> np.ndarray:
        """Runs ``runs`` (sorted, unique) of block ``b`` back to back, one ``pread`` per adjacent group and
        each checked once; a failed check is handled like ``_read``'s."""
        try:
            buf, _ = self._block(b).region.read_blocks(runs)
        except CorruptData as exc:
            self._checked.pop(b, None)
            if not self.is_cache:
                self.faults[b] = str(exc)
                raise
            buf, _ = self._block(b).region.read_blocks(runs)
        return buf[: len(buf) - len(buf) % 8].view("<i8")

    def _run(self, b: int, j: int) -> np.ndarray:
        """The ``j``-th run of ``SUB`` entries of block ``b`` (one checksum block)."""
        return self._read(b, j * SUB, min((j + 1) * SUB, self.blocks.entries))

    def _read(self, b: int, lo: int, hi: int) -> np.ndarray:
        """Entries ``[lo, hi)`` of block ``b`` (relative to its start). A failed check on a cached remote
        block fetches it again; on the source's own file it is ``CorruptData`` naming the file."""
        blk = self._block(b)
        try:
            return np.frombuffer(blk.region.read(8 * lo, 8 * hi), dtype="<i8")
        except CorruptData as exc:
            self._checked.pop(b, None)
            if not self.is_cache:
                self.faults[b] = str(exc)
                raise
        return np.frombuffer(self._block(b).region.read(8 * lo, 8 * hi), dtype="<i8")

    def _block(self, b: int) -> _Block:
        blk = self._checked.get(b)
        if blk is not None:
            return blk
        try:
            blk = self._verify(b)
        except CorruptData as exc:
            self.faults[b] = str(exc)
            raise
        self.faults.pop(b, None)
        self._checked[b] = blk
        return blk

    def _verify(self, b: int) -> _Block:
        """Read block ``b``, prove it (sha256; fetched from the origin when the local copy is wrong), and
        keep what later reads are checked against."""
        a, z = self.blocks.span(b, self._n)
        start, size = self._offset + 8 * a, 8 * (z - a)
        trusting = self.mode == VerifyMode.OFF and self._fetch is None
        try:
            data = pread_exact(self._handle, start, size, self.label)
        except CorruptData:
            if self._fetch is None:
                raise
            data = b""
        if not trusting and not self._hash_ok(b, data):
            if self._fetch is None:
                raise CorruptData(f"{self.label}: document index hash mismatch in block {b} "
                                  "(corrupt or edited)")
            data = self._fill(self._fetch, b, a, z)
        values = np.frombuffer(data, dtype="<i8")
        last = b + 1 == len(self._firsts)
        if values[0] != self._firsts[b] or (last and values[-1] != self.num_tokens) or (
                not last and values[-1] != self._firsts[b + 1]):
            raise CorruptData(f"{self.label}: document index block {b} does not agree with meta.json")
        sums = None if trusting else block_sums(data)
        return _Block(a, CheckedRegion(self._handle, self._offset + 8 * a, size, sums, self.label),
                      values[::SUB].copy())

    def _hash_ok(self, b: int, data: bytes) -> bool:
        return hashlib.sha256(data).hexdigest() == self.blocks.sha256[b]

    def _fill(self, fetch: Fetch, b: int, a: int, z: int) -> bytes:
        """Allocate block ``b``'s bytes within the cache limit, fetch it from the origin, check it, and write
        it into the local file (outside the lock: two threads fetching one block write the same verified
        bytes). Returns the verified bytes."""
        start = self.blocks.data_offset + 8 * a
        budget = self._budget
        if budget is not None:
            self._with_fd(lambda fd: budget.allocate(fd, start, 8 * (z - a), demand=True,
                                                     what=f"{self.label} block {b}"))
        data = fetch(start, start + 8 * (z - a))
        if len(data) != 8 * (z - a) or not self._hash_ok(b, data):
            raise CorruptData(f"{self.label}: document index block {b} hash mismatch on arrival")
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY)
            except OSError as exc:
                raise CorruptData(f"{self.path}: cannot write the fetched block ({exc.strerror})") from exc
            try:
                if os.fstat(fd).st_ino != os.fstat(self._handle.fileno()).st_ino:
                    self._follow_file()  # another process replaced the file
                os.pwrite(fd, data, start)
            finally:
                os.close(fd)
            self._stamp = FileStamp.of(self.path)  # our own write is not a foreign change
            self._punched.discard(b)
        return data

    def _with_fd(self, use: Callable[[int], Any]) -> Any:
        try:
            fd = os.open(self.path, os.O_WRONLY)
        except OSError as exc:
            raise CorruptData(f"{self.path}: cannot open it for writing ({exc.strerror})") from exc
        try:
            return use(fd)
        finally:
            os.close(fd)

    def evictable_bytes(self) -> int:
        """Its blocks on disk past the header's file-system block (which is never given back)."""
        try:
            allocated = os.stat(self.path).st_blocks * 512
        except OSError:
            return 0
        return max(0, allocated - on_disk(self._offset, block_size(self.path.parent)))

    def evict_one(self, demand: bool) -> bool:
        """Give back one block's bytes (``DiskBudget`` asks, for a request only: a prefetch never costs a
        lookup its block): the first verified here, else one another run or worker left on disk."""
        if not demand:
            return False
        with self._lock:
            b = next(iter(self._checked), None)
            if b is None:
                b = self._block_on_disk()
            if b is None:
                return False
            self._checked.pop(b, None)
            self._punched.add(b)
            start, stop = self._own_bytes(b)
            try:
                punched = self._with_fd(lambda fd: punch_hole(fd, start, stop - start))
            except CorruptData:
                return False  # the file is gone: nothing of it to give back
            self._stamp = FileStamp.of(self.path)  # our own change is not a foreign one
            return punched

    def _own_bytes(self, b: int) -> tuple[int, int]:
        """The byte range a hole for block ``b`` may cover: its entries, widened to whole file-system blocks
        where the neighbour sharing one is not in use here (a block that only shared one would never be
        freed); never the header's. Another worker using that neighbour sees a checksum fail and fetches
        it again."""
        unit = block_size(self.path.parent)
        a = b * self.blocks.entries  # its own entries: the one past it is the next block's first
        start, stop = self._offset + 8 * a, self._offset + 8 * min(a + self.blocks.entries, self._n)
        if b - 1 not in self._checked:
            start -= start % unit
        if b + 1 not in self._checked:
            stop = on_disk(stop, unit)
        return max(start, on_disk(self._offset, unit)), stop

    def _block_on_disk(self) -> int | None:
        """A block holding allocated bytes that this process has not punched, found with ``SEEK_DATA``."""
        unit = block_size(self.path.parent)
        pos = on_disk(self._offset, unit)  # the header's own file-system block is never freed
        end = self._offset + 8 * self._n
        while pos < end:
            try:
                pos = os.lseek(self._handle.fileno(), pos, os.SEEK_DATA)
            except OSError:
                return None  # no data past pos (ENXIO), or the file system cannot tell
            if pos >= end:
                return None
            b = min((pos - self._offset) // 8 // self.blocks.entries, len(self._firsts) - 1)
            if b not in self._punched:
                return b
            pos = on_disk(self._offset + 8 * self.blocks.span(b, self._n)[1], unit)
        return None


class IndexWindow:
    """The runs (4 KiB of entries, one checksum each) of a ``DocIndex`` that one batch's lookups need, read
    together when the window is made: one ``pread`` per group of adjacent runs, each run checked once,
    instead of one read and check per search step and per slice. Searches and slices answer exactly what
    the index answers; one whose answer the window cannot prove (a run it lacks) goes to the index, checked
    there. A window is made per batch and dropped with it, so every entry it serves was checked on this read.
    """

    def __init__(self, index: DocIndex, values: np.ndarray) -> None:
        self._index = index
        self._n = len(index)
        self._per = index.blocks.entries
        block, runs = index._route(values, "right")
        # block -> (its runs read, ascending; their first entries; their entries back to back, as many as
        # the block's region holds)
        self._runs: dict[int, tuple[list[int], np.ndarray, np.ndarray]] = {}
        for b in (np.unique(block).tolist() if block.size else []):
            have = np.unique(runs[block == b]).tolist()
            self._runs[b] = (have, np.array(have, dtype=np.int64) * SUB + b * self._per,
                             index._read_runs(b, have))

    def __len__(self) -> int:
        return self._n

    def searchsorted(self, values: Any, side: Literal["left", "right"] = "left") -> np.ndarray:
        """``np.searchsorted(index, values, side)`` for a 1-D ``values``."""
        flat = np.asarray(values, dtype=np.int64)
        firsts = self._index._firsts
        out = np.empty(flat.shape, dtype=np.intp)
        block = np.maximum(np.searchsorted(firsts, flat, side=side) - 1, 0) if len(firsts) > 1 else None
        for b in np.unique(block).tolist() if block is not None else [0]:
            sel = np.flatnonzero(block == b) if block is not None else slice(None)
            have, run_start, entries = self._runs.get(b, ([], np.zeros(1, np.int64), np.zeros(0, np.int64)))
            # The last entry at or below the value (under ``side``) is at ``slot``; the answer is the entry
            # after it, proven only when the window holds that next entry too (or the block ends there:
            # the next block's first entry is above the value, or the search would have gone there).
            slot = np.searchsorted(entries, flat[sel], side=side) - 1
            here = np.minimum(np.maximum(slot, 0), max(len(entries) - 2, 0))
            at = run_start[here // SUB] + here % SUB
            at_next = run_start[(here + 1) // SUB] + (here + 1) % SUB if len(entries) > 1 else at
            ok = (slot >= 0) & (slot + 1 < len(entries)) & (at_next == at + 1)
            if b == 0 and have and have[0] == 0:
                ok |= slot == -1  # below entry 0: the answer is 0
            answer = np.where(slot >= 0, at + 1, 0)
            if ok.all():
                out[sel] = answer
                continue
            idx = np.arange(flat.size)[sel]
            out[idx[ok]] = answer[ok]
            out[idx[~ok]] = self._index.searchsorted(flat[idx[~ok]], side=side)
        return out

    def __getitem__(self, key: slice) -> np.ndarray:
        """Entries ``[start, stop)`` (``step`` 1, both given and in range)."""
        a, c = key.start, key.stop
        if c <= a:
            return np.zeros(0, dtype=np.int64)
        b = a // self._per
        have, _, entries = self._runs.get(b, ([], None, None))
        ja, jc = (a - b * self._per) // SUB, (c - 1 - b * self._per) // SUB
        if (c - 1) // self._per == b and have:
            ka, kc = bisect.bisect_left(have, ja), bisect.bisect_left(have, jc)
            if kc < len(have) and have[ka] == ja and have[kc] == jc and kc - ka == jc - ja:
                lo = ka * SUB + (a - b * self._per) % SUB
                return entries[lo:lo + c - a]
        return self._index[a:c]


def index_data_offset(handle: io.FileIO, num_entries: int, label: str) -> int:
    """Where the data of an ``.npy`` int64 index of ``num_entries`` starts in ``handle``'s file; a missing,
    unreadable, misshapen or short file is ``CorruptData`` naming ``label``."""
    try:
        handle.seek(0)
        version = np.lib.format.read_magic(handle)
        fmt = np.lib.format
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read(handle)
        offset = handle.tell()
        size = os.fstat(handle.fileno()).st_size
    except (OSError, ValueError) as exc:
        raise CorruptData(f"{label}: unreadable document index ({exc})") from exc
    if dtype != np.dtype("<i8") or shape != (num_entries,) or fortran:
        raise CorruptData(f"{label}: document index does not match the source's description "
                          f"({num_entries - 1} documents)")
    if size != offset + 8 * num_entries:
        raise CorruptData(f"{label}: document index is {size} bytes, {offset + 8 * num_entries} expected "
                          "(truncated?)")
    return offset


def load_index(path: Path, num_entries: int, label: str) -> np.ndarray:
    """Read a whole int64 index into memory (sources from before per-block hashes: hashed whole at open,
    then served from memory, so nothing on disk can change or truncate it under the server)."""
    handle = open_handle(path, label)
    offset = index_data_offset(handle, num_entries, label)
    return np.frombuffer(pread_exact(handle, offset, 8 * num_entries, label), dtype="<i8")


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
