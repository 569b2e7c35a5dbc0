"""The on-disk layout of a prepared source and its ``meta.json``: one place for names, versions and checks.

Layout of a prepared source directory::

    meta.json          written last; its presence marks the directory complete
    doc_offsets.npy    int64[num_docs + 1], offsets into the token stream; doc i = [o[i], o[i+1]) incl. EOS;
                       hashed whole (the fingerprint) and in blocks (``doc_index_blocks``: verified lazily)
    tokens-00000.zst   zstd-compressed little-endian token ids (uint16 or uint32), split at shard_tokens
    .cache/shards/     decompressed, verified shards, made on first use (not part of the source; see
                       mixer_service.sources.cache)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixer_contract.errors import CorruptData

FORMAT_NAME = "mixer-prepared-source"
FORMAT_VERSION = 1
META_FILE = "meta.json"
OFFSETS_FILE = "doc_offsets.npy"
DTYPES = ("uint16", "uint32")
INDEX_BLOCK_ENTRIES = 1 << 20  # 8 MiB of index a block: one sha256 costs ~5 ms, one ranged GET fetches it


def shard_file_name(index: int) -> str:
    """Name of the ``index``-th token shard."""
    return f"tokens-{index:05d}.zst"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32: half the disk and cache for most vocabs."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def content_fingerprint(
    tokenizer_fingerprint: str, dtype: str, tokens_sha256: str, offsets_sha256: str
) -> str:
    """Identity of the prepared content: independent of name, paths, time and shard size.

    Hashes the whole token stream (not per-shard hashes) so re-sharding the same content keeps the id.
    """
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "dtype": dtype,
        "tokens_sha256": tokens_sha256,
        "doc_offsets_sha256": offsets_sha256,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def merkle_root(header: dict[str, Any], leaves: Iterable[Any]) -> str:
    """sha256 over a canonical header and the ordered hashes of ``leaves`` (each canonical JSON).

    The fingerprint hashes the whole stream and index, which a reader never re-hashes; the root hashes
    the per-shard and per-block hashes every byte is actually checked against, in order, so an edit of
    ``meta.json`` that keeps the fingerprint (swapped shard entries, an index block and its hash
    rewritten together) still changes it, and a job pinning it refuses the source.
    """
    out = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for leaf in leaves:
        out.update(hashlib.sha256(json.dumps(leaf, sort_keys=True).encode()).digest())
    return out.hexdigest()


def index_leaves(blocks: IndexBlocks | None, whole_sha256: str) -> list[Any]:
    """The document index as root leaves: each block's first entry and hash, or the whole-file hash."""
    if blocks is None:
        return [["doc_offsets", whole_sha256]]
    return [["doc_index", blocks.entries, blocks.data_offset]] + [
        ["block", first, sha] for first, sha in zip(blocks.firsts, blocks.sha256, strict=True)]


@dataclass(frozen=True)
class ShardInfo:
    """One compressed token shard and the hashes that let a reader detect corruption."""

    file: str
    num_tokens: int
    sha256: str
    raw_sha256: str


@dataclass(frozen=True)
class IndexBlocks:
    """Per-block hashes of a document index, so a reader verifies (or fetches) only the blocks it uses.

    Block ``b`` holds entries ``[b * entries, (b + 1) * entries)``; its hash covers those entries *and* the
    next block's first one, so a verified block alone proves that every value it brackets lies inside it
    (a binary search needs no other block). ``firsts[b]`` (entry ``b * entries``) routes a search to its
    block without reading the index; a block is only used after its data is checked to agree with them.
    ``data_offset`` is where entry 0 starts in the ``.npy`` file (for ranged reads).
    """

    entries: int
    data_offset: int
    firsts: tuple[int, ...]
    sha256: tuple[str, ...]

    def span(self, block: int, num_entries: int) -> tuple[int, int]:
        """Entries ``[a, b)`` the hash of ``block`` covers (one past the block, except for the last)."""
        a = block * self.entries
        return a, min(a + self.entries + 1, num_entries)

    def to_json(self) -> dict[str, Any]:
        return {"entries": self.entries, "data_offset": self.data_offset, "firsts": list(self.firsts),
                "sha256": list(self.sha256)}

    @classmethod
    def from_json(cls, obj: dict[str, Any], num_entries: int) -> IndexBlocks:
        """Parse and check the shape: one first offset and one hash per block, firsts increasing from 0."""
        blocks = cls(int(obj["entries"]), int(obj["data_offset"]), tuple(int(f) for f in obj["firsts"]),
                     tuple(str(h) for h in obj["sha256"]))
        count = -(-num_entries // blocks.entries) if blocks.entries > 0 else -1
        firsts = np.asarray(blocks.firsts, dtype=np.int64)
        if (blocks.data_offset < 0 or len(blocks.firsts) != count or len(blocks.sha256) != count
                or firsts[0] != 0 or np.any(np.diff(firsts) <= 0)):
            raise ValueError("doc_index_blocks does not describe the document index")
        return blocks

    @classmethod
    def of_file(cls, path: Path, entries: int = INDEX_BLOCK_ENTRIES) -> IndexBlocks:
        """Hash the index in ``path`` block by block: O(index), once, when the index is written."""
        offsets = np.load(path, mmap_mode="r")
        firsts, hashes = [], []
        for a in range(0, len(offsets), entries):
            firsts.append(int(offsets[a]))
            block = np.ascontiguousarray(offsets[a:a + entries + 1])
            hashes.append(hashlib.sha256(block.data).hexdigest())
        return cls(entries, int(offsets.offset), tuple(firsts), tuple(hashes))


@dataclass(frozen=True)
class SourceMeta:
    """What the rest of the service needs to know about a prepared source."""

    name: str
    fingerprint: str
    tokenizer_fingerprint: str
    vocab_size: int
    eos_id: int
    dtype: str
    num_docs: int
    num_tokens: int
    path: Path
    root: str | None = None  # Merkle root of the hashes the source is read against (set when opened)

    def root_header(self) -> dict[str, Any]:
        """What the root commits to besides the leaves: every field that decides the bytes served."""
        return {"format": FORMAT_NAME, "fingerprint": self.fingerprint,
                "tokenizer_fingerprint": self.tokenizer_fingerprint, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "dtype": self.dtype, "num_docs": self.num_docs,
                "num_tokens": self.num_tokens}


@dataclass(frozen=True)
class MetaFile:
    """The full parsed ``meta.json``: the public ``SourceMeta`` plus integrity data."""

    source: SourceMeta
    shards: tuple[ShardInfo, ...]
    tokens_sha256: str
    doc_offsets_sha256: str
    skipped_empty_docs: int
    doc_index: IndexBlocks | None = None  # sources prepared before per-block hashes: verified whole at open

    def root(self) -> str:
        """The Merkle root of this ``meta.json``: shards in file order, then the index blocks."""
        shards = [["shard", sh.file, sh.num_tokens, sh.sha256, sh.raw_sha256] for sh in self.shards]
        return merkle_root(self.source.root_header(),
                           shards + index_leaves(self.doc_index, self.doc_offsets_sha256))

    def to_json(self) -> str:
        """Deterministic serialization (sorted keys, no time or absolute paths)."""
        s = self.source
        obj = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "name": s.name,
            "fingerprint": s.fingerprint,
            "tokenizer_fingerprint": s.tokenizer_fingerprint,
            "vocab_size": s.vocab_size,
            "eos_id": s.eos_id,
            "dtype": s.dtype,
            "num_docs": s.num_docs,
            "num_tokens": s.num_tokens,
            "compression": "zstd",
            "tokens_sha256": self.tokens_sha256,
            "doc_offsets_file": OFFSETS_FILE,
            "doc_offsets_sha256": self.doc_offsets_sha256,
            "skipped_empty_docs": self.skipped_empty_docs,
            "shards": [vars(sh) for sh in self.shards],
        }
        if self.doc_index is not None:
            obj["doc_index_blocks"] = self.doc_index.to_json()
        return json.dumps(obj, indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, directory: Path) -> MetaFile:
        """Parse and sanity-check ``meta.json``; anything missing or inconsistent is ``CorruptData``."""
        path = directory / META_FILE
        if not path.is_file():
            raise CorruptData(f"{directory}: not a complete prepared source ({META_FILE} missing)")
        try:
            obj: dict[str, Any] = json.loads(path.read_text())
            if obj.get("format") != FORMAT_NAME or obj.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"unsupported format {obj.get('format')!r} v{obj.get('format_version')!r}")
            if obj["dtype"] not in DTYPES:
                raise ValueError(f"unknown dtype {obj['dtype']!r}")
            shards = tuple(
                ShardInfo(str(sh["file"]), int(sh["num_tokens"]), str(sh["sha256"]), str(sh["raw_sha256"]))
                for sh in obj["shards"]
            )
            meta = cls(
                source=SourceMeta(
                    name=str(obj["name"]),
                    fingerprint=str(obj["fingerprint"]),
                    tokenizer_fingerprint=str(obj["tokenizer_fingerprint"]),
                    vocab_size=int(obj["vocab_size"]),
                    eos_id=int(obj["eos_id"]),
                    dtype=str(obj["dtype"]),
                    num_docs=int(obj["num_docs"]),
                    num_tokens=int(obj["num_tokens"]),
                    path=directory,
                ),
                shards=shards,
                tokens_sha256=str(obj["tokens_sha256"]),
                doc_offsets_sha256=str(obj["doc_offsets_sha256"]),
                skipped_empty_docs=int(obj.get("skipped_empty_docs", 0)),
                doc_index=(IndexBlocks.from_json(obj["doc_index_blocks"], int(obj["num_docs"]) + 1)
                           if "doc_index_blocks" in obj else None),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptData(f"{path}: invalid meta.json ({exc})") from exc
        if sum(sh.num_tokens for sh in shards) != meta.source.num_tokens:
            raise CorruptData(f"{path}: shard token counts do not add up to num_tokens")
        return dataclasses.replace(meta, source=dataclasses.replace(meta.source, root=meta.root()))
