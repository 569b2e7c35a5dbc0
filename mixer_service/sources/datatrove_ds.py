"""datatrove's tokenized output (``DocumentTokenizer`` / ``DocumentTokenizerMerger``), read where it lies.

Layout (datatrove ``pipeline/tokens/tokenizer.py``, ``TokenizedFile``): ``<name>.ds`` holds every document's
tokens back to back, little-endian uint16 (``token_size`` 2) or uint32 (4: vocabularies over 65,536 ids);
``<name>.ds.index`` holds each document's end, in tokens from the start of the file, as little-endian uint64.
``.ds.metadata`` and ``.ds.loss`` are not read: the index and the file size say the token size, and loss
masks are a trainer's business. EOS is in the tokens only when the tokenizer step had ``eos_token`` set,
and serving in place needs it. Shuffling (in the tokenizer or the merger) reorders whole documents, so the
files, in the manifest's order, are the corpus order.

Every read goes through an ``Origin``, so a local directory and an S3 prefix are adopted by the same code.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Executor

import numpy as np

from mixer_contract.errors import CorruptData, InvalidInput
from mixer_service.sources.origins import Origin
from mixer_service.sources.token_scan import scan_region
from mixer_service.sources.verify import FileStamp


def doc_ends(origin: Origin, name: str) -> np.ndarray:
    """The document ends (exclusive, in tokens) of ``name``'s ``.index``, checked to be increasing."""
    index = f"{name}.index"
    raw = origin.read(index)
    if len(raw) % 8 or not raw:
        raise CorruptData(f"{origin.describe(index)}: {len(raw)} bytes is not a non-empty list of uint64 "
                          "document ends")
    ends = np.frombuffer(raw, dtype="<u8")
    if ends[-1] >= 1 << 62:
        raise CorruptData(f"{origin.describe(index)}: document end {int(ends[-1])} is not a token position")
    ends = ends.astype(np.int64)
    bad = np.flatnonzero(np.diff(ends, prepend=0) <= 0)
    if bad.size:
        i = int(bad[0])
        raise CorruptData(f"{origin.describe(index)}: document ends are not increasing (document {i} ends at "
                          f"token {int(ends[i])}, after {int(ends[i - 1]) if i else 0})")
    return ends


def check_size(origin: Origin, name: str, num_tokens: int, dtype: np.dtype) -> int:
    """The size of token file ``name`` whose index counts ``num_tokens``; names the file when it is short
    (truncated), long, or holds tokens of another size than the manifest's ``dtype``."""
    size, expected = origin.size(name), num_tokens * dtype.itemsize
    if size == expected:
        return size
    index = origin.describe(f"{name}.index")
    for other in (2, 4):
        if other != dtype.itemsize and size == num_tokens * other:
            raise InvalidInput(f"{origin.describe(name)}: {size} bytes for the {num_tokens} tokens {index} "
                               f"counts, so its tokens are {other} bytes (datatrove token_size {other}); the "
                               f"manifest says {dtype.name}")
    if size < expected:
        raise CorruptData(f"{index}: the last document ends at token {num_tokens}, past the end of "
                          f"{origin.describe(name)} ({size} bytes: {size / dtype.itemsize:g} {dtype.name} "
                          "tokens); the token file is truncated or the index is not its own")
    raise CorruptData(f"{origin.describe(name)}: {size - expected} bytes after the last document {index} "
                      "ends")


def adopt_file(origin: Origin, name: str, dtype: np.dtype, eos_id: int, block_tokens: int,
               stream: hashlib._Hash, pool: Executor, in_flight: int) -> tuple[np.ndarray, dict]:
    """Check and hash one ``.ds`` file block by block (``token_scan``), feeding its tokens to ``stream``.

    Returns its document ends and its part of the adoption record (the layout Megatron and flat parts
    use: tokens in place from byte 0, one sha256 per ``block_tokens`` block)."""
    ends = doc_ends(origin, name)
    num_tokens = int(ends[-1])
    size = check_size(origin, name, num_tokens, dtype)
    scanned = scan_region(origin, name, 0, num_tokens, dtype, eos_id, ends, stream, block_tokens, pool,
                          in_flight)
    if not scanned.eos_ok:
        raise InvalidInput(f"{origin.describe(name)}: documents do not all end with eos_id {eos_id}; re-run "
                           "datatrove's DocumentTokenizer with eos_token set, or prepare the corpus instead")
    return ends, {"file": name, "offset": 0, "num_tokens": num_tokens, "size": size, "blocks": scanned.blocks}


class BlockOrigin:
    """An origin whose files are byte ranges of another origin's files: each verified block of a remote
    token file (``.ds``, Megatron ``.bin``, flat array) becomes one entry of the bounded shard cache,
    fetched with one ranged GET."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self._ranges: dict[str, tuple[str, int, int]] = {}

    def add(self, name: str, start: int, stop: int) -> str:
        key = f"{name}#{start}-{stop}"
        self._ranges[key] = (name, start, stop)
        return key

    def read(self, key: str) -> bytes:
        name, start, stop = self._ranges[key]
        data = self.origin.read_range(name, start, stop)
        if len(data) != stop - start:
            raise CorruptData(f"{self.describe(key)}: {len(data)} bytes, the file is truncated")
        return data

    def read_range(self, key: str, start: int, stop: int) -> bytes:
        name, first, _ = self._ranges[key]
        return self.origin.read_range(name, first + start, first + stop)

    def size(self, key: str) -> int:
        name, start, stop = self._ranges[key]
        return stop - start

    def describe(self, key: str) -> str:
        name, start, stop = self._ranges[key]
        return f"{self.origin.describe(name)} (bytes {start}-{stop})"

    def stamp(self, key: str) -> FileStamp | None:
        return None  # checked by hash on arrival, like every remote shard
