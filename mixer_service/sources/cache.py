"""A bounded, verified, least-recently-used local cache of decompressed token shards.

Each entry is one shard's raw little-endian tokens in ``<raw_sha256>.bin``: content-addressed, so two
sources sharing a shard share an entry and a changed shard can never be mistaken for the old one. An entry
is verified (sha256 of the decompressed bytes) the first time this process uses it, and again whenever its
file changes (inode, size or mtime); a shard fetched from its origin is checked twice (compressed hash before
decompression, raw hash after) before it is installed by rename. Total size stays within ``limit_bytes``
by evicting the least recently used entries (never the one just asked for); arrays already handed out stay
valid after eviction because an unlinked file stays mapped. ``prefetch`` takes the shards the next steps
will need, so steady-state requests find them present.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zstandard

from mixer_service.errors import CorruptData, InvalidInput, MixerError
from mixer_service.sources.origins import Origin
from mixer_service.sources.verify import DEFAULT_VERIFY, FileStamp, VerifyMode, sha256_file

log = logging.getLogger(__name__)


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
    array: np.ndarray | None = None  # set once verified in this process


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0  # a get that had to fetch/decompress (or re-verify) before answering
    fetches: int = 0  # shards read from their origin
    fetched_bytes: int = 0
    verified: int = 0  # cache files hashed
    evictions: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class ShardCache:
    """Decompressed shards under ``directory``, at most ``limit_bytes`` in total (None: unbounded)."""

    def __init__(self, directory: Path, limit_bytes: int | None = None, verify: VerifyMode = DEFAULT_VERIFY,
                 prefetch_threads: int = 4) -> None:
        if limit_bytes is not None and limit_bytes < 0:
            raise InvalidInput(f"cache limit must be >= 0 bytes, got {limit_bytes}")
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
        self._adopt_existing()

    def _adopt_existing(self) -> None:
        """Entries left by an earlier process count against the limit (oldest first); verified on use."""
        found = []
        for path in self.directory.glob("*.bin"):
            stamp = FileStamp.of(path)
            if stamp is not None:
                found.append((stamp.mtime_ns, path.stem, _Entry(path, stamp.size, stamp)))
        for _, key, entry in sorted(found):
            self._entries[key] = entry
        with self._lock:
            self._evict(keep=None)

    @property
    def used_bytes(self) -> int:
        return sum(e.size for e in self._entries.values())

    def __contains__(self, shard: Shard) -> bool:
        return shard.raw_sha256 in self._entries

    def get(self, shard: Shard) -> np.ndarray:
        """The shard's tokens, memory-mapped, verified in this process; fetches it when absent."""
        key = shard.raw_sha256
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.array is not None and FileStamp.of(entry.path) == entry.stamp:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return entry.array
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:  # another thread may have loaded it while this one waited
                entry = self._entries.get(key)
                if entry is not None and entry.array is not None and FileStamp.of(entry.path) == entry.stamp:
                    self._entries.move_to_end(key)
                    self.stats.hits += 1
                    return entry.array
                self.stats.misses += 1
            array, entry = self._load(shard)
            with self._lock:
                self._entries[key] = entry
                self._entries.move_to_end(key)
                self._evict(keep=key)
            return array

    def prefetch(self, shards: Iterable[Shard]) -> list[Future]:
        """Start loading the shards not yet present, in the background; failures surface on ``get``.

        Returns the futures of the loads it started (a caller may wait on them; the service does not).
        """
        started = []
        for shard in shards:
            key = shard.raw_sha256
            with self._lock:
                entry = self._entries.get(key)
                if (entry is not None and entry.array is not None) or key in self._pending:
                    continue
                self._pending.add(key)
            started.append(self._pool.submit(self._prefetch_one, shard))
        return started

    def _prefetch_one(self, shard: Shard) -> None:
        try:
            self.get(shard)
        except MixerError as exc:
            log.warning("prefetch failed", extra={"event": "cache.prefetch_failed", "shard": shard.label,
                                                  "error": str(exc)})
        finally:
            with self._lock:
                self._pending.discard(shard.raw_sha256)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- loading -----------------------------------------------------------------------------------

    def _path(self, shard: Shard) -> Path:
        return self.directory / f"{shard.raw_sha256}.bin"

    def _load(self, shard: Shard) -> tuple[np.ndarray, _Entry]:
        path = self._path(shard)
        stamp = FileStamp.of(path)
        if stamp is not None and stamp.size == shard.raw_bytes and self._trusted(path, shard):
            return self._map(shard, path)
        if stamp is not None:
            log.warning("cached shard does not match its hash; fetching it again", extra={
                "event": "cache.mismatch", "cache_file": str(path), "shard": shard.label})
        self._build(shard, path)
        return self._map(shard, path)

    def _trusted(self, path: Path, shard: Shard) -> bool:
        if self.verify == VerifyMode.OFF:
            return True
        self.stats.verified += 1
        return sha256_file(path) == shard.raw_sha256

    def _map(self, shard: Shard, path: Path) -> tuple[np.ndarray, _Entry]:
        stamp = FileStamp.of(path)
        if shard.num_tokens == 0:
            array = np.zeros(0, dtype=shard.dtype)
        else:
            array = np.asarray(np.memmap(path, dtype=shard.dtype, mode="r", shape=(shard.num_tokens,)))
        return array, _Entry(path, shard.raw_bytes, stamp, array)

    def _build(self, shard: Shard, path: Path) -> None:
        """Fetch, check, decompress, check again, install by rename: a torn or wrong file is never named."""
        started = time.perf_counter()
        data = shard.origin.read(shard.file)
        self.stats.fetches += 1
        self.stats.fetched_bytes += len(data)
        if hashlib.sha256(data).hexdigest() != shard.sha256:
            raise CorruptData(f"{shard.label}: shard checksum mismatch (corrupt or truncated)")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=self.directory)
        tmp = Path(tmp_name)
        try:
            raw_hash, raw_size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out:
                for chunk in _raw_chunks(shard, data):
                    raw_hash.update(chunk)
                    raw_size += len(chunk)
                    out.write(chunk)
            if raw_size != shard.raw_bytes or raw_hash.hexdigest() != shard.raw_sha256:
                raise CorruptData(f"{shard.label}: decompressed shard does not match meta.json")
            os.replace(tmp, path)
        except zstandard.ZstdError as exc:
            tmp.unlink(missing_ok=True)
            raise CorruptData(f"{shard.label}: cannot decompress shard ({exc})") from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        log.info("shard cached", extra={"event": "cache.fetched", "shard": shard.label, "bytes": raw_size,
                                        "seconds": round(time.perf_counter() - started, 3)})

    def _evict(self, keep: str | None) -> None:
        """Drop least recently used entries until the total fits (caller holds ``_lock``)."""
        if self.limit_bytes is None:
            return
        total = self.used_bytes
        for key in list(self._entries):
            if total <= self.limit_bytes:
                break
            if key == keep or key in self._pending:
                continue
            entry = self._entries.pop(key)
            entry.path.unlink(missing_ok=True)
            total -= entry.size
            self.stats.evictions += 1


def _raw_chunks(shard: Shard, data: bytes) -> Iterable[bytes]:
    """The shard's raw tokens, one frame at a time (a decompressobj per frame: ~3x faster than a
    stream_reader on whole in-memory shards)."""
    if shard.expand is not None:
        yield shard.expand(data)
        return
    while data:
        frame = zstandard.ZstdDecompressor().decompressobj()
        yield frame.decompress(data)
        if not frame.eof:
            raise zstandard.ZstdError("truncated zstd frame")
        data = frame.unused_data
