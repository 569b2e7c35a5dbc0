"""A shard's arrival (issue 18): the object's sha256 checked before it is decoded, the decoded bytes
hashed against the raw sha256 (the cache key: skipping it let a lying meta.json swap bytes between sources,
``test_hostile_cache.py``), a cached raw file hashed whole, the block sums and largest token taken in one
pass over the one decoded buffer. Real files and zstd streams written like ``mixer prepare`` writes them,
no mocks."""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import pytest
import xxhash
import zstandard

from mixer_contract.errors import CorruptData
from mixer_service.sources import ShardCache
from mixer_service.sources.cache import Shard
from mixer_service.sources.checked import CHECK_BLOCK, CheckedTokens, Digest, block_sums
from mixer_service.sources.origins import LocalOrigin

DTYPE = np.dtype("<u2")
VOCAB = 50257


def compress(raw: bytes, level: int = 3) -> bytes:
    """As ``mixer prepare`` writes a shard: one zstd stream, level 3, multithreaded writer."""
    out = io.BytesIO()
    with zstandard.ZstdCompressor(level=level, threads=-1).stream_writer(out, closefd=False) as writer:
        writer.write(raw)
    return out.getvalue()


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n, dtype=np.uint64).astype(DTYPE)


def stored(directory: Path, name: str, obj: bytes, raw: bytes) -> Shard:
    """A shard whose object ``obj`` is written under ``directory``, its meta.json naming the sha256 of
    ``obj`` and of ``raw`` (as prepare computes them when ``obj`` is ``raw`` compressed)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(obj)
    return Shard(LocalOrigin(directory), name, len(raw) // DTYPE.itemsize, DTYPE,
                 hashlib.sha256(obj).hexdigest(), hashlib.sha256(raw).hexdigest(),
                 vocab_size=VOCAB)


def reference_sums(data: bytes) -> np.ndarray:
    """The block sums as the per-read checks compute them: xxh3 of each 4 KiB block, one call a block."""
    return np.array([xxhash.xxh3_64_intdigest(data[i:i + CHECK_BLOCK])
                     for i in range(0, len(data), CHECK_BLOCK)], dtype=np.uint64)


def test_a_flipped_byte_in_the_compressed_object_is_refused_before_decompression(tmp_path: Path) -> None:
    raw = tokens(300_001).tobytes()
    good = compress(raw)
    shard = stored(tmp_path / "src", "s.zst", good, raw)
    bad = bytearray(good)
    bad[0] ^= 0x01  # the zstd magic number: a decoder would fail with its own message
    with pytest.raises(zstandard.ZstdError, match="Unknown frame descriptor"):
        zstandard.ZstdDecompressor().decompressobj().decompress(bytes(bad))
    middle = bytearray(good)
    middle[len(good) // 2] ^= 0x01  # inside the compressed data
    for at, obj in enumerate((bad, middle)):
        (tmp_path / "src" / "s.zst").write_bytes(bytes(obj))
        for memory in (1 << 30, 0):
            cache = ShardCache(tmp_path / f"cache-{at}-{memory}", memory_bytes=memory)
            with pytest.raises(CorruptData, match=r"s\.zst: shard checksum mismatch"):
                cache.get(shard)
            assert cache.stats.fetches == 1 and not cache.is_resident(shard)
            assert list(cache.directory.iterdir()) == []  # nothing named, no partial file
            cache.close()


def test_a_flipped_byte_in_a_cached_raw_file_is_refused_by_its_hash(tmp_path: Path, caplog) -> None:
    want = tokens(200_003)
    raw = want.tobytes()
    shard = stored(tmp_path / "src", "s.zst", compress(raw), raw)
    first = ShardCache(tmp_path / "cache")
    np.testing.assert_array_equal(np.asarray(first.get(shard)), want)
    first.close()
    entry = tmp_path / "cache" / f"{shard.raw_sha256}.bin"
    data = bytearray(entry.read_bytes())
    data[len(data) - 1] ^= 0x01  # the last byte: past the last whole check block
    entry.write_bytes(bytes(data))

    again = ShardCache(tmp_path / "cache")  # a new process: the file is hashed before any use
    with caplog.at_level(logging.WARNING, logger="mixer_service.sources.cache"):
        np.testing.assert_array_equal(np.asarray(again.get(shard)), want)
    assert again.stats.verified == 1 and again.stats.fetches == 1  # refused, rebuilt from the object
    assert any(getattr(r, "event", "") == "cache.mismatch" for r in caplog.records)
    again.close()

    entry.write_bytes(bytes(data))  # rotten again, and the object gone: refused, never served
    (tmp_path / "src" / "s.zst").unlink()
    for memory in (1 << 30, 0):
        gone = ShardCache(tmp_path / "cache", memory_bytes=memory)
        with pytest.raises(CorruptData, match="s.zst"):
            gone.get(shard)
        assert gone.stats.verified == 1
        gone.close()
        entry.write_bytes(bytes(data))


@pytest.mark.parametrize("length", [1, 4095, 4097, 3 * CHECK_BLOCK + 1001, (1 << 20) + 2 * CHECK_BLOCK + 77,
                                    (5 << 20) + 12345])
def test_block_sums_of_any_length_and_chunking_equal_one_xxh3_per_block(length: int) -> None:
    data = np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8).tobytes()
    want = reference_sums(data)
    np.testing.assert_array_equal(block_sums(data), want)
    rng = np.random.default_rng(length + 1)
    digest, at = Digest(np.dtype(np.uint8)), 0
    while at < length:  # fed in pieces of odd sizes, as decoders and reads hand them over
        step = int(rng.integers(1, 3 * CHECK_BLOCK))
        digest.update(memoryview(data)[at:at + step])
        at += step
    np.testing.assert_array_equal(digest.finish(), want)
    assert digest.max_token == max(data)


@pytest.mark.parametrize("memory", [1 << 30, 0])
def test_a_built_entry_carries_the_block_sums_of_its_raw_bytes(tmp_path: Path, memory: int) -> None:
    """A raw length not a multiple of 4 KiB, two zstd frames decoded into one buffer: the entry's sums are
    one xxh3 per block of the raw bytes, and its checked reads serve them."""
    want = tokens((3 << 20) // 2 + 1234)
    raw = want.tobytes()
    cut = 2 * 700_001
    shard = stored(tmp_path / "src", "s.zst", compress(raw[:cut]) + compress(raw[cut:], level=1), raw)
    cache = ShardCache(tmp_path / "cache", memory_bytes=memory)
    served = cache.get(shard)
    entry = cache._entries[shard.raw_sha256]
    assert entry.region is not None and entry.max_token == int(want.max())
    np.testing.assert_array_equal(np.frombuffer(entry.region.sums, dtype=np.uint64), reference_sums(raw))
    disk = CheckedTokens(entry.region, DTYPE, want.size)
    np.testing.assert_array_equal(disk[0:want.size], want)
    np.testing.assert_array_equal(np.asarray(served), want)
    assert isinstance(served, np.ndarray) == bool(memory)
    cache.close()


@pytest.mark.parametrize("memory", [1 << 30, 0])
def test_an_out_of_vocabulary_token_at_the_very_last_position_is_refused(tmp_path: Path, memory: int) -> None:
    want = tokens(CHECK_BLOCK * 100 + 3)
    want[-1] = VOCAB  # the first id past the vocabulary, in the last (partial) block of the last chunk
    raw = want.tobytes()
    shard = stored(tmp_path / "src", "s.zst", compress(raw), raw)
    message = rf"s\.zst: token id {VOCAB} at token offset {want.size - 1} is outside the vocabulary"
    cache = ShardCache(tmp_path / "cache", memory_bytes=memory)
    with pytest.raises(CorruptData, match=message):
        cache.get(shard)  # built now
    cache.close()
    again = ShardCache(tmp_path / "cache", memory_bytes=memory)
    with pytest.raises(CorruptData, match=message):
        again.get(shard)  # the cached file re-hashed
    assert again.stats.verified == 1 and again.stats.fetches == 0
    again.close()


@pytest.mark.parametrize("memory", [1 << 30, 0])
def test_an_object_that_does_not_decode_to_its_raw_sha256_is_refused_and_serves_nobody(
        tmp_path: Path, memory: int) -> None:
    """The cache is content-addressed by raw sha256: a meta.json whose raw sha256 lies (its object, which
    matches its own sha256, decodes to other bytes) is refused, and an honest source with that raw sha256
    gets its own bytes."""
    want = tokens(150_000)
    raw = want.tobytes()
    other = tokens(150_000, seed=9)
    lying = stored(tmp_path / "liar", "s.zst", compress(other.tobytes()), raw)
    honest = stored(tmp_path / "web", "s.zst", compress(raw, level=19), raw)
    assert lying.raw_sha256 == honest.raw_sha256 and lying.sha256 != honest.sha256
    cache = ShardCache(tmp_path / "cache", memory_bytes=memory)
    with pytest.raises(CorruptData, match=r"s\.zst: decompressed shard does not match meta\.json"):
        cache.get(lying)
    np.testing.assert_array_equal(np.asarray(cache.get(honest)), want)
    # Once bytes that hash to the key are cached, the liar's shard reads them: what its raw sha256 commits
    # to, never its object's other bytes.
    np.testing.assert_array_equal(np.asarray(cache.get(lying)), want)
    cache.close()


def test_two_objects_of_the_same_raw_bytes_share_one_entry(tmp_path: Path) -> None:
    want = tokens(150_000)
    raw = want.tobytes()
    fast = stored(tmp_path / "a", "s.zst", compress(raw), raw)
    small = stored(tmp_path / "b", "s.zst", compress(raw, level=19), raw)
    cache = ShardCache(tmp_path / "cache")
    for shard in (fast, small, fast):
        np.testing.assert_array_equal(np.asarray(cache.get(shard)), want)
        assert cache.is_resident(shard)
    assert cache.stats.fetches == 1  # raw-hashed when built: the key is proven for every source
    cache.close()


def test_a_stream_longer_or_shorter_than_the_shard_is_refused(tmp_path: Path) -> None:
    raw = tokens(100_000).tobytes()
    for name, obj in {"long.zst": compress(raw + b"\0\0"), "short.zst": compress(raw[:-2]),
                      "cut.zst": compress(raw)[:-100]}.items():
        shard = stored(tmp_path / "src", name, obj, raw)
        for memory in (1 << 30, 0):
            cache = ShardCache(tmp_path / f"cache-{name}-{memory}", memory_bytes=memory)
            with pytest.raises(CorruptData, match=rf"{name}: decompressed shard is (longer|shorter) than"):
                cache.get(shard)
            assert list(cache.directory.iterdir()) == [] and not cache.is_resident(shard)
            cache.close()


def test_an_object_stored_raw_and_an_expansion_are_both_checked(tmp_path: Path) -> None:
    """A block stored uncompressed (``expand=bytes``, its sha256 is the raw sha256) and an expansion that
    parses (MDS) whose output changed: each refused by a hash."""
    want = tokens(50_001)
    raw = want.tobytes()
    sha = hashlib.sha256(raw).hexdigest()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "block").write_bytes(raw)
    plain = Shard(LocalOrigin(tmp_path / "src"), "block", want.size, DTYPE, sha, sha, bytes, VOCAB)
    cache = ShardCache(tmp_path / "cache")
    np.testing.assert_array_equal(np.asarray(cache.get(plain)), want)
    flipped = bytearray(raw)
    flipped[-1] ^= 0x01
    (tmp_path / "src" / "block").write_bytes(bytes(flipped))
    with pytest.raises(CorruptData, match="block: shard checksum mismatch"):
        ShardCache(tmp_path / "cache2").get(plain)
    (tmp_path / "src" / "block").write_bytes(raw)

    def wrong(data: bytes) -> bytes:  # an expansion that changed: the right length, other bytes
        return data[:-2] + b"\0\0"
    parsed = Shard(LocalOrigin(tmp_path / "src"), "block", want.size, DTYPE, sha, sha, wrong, VOCAB)
    with pytest.raises(CorruptData, match="block: decompressed shard does not match meta.json"):
        ShardCache(tmp_path / "cache3").get(parsed)
    cache.close()
