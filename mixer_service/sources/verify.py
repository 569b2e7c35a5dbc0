"""How much a server checks a source's bytes before serving them, and the hashing it uses.

``off`` trusts files of the right size (benchmarks only); ``fast`` (the default) verifies ``meta.json``
when the source is opened and each shard and each 8 MiB block of the document index the first time this
process uses it, so a start costs O(1), not O(index) or O(corpus); ``full`` also hashes every shard and
index block at open, before the server reports ready. sha256 is kept (it is what every existing
``meta.json`` records): ~1.5 GB/s on one core here, about the speed zstd decompresses; a lazily verified
shard is hashed twice, as its compressed object and as its raw bytes (``cache``: why both).
"""

from __future__ import annotations

import enum
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


class VerifyMode(enum.StrEnum):
    OFF = "off"
    FAST = "fast"
    FULL = "full"


DEFAULT_VERIFY = VerifyMode.FAST


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@dataclass(frozen=True)
class FileStamp:
    """A file's identity at one moment (inode, size, mtime): a changed stamp means a changed file."""

    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileStamp | None:
        """The stamp of ``path``, or None when it cannot be stat-ed (missing)."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)

    @classmethod
    def of_open(cls, fd: int) -> FileStamp:
        """The stamp of an open file: the one it had when opened, even if another process has unlinked its
        name since (an eviction between a stat and an open)."""
        st = os.fstat(fd)
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)
