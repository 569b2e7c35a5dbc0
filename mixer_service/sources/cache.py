"""A bounded, verified, least-recently-used local cache of decompressed token shards.

Each entry is one shard's raw little-endian tokens in ``<raw_sha256>.bin``: content-addressed, so two
sources sharing a shard share an entry and a changed shard can never be mistaken for the old one. An entry
is verified (sha256 of its raw bytes) the first time this process uses it, and again whenever its file
changes (inode, size or mtime). A shard fetched from its origin is checked twice as it arrives: the sha256 of
the stored object before it is decoded, then the sha256 of the decoded bytes against ``raw_sha256``, the
cache key; it is installed by rename.

Why the raw bytes are hashed although the object's hash was checked (issue 18 tried skipping it): the cache
is content-addressed by ``raw_sha256`` and shared by every source, and a matching object proves only its own
decompression, not that it decodes to the key. With the raw hash skipped, a meta.json whose ``raw_sha256``
lies made one shard serve different bytes depending on what another source had read, and ``--verify off``
handed the liar's bytes to an honest source (``tests/sources/test_hostile_cache.py``). The raw hash is one
``hashlib`` call over the decoded buffer (~9 ms a 16 MiB shard here, about a quarter of a build).

The pass that proves an entry's bytes (decoding and hashing an object, or re-hashing a file) also takes a 4
KiB block checksum table from them (``checked``): every later read of the entry is a ``pread`` checked against
it, so bit rot that leaves the file's stat untouched, or a truncation, is caught on the read that meets it;
the entry is then dropped and rebuilt from its shard. Token ids are checked against the source's vocabulary
once, in that same pass. With ``limit_bytes`` the cache directory (``root``: everything under it, the document
indexes kept there included) is a ``DiskBudget``: a shard's bytes are allocated before it is fetched, evicting
the least recently used entries first, so the directory never holds more than the limit, fetches in flight
included; views already handed out stay valid after eviction because they hold the unlinked file open.

Resident tier (``memory_bytes``, default 1 GiB per process; 0 turns it off): when this process has a
shard's whole raw bytes in hand because it has just proven them (fetched, decoded and hashed, or a cached
file re-hashed), it keeps those very bytes, one immutable buffer, as the shard's
resident copy, and ``get`` answers a read-only array view of them: no ``pread``, no block check, nothing a
later change, truncation or removal of the file can reach (they are not a mapping of it). Resident copies are
bounded by ``memory_bytes`` (least recently read evicted first) and independent of the disk entries: a disk
eviction keeps the resident copy (its bytes stay proven), a resident eviction leaves the disk entry to the
checked path. A checked read never promotes a shard into memory (under the global order that would load a
whole shard for one row); only a fetch or a verification does.

``prefetch`` takes the shards the next steps will need (not those resident), so steady-state requests find
them present; a prefetch that does not fit without evicting the most recently read half of the limit is
skipped, never waited for.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import itertools
import logging
import os
import re
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeGuard, TypeVar

import numpy as np
import zstandard

from mixer_contract.errors import CorruptData, InvalidInput, MixerError, SourceUnavailable
from mixer_contract.job import DEFAULT_WINDOW_SHARDS
from mixer_service.sources.checked import CheckedRegion, CheckedTokens, Digest, find_token_above, open_handle
from mixer_service.sources.disk_budget import CacheFull, DiskBudget, block_size, on_disk
from mixer_service.sources.doc_index import DocIndex
from mixer_service.sources.origins import Origin
from mixer_service.sources.verify import DEFAULT_VERIFY, FileStamp, VerifyMode

log = logging.getLogger(__name__)
_Tokens = TypeVar("_Tokens", CheckedTokens, np.ndarray)

_READ_CHUNK = 1 << 22  # bytes hashed a read while verifying an entry (a multiple of the check block)
# What a shard cache writes into its directory: KEY.bin, .KEY.bin.tmp-PID-THREAD (being fetched) and
# .KEY.bin.building (one_builder's lock).
_OWN_FILE = re.compile(r"[0-9a-f]{64}\.bin|\.[0-9a-f]{64}\.bin\.(?:tmp-\d+-\d+|building)")


@dataclass(frozen=True)
class Shard:
    """One zstd-compressed token shard of a source and the hashes that prove its bytes."""

    origin: Origin = field(compare=False, repr=False)
    file: str
    num_tokens: int
    dtype: np.dtype
    sha256: str  # of the file as stored
    raw_sha256: str  # of the decompressed tokens: the cache key
    # Turns the stored file into raw tokens when it is not a plain zstd stream (e.g. an MDS shard).
    expand: Callable[[bytes], bytes] | None = field(default=None, compare=False, repr=False)
    vocab_size: int | None = field(default=None, compare=False)  # token ids must lie below it

    @property
    def raw_bytes(self) -> int:
        return self.num_tokens * self.dtype.itemsize

    @property
    def label(self) -> str:
        return self.origin.describe(self.file)


@dataclass
class _Entry:
    path: Path
    size: int
    stamp: FileStamp | None
    region: CheckedRegion | None = None  # set once verified in this process
    max_token: int = -1  # largest token id, from the verified bytes (-1: not looked at, --verify off)
    max_dtype: np.dtype | None = None  # the dtype the bytes were read as to take ``max_token``
    requested: int = 0  # when a request last read it (a ShardCache._clock tick); 0: prefetched, not read yet


@dataclass
class _Resident:
    """A shard's proven raw bytes kept in memory (read-only) and the largest token id among them."""

    data: np.ndarray  # uint8, read-only, over an immutable buffer nobody else can write
    max_token: int
    max_dtype: np.dtype  # as ``_Entry.max_dtype``


def _readonly(buffer: bytes | bytearray) -> np.ndarray:
    """A uint8 array over ``buffer`` that neither it nor any view of it can be made writeable."""
    return np.frombuffer(memoryview(buffer).toreadonly(), dtype=np.uint8)


DEFAULT_MEMORY_BYTES = 1 << 30  # per process: 64 shards of 2^23 uint16 tokens, 4 default windows of 16


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0  # a get that had to fetch/decompress (or re-verify) before answering
    fetches: int = 0  # shards read from their origin
    fetched_bytes: int = 0
    verified: int = 0  # cache files hashed
    evictions: int = 0
    prefetch_skipped: int = 0  # prefetches that did not fit the limit (the request fetches it when it comes)
    rebuilt: int = 0  # entries whose bytes failed a read check after verification, dropped and rebuilt
    resident_hits: int = 0  # gets answered from a resident (in-memory, proven) copy; also counted in hits
    resident_bytes: int = 0  # gauge: bytes of the resident copies held now (<= memory_bytes)
    resident_evictions: int = 0  # resident copies dropped to stay within memory_bytes

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class ShardCache:
    """Decompressed shards under ``directory``; with ``limit_bytes``, everything under ``root`` (default
    ``directory``; the server's ``--cache-dir``, which also holds remote document indexes) stays within it.
    ``memory_bytes``: the bound of this process's resident copies of proven shards (0: none, every read is a
    checked read of the disk entry)."""

    def __init__(self, directory: Path, limit_bytes: int | None = None, verify: VerifyMode = DEFAULT_VERIFY,
                 prefetch_threads: int = 4, root: Path | None = None,
                 memory_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        if limit_bytes is not None and limit_bytes < 0:
            raise InvalidInput(f"cache limit must be >= 0 bytes, got {limit_bytes}")
        if memory_bytes < 0:
            raise InvalidInput(f"memory cache must be >= 0 bytes, got {memory_bytes}")
        self.memory_bytes = memory_bytes
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # least recently read first
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidInput(f"cannot create the shard cache at {self.directory} ({exc})") from exc
        self.limit_bytes = limit_bytes
        self.verify = VerifyMode(verify)
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._pool = ThreadPoolExecutor(prefetch_threads, thread_name_prefix="shard-prefetch")
        self._pending: set[str] = set()
        self._clock = itertools.count(1)
        self.budget = None if limit_bytes is None else DiskBudget(Path(root or self.directory), limit_bytes)
        self._adopt_existing()
        if self.budget is not None:
            self.budget.add_tenant(self)

    def fit(self) -> None:
        """Evict until the directory is within the limit (a smaller one than the last run's). Not at open: a
        start refused for a limit that is too small must leave the cache as it found it (another server
        may be serving from it, and a typo such as ``--cache-limit 20`` would have emptied it)."""
        if self.budget is not None:
            self.budget.fit()

    def _adopt_existing(self) -> None:
        """Entries left by an earlier process count against the limit (oldest first); verified on use. Partial
        files of processes that died mid-fetch are removed (they hold allocated bytes)."""
        found = []
        # Under the budget's lock, in which a writer creates and locks its partial file (DiskBudget.create).
        with self.budget.locked() if self.budget is not None else contextlib.nullcontext():
            for path in self.directory.glob(".*.tmp-*"):
                if not _being_written(path):
                    path.unlink(missing_ok=True)
        for path in self.directory.glob("*.bin"):
            stamp = _regular(path)
            if stamp is not None:
                found.append((stamp.mtime_ns, path.stem, _Entry(path, stamp.size, stamp)))
        for _, key, entry in sorted(found):
            self._entries[key] = entry

    @property
    def used_bytes(self) -> int:
        """Bytes on disk under the budget's root (as ``du`` counts them); without a limit, the entries'."""
        if self.budget is not None:
            return self.budget.used()
        return sum(e.size for e in self._entries.values())

    def problems(self) -> list[str]:
        """Why this cache cannot take a shard now (readiness): its directory gone and not creatable, or not
        writable; [] when it can."""
        probe = self.directory / f".ready-{os.getpid()}-{threading.get_ident()}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o644))  # as root, only a write tells
            probe.unlink()
        except OSError as exc:
            return [f"the shard cache at {self.directory} cannot take a shard ({exc.strerror or exc})"]
        return []

    def check_limit(self, sources: Iterable) -> None:
        """Refuse a limit too small to serve the default (sliding) order of every source at once (a job reads
        each of its sources at every step), plus what is under the root and cannot be evicted (document
        indexes, source records) and a block of each remote index. The message gives the smallest limit
        that works.

        Per source ``W + 2`` shards: a sliding block reads ``W``, the step into the next block one more
        (the shard it admits), and the retiring shard's last chunk runs into the next shard of the stream.
        With ``W`` only, the admitted shard evicts one still in use and every block refetches; with
        ``W + 1``, the neighbour does (``tests/engine/test_epoch_order.py``, an LRU over an epoch)."""
        if self.budget is None:
            return
        unit = block_size(self.budget.root)
        fixed = self.budget.fixed()
        windows, index_blocks = {}, 0
        for source in sources:
            shards = getattr(source, "shards", None) or []
            if shards:
                windows[source.meta.name] = min(DEFAULT_WINDOW_SHARDS + 2, len(shards)) * on_disk(
                    max(s.raw_bytes for s in shards), unit)
            index = getattr(source, "doc_offsets", None)
            if isinstance(index, DocIndex) and index.is_cache:
                index_blocks += on_disk(8 * min(index.blocks.entries + 1, len(index)), unit)
        window = sum(windows.values())
        minimum = fixed + index_blocks + window
        if self.budget.limit < minimum:
            widest = max(windows, key=windows.__getitem__) if windows else None
            raise InvalidInput(
                f"--cache-limit {self.budget.limit} bytes is too small: the default (sliding) order "
                f"of each of the {len(windows)} sources needs {window} bytes "
                f"({DEFAULT_WINDOW_SHARDS + 2} shards, or all of them if fewer; the largest, {widest!r}, "
                f"{windows.get(widest, 0)}) "
                f"plus {index_blocks} bytes for a block of each remote document index, plus {fixed} bytes "
                f"under {self.budget.root} that no cache may evict (source records, document index headers, "
                f"directories, and any file the cache did not write there); give at least --cache-limit "
                f"{minimum}")

    def evict_one(self, demand: bool) -> bool:
        """Drop the least recently used entry not being loaded (``DiskBudget`` asks, holding its lock). A
        prefetch may only drop shards requests read before but not lately (outside the most recently read
        half of the limit): never what current requests read, nor another prefetch's shard not read yet. For
        a request, when this process holds nothing to drop, the oldest shard file another worker installed."""
        with self._lock:
            spared = set() if demand else self._recently_read()
            for key, entry in self._entries.items():  # least recently used first
                if key in spared or not (demand or entry.requested):
                    continue
                lock = self._key_locks.get(key)
                if lock is not None and lock.locked():
                    continue
                entry = self._entries.pop(key)
                entry.path.unlink(missing_ok=True)
                self.stats.evictions += 1
                return True
        return demand and self._evict_foreign()

    def evictable_bytes(self) -> int:
        """The files of its directory it knows: shards of any worker (evictable), files being fetched into it
        (to become shards, or removed) and build locks (empty). Anything else there counts as fixed."""
        try:
            entries = [e for e in os.scandir(self.directory)
                       if _OWN_FILE.fullmatch(e.name) and e.is_file(follow_symlinks=False)]
        except OSError:
            return 0  # gone: made again on the next fetch
        total = 0
        for entry in entries:
            try:
                total += entry.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue  # gone since the listing
        return total

    def _recently_read(self) -> set[str]:
        """The most recently read entries that together fit in half the limit (caller holds ``_lock``)."""
        spared, total = set(), 0
        for entry_key, entry in sorted(self._entries.items(), key=lambda kv: -kv[1].requested):
            if not entry.requested or 2 * (total + entry.size) > (self.limit_bytes or 0):
                break
            spared.add(entry_key)
            total += entry.size
        return spared

    def _evict_foreign(self) -> bool:
        with self._lock:
            mine = set(self._entries)
        others = []
        for path in self.directory.glob("*.bin"):
            stamp = _regular(path)
            if stamp is not None and path.stem not in mine:
                others.append((stamp.mtime_ns, path))
        if not others:
            return False
        min(others)[1].unlink(missing_ok=True)
        self.stats.evictions += 1
        return True

    def __contains__(self, shard: Shard) -> bool:
        return shard.raw_sha256 in self._entries

    def get(self, shard: Shard) -> CheckedTokens | np.ndarray:
        """The shard's tokens, verified in this process: a read-only array of its resident copy when it
        has one, else read (and checked) from disk on every access; fetches it when absent (``CacheFull``
        when it cannot fit the limit even after evicting all else)."""
        with self._lock:
            resident = self._resident.get(shard.raw_sha256)
            if resident is not None:
                self._resident.move_to_end(shard.raw_sha256)
                self.stats.hits += 1
                self.stats.resident_hits += 1
        if resident is None:
            entry = self._entry(shard)
            with self._lock:  # just proven (fetched or re-hashed) by this call or a concurrent one
                resident = self._resident.get(shard.raw_sha256)
            if resident is None:
                return self._view(shard, entry)
        return self._resident_view(shard, resident)

    def _resident_view(self, shard: Shard, resident: _Resident) -> np.ndarray:
        return _in_vocabulary(shard, resident.max_token, resident.max_dtype, resident.data.view(shard.dtype))

    def _keepable(self, shard: Shard) -> bool:
        """Whether a shard's proven bytes may become its resident copy (one larger than ``memory_bytes``
        is never kept)."""
        return 0 < shard.raw_bytes <= self.memory_bytes

    def _keep(self, shard: Shard, data: np.ndarray, max_token: int) -> None:
        """Make ``data`` (the shard's raw bytes, just proven) its resident copy, evicting the least
        recently read copies to stay within ``memory_bytes``."""
        size = data.nbytes
        if not self._keepable(shard) or size != shard.raw_bytes:
            return
        key = shard.raw_sha256
        with self._lock:
            old = self._resident.pop(key, None)
            if old is not None:
                self.stats.resident_bytes -= old.data.nbytes
            while self._resident and self.stats.resident_bytes + size > self.memory_bytes:
                _, dropped = self._resident.popitem(last=False)
                self.stats.resident_bytes -= dropped.data.nbytes
                self.stats.resident_evictions += 1
            self._resident[key] = _Resident(data, max_token, shard.dtype)
            self.stats.resident_bytes += size

    def is_resident(self, shard: Shard) -> bool:
        return shard.raw_sha256 in self._resident

    def _entry(self, shard: Shard, failed: CheckedRegion | None = None, demand: bool = True) -> _Entry:
        """The verified entry of ``shard``; ``failed``: a region of it that failed a read check, so the
        entry is dropped and rebuilt (unless another thread already did)."""
        key = shard.raw_sha256
        with self._lock:
            entry = self._entries.get(key)
            if failed is None and self._usable(entry):
                self._entries.move_to_end(key)
                self.stats.hits += 1
                entry.requested = next(self._clock) if demand else entry.requested
                return entry
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:  # another thread may have loaded it while this one waited
                entry = self._entries.get(key)
                if self._usable(entry) and (failed is None or entry.region is not failed):
                    self._entries.move_to_end(key)
                    self.stats.hits += 1
                    entry.requested = next(self._clock) if demand else entry.requested
                    return entry
                self.stats.misses += 1
            if failed is not None:
                self.stats.rebuilt += 1
                log.warning("cached shard failed a read check; rebuilding it", extra={
                    "event": "cache.corrupt", "cache_file": str(failed.label), "shard": shard.label})
            entry = self._load(shard, trust_file=failed is None, demand=demand)
            entry.requested = next(self._clock) if demand else 0
            with self._lock:
                self._entries[key] = entry
                self._entries.move_to_end(key)
            return entry

    @staticmethod
    def _usable(entry: _Entry | None) -> TypeGuard[_Entry]:
        return entry is not None and entry.region is not None and FileStamp.of(entry.path) == entry.stamp

    def _view(self, shard: Shard, entry: _Entry) -> CheckedTokens:
        assert entry.region is not None
        view = CheckedTokens(entry.region, shard.dtype, shard.num_tokens,
                             recover=lambda failed: self._entry(shard, failed).region)
        return _in_vocabulary(shard, entry.max_token, entry.max_dtype, view)

    def prefetch(self, shards: Iterable[Shard]) -> list[Future]:
        """Start loading the shards not yet present, in the background; failures surface on ``get``.

        Returns the futures of the loads it started (a caller may wait on them; the service does not).
        """
        started = []
        for shard in shards:
            key = shard.raw_sha256
            with self._lock:
                entry = self._entries.get(key)
                if (entry is not None and entry.region is not None) or key in self._pending \
                        or key in self._resident:  # a resident copy needs no disk entry to be served
                    continue
                self._pending.add(key)
            started.append(self._pool.submit(self._prefetch_one, shard))
        return started

    def _prefetch_one(self, shard: Shard) -> None:
        try:
            self._entry(shard, demand=False)
        except CacheFull:
            self.stats.prefetch_skipped += 1
            log.info("prefetch skipped: the cache is full of shards in use", extra={
                "event": "cache.prefetch_skipped", "shard": shard.label})
        except MixerError as exc:
            log.warning("prefetch failed", extra={"event": "cache.prefetch_failed", "shard": shard.label,
                                                  "error": str(exc)})
        finally:
            with self._lock:
                self._pending.discard(shard.raw_sha256)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._resident.clear()
            self.stats.resident_bytes = 0
        if self.budget is not None:
            self.budget.remove_tenant(self)
            self.budget.close()

    # -- loading -----------------------------------------------------------------------------------

    def _install(self, tmp: Path, path: Path) -> None:
        """Rename under the budget's lock: a directory walked while a file changes names could count it
        twice, or not at all."""
        if self.budget is None:
            os.replace(tmp, path)
            return
        with self.budget.locked():
            os.replace(tmp, path)

    def _path(self, shard: Shard) -> Path:
        return self.directory / f"{shard.raw_sha256}.bin"

    def _load(self, shard: Shard, trust_file: bool = True, demand: bool = True) -> _Entry:
        """Verify the cached file (building it first when absent, wrong, or not ``trust_file``) and open it
        for checked reads. One process of the host builds a shard at a time: the workers of a server share
        the directory, and each used to fetch and decode every shard itself (2 workers, 138 fetches of ~65
        shards in the 8-rank head-to-head, docs/scale.md); a worker that waited verifies the file the other
        built instead."""
        path = self._path(shard)
        stamp = FileStamp.of(path)
        if trust_file and (entry := self._found(shard, path, stamp)) is not None:
            return entry
        with one_builder(self.directory / f".{path.name}.building"):
            again = FileStamp.of(path)
            if trust_file and again != stamp and (entry := self._found(shard, path, again)) is not None:
                return entry
            handle, digest, raw = self._build(shard, path, demand)
        region = CheckedRegion(handle, 0, shard.raw_bytes, digest.finish(), str(path))
        if raw is not None:
            self._keep(shard, raw, digest.max_token)
        return _Entry(path, shard.raw_bytes, FileStamp.of_open(handle.fileno()), region, digest.max_token,
                      shard.dtype)

    def _found(self, shard: Shard, path: Path, stamp: FileStamp | None) -> _Entry | None:
        """The entry of the file at ``path`` (seen as ``stamp``) if it holds the shard's bytes, else None."""
        if stamp is None or stamp.size != shard.raw_bytes:
            return None
        try:
            handle = io.FileIO(path, "r")
        except FileNotFoundError:  # evicted by another process since the stat: fetched again
            return None
        entry = self._verified(shard, path, handle)
        if entry is None:
            handle.close()
            log.warning(f"cached shard {path} does not match its hash; fetching it again", extra={
                "event": "cache.mismatch", "cache_file": str(path), "shard": shard.label})
        return entry

    def _verified(self, shard: Shard, path: Path, handle: io.FileIO) -> _Entry | None:
        """An entry for ``path`` (open as ``handle``) with the checksum table of the bytes just hashed, or
        None when they do not match the shard (``--verify off``: length checks only, nothing hashed)."""
        stamp = FileStamp.of_open(handle.fileno())
        if self.verify == VerifyMode.OFF:
            unchecked = CheckedRegion(handle, 0, shard.raw_bytes, None, str(path))
            return _Entry(path, shard.raw_bytes, stamp, unchecked)
        self.stats.verified += 1
        sha, digest, offset = hashlib.sha256(), Digest(shard.dtype), 0
        # Read into the buffer the resident copy will be (when it may be kept): the bytes hashed are the
        # bytes kept, with no second read of the file.
        keep = bytearray(shard.raw_bytes) if self._keepable(shard) else None
        into = memoryview(keep) if keep is not None else None
        chunk: bytes | memoryview
        while offset < shard.raw_bytes:
            size = min(_READ_CHUNK, shard.raw_bytes - offset)
            try:
                if into is not None:
                    got = os.preadv(handle.fileno(), [into[offset:offset + size]], offset)
                    chunk = into[offset:offset + got]
                else:
                    chunk = os.pread(handle.fileno(), size, offset)
            except OSError:
                return None  # unreadable (EIO): rebuilt like a wrong one
            if not chunk:
                return None
            sha.update(chunk)
            digest.update(chunk)
            offset += len(chunk)
        if sha.hexdigest() != shard.raw_sha256:
            return None
        region = CheckedRegion(handle, 0, shard.raw_bytes, digest.finish(), str(path))
        if keep is not None:
            del into, chunk  # no writeable view of the kept bytes may outlive this function
            self._keep(shard, _readonly(keep), digest.max_token)
        return _Entry(path, shard.raw_bytes, stamp, region, digest.max_token, shard.dtype)

    def _build(self, shard: Shard, path: Path,
               demand: bool = True) -> tuple[io.FileIO, Digest, np.ndarray | None]:
        """Allocate its bytes within the limit, fetch, check the object's sha256 (before decoding it), decode,
        check the length and the raw sha256, install by rename: a torn or wrong file is never named. Returns a
        read handle on the file, opened before its rename (another process may evict it as soon as it is
        named), the block checksums (and largest token id) of the bytes it proved, and those bytes (read-only)
        when they may be kept resident."""
        started = time.perf_counter()
        tmp = self.directory / f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)  # put back if deleted while serving
            if self.budget is None:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            else:
                fd = self.budget.create(tmp, demand=demand)
        except OSError as exc:
            raise SourceUnavailable(f"{shard.label}: cannot write into the shard cache at {self.directory} "
                                    f"({exc.strerror or exc})") from exc
        fcntl.flock(fd, fcntl.LOCK_EX)  # held while written: a partial file nobody holds is a dead writer's
        try:
            with os.fdopen(fd, "wb") as out:
                if self.budget is not None and shard.raw_bytes:
                    self.budget.allocate(fd, 0, shard.raw_bytes, demand=demand, what=shard.label)
                data = shard.origin.read(shard.file)
                self.stats.fetches += 1
                self.stats.fetched_bytes += len(data)
                if hashlib.sha256(data).hexdigest() != shard.sha256:
                    raise CorruptData(f"{shard.label}: shard checksum mismatch (corrupt or truncated)")
                digest, raw = _write_raw(shard, data, out)
                out.flush()
                # Renamed before ``out`` is closed: closing releases the flock, and a cache opening the
                # directory in between took the file for a dead writer's and removed it (the rename failed).
                handle = open_handle(tmp, str(path))
                try:
                    self._install(tmp, path)
                except BaseException:
                    handle.close()
                    raise
        except zstandard.ZstdError as exc:
            tmp.unlink(missing_ok=True)
            raise CorruptData(f"{shard.label}: cannot decompress shard ({exc})") from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        log.info("shard cached", extra={"event": "cache.fetched", "shard": shard.label,
                                        "bytes": shard.raw_bytes,
                                        "seconds": round(time.perf_counter() - started, 3)})
        return handle, digest, _readonly(raw) if self._keepable(shard) else None


def _in_vocabulary(shard: Shard, max_token: int, max_dtype: np.dtype | None, tokens: _Tokens) -> _Tokens:
    """``tokens``, unless the largest id taken when they were proven lies outside the vocabulary: then
    ``CorruptData`` naming the first such token (resident copy and checked reads alike). An entry shared by
    a shard that reads the same bytes as another dtype (content-addressed: only a crafted meta.json does
    that) has no largest id for this dtype: its tokens are scanned on every read."""
    if shard.vocab_size is None or max_dtype is None:
        return tokens
    if max_dtype != shard.dtype:
        found = find_token_above(tokens, shard.vocab_size)
    elif max_token >= shard.vocab_size:
        found = find_token_above(tokens, shard.vocab_size) or (-1, max_token)
    else:
        found = None
    if found is not None:
        pos, token = found
        raise CorruptData(f"{shard.label}: token id {token} at token offset {pos} is outside the "
                          f"vocabulary ({shard.vocab_size} ids)")
    return tokens


BUILD_WAIT_S = 15.0  # a worker waits this long for another's build of a shard, then builds it itself
_LOCK_POLL_S = 0.005


@contextmanager
def one_builder(lock_path: Path) -> Iterator[None]:
    """Hold ``lock_path`` exclusively across the host's processes (``flock``; a dead holder's lock is
    released by the kernel) and remove it on release. A waiter that locked a file removed
    meanwhile (its inode no longer the name's) opens the name again, so two holders never overlap (unless
    someone else deletes the file: then builds may overlap, which costs a fetch, never a wrong byte). After
    ``BUILD_WAIT_S`` it goes on without the lock: a holder stopped (SIGSTOP) or
    stuck on its store must not stall every worker; the caller then builds on its own, as each worker
    did before (its own temporary file, an atomic rename of verified bytes)."""
    fd = _lock(lock_path, time.monotonic() + BUILD_WAIT_S)
    if fd is None:
        log.warning("another worker's build of a shard is taking too long; building it here too",
                    extra={"event": "cache.build_wait_expired", "lock": str(lock_path)})
        yield
        return
    try:
        yield
    finally:
        with suppress(FileNotFoundError):
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:  # not a file someone put in its place
                os.unlink(lock_path)
        os.close(fd)


def _lock(lock_path: Path, deadline: float) -> int | None:
    """An open descriptor of ``lock_path`` holding its lock, or None once ``deadline`` passed."""
    while True:
        try:
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the directory itself was removed while serving: put it back
                lock_path.parent.mkdir(parents=True, exist_ok=True)
                continue
        except OSError as exc:
            raise SourceUnavailable(f"cannot write into the shard cache at {lock_path.parent} "
                                    f"({exc.strerror or exc})") from exc
        try:
            if _lock_until(fd, deadline) and os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass  # removed by its holder after this one opened it: open the name again
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        if time.monotonic() >= deadline:
            return None


def _lock_until(fd: int, deadline: float) -> bool:
    """``flock(fd, LOCK_EX)``, polled until ``deadline``; whether it was taken."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(_LOCK_POLL_S)


def _being_written(tmp: Path) -> bool:
    """Whether a live writer holds a partial file's lock (a process id alone can be reused after a crash)."""
    try:
        fd = os.open(tmp, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _write_raw(shard: Shard, data: bytes, out: BinaryIO) -> tuple[Digest, bytes | bytearray]:
    """Decode ``data`` (its sha256 checked) into one buffer, take its block sums and largest token and
    write it; refuse a stream longer or shorter than the shard, or raw bytes not matching the raw sha256
    (the cache key, module docstring). Whole-shard calls, not chunks: each call into zstd, hashlib or a
    write gives the GIL up and waits to take it back, which under request threads costs more than the work
    (1 MiB chunks built 1.6x slower with two Python threads running)."""
    raw = _raw(shard, data)
    if len(raw) != shard.raw_bytes:  # never write past what was allocated
        raise CorruptData(f"{shard.label}: decompressed shard is "
                          f"{'longer' if len(raw) > shard.raw_bytes else 'shorter'} than meta.json says")
    if hashlib.sha256(raw).hexdigest() != shard.raw_sha256:
        raise CorruptData(f"{shard.label}: decompressed shard does not match meta.json")
    digest = Digest(shard.dtype)
    digest.update(raw)
    out.write(raw)
    return digest, raw


def _raw(shard: Shard, data: bytes) -> bytes | bytearray:
    """The shard's raw bytes, one buffer: an ``expand`` shard's expansion, or every zstd frame of ``data``
    decompressed in one call straight into a buffer of the shard's size (never a second, joined copy),
    plus one byte more if the stream has it (so a longer stream shows). A frame cut short yields only what
    it decodes to: the caller's length check refuses it."""
    if shard.expand is not None:
        return shard.expand(data)
    into = bytearray(shard.raw_bytes)
    reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
    view, at = memoryview(into), 0
    while at < len(into):
        got = reader.readinto(view[at:])
        if not got:
            return into[:at]
        at += got
    del view  # a bytearray with a view exported cannot grow
    into += reader.read(1)
    return into


def _regular(path: Path) -> FileStamp | None:
    """``path``'s stamp when it is a regular file (not a directory or a link named like a shard, which an
    eviction could not ``unlink`` or would not free), else None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return FileStamp(st.st_ino, st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None
