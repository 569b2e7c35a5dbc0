"""A hard bound on the bytes a cache directory holds on disk, what is being written into it included.

The disk itself is the ledger: bytes are allocated (``posix_fallocate``) before a fetch, decompression or
index block writes them, under a lock that every process sharing the directory takes (``flock``), after
measuring what the directory holds the way ``du`` does (allocated blocks, directories included). A write
that does not fit evicts what the tenants (the shard cache, cached document indexes) offer, oldest first,
or is refused: the directory never holds more than the limit, whatever the number of threads, prefetches
or worker processes. Files unlinked while a reader still holds them open keep their blocks until it closes
them (``du`` no longer sees them; ``df`` does).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from mixer_contract.errors import SourceUnavailable

LOCK_FILE = ".budget.lock"
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


class CacheFull(SourceUnavailable):
    """A write a request needs does not fit in ``--cache-limit`` even after evicting all that can be (503)."""


class Tenant(Protocol):
    """Something whose files under the budget's root may be dropped to make room."""

    def evict_one(self, demand: bool) -> bool:
        """Drop the least valuable thing it holds; False when nothing may go. ``demand``: the room is for a
        request waiting on it (a prefetch gets less)."""
        ...

    def evictable_bytes(self) -> int:
        """Allocated bytes under the root it could give back (or that are in flight to become such): not
        part of what a limit must hold for good."""
        ...


def allocated_bytes(root: Path) -> int:
    """What ``du -s -B1 root`` reports: allocated blocks of every file and directory, hard links once."""
    total, seen = 0, set()
    stack = [str(root)]
    try:
        total += os.stat(root).st_blocks * 512
    except OSError:
        return 0
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue  # removed while walking
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            elif st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


class DiskBudget:
    """At most ``limit`` bytes under ``root``; ``allocate`` is the only way in for bytes written while
    serving. One per root per process; ``covering`` finds the budget a file lies under."""

    _by_root: weakref.WeakValueDictionary[Path, DiskBudget] = weakref.WeakValueDictionary()

    def __init__(self, root: Path, limit: int, demand_wait_s: float = 10.0) -> None:
        self.root = Path(root).resolve()
        self.limit = limit
        self.demand_wait_s = demand_wait_s  # a request waits this long for in-flight writes to land
        self.refused = 0  # allocations refused (a skipped prefetch, or a request's CacheFull)
        self.root.mkdir(parents=True, exist_ok=True)
        self._thread_lock = threading.Lock()  # tenants never allocate while evicting
        self._lock_fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        self._tenants: list[weakref.ref[Tenant]] = []  # a tenant lives as long as its owner keeps it
        DiskBudget._by_root[self.root] = self

    @classmethod
    def covering(cls, path: Path) -> DiskBudget | None:
        """The budget of the nearest root above ``path`` in this process, if any."""
        path = Path(path).resolve()
        for parent in (path, *path.parents):
            budget = cls._by_root.get(parent)
            if budget is not None:
                return budget
        return None

    def add_tenant(self, tenant: Tenant) -> None:
        """Tenants are asked in the order they were added (the shard cache first: a shard is cheaper to
        fetch again, per byte, than the index lookups of every request)."""
        with self._thread_lock:
            self._tenants.append(weakref.ref(tenant))

    def remove_tenant(self, tenant: Tenant) -> None:
        with self._thread_lock:
            self._tenants = [t for t in self._tenants if t() not in (None, tenant)]

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across threads (the lock) and processes (``flock`` on a file of the root)."""
        with self._thread_lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def used(self) -> int:
        return allocated_bytes(self.root)

    def fixed(self) -> int:
        """What the root holds that no tenant can give back (source records, index headers, directories): the
        same for the same sources however warm the cache or busy the other workers, so a limit accepted once
        is accepted again at a restart."""
        with self.locked():  # a snapshot: every allocation, install and eviction takes it (else a shard
            # allocated or evicted between the walk and the listing counted once and not the other)
            tenants = [t for t in (ref() for ref in self._tenants) if t is not None]
            return max(0, self.used() - sum(t.evictable_bytes() for t in tenants))

    def create(self, path: Path, *, demand: bool) -> int:
        """Create ``path`` (a new file under the root) and return its descriptor, with room for the block its
        directory may grow by: a name added beside many may take a new directory block, outside any
        allocation."""
        with self.locked():
            self._make_room(block_size(self.root), demand)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            # Held before the lock is released: a cache opening the directory removes, under this lock, the
            # partial files nobody holds (a dead writer's), and would take this one for such.
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fd

    def allocate(self, fd: int, offset: int, length: int, *, demand: bool, what: str) -> None:
        """Allocate ``[offset, offset + length)`` of ``fd`` (a file under the root) once it fits, evicting
        first. A prefetch (``demand`` False) is refused at once when it does not fit; a request waits up to
        ``demand_wait_s`` for in-flight writes to land (they become evictable), then ``CacheFull``."""
        deadline = time.monotonic() + (self.demand_wait_s if demand else 0.0)
        delay, unit = 0.005, block_size(self.root)
        # Whole file-system blocks, and one more inside an existing file (a sparse file's extent map may
        # take a block of its own when a hole in its middle is filled).
        need = on_disk(offset % unit + length, unit) + (unit if offset else 0)
        while True:
            with self.locked():
                used = self._make_room(need, demand)
                if used + need <= self.limit:
                    try:
                        os.posix_fallocate(fd, offset, length)
                        return
                    except OSError as exc:  # the disk itself is full (ENOSPC), or the file is gone
                        if exc.errno != errno.ENOSPC or not self._evict_any(demand):
                            raise CacheFull(f"{what}: cannot allocate {length} bytes under {self.root} "
                                            f"({exc.strerror or exc})") from exc
                        continue  # the disk is shared with other files: what this cache held, it gave back
            if time.monotonic() + delay > deadline:
                break
            time.sleep(delay)
            delay = min(2 * delay, 0.2)
        self.refused += 1
        raise CacheFull(f"{what}: the cache at {self.root} cannot hold {length} more bytes within "
                        f"--cache-limit {self.limit} ({used} in use by files in use, in flight or not "
                        "evictable); raise --cache-limit")

    def fit(self) -> None:
        """Evict until the root is within the limit (a smaller limit than the last run's, at start)."""
        with self.locked():
            self._make_room(0, demand=True)

    def _evict_any(self, demand: bool) -> bool:
        """Drop one entry of any tenant (holding the lock); False when none may go."""
        return any(tenant is not None and tenant.evict_one(demand) for tenant in (t() for t in self._tenants))

    def _make_room(self, length: int, demand: bool) -> int:
        """Evict until ``length`` more bytes fit or nothing more may go; returns the bytes in use."""
        used = self.used()
        while used + length > self.limit and self._evict_any(demand):
            used = self.used()
        return used

    def close(self) -> None:
        os.close(self._lock_fd)


def block_size(root: Path) -> int:
    """The allocation unit of the file system under ``root`` (what a 1-byte file costs)."""
    return os.statvfs(root).f_frsize or 4096


def on_disk(nbytes: int, unit: int) -> int:
    """``nbytes`` rounded up to whole allocation units."""
    return -(-nbytes // unit) * unit


def _load_fallocate():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    func = getattr(libc, "fallocate", None)
    if func is not None:
        func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return func


_fallocate = _load_fallocate()


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the blocks of ``[offset, offset + length)`` (the file keeps its size; reads give zeros). False
    where the platform or file system cannot."""
    if _fallocate is None:
        return False
    return _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0
