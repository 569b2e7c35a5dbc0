"""Tokenized corpora adopted in place: Megatron-LM indexed datasets, flat token arrays, MDS token columns,
datatrove ``.ds`` files.

A directory holding ``mixer-source.json`` (the manifest the user writes) registers a corpus another
pipeline already tokenized::

    {"format": "megatron" | "flat" | "mds" | "datatrove", "name": "web", "files": ["data_text_document"],
     "tokenizer_fingerprint": "...", "vocab_size": 50257, "dtype": "uint16", "eos_id": 50256}

``files`` are relative to the directory: Megatron prefixes (``.bin`` + ``.idx``), flat ``.npy`` or raw
``.bin`` files of ``dtype`` in which every document ends with ``eos_id`` (the OLMo/Dolma layout), MDS
directories (with ``index.json``) whose ``column`` (default ``tokens``) holds each document's tokens (an
MDS document gets ``eos_id`` appended unless ``"append_eos": false``), or datatrove ``.ds`` token files
(with their ``.ds.index``; ``datatrove_ds``). Every format may also live under an ``s3://`` prefix
(``AdoptedSource.open_remote``): blocks (or MDS shards) fetched by ranged GETs into the bounded shard cache.

Adopting computes, once, what a prepared source's ``meta.json`` records: the document index
(``.mixer-doc_offsets.npy``, int64, 8 bytes a document), the hash of every block of tokens and the content
fingerprint, stored in ``.mixer-adopted.json`` under the cache directory
(``<cache>/adopted/<name>-<hash of the path>/``), never in the corpus, so the corpus can be read-only. The
fingerprint is the sha256 of the whole token stream (what makes it equal a prepared source's), so it costs
one read of every token; ``mixer adopt --index`` pays that once and writes the record into
``mixer-index/``, which ships with the corpus: every server that opens the corpus then copies the record
and reads the shipped document index in place, block by block (O(1) in the corpus at open), instead of
reading the tokens. The record names every file it read with its size and the
sha256 of its first and last 64 KiB; a record (stored or shipped) whose files no longer match (regenerated
in place under the same manifest) is derived again, never reused stale. The canonical stream (documents,
each followed by EOS) is the same as ``prepare`` would write for the same documents, so the fingerprint is
too. Megatron and flat tokens are read where they are with ``pread`` (no memory map: a file truncated under
the server is an error naming it, not SIGBUS), in blocks hashed again before their first use in each
process, when their token ids are also checked against ``vocab_size``; every later read is checked against
4 KiB checksums of the verified bytes (``checked``). An MDS shard interleaves sample headers with tokens,
so its tokens are extracted into the shard cache on first use and verified.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from mixer_contract.errors import CorruptData, InvalidInput, MixerError, SourceUnavailable
from mixer_service.sources import datatrove_ds
from mixer_service.sources.cache import Shard, ShardCache
from mixer_service.sources.checked import CheckedRegion, CheckedTokens, Digest, open_handle, pread_exact
from mixer_service.sources.doc_index import DocIndex, Fetch, npy_header, sparse_index_file
from mixer_service.sources.origins import PROBE_BYTES as PROBE_BYTES  # re-exported: what a probe hashes
from mixer_service.sources.origins import LocalOrigin, Origin, probe, same_probes
from mixer_service.sources.prepared import ShardedSource, as_verify_mode, open_index, write_atomic
from mixer_service.sources.source_format import (
    DTYPES,
    IndexBlocks,
    SourceMeta,
    content_fingerprint,
    index_leaves,
    merkle_root,
)
from mixer_service.sources.token_scan import scan_region
from mixer_service.sources.verify import DEFAULT_VERIFY, FileStamp, VerifyMode

log = logging.getLogger(__name__)

MANIFEST = "mixer-source.json"
RECORD = ".mixer-adopted.json"
OFFSETS = ".mixer-doc_offsets.npy"
RECORD_FORMAT, RECORD_VERSION = "mixer-adopted-source", 2  # 2: input probes, kept under the cache dir
ADOPTED_SUBDIR = "adopted"
INDEX_SUBDIR = "mixer-index"  # the record ``mixer adopt --index`` ships with a corpus (read, never written)
SCAN_WORKERS = min(4, os.cpu_count() or 1)  # threads hashing blocks while one reads them in order
FORMATS = ("megatron", "flat", "mds", "datatrove")
BLOCK_TOKENS = 1 << 24  # 32 MiB of uint16 per verified block: one hash costs ~20 ms
_NPY_HEADER_MAX = 1 << 17  # bytes read to parse a .npy header (version 1 headers are at most 64 KiB)
_MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
_MEGATRON_DTYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32",
                    8: "uint16"}


@dataclass(frozen=True)
class Manifest:
    """The user's registration of an adopted corpus."""

    format: str
    name: str
    files: tuple[str, ...]
    tokenizer_fingerprint: str
    vocab_size: int
    dtype: str
    eos_id: int
    column: str = "tokens"
    append_eos: bool = True

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidInput(f"{path}: unreadable manifest ({exc})") from exc
        return cls.parse(data, str(path), str(directory))

    @classmethod
    def parse(cls, data: bytes, path: str, directory: str) -> Manifest:
        """The manifest in ``data``, read from ``path`` (for messages) in ``directory``."""
        try:
            obj: dict[str, Any] = json.loads(data)
        except ValueError as exc:
            raise InvalidInput(f"{path}: unreadable manifest ({exc})") from exc
        required = ("format", "name", "files", "tokenizer_fingerprint", "vocab_size", "dtype", "eos_id")
        missing = [k for k in required if k not in obj]
        if missing:
            raise InvalidInput(f"{path}: missing field(s) {missing}")
        unknown = set(obj) - set(required) - {"column", "append_eos"}
        if unknown:
            raise InvalidInput(f"{path}: unknown field(s) {sorted(unknown)}")
        if obj["format"] not in FORMATS:
            raise InvalidInput(f"{path}: format must be one of {FORMATS}, got {obj['format']!r}")
        if obj["dtype"] not in DTYPES:
            raise InvalidInput(f"{path}: dtype must be one of {DTYPES}, got {obj['dtype']!r}")
        files = obj["files"]
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            raise InvalidInput(f"{path}: files must be a non-empty list of paths relative to {directory}")
        for key in ("vocab_size", "eos_id"):
            if isinstance(obj[key], bool) or not isinstance(obj[key], int) or obj[key] < 0:
                raise InvalidInput(f"{path}: {key} must be a non-negative integer, got {obj[key]!r}")
        if obj["eos_id"] >= obj["vocab_size"] or obj["vocab_size"] > np.iinfo(obj["dtype"]).max + 1:
            raise InvalidInput(f"{path}: eos_id {obj['eos_id']} / vocab_size {obj['vocab_size']} do not fit "
                               f"{obj['dtype']}")
        return cls(obj["format"], str(obj["name"]), tuple(files), str(obj["tokenizer_fingerprint"]),
                   obj["vocab_size"], obj["dtype"], obj["eos_id"], str(obj.get("column", "tokens")),
                   bool(obj.get("append_eos", True)))


def is_adopted(directory: Path) -> bool:
    return (directory / MANIFEST).is_file()


# -- reading each format's documents ---------------------------------------------------------------


@dataclass(frozen=True)
class _Region:
    """Tokens stored contiguously in place: ``num_tokens`` of them at byte ``offset`` of ``file``."""

    file: str
    offset: int
    num_tokens: int
    # exclusive token ends of this region's documents, relative to the region (None: found from EOS)
    doc_ends: np.ndarray | None


def _megatron_region(origin: Origin, prefix: str, m: Manifest) -> _Region:
    """A Megatron-LM MMIDIDX ``prefix.idx`` + ``prefix.bin`` pair (layout of Megatron-LM's
    megatron/core/datasets/indexed_dataset.py: header, int32 lengths, int64 pointers, int64 doc index)."""
    idx_name, bin_name = f"{prefix}.idx", f"{prefix}.bin"
    idx_label = origin.describe(idx_name)
    raw = origin.read(idx_name)  # read, not mapped: a file truncated meanwhile is an error, not SIGBUS
    try:
        header = raw[:34]
        magic, (version,), (code,), (seqs, docs) = (header[:9], struct.unpack("<Q", header[9:17]),
                                                    struct.unpack("<B", header[17:18]),
                                                    struct.unpack("<QQ", header[18:34]))
        if magic != _MEGATRON_MAGIC or version != 1:
            raise ValueError(f"not an MMIDIDX v1 index (magic {magic!r}, version {version})")
        lengths = np.frombuffer(raw, dtype="<i4", count=seqs, offset=34)
        pointers = np.frombuffer(raw, dtype="<i8", count=seqs, offset=34 + 4 * seqs)
        doc_index = np.frombuffer(raw, dtype="<i8", count=docs, offset=34 + 12 * seqs)
    except (ValueError, struct.error) as exc:
        raise CorruptData(f"{idx_label}: unreadable Megatron index ({exc})") from exc
    stored = _MEGATRON_DTYPES.get(code, f"code {code}")
    # int32 ids are the uint32 bytes for any id < 2**31, so Megatron's int32 files adopt as uint32.
    if {"int32": "uint32"}.get(stored, stored) != m.dtype:
        raise InvalidInput(f"{idx_label}: tokens are {stored}, the manifest says {m.dtype}")
    itemsize = np.dtype(m.dtype).itemsize
    ends = np.cumsum(lengths, dtype=np.int64)
    if seqs and not np.array_equal(pointers, (ends - lengths) * itemsize):
        _lying_dtype_code(idx_label, code, stored, pointers, ends - lengths)
        raise InvalidInput(f"{idx_label}: sequences are not stored back to back; re-save it with Megatron's "
                           "builder or prepare the corpus instead")
    if docs < 1 or doc_index[0] != 0 or doc_index[-1] != seqs or np.any(np.diff(doc_index) <= 0):
        raise CorruptData(f"{idx_label}: document index does not cover the {seqs} sequences in order")
    total = int(ends[-1]) if seqs else 0
    size = origin.size(bin_name)
    if size != total * itemsize:
        raise CorruptData(f"{origin.describe(bin_name)}: {size} bytes, the index says {total * itemsize}")
    return _Region(bin_name, 0, total, ends[doc_index[1:] - 1])


def _lying_dtype_code(idx_label: str, code: int, stored: str, pointers: np.ndarray,
                      starts: np.ndarray) -> None:
    """Raise naming the dtype code when the pointers are back to back for another token size."""
    for size in (1, 2, 4, 8):
        if np.array_equal(pointers, starts * size):
            raise CorruptData(f"{idx_label}: the dtype code {code} says {stored}, but the pointers advance "
                              f"{size} bytes a token: the .idx's dtype code is wrong (the tokens were "
                              f"written as {size}-byte ids)")


def _flat_region(origin: Origin, name: str, m: Manifest) -> _Region:
    """A flat ``.npy`` or raw ``.bin`` token array in which each document ends with EOS (OLMo/Dolma); its
    documents are found from EOS by the adoption pass."""
    dtype = np.dtype(m.dtype).newbyteorder("<")
    size = origin.size(name)
    if not name.endswith(".npy"):
        return _Region(name, 0, size // dtype.itemsize, None)
    head = io.BytesIO(origin.read_range(name, 0, min(size, _NPY_HEADER_MAX)))
    try:
        version = np.lib.format.read_magic(head)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, stored = read(head)
    except (OSError, ValueError) as exc:
        raise CorruptData(f"{origin.describe(name)}: unreadable token array ({exc})") from exc
    if stored != dtype or len(shape) != 1 or fortran:
        raise InvalidInput(f"{origin.describe(name)}: a 1-D {m.dtype} array is needed, got {stored} {shape}")
    return _Region(name, head.tell(), int(shape[0]), None)


def _mds_shards(origin: Origin, sub: str, m: Manifest) -> list[dict]:
    """The shards of an MDS dataset (mosaicml-streaming ``index.json``) and how to read the token column."""
    index_name = f"{sub}/index.json"
    try:
        index = json.loads(origin.read(index_name))
        shards = []
        for info in index["shards"]:
            if info.get("format") != "mds":
                raise ValueError(f"shard format {info.get('format')!r} is not mds")
            column = info["column_names"].index(m.column)
            stored = info["zip_data"] if info.get("compression") else info["raw_data"]
            shards.append({"file": f"{sub}/{stored['basename']}", "compression": info.get("compression"),
                           "column": column, "encodings": info["column_encodings"],
                           "sizes": info["column_sizes"], "samples": int(info["samples"])})
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"{origin.describe(index_name)}: not an MDS index with a {m.column!r} column "
                           f"({exc})") from exc
    return shards


def _mds_documents(data: bytes, spec: dict, m: Manifest) -> Iterator[np.ndarray]:
    """The token column of every sample of one MDS shard (layout: streaming/base/format/mds)."""
    if spec["compression"]:
        if not str(spec["compression"]).startswith("zstd"):
            raise InvalidInput(f"{spec['file']}: compression {spec['compression']!r} is not supported "
                               "(zstd is)")
        data = zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 34)
    n = int(np.frombuffer(data, "<u4", count=1)[0])
    offsets = np.frombuffer(data, "<u4", count=n + 1, offset=4).astype(np.int64)
    variable = [i for i, size in enumerate(spec["sizes"]) if size is None]
    for begin, end in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        sample = memoryview(data)[begin:end]
        sizes = list(spec["sizes"])
        dynamic = np.frombuffer(sample, "<u4", count=len(variable))
        for i, size in zip(variable, dynamic.tolist(), strict=True):
            sizes[i] = size
        start = 4 * len(variable) + sum(sizes[: spec["column"]])
        value = sample[start : start + sizes[spec["column"]]]
        yield _decode_tokens(value, spec["encodings"][spec["column"]], m)


def _decode_tokens(value: memoryview, encoding: str, m: Manifest) -> np.ndarray:
    """One ``bytes`` or ``ndarray[:dtype[:shape]]`` MDS value as 1-D tokens of the manifest's dtype."""
    kind, *args = encoding.split(":")
    if kind == "bytes":
        return np.frombuffer(value, dtype=np.dtype(m.dtype).newbyteorder("<"))
    if kind != "ndarray":
        raise InvalidInput(f"MDS column encoding {encoding!r} cannot hold tokens (bytes or ndarray can)")
    pos, dtype = 0, args[0] if args else None
    if dtype is None:
        codes = {8: "uint8", 16: "uint16", 32: "uint32", 33: "int32", 64: "uint64", 65: "int64"}
        dtype, pos = codes.get(value[0], f"code {value[0]}"), 1
    if len(args) < 2:  # dynamic shape: one byte (ndim << 2 | shape dtype), then the shape
        ndim, shape_dtype = value[pos] >> 2, ("<u1", "<u2", "<u4", "<u8")[value[pos] & 3]
        pos += 1 + ndim * np.dtype(shape_dtype).itemsize
    if {"int32": "uint32"}.get(dtype, dtype) != m.dtype:
        raise InvalidInput(f"MDS tokens are {dtype}, the manifest says {m.dtype}")
    return np.frombuffer(value[pos:], dtype=np.dtype(m.dtype).newbyteorder("<"))


def _mds_expand(origin: Origin, spec: dict, m: Manifest) -> Callable[[bytes], bytes]:
    """Stored shard bytes -> its canonical token stream (each document followed by EOS)."""
    eos = np.array([m.eos_id], dtype=np.dtype(m.dtype).newbyteorder("<"))

    def expand(data: bytes) -> bytes:
        try:
            docs = list(_mds_documents(data, spec, m))
        except (ValueError, IndexError, zstandard.ZstdError) as exc:
            raise CorruptData(f"{origin.describe(spec['file'])}: unreadable MDS shard ({exc})") from exc
        parts = [p for d in docs for p in ((d, eos) if m.append_eos else (d,))]
        return np.concatenate(parts).tobytes() if parts else b""
    return expand


# -- adoption: computed once, kept under the cache dir ---------------------------------------------


def state_dir(directory: Path, cache: ShardCache) -> Path:
    """Where the adoption record of ``directory`` lives: beside the shard cache, one directory a corpus."""
    key = hashlib.sha256(str(Path(directory).resolve()).encode()).hexdigest()[:16]
    return cache.directory.parent / ADOPTED_SUBDIR / f"{Path(directory).name}-{key}"


def _current(record: dict, origin: Origin, manifest_sha: str) -> bool:
    """Whether a record still describes the files: same manifest, same version, same probes (and, for a
    record whose document index is read where it ships, that index still there)."""
    if record.get("manifest_sha256") != manifest_sha or record.get("version") != RECORD_VERSION:
        return False
    if record.get("shipped_index"):
        try:
            origin.size(f"{INDEX_SUBDIR}/{OFFSETS}")
        except MixerError:
            return False
    return same_probes(origin, record.get("inputs", []))


def adopt(where: Path | Origin, state: Path, *, force: bool = False, workers: int = SCAN_WORKERS) -> dict:
    """The adoption record of ``where`` (a directory, or an origin such as an S3 prefix), kept in ``state``:
    document index, block hashes, fingerprint.

    A later open reads the record in ``state`` while the manifest and the probes of every input file are
    unchanged (a few 64 KiB reads a file); without one, a current index shipped with the corpus
    (``mixer-index/``, written by ``mixer adopt --index``) is copied into ``state``: both O(1) in the corpus.
    Only without either (or with ``force``) is every token read, once, by ``workers`` threads.
    """
    origin: Origin = LocalOrigin(where) if isinstance(where, Path) else where
    manifest_bytes = origin.read(MANIFEST)
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    if not force:
        record = _stored(origin, state, manifest_sha) or _shipped(origin, state, manifest_sha)
        if record is not None:
            return record
    m = Manifest.parse(manifest_bytes, origin.describe(MANIFEST), origin.describe(""))
    started = time.perf_counter()
    log.info("adopting %s (%s) once: hashing every token", origin.describe(""), m.format,
             extra={"event": "adopt.start", "source": m.name, "format": m.format})
    record, offsets = _derive(origin, m, manifest_sha, workers)
    state.mkdir(parents=True, exist_ok=True)
    write_atomic(state / OFFSETS, offsets)
    record["doc_index_blocks"] = IndexBlocks.of_file(state / OFFSETS).to_json()
    write_atomic(state / RECORD, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    log.info("adopted %s: %d docs, %d tokens in %.1fs", origin.describe(""), record["num_docs"],
             record["num_tokens"], time.perf_counter() - started,
             extra={"event": "adopt.done", "source": m.name, "fingerprint": record["fingerprint"]})
    return record


def _stored(origin: Origin, state: Path, manifest_sha: str) -> dict | None:
    """The record in ``state`` when it still describes the files."""
    try:
        record = json.loads((state / RECORD).read_text())
    except (OSError, ValueError):
        return None  # none yet, or unreadable: derived again
    if _current(record, origin, manifest_sha):
        return record
    log.warning("adopted files changed since their record; adopting again", extra={
        "event": "adopt.stale", "directory": origin.describe("")})
    return None


def _shipped(origin: Origin, state: Path, manifest_sha: str) -> dict | None:
    """The record ``mixer adopt --index`` shipped with the corpus, copied into ``state`` when it still
    describes the files. Its document index (8 bytes a document) is not copied: it is read where it ships,
    block by block, each block verified on first use like any record's."""
    try:
        data = origin.read(f"{INDEX_SUBDIR}/{RECORD}")
    except MixerError:
        return None  # none shipped
    try:
        record = json.loads(data)
    except ValueError:
        record = {}
    if not isinstance(record, dict) or not _current(record, origin, manifest_sha):
        log.warning("the index shipped with the corpus does not match its files; adopting again", extra={
            "event": "adopt.shipped_stale", "index": origin.describe(INDEX_SUBDIR)})
        return None
    record["shipped_index"] = True  # its document index is read where it ships (``_index_at``)
    state.mkdir(parents=True, exist_ok=True)
    write_atomic(state / RECORD, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    log.info("adopted %s from its shipped index", origin.describe(""), extra={
        "event": "adopt.shipped", "fingerprint": record.get("fingerprint")})
    return record


def _derive(origin: Origin, m: Manifest, manifest_sha: str, workers: int) -> tuple[dict, bytes]:
    """Read every token once: the record (without its index blocks) and the document index (``.npy``)."""
    stream = hashlib.sha256()
    ends: list[np.ndarray] = []
    parts: list[dict] = []
    inputs: list[str] = []
    base = 0
    dtype = np.dtype(m.dtype).newbyteorder("<")
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="adopt-scan") as pool:
        for name in m.files:
            if m.format == "mds":
                inputs.append(f"{name}/index.json")
                found = list(_adopt_mds(origin, name, m, dtype, stream))
                inputs += [part["file"] for _, part in found]
            elif m.format == "datatrove":
                inputs += [f"{name}.index", name]
                found = [datatrove_ds.adopt_file(origin, name, dtype, m.eos_id, BLOCK_TOKENS, stream, pool,
                                                 2 * workers)]
            else:
                inputs += [f"{name}.idx", f"{name}.bin"] if m.format == "megatron" else [name]
                found = [_adopt_in_place(origin, name, m, dtype, stream, pool, 2 * workers)]
            for doc_ends, part in found:
                ends.append(doc_ends + base)
                base += part["num_tokens"]
                parts.append(part)
    doc_offsets = np.concatenate([np.zeros(1, np.int64), *ends]).astype("<i8")
    if doc_offsets.size < 2 or np.any(np.diff(doc_offsets) < 2):
        raise InvalidInput(f"{origin.describe('')}: empty documents (a lone EOS) cannot be served; drop them "
                           "first")
    offsets_sha = hashlib.sha256(doc_offsets.tobytes()).hexdigest()
    return {
        "format": RECORD_FORMAT, "version": RECORD_VERSION, "manifest_sha256": manifest_sha,
        "inputs": [probe(origin, name) for name in inputs],
        "fingerprint": content_fingerprint(m.tokenizer_fingerprint, m.dtype, stream.hexdigest(), offsets_sha),
        "tokens_sha256": stream.hexdigest(), "doc_offsets_sha256": offsets_sha,
        "num_docs": int(doc_offsets.size - 1), "num_tokens": int(base), "block_tokens": BLOCK_TOKENS,
        "parts": parts,
    }, _npy_bytes(doc_offsets)


def _adopt_in_place(origin: Origin, name: str, m: Manifest, dtype: np.dtype, stream: hashlib._Hash,
                    pool: ThreadPoolExecutor, in_flight: int) -> tuple[np.ndarray, dict]:
    """One Megatron prefix or flat array: its document ends and its part of the record."""
    region = (_megatron_region if m.format == "megatron" else _flat_region)(origin, name, m)
    found = scan_region(origin, region.file, region.offset, region.num_tokens, dtype, m.eos_id,
                        region.doc_ends, stream, BLOCK_TOKENS, pool, in_flight)
    label = origin.describe(region.file)
    if region.doc_ends is None and (found.doc_ends.size == 0 or found.doc_ends[-1] != region.num_tokens):
        raise InvalidInput(f"{label}: the last document does not end with eos_id {m.eos_id}; every document "
                           "must, so the array can be served in place")
    if not found.eos_ok:
        raise InvalidInput(f"{label}: documents do not all end with eos_id {m.eos_id}; re-run the tokenizer "
                           "with EOS appended (Megatron: --append-eod) or prepare the corpus instead")
    if found.doc_ends.size == 0 or found.doc_ends[-1] != region.num_tokens:
        raise InvalidInput(f"{label}: tokens after the last document's EOS")
    return found.doc_ends, {"file": region.file, "offset": region.offset, "num_tokens": region.num_tokens,
                            "size": origin.size(region.file), "blocks": found.blocks}


def _adopt_mds(origin: Origin, sub: str, m: Manifest, dtype: np.dtype,
               stream: hashlib._Hash) -> Iterator[tuple[np.ndarray, dict]]:
    """Each shard of one MDS dataset: its document ends and its part of the record."""
    for spec in _mds_shards(origin, sub, m):
        data = origin.read(spec["file"])
        raw = _mds_expand(origin, spec, m)(data)
        tokens = np.frombuffer(raw, dtype=dtype)
        if m.append_eos:
            doc_ends = np.cumsum([d.size + 1 for d in _mds_documents(data, spec, m)], dtype=np.int64)
        else:
            doc_ends = np.flatnonzero(tokens == m.eos_id) + 1
        stream.update(raw)
        yield doc_ends, spec | {"sha256": hashlib.sha256(data).hexdigest(), "num_tokens": tokens.size,
                                "raw_sha256": hashlib.sha256(raw).hexdigest()}


def _npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


# -- serving ---------------------------------------------------------------------------------------


class _InPlaceBlocks:
    """Blocks of token files read where they are, with ``pread``: each block hashed (and its ids checked
    against the vocabulary) before its first use and again after its file changes; every read checked
    against the 4 KiB checksums taken from the hashed bytes."""

    def __init__(self, directory: Path, parts: list[dict], dtype: np.dtype, block: int, mode: VerifyMode,
                 vocab_size: int) -> None:
        self.mode = mode
        self.dtype = dtype
        self.vocab_size = vocab_size
        self.blocks: list[tuple[Path, int, int, str]] = []  # file, first byte, tokens, sha256
        for part in parts:
            path = directory / part["file"]
            for k, sha in enumerate(part["blocks"]):
                n = min(block, part["num_tokens"] - k * block)
                self.blocks.append((path, part["offset"] + k * block * dtype.itemsize, n, sha))
        self.faults: dict[int, str] = {}  # shared with the source: blocks whose last read failed
        self._verified: dict[int, tuple[FileStamp | None, CheckedTokens]] = {}
        self._handles: dict[Path, tuple[FileStamp | None, Any]] = {}

    @property
    def sizes(self) -> list[int]:
        return [b[2] for b in self.blocks]

    def load(self, k: int) -> CheckedTokens:
        path = self.blocks[k][0]
        stamp = FileStamp.of(path)
        seen = self._verified.get(k)
        if seen is not None and seen[0] == stamp:
            return seen[1]
        if stamp is None:
            raise CorruptData(f"{path}: missing (removed since adoption?)")
        view = self._verify(k, stamp)
        self._verified[k] = (stamp, view)
        return view

    def _handle(self, path: Path, stamp: FileStamp):
        """One open handle a file, opened again when the file changed (a replaced file is a new inode)."""
        held = self._handles.get(path)
        if held is None or held[0] != stamp:
            held = self._handles[path] = (stamp, open_handle(path, str(path)))
        return held[1]

    def _verify(self, k: int, stamp: FileStamp) -> CheckedTokens:
        path, start, n, sha = self.blocks[k]
        handle = self._handle(path, stamp)
        size = n * self.dtype.itemsize
        if self.mode == VerifyMode.OFF:
            return CheckedTokens(CheckedRegion(handle, start, size, None, str(path)), self.dtype, n)
        data = pread_exact(handle, start, size, str(path))
        if hashlib.sha256(data).hexdigest() != sha:
            raise CorruptData(f"{path}: tokens {k} block checksum mismatch (changed since adoption?)")
        digest = Digest(self.dtype)
        digest.update(data)
        region = CheckedRegion(handle, start, size, digest.finish(), str(path))
        if digest.max_token >= self.vocab_size:
            tokens = np.frombuffer(data, dtype=self.dtype)
            i = int(np.flatnonzero(tokens >= self.vocab_size)[0])
            raise CorruptData(f"{path}: token id {int(tokens[i])} at byte {start + i * self.dtype.itemsize} "
                              f"is outside the vocabulary ({self.vocab_size} ids)")
        return CheckedTokens(region, self.dtype, n, recover=lambda failed: self._recover(k, failed))

    def _recover(self, k: int, failed: CheckedRegion) -> CheckedRegion:
        """A read of block ``k`` failed its check: the file is read in place, so there is nothing to rebuild
        from; hash it again (a file put back is accepted), else the fault stands, for readiness too."""
        self._verified.pop(k, None)
        self._handles.pop(self.blocks[k][0], None)
        try:
            return self.load(k).region
        except CorruptData as exc:
            self.faults[k] = str(exc)
            raise


def _cached_shards(origin: Origin, m: Manifest, record: dict) -> list[Shard]:
    """The shard-cache entries of a record read through ``origin``: one per MDS shard (extracted on
    arrival), or one per block of tokens stored in place (a byte range of its file)."""
    dtype = np.dtype(m.dtype).newbyteorder("<")
    if m.format == "mds":
        return [Shard(origin, p["file"], p["num_tokens"], dtype, p["sha256"], p["raw_sha256"],
                      _mds_expand(origin, p, m), m.vocab_size) for p in record["parts"]]
    ranges, block, shards = datatrove_ds.BlockOrigin(origin), record["block_tokens"], []
    for p in record["parts"]:
        for k, sha in enumerate(p["blocks"]):
            n, start = min(block, p["num_tokens"] - k * block), p["offset"] + k * block * dtype.itemsize
            key = ranges.add(p["file"], start, start + n * dtype.itemsize)
            shards.append(Shard(ranges, key, n, dtype, sha, sha, bytes, m.vocab_size))
    return shards


def _index_at(record: dict, origin: Origin, state: Path) -> tuple[Path, Fetch | None, str]:
    """Where the document index is read: the file under ``state``, or for a shipped index the shipped file,
    in place in a local corpus, or as a sparse local file whose blocks are fetched by ranged GETs."""
    if not record.get("shipped_index"):
        return state / OFFSETS, None, str(state / OFFSETS)
    name = f"{INDEX_SUBDIR}/{OFFSETS}"
    if isinstance(origin, LocalOrigin):
        return origin.path(name), None, origin.describe(name)
    entries = record["num_docs"] + 1
    header = npy_header(entries)
    if len(header) != record["doc_index_blocks"]["data_offset"]:  # written by another numpy: ask for its own
        header = origin.read_range(name, 0, record["doc_index_blocks"]["data_offset"])
    sparse_index_file(state / OFFSETS, header, entries)
    return state / OFFSETS, functools.partial(origin.read_range, name), origin.describe(name)


def _open_index(path: Path, fetch: Fetch | None, label: str, meta: SourceMeta, record: dict,
                mode: VerifyMode) -> np.ndarray | DocIndex:
    """Verified block by block on use; a record written before per-block hashes: hashed whole now."""
    try:
        blocks = (IndexBlocks.from_json(record["doc_index_blocks"], meta.num_docs + 1)
                  if "doc_index_blocks" in record else None)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptData(f"{label}: invalid doc_index_blocks in its adoption record ({exc})") from exc
    return open_index(path, meta, blocks, record["doc_offsets_sha256"], mode, fetch, label)


def _root(meta: SourceMeta, record: dict) -> str:
    """The Merkle root of an adoption record: every token block (or MDS shard) hash in stream order, then
    the index blocks."""
    leaves: list[Any] = []
    for p in record["parts"]:
        if "blocks" in p:
            leaves += [["block", p["file"], p["offset"], p["num_tokens"], k, sha]
                       for k, sha in enumerate(p["blocks"])]
        else:
            leaves.append(["shard", p["file"], p["num_tokens"], p["sha256"], p["raw_sha256"]])
    blocks = IndexBlocks.from_json(record["doc_index_blocks"], meta.num_docs + 1) \
        if "doc_index_blocks" in record else None
    header = meta.root_header() | {"block_tokens": record.get("block_tokens")}
    return merkle_root(header, leaves + index_leaves(blocks, record["doc_offsets_sha256"]))


class AdoptedSource(ShardedSource):
    """An adopted corpus served like a prepared source (same fingerprint for the same documents)."""

    record: dict  # the adoption record it was opened with
    _manifest_sha: str
    _cache: ShardCache
    _shards: list[Shard]  # what the shard cache holds for it (MDS, remote blocks); [] when read in place

    @classmethod
    def open(cls, directory: Path | str, cache: ShardCache, *,
             verify: bool | str | VerifyMode = DEFAULT_VERIFY, state: Path | None = None) -> AdoptedSource:
        """Open the corpus in ``directory``; its adoption record is kept in ``state`` (default: beside the
        shard cache, ``state_dir``)."""
        directory = Path(directory)
        state = Path(state) if state is not None else state_dir(directory, cache)
        mode = as_verify_mode(verify)
        m = Manifest.load(directory)
        try:
            record = adopt(directory, state)
        except (OSError, ValueError) as exc:
            raise CorruptData(f"{directory}: cannot adopt ({exc})") from exc
        dtype = np.dtype(m.dtype).newbyteorder("<")
        parts = record["parts"]
        faults: dict[int, str] = {}
        shards: list[Shard] = []
        if m.format == "mds":
            shards = _cached_shards(LocalOrigin(directory), m, record)
            sizes, load = [s.num_tokens for s in shards], (lambda k: cache.get(shards[k]))
        else:
            blocks = _InPlaceBlocks(directory, parts, dtype, record["block_tokens"], mode, m.vocab_size)
            sizes, load, faults = blocks.sizes, blocks.load, blocks.faults
        watched = {directory / p["file"]: FileStamp.of(directory / p["file"]) for p in parts}
        return cls._assemble(m, record, LocalOrigin(directory), directory, state, directory / MANIFEST, cache,
                             shards, sizes, load, faults, watched, mode)

    @classmethod
    def open_remote(cls, origin: Origin, state: Path, cache: ShardCache, *,
                    verify: bool | str | VerifyMode = DEFAULT_VERIFY) -> AdoptedSource:
        """Open a corpus of any format under an object-store prefix. Its record and a copy of its manifest
        are kept in ``state``; each block of tokens (each MDS shard) is one ranged GET (one GET) into the
        bounded shard cache, on first use, hashed on arrival and checked against the vocabulary."""
        state = Path(state)
        mode = as_verify_mode(verify)
        data = origin.read(MANIFEST)
        m = Manifest.parse(data, origin.describe(MANIFEST), origin.describe(""))
        record = adopt(origin, state)
        if record["manifest_sha256"] != hashlib.sha256(data).hexdigest():
            raise SourceUnavailable(f"{origin.describe(MANIFEST)}: changed while being adopted; open again")
        write_atomic(state / MANIFEST, data)  # watched like a local manifest
        shards = _cached_shards(origin, m, record)
        return cls._assemble(m, record, origin, state, state, state / MANIFEST, cache, shards,
                             [s.num_tokens for s in shards], lambda k: cache.get(shards[k]), {}, {}, mode)

    @classmethod
    def _assemble(cls, m: Manifest, record: dict, origin: Origin, path: Path, state: Path, manifest: Path,
                  cache: ShardCache, shards: list[Shard], sizes: list[int], load: Callable[[int], Any],
                  faults: dict[int, str], watched: dict[Path, FileStamp | None],
                  mode: VerifyMode) -> AdoptedSource:
        """The source over an adoption record: its metadata and Merkle root, the verified index, the
        token loader."""
        meta = SourceMeta(m.name, record["fingerprint"], m.tokenizer_fingerprint, m.vocab_size, m.eos_id,
                          m.dtype, record["num_docs"], record["num_tokens"], path)
        try:
            meta = dataclasses.replace(meta, root=_root(meta, record))
            index, fetch, label = _index_at(record, origin, state)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptData(f"{state / RECORD}: invalid adoption record ({exc})") from exc
        offsets = _open_index(index, fetch, label, meta, record, mode)
        shard_offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        index_files = (manifest, state / RECORD) + (() if fetch else (index,))  # a fetched one heals itself
        source = cls(meta, shard_offsets, load, offsets, index_files, watched, faults)
        source.record, source._manifest_sha = record, record["manifest_sha256"]
        source._cache, source._shards = cache, shards
        if mode == VerifyMode.FULL:
            for k in range(len(sizes)):
                source.tokens.shard(k)
        return source

    @property
    def shards(self) -> list[Shard]:
        """What the shard cache holds of it (MDS shards, blocks of a remote corpus): what ``--cache-limit``
        must leave room for. [] when its files are read in place."""
        return list(self._shards)

    def prefetch(self, shard_ids: Iterable[int]) -> list[Future]:
        """Load these cached shards in the background; blocks read in place have nothing to fetch."""
        return self._cache.prefetch(self._shards[int(k)] for k in shard_ids) if self._shards else []

    def _still_valid(self, path: Path) -> bool:
        """A manifest or record put back with the same content is accepted again (the index: its blocks)."""
        try:
            if path.name == MANIFEST:
                return hashlib.sha256(path.read_bytes()).hexdigest() == self._manifest_sha
            if path.name == RECORD:
                return json.loads(path.read_text()) == self.record
        except (OSError, ValueError):
            return False
        return super()._still_valid(path)
