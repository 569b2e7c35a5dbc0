"""Open a prepared source for O(1) random access to documents with bounded memory.

Shards stay zstd-compressed at rest; the first open decompresses them once (verifying every hash) into a
local cache file that is then memory-mapped, so later opens take milliseconds whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import logging
import operator
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import zstandard

from mixer_service.errors import CorruptData, InvalidInput, NotFound
from mixer_service.prepare.meta import OFFSETS_FILE, MetaFile, SourceMeta

logger = logging.getLogger(__name__)

CACHE_SUBDIR = ".cache"
CACHE_FILE = "tokens.bin"
_READ_CHUNK = 1 << 22


class DocumentIndexError(NotFound, IndexError):
    """A document index outside ``[0, num_docs)``: ``NotFound`` for the service, ``IndexError`` for Python."""


def _hash_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


class PreparedSource:
    """A prepared source: all tokens as one memory-mapped array plus the document offsets."""

    def __init__(
        self, meta: SourceMeta, tokens: np.ndarray, doc_offsets: np.ndarray, cache_path: Path
    ) -> None:
        self.meta = meta
        self.tokens = tokens
        self.doc_offsets = doc_offsets
        self.cache_path = cache_path

    @classmethod
    def open(cls, path: Path | str, cache_dir: Path | None = None, *, verify: bool = False) -> PreparedSource:
        """Validate ``path``, build the token cache if needed, and memory-map it.

        An existing cache of the right size is trusted (fast path); ``verify=True`` re-hashes the shards,
        the offsets index and the cache, and rebuilds a cache that does not match.
        """
        directory = Path(path)
        info = MetaFile.load(directory)
        meta = info.source
        offsets = cls._open_offsets(directory, info, verify)
        if verify:
            for shard in info.shards:
                _check_shard_hash(directory / shard.file, shard.sha256)
        dtype = np.dtype(meta.dtype).newbyteorder("<")
        cache = (
            Path(cache_dir) / f"{meta.fingerprint}.bin"
            if cache_dir
            else directory / CACHE_SUBDIR / CACHE_FILE
        )
        expected_size = meta.num_tokens * dtype.itemsize
        if not (cache.is_file() and cache.stat().st_size == expected_size):
            _build_cache(directory, info, cache)
        elif verify and _hash_file(cache) != info.tokens_sha256:
            logger.warning(
                "token cache %s does not match %s; rebuilding",
                cache,
                directory,
                extra={"event": "source.cache_mismatch", "cache": str(cache)},
            )
            _build_cache(directory, info, cache)
        tokens = np.memmap(cache, dtype=dtype, mode="r", shape=(meta.num_tokens,))
        return cls(meta, tokens, offsets, cache)

    @staticmethod
    def _open_offsets(directory: Path, info: MetaFile, verify: bool) -> np.ndarray:
        path = directory / OFFSETS_FILE
        try:
            offsets = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise CorruptData(f"{path}: unreadable document index ({exc})") from exc
        n, total = info.source.num_docs, info.source.num_tokens
        if (
            offsets.dtype != np.dtype("<i8")
            or offsets.shape != (n + 1,)
            or offsets[0] != 0
            or offsets[-1] != total
        ):
            raise CorruptData(f"{path}: document index does not match meta.json ({n} docs, {total} tokens)")
        if verify and hashlib.sha256(memoryview(offsets)).hexdigest() != info.doc_offsets_sha256:
            raise CorruptData(f"{path}: document index hash mismatch")
        return offsets

    def __len__(self) -> int:
        return self.meta.num_docs

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` without its trailing EOS (a zero-copy view)."""
        i = operator.index(i)
        if not 0 <= i < self.meta.num_docs:
            raise DocumentIndexError(
                f"document {i} out of range for source {self.meta.name!r} ({self.meta.num_docs} documents)"
            )
        start, end = self.doc_offsets[i], self.doc_offsets[i + 1]
        return self.tokens[start : end - 1]


def _check_shard_hash(path: Path, expected: str) -> None:
    try:
        ok = _hash_file(path) == expected
    except OSError as exc:
        raise CorruptData(f"{path}: cannot read shard ({exc})") from exc
    if not ok:
        raise CorruptData(f"{path}: shard checksum mismatch (corrupt or truncated)")


def _build_cache(directory: Path, info: MetaFile, cache: Path) -> None:
    """Decompress every shard into ``cache`` (temp file + rename), checking sizes and both hashes."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{cache.name}.tmp-", dir=cache.parent)
    except OSError as exc:
        raise InvalidInput(
            f"cannot create token cache at {cache} ({exc}); pass a writable cache_dir"
        ) from exc
    tmp = Path(tmp_name)
    started = time.perf_counter()
    itemsize = np.dtype(info.source.dtype).itemsize
    dctx = zstandard.ZstdDecompressor()
    try:
        with os.fdopen(fd, "wb") as out:
            for shard in info.shards:
                path = directory / shard.file
                try:
                    # Check the compressed bytes first so corrupt data never reaches the decompressor.
                    _check_shard_hash(path, shard.sha256)
                    raw_hash, raw_size = hashlib.sha256(), 0
                    with open(path, "rb") as fh, dctx.stream_reader(fh, read_across_frames=True) as reader:
                        while chunk := reader.read(_READ_CHUNK):
                            raw_hash.update(chunk)
                            raw_size += len(chunk)
                            out.write(chunk)
                except (OSError, zstandard.ZstdError) as exc:
                    raise CorruptData(f"{path}: cannot read shard ({exc})") from exc
                if raw_size != shard.num_tokens * itemsize or raw_hash.hexdigest() != shard.raw_sha256:
                    raise CorruptData(f"{path}: decompressed shard does not match meta.json")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, cache)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info(
        "built token cache %s for %s in %.1fs",
        cache,
        directory,
        time.perf_counter() - started,
        extra={"event": "source.cache_built", "cache": str(cache), "source": info.source.name},
    )
