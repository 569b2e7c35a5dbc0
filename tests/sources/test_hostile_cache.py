"""Found by a hostile review of issue 18's hash-once ingest (the raw sha256 skipped when the zstd object
matched its own): a lying meta.json's shard changed bytes once another source was read, and ``--verify off``
handed the liar's bytes to an honest source; and, older, a shared entry's vocabulary check used the dtype
of whichever shard proved it first. These pin what a shard's bytes must be: the same every time it is read,
never another object's decompression under its key, and checked against its own vocabulary and dtype."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_cache_hash_once import compress, stored, tokens

from mixer_contract.errors import CorruptData
from mixer_service.sources import ShardCache


@pytest.mark.parametrize("memory", [1 << 30, 0])
def test_a_shard_serves_the_same_bytes_every_time_whatever_another_source_reads(
        tmp_path: Path, memory: int) -> None:
    """A meta.json whose raw sha256 does not match its object (the "liar") is refused; with hash-once it was
    served its object's decompression, and then, once another source whose shard has that raw sha256 was
    read, the other source's bytes: one step of one job answered with two different token sequences."""
    want = tokens(150_000)
    raw = want.tobytes()
    other = tokens(150_000, seed=9)
    lying = stored(tmp_path / "liar", "s.zst", compress(other.tobytes()), raw)
    honest = stored(tmp_path / "web", "s.zst", compress(raw, level=19), raw)
    cache = ShardCache(tmp_path / "cache", memory_bytes=memory)
    try:
        first = np.asarray(cache.get(lying)).copy()
    except CorruptData:  # what the cache did before issue 18: the liar refused, nothing of it cached
        np.testing.assert_array_equal(np.asarray(cache.get(honest)), want)
        cache.close()
        return
    np.testing.assert_array_equal(np.asarray(cache.get(honest)), want)
    again = np.asarray(cache.get(lying)).copy()
    cache.close()
    assert np.array_equal(first, again), (
        "the liar's shard changed bytes between two reads in one process: "
        f"first read == its own object: {np.array_equal(first, other)}, "
        f"second read == the other source's bytes: {np.array_equal(again, want)}")


def test_verify_off_never_hands_one_object_s_bytes_to_another_source(tmp_path: Path) -> None:
    """``--verify off`` trusts cached files of the right size, so a fetched shard's raw bytes must be hashed
    before they are named by the raw sha256: with hash-once, a lying object reached the cache and an honest
    source with the same raw sha256 was served the liar's bytes."""
    want = tokens(150_000)
    raw = want.tobytes()
    other = tokens(150_000, seed=9)
    lying = stored(tmp_path / "liar", "s.zst", compress(other.tobytes()), raw)
    honest = stored(tmp_path / "web", "s.zst", compress(raw, level=19), raw)
    cache = ShardCache(tmp_path / "cache", verify="off", memory_bytes=0)
    try:
        cache.get(lying)
    except CorruptData:  # before issue 18: refused, nothing of it cached
        pass
    served = np.asarray(cache.get(honest)).copy()
    cache.close()
    assert np.array_equal(served, want), "the honest source was served the liar's object's bytes"


@pytest.mark.parametrize("memory", [1 << 30, 0])
def test_the_vocabulary_check_of_a_shared_entry_uses_the_reading_shard_s_dtype(
        tmp_path: Path, memory: int) -> None:
    """The cache is keyed by raw sha256, and an entry kept the largest token id of the dtype of the shard
    that proved it: a ``<u4`` shard reading an entry a ``<u2`` shard proved was served ids far outside its
    vocabulary (older than issue 18)."""
    import hashlib

    from mixer_service.sources.cache import Shard
    from mixer_service.sources.origins import LocalOrigin

    raw = tokens(150_000).tobytes()
    obj = compress(raw)
    for d in ("u2", "u4"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "s.zst").write_bytes(obj)
    sha, raw_sha = hashlib.sha256(obj).hexdigest(), hashlib.sha256(raw).hexdigest()
    u2 = Shard(LocalOrigin(tmp_path / "u2"), "s.zst", 150_000, np.dtype("<u2"), sha, raw_sha,
               vocab_size=50257)
    u4 = Shard(LocalOrigin(tmp_path / "u4"), "s.zst", 75_000, np.dtype("<u4"), sha, raw_sha,
               vocab_size=50257)
    alone = ShardCache(tmp_path / "alone", memory_bytes=memory)
    with pytest.raises(CorruptData, match="outside the vocabulary"):
        alone.get(u4)
    alone.close()
    cache = ShardCache(tmp_path / "cache", memory_bytes=memory)
    cache.get(u2)
    try:
        with pytest.raises(CorruptData, match="outside the vocabulary"):
            served = np.asarray(cache.get(u4))
            print("served max token id", int(served.max()))
    finally:
        cache.close()
