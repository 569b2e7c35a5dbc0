"""One pass over tokens stored contiguously in place (Megatron ``.bin``, flat arrays, datatrove ``.ds``),
read through an ``Origin``: what adopting a corpus costs once, before its record exists.

The content fingerprint is the sha256 of the whole token stream, so the blocks are read in order and fed to
one hash; each block's own sha256 and its EOS checks (or, for a flat array, finding its EOS positions) run
on a thread pool meanwhile, from the very bytes the stream hash saw (hashlib and numpy release the GIL on
large buffers, and a block is handed over without a copy). A bounded number of blocks is in flight, so
memory stays bounded by the block size, not the corpus.
"""

from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import numpy as np

from mixer_contract.errors import CorruptData
from mixer_service.sources.origins import Origin


@dataclass(frozen=True)
class Scanned:
    """What the pass found in one file's token region."""

    doc_ends: np.ndarray  # exclusive token ends of the documents, relative to the region
    blocks: list[str]  # sha256 of each block of ``block_tokens`` tokens
    eos_ok: bool  # every document's last token is EOS


def scan_region(origin: Origin, name: str, offset: int, num_tokens: int, dtype: np.dtype, eos_id: int,
                doc_ends: np.ndarray | None, stream: hashlib._Hash, block_tokens: int,
                pool: Executor, in_flight: int) -> Scanned:
    """Read ``num_tokens`` tokens at byte ``offset`` of ``name`` once, feeding ``stream``; hash each block and
    check that every document in ``doc_ends`` ends with ``eos_id`` (``doc_ends`` None: the documents are
    delimited by EOS, found here). At most ``in_flight`` blocks wait for ``pool`` at a time."""
    item = dtype.itemsize
    pending: deque[Future] = deque()
    results = []
    for a in range(0, num_tokens, block_tokens):
        n = min(block_tokens, num_tokens - a)
        data = origin.read_range(name, offset + a * item, offset + (a + n) * item)
        if len(data) != n * item:
            raise CorruptData(f"{origin.describe(name)}: ends before byte {offset + (a + n) * item} "
                              "(truncated while being read?)")
        stream.update(data)
        pending.append(pool.submit(_block, data, a, dtype, eos_id, doc_ends))
        while len(pending) >= max(1, in_flight):
            results.append(pending.popleft().result())
    results += [f.result() for f in pending]
    found = [r[2] for r in results] if doc_ends is None else []
    ends = (np.concatenate(found) if found else np.zeros(0, np.int64)) if doc_ends is None else doc_ends
    return Scanned(ends.astype(np.int64), [r[0] for r in results], all(r[1] for r in results))


def _block(data: bytes, first: int, dtype: np.dtype, eos_id: int,
           doc_ends: np.ndarray | None) -> tuple[str, bool, np.ndarray | None]:
    """(sha256, EOS check, EOS-delimited ends or None) of the block of tokens starting at token ``first``."""
    tokens = np.frombuffer(data, dtype=dtype)
    sha = hashlib.sha256(data).hexdigest()
    if doc_ends is None:
        return sha, True, np.flatnonzero(tokens == eos_id) + first + 1
    lo, hi = np.searchsorted(doc_ends, [first + 1, first + tokens.size + 1])
    return sha, bool(np.all(tokens[doc_ends[lo:hi] - 1 - first] == eos_id)), None
