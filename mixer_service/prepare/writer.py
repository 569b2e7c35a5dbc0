"""Turn a stream of documents into a prepared source: zstd token shards, a doc-offset index and meta.json.

Everything is written into a temp directory under ``<parent>/.prepare-staging/`` (same filesystem) and
renamed into place at the end, with ``meta.json`` written last, so a crash or Ctrl-C never leaves a
directory that looks like a complete source next to real ones. Memory is bounded by one batch of
documents, whatever the corpus size.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import zstandard
from tqdm import tqdm

from mixer_contract.errors import Conflict, InvalidInput
from mixer_service.prepare.tokenizer import TextTokenizer
from mixer_service.sources.source_format import (
    META_FILE,
    OFFSETS_FILE,
    IndexBlocks,
    MetaFile,
    ShardInfo,
    SourceMeta,
    content_fingerprint,
    shard_file_name,
    token_dtype,
)

logger = logging.getLogger(__name__)

# 8 Mi tokens: 16 MiB raw at uint16. New jobs read a source in windows of 16 shards (docs/epoch_order.md),
# so a window is 256 MiB and a cache of a quarter of a 10^9-token source holds one (fingerprints do not
# depend on the shard size).
DEFAULT_SHARD_TOKENS = 1 << 23
DEFAULT_BATCH_CHARS = 4 << 20  # enough text per encode_batch call to keep every core busy
DEFAULT_BATCH_DOCS = 16384
ZSTD_LEVEL = 3
STAGING_DIR = ".prepare-staging"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _ShardWriter:
    """Appends tokens to zstd shards of exactly ``shard_tokens`` tokens (the last may be shorter)."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory = directory
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.shards: list[ShardInfo] = []
        self.stream_hash = hashlib.sha256()
        self.num_tokens = 0
        self._cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1)
        self._writer: zstandard.ZstdCompressionWriter | None = None
        self._raw_hash = hashlib.sha256()
        self._in_shard = 0

    def write(self, tokens: np.ndarray) -> None:
        """Append tokens (already in the target dtype), starting new shards as they fill."""
        while tokens.size:
            if self._writer is None:
                path = self.directory / shard_file_name(len(self.shards))
                self._writer = self._cctx.stream_writer(open(path, "wb"), closefd=True)
            take = min(tokens.size, self.shard_tokens - self._in_shard)
            chunk = tokens[:take].tobytes()
            self._writer.write(chunk)
            self._raw_hash.update(chunk)
            self.stream_hash.update(chunk)
            self._in_shard += take
            self.num_tokens += take
            tokens = tokens[take:]
            if self._in_shard == self.shard_tokens:
                self._finish_shard()

    def _finish_shard(self) -> None:
        assert self._writer is not None
        self._writer.close()
        path = self.directory / shard_file_name(len(self.shards))
        _fsync(path)
        with open(path, "rb") as fh:
            sha = hashlib.file_digest(fh, "sha256").hexdigest()
        self.shards.append(ShardInfo(path.name, self._in_shard, sha, self._raw_hash.hexdigest()))
        self._writer, self._raw_hash, self._in_shard = None, hashlib.sha256(), 0

    def close(self) -> list[ShardInfo]:
        """Finish the partial last shard and return every shard's info."""
        if self._writer is not None:
            self._finish_shard()
        return self.shards

    def abort(self) -> None:
        """Close an open shard file without finishing it (the temp dir is deleted after)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class _OffsetsWriter:
    """Streams document end offsets to disk so the index never has to fit in memory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._raw_path = directory / (OFFSETS_FILE + ".part")
        self._fh = open(self._raw_path, "wb")
        self.hash = hashlib.sha256()
        self.num_docs = 0
        self._append(np.zeros(1, dtype="<i8"))

    def _append(self, offsets: np.ndarray) -> None:
        data = offsets.astype("<i8", copy=False).tobytes()
        self._fh.write(data)
        self.hash.update(data)

    def add(self, end_offsets: np.ndarray) -> None:
        """Record the end offsets (exclusive, after EOS) of a batch of documents."""
        self._append(end_offsets)
        self.num_docs += end_offsets.size

    def close(self) -> str:
        """Write ``doc_offsets.npy`` (npy header + the streamed data) and return its data hash."""
        self._fh.close()
        path = self.directory / OFFSETS_FILE
        with open(path, "wb") as out, open(self._raw_path, "rb") as src:
            header = {"descr": "<i8", "fortran_order": False, "shape": (self.num_docs + 1,)}
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(src, out, 1 << 20)
        self._raw_path.unlink()
        _fsync(path)
        return self.hash.hexdigest()

    def abort(self) -> None:
        """Close the file handle (the temp dir is deleted after)."""
        self._fh.close()


def _batches(docs: Iterable[str], batch_chars: int, batch_docs: int) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= batch_chars or len(batch) >= batch_docs:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse to clobber a prepared source (unless asked) or anything that is not one."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise Conflict(f"{out_dir}: exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    if not (out_dir / META_FILE).is_file():
        raise Conflict(
            f"{out_dir}: exists, is not empty and is not a prepared source; refusing to replace it"
        )
    if not overwrite:
        raise Conflict(f"{out_dir}: a prepared source already exists (use overwrite to replace it)")


def _install(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished temp dir into place; an old source is swapped out, then deleted."""
    _check_target(out_dir, overwrite)
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    trash = tmp.parent / f"{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, trash)
    os.rename(tmp, out_dir)
    shutil.rmtree(trash)


def _pack(token_lists: list[np.ndarray], eos_id: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate a batch's documents, each followed by EOS; also return per-doc lengths incl. EOS."""
    lengths = np.fromiter((t.size + 1 for t in token_lists), dtype=np.int64, count=len(token_lists))
    ends = np.cumsum(lengths)
    out = np.empty(int(ends[-1]), dtype=dtype)
    out[ends - 1] = eos_id
    start = 0
    for toks, end in zip(token_lists, ends.tolist(), strict=True):
        out[start : end - 1] = toks
        start = end
    return out, lengths


class SkipCount:
    """Empty documents dropped so far: known only once the batches are consumed, so kept by reference."""

    def __init__(self) -> None:
        self.value = 0


def _packed_batches(
    documents: Iterable[str],
    tokenizer: TextTokenizer,
    dtype: np.dtype,
    batch_chars: int,
    batch_docs: int,
    max_docs: int | None,
    skipped: SkipCount,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Packed tokens and per-doc lengths, batch by batch; empties counted, at most ``max_docs`` kept."""
    kept = 0
    for raw_batch in _batches(documents, batch_chars, batch_docs):
        batch = [d for d in raw_batch if d]
        skipped.value += len(raw_batch) - len(batch)
        if max_docs is not None:
            batch = batch[: max_docs - kept]
        if batch:
            yield _pack(tokenizer.encode_batch(batch), tokenizer.eos_id, dtype)
            kept += len(batch)
        if max_docs is not None and kept >= max_docs:
            break


def check_arguments(out_dir: Path, shard_tokens: int, max_docs: int | None, overwrite: bool) -> None:
    """Refuse bad sizes or an occupied target before any input is read."""
    if shard_tokens <= 0:
        raise InvalidInput(f"shard_tokens must be positive, got {shard_tokens}")
    if max_docs is not None and max_docs <= 0:
        raise InvalidInput(f"max_docs must be positive, got {max_docs}")
    _check_target(out_dir, overwrite)


def prepare_source(
    documents: Iterable[str],
    out_dir: Path,
    tokenizer: TextTokenizer,
    name: str | None = None,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    batch_chars: int = DEFAULT_BATCH_CHARS,
    batch_docs: int = DEFAULT_BATCH_DOCS,
    max_docs: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> SourceMeta:
    """Tokenize ``documents`` into a prepared source at ``out_dir`` and return its metadata.

    Empty documents are skipped (and counted); at most ``max_docs`` non-empty documents are kept.
    Deterministic: the same documents and tokenizer always give the same fingerprint.
    """
    out_dir = Path(out_dir)
    check_arguments(out_dir, shard_tokens, max_docs, overwrite)
    skipped = SkipCount()
    dtype = token_dtype(tokenizer.vocab_size)
    batches = _packed_batches(documents, tokenizer, dtype, batch_chars, batch_docs, max_docs, skipped)
    name = name or out_dir.name
    return write_packed(batches, out_dir, tokenizer, name, skipped, shard_tokens=shard_tokens,
                        overwrite=overwrite, progress=progress, desc=f"prepare {name}")


def write_packed(
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    out_dir: Path,
    tokenizer: TextTokenizer,
    name: str,
    skipped: SkipCount,
    *,
    shard_tokens: int,
    overwrite: bool,
    progress: bool,
    desc: str,
) -> SourceMeta:
    """Write packed batches (tokens with EOS after each doc, per-doc lengths) as a prepared source.

    The bytes depend only on the concatenated tokens and lengths, never on where batches split them,
    which is what lets ``mixer prepare --ray`` merge parts into the single-process result.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    # The temp dir sits one level down (same filesystem, so the final rename is atomic): a crash just
    # before that rename leaves a complete-looking dir, but never as a sibling of real sources.
    staging = out_dir.parent / STAGING_DIR
    staging.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=staging))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished source should be shareable
    shards = _ShardWriter(tmp, dtype, shard_tokens)
    offsets = _OffsetsWriter(tmp)
    started = time.perf_counter()
    bar = tqdm(desc=desc, unit="doc", unit_scale=True, disable=not progress, dynamic_ncols=True)
    try:
        for tokens, lengths in batches:
            offsets.add(shards.num_tokens + np.cumsum(lengths))
            shards.write(tokens)
            bar.update(len(lengths))
            rate = shards.num_tokens / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(f"{rate / 1e6:.2f}M tok/s", refresh=False)
        if offsets.num_docs == 0:
            raise InvalidInput(
                f"no non-empty documents in the input for {name!r} ({skipped.value} empty skipped)")
        shard_infos = shards.close()
        offsets_sha = offsets.close()
        stream_sha = shards.stream_hash.hexdigest()
        meta = MetaFile(
            source=SourceMeta(
                name=name,
                fingerprint=content_fingerprint(tokenizer.fingerprint, dtype.name, stream_sha, offsets_sha),
                tokenizer_fingerprint=tokenizer.fingerprint,
                vocab_size=tokenizer.vocab_size,
                eos_id=tokenizer.eos_id,
                dtype=dtype.name,
                num_docs=offsets.num_docs,
                num_tokens=shards.num_tokens,
                path=out_dir,
            ),
            shards=tuple(shard_infos),
            tokens_sha256=stream_sha,
            doc_offsets_sha256=offsets_sha,
            skipped_empty_docs=skipped.value,
            doc_index=IndexBlocks.of_file(tmp / OFFSETS_FILE),
        )
        (tmp / META_FILE).write_text(meta.to_json())
        _fsync(tmp / META_FILE)
        _fsync(tmp)
        _install(tmp, out_dir, overwrite)
    except BaseException:
        shards.abort()
        offsets.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
        with contextlib.suppress(OSError):  # still in use by a concurrent prepare
            staging.rmdir()
    elapsed = time.perf_counter() - started
    s = meta.source
    logger.info(
        "prepared source %s: %d docs, %d tokens, %d shards, %d empty docs skipped, %.1fs (%.0f tok/s) -> %s",
        s.name,
        s.num_docs,
        s.num_tokens,
        len(shard_infos),
        skipped.value,
        elapsed,
        s.num_tokens / elapsed,
        out_dir,
        extra={
            "event": "prepare.done",
            "source": s.name,
            "fingerprint": s.fingerprint,
            "num_docs": s.num_docs,
            "num_tokens": s.num_tokens,
            "num_shards": len(shard_infos),
            "skipped_empty_docs": skipped.value,
            "seconds": round(elapsed, 3),
        },
    )
    return s
