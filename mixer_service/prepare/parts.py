"""Parts of a distributed prepare: contiguous runs of input files, tokenized apart, merged in input order.

Nothing here imports Ray: a part is tokenized by the same readers, batching and packing as the
single-process prepare, and the merge replays the single-process writer over the parts in order, so the
merged source is byte-identical however the documents were split into parts.
"""

from __future__ import annotations

import fnmatch
import io
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import zstandard

from mixer_contract.errors import InvalidInput
from mixer_service.prepare.readers import (
    FORMATS,
    MDS_INDEX,
    Format,
    detect_format,
    expand_inputs,
    iter_documents,
)
from mixer_service.prepare.tokenizer import HFTokenizer, TextTokenizer
from mixer_service.prepare.writer import (
    DEFAULT_BATCH_CHARS,
    DEFAULT_BATCH_DOCS,
    SkipCount,
    _batches,
    _pack,
    write_packed,
)
from mixer_service.sources.source_format import SourceMeta, token_dtype

PART_BYTES = 64 << 20  # input bytes a part: ~30 s of one core's BPE, small against task overhead
CHUNK_TOKENS = 1 << 24  # a part's tokens leave its worker in chunks of this size: bounded worker memory
PART_ZSTD_LEVEL = 1  # parts are transient: cheap compression for the trip to the driver


@dataclass(frozen=True)
class InputFile:
    """One input: a local path or an ``s3://bucket/key`` URL, its format and size (for grouping)."""

    location: str
    kind: Format
    size: int


@dataclass(frozen=True)
class ReadSpec:
    """How every worker reads its inputs (the same arguments as the single-process prepare)."""

    text_field: str = "text"
    split_regex: str | None = None
    s3_endpoint: str | None = None


def plan_inputs(
    inputs: Sequence[str | Path], fmt: Format = "auto", glob: str | None = None,
    s3_endpoint: str | None = None,
) -> list[InputFile]:
    """Expand the inputs in the single-process order; ``s3://`` prefixes list in key order."""
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    out: list[InputFile] = []
    for raw in inputs:
        if str(raw).startswith("s3://"):
            out.extend(_plan_s3(str(raw), fmt, glob, s3_endpoint))
            continue
        for path in expand_inputs([raw], glob):
            kind = detect_format(path) if fmt == "auto" else fmt
            if kind == "mds" and not (path / MDS_INDEX).is_file():
                raise InvalidInput(f"{path}: not an MDS dataset (no {MDS_INDEX})")
            out.append(InputFile(str(path), kind, path.stat().st_size))
    return out


def _plan_s3(url: str, fmt: Format, glob: str | None, endpoint: str | None) -> list[InputFile]:
    """An object, or every non-hidden object under a prefix matching ``glob``, like a local directory."""
    from mixer_service.sources.origins import parse_s3_url, s3_client

    bucket, prefix = parse_s3_url(url)
    client = s3_client(endpoint, timeout_s=30.0)
    objects: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        objects.update((o["Key"], int(o["Size"])) for o in page.get("Contents", ()))
    if prefix in objects:
        keys = [prefix]
    else:
        below = prefix + "/" if prefix else ""
        keys = sorted(k for k in objects if k.startswith(below) and _matches(k[len(below):], glob))
    if not keys:
        raise InvalidInput(f"{url}: no objects matching {glob or '**/*'!r}")
    out = []
    for key in keys:
        kind = detect_format(Path(key)) if fmt == "auto" else fmt
        if kind == "mds":
            raise InvalidInput(f"s3://{bucket}/{key}: MDS inputs must be local directories")
        out.append(InputFile(f"s3://{bucket}/{key}", kind, objects[key]))
    return out


def _matches(relative: str, glob: str | None) -> bool:
    """``Path.glob`` semantics for a key below the prefix (``*`` within a segment, ``**`` any depth);
    hidden segments skipped, as for a local directory."""
    parts = PurePosixPath(relative).parts
    if any(part.startswith(".") for part in parts):
        return False
    return glob is None or _glob_match(parts, PurePosixPath(glob).parts)


def _glob_match(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _glob_match(parts[1:], pattern[1:])


def group_parts(files: Sequence[InputFile], part_bytes: int = PART_BYTES) -> list[list[InputFile]]:
    """Contiguous runs of files of about ``part_bytes`` each (a larger file is a part alone)."""
    if part_bytes <= 0:
        raise InvalidInput(f"part_bytes must be positive, got {part_bytes}")
    parts: list[list[InputFile]] = []
    size = 0
    for f in files:
        if not parts or size + f.size > part_bytes:
            parts.append([])
            size = 0
        parts[-1].append(f)
        size += f.size
    return parts


def read_part(files: Iterable[InputFile], spec: ReadSpec) -> Iterator[str]:
    """The documents of a part's files in order, through the single-process readers."""
    for f in files:
        if not f.location.startswith("s3://"):
            yield from iter_documents([f.location], f.kind, spec.text_field, spec.split_regex)
            continue
        with tempfile.TemporaryDirectory(prefix="mixer-part-") as tmp:
            path = Path(tmp) / PurePosixPath(f.location).name  # keeps the suffix the readers look at
            _download(f.location, path, spec.s3_endpoint)
            yield from iter_documents([path], f.kind, spec.text_field, spec.split_regex)


def _download(url: str, path: Path, endpoint: str | None) -> None:
    from mixer_service.sources.origins import parse_s3_url, s3_client

    bucket, key = parse_s3_url(url)
    try:
        s3_client(endpoint, timeout_s=30.0).download_file(bucket, key, str(path))
    except Exception as exc:  # botocore raises many unrelated types; the message names the object
        raise InvalidInput(f"{url}: cannot download ({exc})") from exc


def worker_tokenizer(tokenizer: TextTokenizer) -> TextTokenizer:
    """The tokenizer as it arrived by pickle, re-wrapped so that settings pickle drops (special tokens
    encoded as text) are set again; its fingerprint must still match the driver's."""
    if not isinstance(tokenizer, HFTokenizer):
        return tokenizer
    rebuilt = HFTokenizer(tokenizer.backend, tokenizer.eos_id)
    if rebuilt.fingerprint != tokenizer.fingerprint:
        raise InvalidInput("the tokenizer changed on its way to a worker (fingerprint differs)")
    return rebuilt


@dataclass(frozen=True)
class PartChunk:
    """Consecutive documents of one part: packed tokens (zstd), lengths of the non-empty documents
    (with EOS) and the character count of every document, empties included (to replay ``max_docs``)."""

    part: int
    chunk: int
    last: bool
    tokens_zst: bytes
    lengths: np.ndarray
    chars: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, key=np.array([self.part, self.chunk, int(self.last)], dtype=np.int64),
                 tokens_zst=np.frombuffer(self.tokens_zst, dtype=np.uint8), lengths=self.lengths,
                 chars=self.chars)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PartChunk:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            part, chunk, last = (int(v) for v in z["key"])
            return cls(part, chunk, bool(last), z["tokens_zst"].tobytes(), z["lengths"], z["chars"])

    def tokens(self, dtype: np.dtype) -> np.ndarray:
        return np.frombuffer(zstandard.ZstdDecompressor().decompress(self.tokens_zst), dtype=dtype)


def tokenize_part(
    part: int,
    documents: Iterable[str],
    tokenizer: TextTokenizer,
    chunk_tokens: int = CHUNK_TOKENS,
    batch_chars: int = DEFAULT_BATCH_CHARS,
    batch_docs: int = DEFAULT_BATCH_DOCS,
) -> Iterator[PartChunk]:
    """A part's documents tokenized and packed like the single-process prepare, in chunks (at least one)."""
    dtype = token_dtype(tokenizer.vocab_size)
    cctx = zstandard.ZstdCompressor(level=PART_ZSTD_LEVEL)
    tokens: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    chars: list[np.ndarray] = []
    held = chunk = 0

    def flush(last: bool) -> PartChunk:
        packed = np.concatenate(tokens) if tokens else np.empty(0, dtype=dtype)
        out = PartChunk(part, chunk, last, cctx.compress(packed.tobytes()),
                        np.concatenate(lengths) if lengths else np.empty(0, dtype=np.int64),
                        np.concatenate(chars) if chars else np.empty(0, dtype=np.int64))
        for pending in (tokens, lengths, chars):
            pending.clear()
        return out

    for raw_batch in _batches(documents, batch_chars, batch_docs):
        chars.append(np.fromiter((len(d) for d in raw_batch), dtype=np.int64, count=len(raw_batch)))
        batch = [d for d in raw_batch if d]
        if batch:
            packed, batch_lengths = _pack(tokenizer.encode_batch(batch), tokenizer.eos_id, dtype)
            tokens.append(packed)
            lengths.append(batch_lengths)
            held += packed.size
        if held >= chunk_tokens:
            yield flush(last=False)
            held, chunk = 0, chunk + 1
    yield flush(last=True)


def _replay(
    chunks: Iterable[PartChunk], dtype: np.dtype, max_docs: int | None, skipped: SkipCount,
    batch_chars: int, batch_docs: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Packed batches as the single-process prepare writes them, with its skip count.

    Without ``max_docs`` that is every chunk as it is. With it, the single-process run stops after the
    read batch that holds the last kept document and counts the empties of every batch it read, so the
    batch boundaries are replayed from the character counts.
    """
    kept = in_batch = batch_size = batch_empties = 0
    for c in chunks:
        if max_docs is None:
            skipped.value += int(np.count_nonzero(c.chars == 0))
            if c.lengths.size:
                yield c.tokens(dtype), c.lengths
            continue
        take = 0
        for n in c.chars.tolist():
            if n == 0:
                batch_empties += 1
            elif kept < max_docs:
                kept += 1
                take += 1
            in_batch += n
            batch_size += 1
            if in_batch >= batch_chars or batch_size >= batch_docs:
                skipped.value += batch_empties
                in_batch = batch_size = batch_empties = 0
                if kept >= max_docs:
                    break
        if take:
            yield c.tokens(dtype)[: int(c.lengths[:take].sum())], c.lengths[:take]
        if kept >= max_docs and batch_size == 0:
            return
    skipped.value += batch_empties


def merge_parts(
    chunks: Iterable[PartChunk],
    out_dir: Path,
    tokenizer: TextTokenizer,
    name: str,
    *,
    shard_tokens: int,
    max_docs: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    batch_chars: int = DEFAULT_BATCH_CHARS,
    batch_docs: int = DEFAULT_BATCH_DOCS,
) -> SourceMeta:
    """Write chunks (in part, then chunk order) as one prepared source through the single-process writer."""
    skipped = SkipCount()
    dtype = token_dtype(tokenizer.vocab_size)
    batches = _replay(chunks, dtype, max_docs, skipped, batch_chars, batch_docs)
    return write_packed(batches, out_dir, tokenizer, name, skipped, shard_tokens=shard_tokens,
                        overwrite=overwrite, progress=progress, desc=f"merge {name}")


def load_chunks(directory: Path, names: Iterable[str]) -> Iterator[PartChunk]:
    """Read stored chunk files one at a time (the merge holds one chunk in memory)."""
    for name in names:
        yield PartChunk.from_bytes((directory / name).read_bytes())


def chunk_file_name(part: int, chunk: int) -> str:
    """Zero-padded so that sorted names are part order, then chunk order."""
    return f"part-{part:08d}-{chunk:06d}.npz"
