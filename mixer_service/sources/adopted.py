"""Tokenized corpora adopted in place: Megatron-LM indexed datasets, flat token arrays, MDS token columns.

A directory holding ``mixer-source.json`` (the manifest the user writes) registers a corpus another
pipeline already tokenized::

    {"format": "megatron" | "flat" | "mds", "name": "web", "files": ["data_text_document"],
     "tokenizer_fingerprint": "...", "vocab_size": 50257, "dtype": "uint16", "eos_id": 50256}

``files`` are relative to the directory: Megatron prefixes (``.bin`` + ``.idx``), flat ``.npy`` or raw
``.bin`` files of ``dtype`` in which every document ends with ``eos_id`` (the OLMo/Dolma layout), or MDS
directories (with ``index.json``) whose ``column`` (default ``tokens``) holds each document's tokens; an
MDS document gets ``eos_id`` appended unless ``"append_eos": false``.

The first open computes, once, what a prepared source's ``meta.json`` records: the document index
(``.mixer-doc_offsets.npy``, int64, 8 bytes a document), the hash of every block of tokens and the content
fingerprint, stored in ``.mixer-adopted.json``. The canonical stream (documents, each followed by EOS) is
the same as ``prepare`` would write for the same documents, so the fingerprint is too. Megatron and flat
tokens are memory-mapped where they are, in blocks hashed before their first use; an MDS shard interleaves
sample headers with tokens, so its tokens are extracted into the shard cache on first use and verified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from mixer_service.errors import CorruptData, InvalidInput
from mixer_service.prepare.meta import DTYPES, IndexBlocks, SourceMeta, content_fingerprint
from mixer_service.sources.cache import Shard, ShardCache
from mixer_service.sources.doc_index import DocIndex
from mixer_service.sources.origins import LocalOrigin
from mixer_service.sources.prepared import ShardedSource, _write_atomic, as_verify_mode, open_index
from mixer_service.sources.verify import DEFAULT_VERIFY, FileStamp, VerifyMode

log = logging.getLogger(__name__)

MANIFEST = "mixer-source.json"
RECORD = ".mixer-adopted.json"
OFFSETS = ".mixer-doc_offsets.npy"
RECORD_FORMAT, RECORD_VERSION = "mixer-adopted-source", 1
FORMATS = ("megatron", "flat", "mds")
BLOCK_TOKENS = 1 << 24  # 32 MiB of uint16 per verified block: one hash costs ~20 ms
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
            obj: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
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
    doc_ends: np.ndarray  # exclusive token ends of this region's documents, relative to the region


def _megatron_region(directory: Path, prefix: str, m: Manifest) -> _Region:
    """A Megatron-LM MMIDIDX ``prefix.idx`` + ``prefix.bin`` pair (layout of Megatron-LM's
    megatron/core/datasets/indexed_dataset.py: header, int32 lengths, int64 pointers, int64 doc index)."""
    idx_path, bin_path = directory / f"{prefix}.idx", directory / f"{prefix}.bin"
    try:
        raw = np.memmap(idx_path, dtype=np.uint8, mode="r")
        header = bytes(raw[:34])
        magic, (version,), (code,), (seqs, docs) = (header[:9], struct.unpack("<Q", header[9:17]),
                                                    struct.unpack("<B", header[17:18]),
                                                    struct.unpack("<QQ", header[18:34]))
        if magic != _MEGATRON_MAGIC or version != 1:
            raise ValueError(f"not an MMIDIDX v1 index (magic {magic!r}, version {version})")
        lengths = np.frombuffer(raw, dtype="<i4", count=seqs, offset=34)
        pointers = np.frombuffer(raw, dtype="<i8", count=seqs, offset=34 + 4 * seqs)
        doc_index = np.frombuffer(raw, dtype="<i8", count=docs, offset=34 + 12 * seqs)
    except (OSError, ValueError, struct.error) as exc:
        raise CorruptData(f"{idx_path}: unreadable Megatron index ({exc})") from exc
    stored = _MEGATRON_DTYPES.get(code, f"code {code}")
    # int32 ids are the uint32 bytes for any id < 2**31, so Megatron's int32 files adopt as uint32.
    if {"int32": "uint32"}.get(stored, stored) != m.dtype:
        raise InvalidInput(f"{idx_path}: tokens are {stored}, the manifest says {m.dtype}")
    itemsize = np.dtype(m.dtype).itemsize
    ends = np.cumsum(lengths, dtype=np.int64)
    if seqs and not np.array_equal(pointers, (ends - lengths) * itemsize):
        raise InvalidInput(f"{idx_path}: sequences are not stored back to back; re-save it with Megatron's "
                           "builder or prepare the corpus instead")
    if docs < 1 or doc_index[0] != 0 or doc_index[-1] != seqs or np.any(np.diff(doc_index) <= 0):
        raise CorruptData(f"{idx_path}: document index does not cover the {seqs} sequences in order")
    total = int(ends[-1]) if seqs else 0
    if bin_path.stat().st_size != total * itemsize:
        raise CorruptData(f"{bin_path}: {bin_path.stat().st_size} bytes, the index says {total * itemsize}")
    return _Region(f"{prefix}.bin", 0, total, ends[doc_index[1:] - 1])


def _flat_region(directory: Path, name: str, m: Manifest) -> _Region:
    """A flat ``.npy`` or raw ``.bin`` token array in which each document ends with EOS (OLMo/Dolma)."""
    path = directory / name
    dtype = np.dtype(m.dtype).newbyteorder("<")
    try:
        if name.endswith(".npy"):
            array = np.load(path, mmap_mode="r")
            if array.dtype != dtype or array.ndim != 1:
                raise InvalidInput(f"{path}: a 1-D {m.dtype} array is needed, got {array.dtype} "
                                   f"{array.shape}")
            offset = int(array.offset)
        else:
            array, offset = np.memmap(path, dtype=dtype, mode="r"), 0
    except (OSError, ValueError) as exc:
        raise CorruptData(f"{path}: unreadable token array ({exc})") from exc
    ends = [np.flatnonzero(np.asarray(array[a : a + BLOCK_TOKENS]) == m.eos_id) + a + 1
            for a in range(0, array.size, BLOCK_TOKENS)]
    doc_ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    if array.size == 0 or array[-1] != m.eos_id:
        raise InvalidInput(f"{path}: the last document does not end with eos_id {m.eos_id}; every document "
                           "must, so the array can be served in place")
    return _Region(name, offset, int(array.size), doc_ends.astype(np.int64))


def _mds_shards(directory: Path, sub: str, m: Manifest) -> list[dict]:
    """The shards of an MDS dataset (mosaicml-streaming ``index.json``) and how to read the token column."""
    index_path = directory / sub / "index.json"
    try:
        index = json.loads(index_path.read_text())
        shards = []
        for info in index["shards"]:
            if info.get("format") != "mds":
                raise ValueError(f"shard format {info.get('format')!r} is not mds")
            column = info["column_names"].index(m.column)
            stored = info["zip_data"] if info.get("compression") else info["raw_data"]
            shards.append({"file": f"{sub}/{stored['basename']}", "compression": info.get("compression"),
                           "column": column, "encodings": info["column_encodings"],
                           "sizes": info["column_sizes"], "samples": int(info["samples"])})
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInput(f"{index_path}: not an MDS index with a {m.column!r} column ({exc})") from exc
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


def _mds_expand(directory: Path, spec: dict, m: Manifest) -> Callable[[bytes], bytes]:
    """Stored shard bytes -> its canonical token stream (each document followed by EOS)."""
    eos = np.array([m.eos_id], dtype=np.dtype(m.dtype).newbyteorder("<"))

    def expand(data: bytes) -> bytes:
        try:
            docs = list(_mds_documents(data, spec, m))
        except (ValueError, IndexError, zstandard.ZstdError) as exc:
            raise CorruptData(f"{directory / spec['file']}: unreadable MDS shard ({exc})") from exc
        parts = [p for d in docs for p in ((d, eos) if m.append_eos else (d,))]
        return np.concatenate(parts).tobytes() if parts else b""
    return expand


# -- adoption: computed once, stored beside the manifest --------------------------------------------


def adopt(directory: Path, *, force: bool = False) -> dict:
    """Compute (or load) the adoption record of ``directory``: document index, block hashes, fingerprint.

    O(corpus) once; later opens read the stored record while the manifest is unchanged.
    """
    directory = Path(directory)
    manifest_sha = hashlib.sha256((directory / MANIFEST).read_bytes()).hexdigest()
    record_path = directory / RECORD
    if not force and record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
            if record.get("manifest_sha256") == manifest_sha and record.get("version") == RECORD_VERSION:
                return record
        except ValueError:
            pass  # unreadable: recompute
    m = Manifest.load(directory)
    started = time.perf_counter()
    log.info("adopting %s (%s) once: hashing every token", directory, m.format,
             extra={"event": "adopt.start", "source": m.name, "format": m.format})
    stream, offsets_hash = hashlib.sha256(), hashlib.sha256()
    ends: list[np.ndarray] = []
    base = 0
    parts: list[dict] = []
    dtype = np.dtype(m.dtype).newbyteorder("<")
    if m.format == "mds":
        for sub in m.files:
            for spec in _mds_shards(directory, sub, m):
                data = (directory / spec["file"]).read_bytes()
                raw = _mds_expand(directory, spec, m)(data)
                tokens = np.frombuffer(raw, dtype=dtype)
                if m.append_eos:
                    doc_ends = np.cumsum([d.size + 1 for d in _mds_documents(data, spec, m)], dtype=np.int64)
                else:
                    doc_ends = np.flatnonzero(tokens == m.eos_id) + 1
                stream.update(raw)
                ends.append(doc_ends + base)
                base += tokens.size
                parts.append(spec | {"sha256": hashlib.sha256(data).hexdigest(), "num_tokens": tokens.size,
                                     "raw_sha256": hashlib.sha256(raw).hexdigest()})
    else:
        for name in m.files:
            region = (_megatron_region if m.format == "megatron" else _flat_region)(directory, name, m)
            array = np.memmap(directory / region.file, dtype=dtype, mode="r", offset=region.offset,
                              shape=(region.num_tokens,))
            blocks = []
            for a in range(0, region.num_tokens, BLOCK_TOKENS):
                chunk = np.ascontiguousarray(array[a : a + BLOCK_TOKENS])
                stream.update(chunk.data)
                blocks.append(_sha256(chunk))
            if np.any(np.asarray(array[region.doc_ends - 1]) != m.eos_id):
                raise InvalidInput(f"{directory / region.file}: documents do not all end with eos_id "
                                   f"{m.eos_id}; re-run the tokenizer with EOS appended (Megatron: "
                                   "--append-eod) or prepare the corpus instead")
            if region.doc_ends.size == 0 or region.doc_ends[-1] != region.num_tokens:
                raise InvalidInput(f"{directory / region.file}: tokens after the last document's EOS")
            ends.append(region.doc_ends + base)
            base += region.num_tokens
            parts.append({"file": region.file, "offset": region.offset, "num_tokens": region.num_tokens,
                          "size": (directory / region.file).stat().st_size, "blocks": blocks})
    doc_offsets = np.concatenate([np.zeros(1, np.int64), *ends]).astype("<i8")
    if doc_offsets.size < 2 or np.any(np.diff(doc_offsets) < 2):
        raise InvalidInput(f"{directory}: empty documents (a lone EOS) cannot be served; drop them first")
    offsets_hash.update(doc_offsets.tobytes())
    buffer = _npy_bytes(doc_offsets)
    _write_atomic(directory / OFFSETS, buffer)
    record = {
        "format": RECORD_FORMAT, "version": RECORD_VERSION, "manifest_sha256": manifest_sha,
        "fingerprint": content_fingerprint(m.tokenizer_fingerprint, m.dtype, stream.hexdigest(),
                                           offsets_hash.hexdigest()),
        "tokens_sha256": stream.hexdigest(), "doc_offsets_sha256": offsets_hash.hexdigest(),
        "num_docs": int(doc_offsets.size - 1), "num_tokens": int(base), "block_tokens": BLOCK_TOKENS,
        "parts": parts, "doc_index_blocks": IndexBlocks.of_file(directory / OFFSETS).to_json(),
    }
    _write_atomic(record_path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    log.info("adopted %s: %d docs, %d tokens in %.1fs", directory, record["num_docs"], base,
             time.perf_counter() - started, extra={"event": "adopt.done", "source": m.name,
                                                    "fingerprint": record["fingerprint"]})
    return record


def _sha256(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens).data).hexdigest()


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


# -- serving ---------------------------------------------------------------------------------------


class _InPlaceBlocks:
    """Blocks of token files read where they are; each block hashed before its first use, and again after
    its file changes."""

    def __init__(self, directory: Path, parts: list[dict], dtype: np.dtype, block: int, mode: VerifyMode):
        self.mode = mode
        self.blocks: list[tuple[Path, np.ndarray, str]] = []
        for part in parts:
            path = directory / part["file"]
            try:
                array = np.asarray(np.memmap(path, dtype=dtype, mode="r", offset=part["offset"],
                                             shape=(part["num_tokens"],)))
            except (OSError, ValueError) as exc:
                raise CorruptData(f"{path}: cannot map the adopted tokens ({exc})") from exc
            for k, sha in enumerate(part["blocks"]):
                self.blocks.append((path, array[k * block : (k + 1) * block], sha))
        self._verified: dict[int, FileStamp | None] = {}

    @property
    def sizes(self) -> list[int]:
        return [b[1].size for b in self.blocks]

    def load(self, k: int) -> np.ndarray:
        path, array, sha = self.blocks[k]
        stamp = FileStamp.of(path)
        if self.mode != VerifyMode.OFF and self._verified.get(k, "unseen") != stamp:
            if stamp is None or _sha256(array) != sha:
                raise CorruptData(f"{path}: tokens {k} block checksum mismatch (changed since adoption?)")
            self._verified[k] = stamp
        return array


def _open_index(path: Path, meta: SourceMeta, record: dict, mode: VerifyMode) -> np.ndarray | DocIndex:
    """Verified block by block on use; a record written before per-block hashes: hashed whole now."""
    try:
        blocks = (IndexBlocks.from_json(record["doc_index_blocks"], meta.num_docs + 1)
                  if "doc_index_blocks" in record else None)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptData(f"{path.parent / RECORD}: invalid doc_index_blocks ({exc})") from exc
    return open_index(path, meta, blocks, record["doc_offsets_sha256"], mode)


class AdoptedSource(ShardedSource):
    """An adopted corpus served like a prepared source (same fingerprint for the same documents)."""

    @classmethod
    def open(cls, directory: Path | str, cache: ShardCache, *,
             verify: bool | str | VerifyMode = DEFAULT_VERIFY) -> AdoptedSource:
        directory = Path(directory)
        mode = as_verify_mode(verify)
        m = Manifest.load(directory)
        try:
            record = adopt(directory)
        except (OSError, ValueError) as exc:
            raise CorruptData(f"{directory}: cannot adopt ({exc})") from exc
        meta = SourceMeta(m.name, record["fingerprint"], m.tokenizer_fingerprint, m.vocab_size, m.eos_id,
                          m.dtype, record["num_docs"], record["num_tokens"], directory)
        offsets = _open_index(directory / OFFSETS, meta, record, mode)
        dtype = np.dtype(m.dtype).newbyteorder("<")
        parts = record["parts"]
        if m.format == "mds":
            origin = LocalOrigin(directory)
            shards = [Shard(origin, p["file"], p["num_tokens"], dtype, p["sha256"], p["raw_sha256"],
                            _mds_expand(directory, p, m)) for p in parts]
            sizes, load = [s.num_tokens for s in shards], (lambda k: cache.get(shards[k]))
        else:
            blocks = _InPlaceBlocks(directory, parts, dtype, record["block_tokens"], mode)
            sizes, load = blocks.sizes, blocks.load
        watched = {directory / p["file"]: FileStamp.of(directory / p["file"]) for p in parts}
        shard_offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        source = cls(meta, shard_offsets, load, offsets,
                     (directory / MANIFEST, directory / RECORD, directory / OFFSETS), watched)
        if mode == VerifyMode.FULL:
            for k in range(len(sizes)):
                source.tokens.shard(k)
        return source
