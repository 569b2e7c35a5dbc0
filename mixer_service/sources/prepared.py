"""A prepared source (see ``prepare.meta`` for the layout) opened for O(1) random access to documents.

Opening reads ``meta.json`` and opens the document index (8 bytes a document, verified block by
block on first use: ``doc_index.DocIndex``); no shard is touched, so the time to open does not grow with
the corpus. Each shard is fetched, decompressed and verified into a ``ShardCache`` the first time a batch
needs it. Files that change under a running server are reported by
``problems()`` (a stat per file, for ``/v1/ready``) and by ``changed()`` (one stat, per request).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import operator
import os
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from mixer_contract.errors import CorruptData, MixerError, NotFound
from mixer_service.sources.cache import Shard, ShardCache
from mixer_service.sources.doc_index import DocIndex, Fetch, load_index, npy_header, sparse_index_file
from mixer_service.sources.origins import LocalOrigin, Origin
from mixer_service.sources.source_format import (
    META_FILE,
    OFFSETS_FILE,
    IndexBlocks,
    MetaFile,
    SourceMeta,
    content_fingerprint,
)
from mixer_service.sources.tokens import ShardedTokens
from mixer_service.sources.verify import DEFAULT_VERIFY, FileStamp, VerifyMode

log = logging.getLogger(__name__)

CACHE_SUBDIR = ".cache"


class DocumentIndexError(NotFound, IndexError):
    """A document index outside ``[0, num_docs)``: ``NotFound`` for the service, ``IndexError`` for Python."""


def as_verify_mode(verify: bool | str | VerifyMode) -> VerifyMode:
    """``True`` is ``full`` and ``False`` is ``off`` (the old boolean flag); strings name a mode."""
    if isinstance(verify, bool):
        return VerifyMode.FULL if verify else VerifyMode.OFF
    return VerifyMode(verify)


class ShardedSource:
    """What every token source offers the engine and the registry: lazily loaded, verified shards, the
    block-verified document index, and change detection for the files read in place."""

    def __init__(self, meta: SourceMeta, shard_offsets: np.ndarray, load: Callable[[int], np.ndarray],
                 doc_offsets: np.ndarray | DocIndex, index_files: tuple[Path, ...],
                 watched: dict[Path, FileStamp | None], faults: dict[int, str] | None = None) -> None:
        self.meta = meta
        self.tokens = ShardedTokens(shard_offsets, np.dtype(meta.dtype).newbyteorder("<"), self._guard(load))
        # int64[num_shards + 1]: shard k holds tokens [shard_offsets[k], shard_offsets[k + 1])
        self.shard_offsets = self.tokens.shard_offsets
        self.doc_offsets = doc_offsets
        # shard -> why its last load (or checked read) failed; cleared by a good load
        self.faults: dict[int, str] = {} if faults is None else faults
        self._index_files = index_files
        self._stamps = {path: FileStamp.of(path) for path in index_files} | watched
        self._rejected: dict[Path, FileStamp | None] = {}  # stamps found not to hold the opened bytes

    def __len__(self) -> int:
        return self.meta.num_docs

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` without its trailing EOS."""
        i = operator.index(i)
        if not 0 <= i < self.meta.num_docs:
            raise DocumentIndexError(
                f"document {i} out of range for source {self.meta.name!r} ({self.meta.num_docs} documents)"
            )
        return self.tokens.read(int(self.doc_offsets[i]), int(self.doc_offsets[i + 1]) - 1)

    def prefetch(self, shard_ids: Iterable[int]) -> list[Future]:
        """Load these shards in the background (the engine knows which ones the next steps touch); a
        source read in place has nothing to fetch."""
        return []

    def _guard(self, load: Callable[[int], np.ndarray]) -> Callable[[int], np.ndarray]:
        """``load`` with each shard's failure remembered for readiness, until a later load succeeds.

        Only the request that needs a failing shard is refused (503 naming it); steps that read other shards
        keep being served, and a shard that is put back (or an object store that answers again) recovers.
        """
        def guarded(k: int) -> np.ndarray:
            try:
                tokens = load(k)
            except MixerError as exc:
                self.faults[k] = str(exc)
                raise
            self.faults.pop(k, None)
            return tokens
        return guarded

    def changed(self) -> str | None:
        """Why this source can no longer be served (a stat of each index file), or None.

        Shards need no check here: each is hashed when it enters the cache and every read of it is checked,
        so only the index files, read in place, can change unseen (a remote index's local copy is a cache
        too: changed under us, its blocks are checked again before use). A changed file that holds the
        bytes this source was opened with again (put back) is accepted here, on the request path: nobody
        has to poll readiness for batches to recover.
        """
        if isinstance(self.doc_offsets, DocIndex):
            self.doc_offsets.refresh()
        for path in self._index_files:
            if not self._recheck(path):
                return f"source {self.meta.name!r}: {path} was removed or changed under this server"
        return None

    def problems(self) -> list[str]:
        """Every file of this source that is missing or changed since open, plus shards and index blocks that
        failed to load.

        A stat per file; a file whose stamp changed is re-verified against the hash this source expects,
        and accepted again when it matches (a shard put back from a backup is fine).
        """
        out = [f"source {self.meta.name!r}: {path} {'changed' if path.exists() else 'was removed'} "
               "under this server" for path in list(self._stamps) if not self._recheck(path)]
        index_faults = self.doc_offsets.faults if isinstance(self.doc_offsets, DocIndex) else {}
        failed = [*self.faults.values(), *index_faults.values()]
        return [f"source {self.meta.name!r}: {why}" for why in failed] + out

    def _recheck(self, path: Path) -> bool:
        """Whether ``path`` has the stamp it was opened with, or holds the same bytes again (put back).
        A stamp already found wrong is not hashed again until it changes (one stat a request meanwhile)."""
        now = FileStamp.of(path)
        if now == self._stamps[path]:
            return True
        if now is not None and now != self._rejected.get(path) and self._still_valid(path):
            self._stamps[path] = now
            self._rejected.pop(path, None)
            return True
        self._rejected[path] = now
        return False

    def _still_valid(self, path: Path) -> bool:
        """Whether a changed file still holds exactly the bytes this source was opened with (for the
        block-verified index: the blocks in use; the others are checked on their next use)."""
        return isinstance(self.doc_offsets, DocIndex) and path == self.doc_offsets.path \
            and self.doc_offsets.revalidate()


class PreparedSource(ShardedSource):
    """Tokens (lazily loaded shards) plus the block-verified document offsets of one prepared source."""

    def __init__(self, meta: SourceMeta, info: MetaFile, origin: Origin, index_dir: Path,
                 doc_offsets: np.ndarray | DocIndex, cache: ShardCache) -> None:
        self.info = info
        self.origin = origin
        self.cache = cache
        dtype = np.dtype(meta.dtype).newbyteorder("<")
        self._shards = [Shard(origin, sh.file, sh.num_tokens, dtype, sh.sha256, sh.raw_sha256,
                              vocab_size=meta.vocab_size) for sh in info.shards]
        offsets = np.concatenate([[0], np.cumsum([sh.num_tokens for sh in info.shards], dtype=np.int64)])
        watched: dict[Path, FileStamp | None] = {}
        for sh in info.shards:
            stamp = origin.stamp(sh.file)
            if stamp is not None:
                watched[Path(origin.describe(sh.file))] = stamp
        self._index_dir = index_dir
        cached_index = isinstance(doc_offsets, DocIndex) and doc_offsets.is_cache
        index_files = (index_dir / META_FILE,) + (() if cached_index else (index_dir / OFFSETS_FILE,))
        super().__init__(meta, offsets, self._load_shard, doc_offsets, index_files, watched)

    @classmethod
    def open(cls, path: Path | str, cache_dir: Path | None = None, *,
             verify: bool | str | VerifyMode = DEFAULT_VERIFY,
             cache: ShardCache | None = None) -> PreparedSource:
        """Open the prepared source in directory ``path``; shards are cached under ``cache_dir`` (default
        ``path/.cache/shards``) unless a shared ``cache`` is given."""
        directory = Path(path)
        mode = as_verify_mode(verify)
        if cache is None:
            where = Path(cache_dir) if cache_dir else directory / CACHE_SUBDIR / "shards"
            cache = ShardCache(where, verify=mode)
        return cls._open(LocalOrigin(directory), directory, MetaFile.load(directory), cache, mode)

    @classmethod
    def open_remote(cls, origin: Origin, index_dir: Path, cache: ShardCache,
                    verify: bool | str | VerifyMode = DEFAULT_VERIFY) -> PreparedSource:
        """Open a source whose files live in ``origin``: ``meta.json`` is copied into ``index_dir``, and the
        document index becomes a sparse local file whose blocks are fetched (ranged reads) and verified on
        first use; shards stay remote until used. A source prepared before per-block index hashes has its
        index copied whole."""
        index_dir = Path(index_dir)
        index_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(index_dir / META_FILE, origin.read(META_FILE))
        info = MetaFile.load(index_dir)
        if info.doc_index is None:
            write_atomic(index_dir / OFFSETS_FILE, origin.read(OFFSETS_FILE))
        else:
            header = npy_header(info.source.num_docs + 1)
            if len(header) != info.doc_index.data_offset:  # written by another numpy: ask for its own
                header = origin.read_range(OFFSETS_FILE, 0, info.doc_index.data_offset)
            sparse_index_file(index_dir / OFFSETS_FILE, header, info.source.num_docs + 1)
        return cls._open(origin, index_dir, info, cache, as_verify_mode(verify), remote=True)

    @classmethod
    def _open(cls, origin: Origin, index_dir: Path, info: MetaFile, cache: ShardCache, mode: VerifyMode,
              remote: bool = False) -> PreparedSource:
        meta = info.source
        if mode != VerifyMode.OFF and meta.fingerprint != content_fingerprint(
                meta.tokenizer_fingerprint, meta.dtype, info.tokens_sha256, info.doc_offsets_sha256):
            raise CorruptData(f"{index_dir / META_FILE}: fingerprint does not match the content hashes it "
                              "lists (edited by hand?)")
        fetch = functools.partial(origin.read_range, OFFSETS_FILE) if remote else None
        offsets = open_index(index_dir / OFFSETS_FILE, meta, info.doc_index, info.doc_offsets_sha256, mode,
                             fetch, origin.describe(OFFSETS_FILE))
        source = cls(meta, info, origin, index_dir, offsets, cache)
        if mode == VerifyMode.FULL:
            source.verify_shards()
        return source

    @property
    def shards(self) -> list[Shard]:
        return list(self._shards)

    def prefetch(self, shard_ids: Iterable[int]) -> list[Future]:
        """Load these shards in the background (the engine knows which ones the next steps touch)."""
        return self.cache.prefetch(self._shards[int(k)] for k in shard_ids)

    def verify_shards(self) -> None:
        """Hash every compressed shard now (``--verify full``), without decompressing or caching it."""
        for shard in self._shards:
            if hashlib.sha256(shard.origin.read(shard.file)).hexdigest() != shard.sha256:
                raise CorruptData(f"{shard.label}: shard checksum mismatch (corrupt or truncated)")

    def _load_shard(self, k: int) -> np.ndarray:
        return self.cache.get(self._shards[k])

    def _still_valid(self, path: Path) -> bool:
        if isinstance(self.doc_offsets, DocIndex) and path == self.doc_offsets.path:
            return super()._still_valid(path)
        expected = {Path(shard.origin.describe(shard.file)): shard.sha256 for shard in self._shards}
        expected[self._index_dir / OFFSETS_FILE] = self.info.doc_offsets_sha256
        if path == self._index_dir / META_FILE:
            try:
                return MetaFile.load(self._index_dir) == self.info
            except CorruptData:
                return False
        try:
            return path in expected and _sha256_file(path) == expected[path]
        except OSError:
            return False


def open_index(path: Path, meta: SourceMeta, blocks: IndexBlocks | None, whole_sha256: str, mode: VerifyMode,
               fetch: Fetch | None = None, label: str | None = None) -> np.ndarray | DocIndex:
    """The document index. With per-block hashes it is verified lazily: a local one has its first and
    last blocks checked now (cheap, and what a truncated or rewritten small index shows first), ``full``
    checks every block. A source from before per-block hashes has its index hashed whole, now."""
    if blocks is not None:
        index = DocIndex(path, meta.num_docs, meta.num_tokens, blocks, mode, fetch, label)
        if mode == VerifyMode.FULL:
            index.verify_all()
        elif fetch is None:
            index.verify_ends()
        return index
    offsets = load_index(path, meta.num_docs + 1, str(path))
    if offsets[0] != 0 or offsets[-1] != meta.num_tokens:
        raise CorruptData(f"{path}: document index does not match the source's description "
                          f"({meta.num_docs} docs, {meta.num_tokens} tokens)")
    if mode != VerifyMode.OFF and hashlib.sha256(offsets.data).hexdigest() != whole_sha256:
        raise CorruptData(f"{path}: document index hash mismatch (corrupt or edited)")
    return offsets


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never a torn write (a crash leaves no temp file behind)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would keep a shipped index from servers running as another user
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
