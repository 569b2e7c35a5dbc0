"""The resident tier of ``ShardCache`` (issue 21): a shard whose whole raw bytes were just proven (fetched and
hashed, or a cached file re-hashed) is kept in memory and served from there, immune to what later happens to
its file; bounded by ``memory_bytes`` (least recently read evicted); ``memory_bytes=0`` is the checked
disk path of before. Real prepared sources and files, no mocks."""

from __future__ import annotations

import dataclasses
import os
import random
import threading
from pathlib import Path

import numpy as np
import pytest
from test_integrity_sources import TOK, rot_in_place

from mixer_contract.errors import CorruptData, InvalidInput
from mixer_contract.job import JobConfig
from mixer_contract.schedule import Schedule
from mixer_service.engine import MixingEngine
from mixer_service.prepare.writer import prepare_source
from mixer_service.sources import PreparedSource, ShardCache
from mixer_service.sources.checked import CheckedTokens

SHARD_TOKENS = 40_000


@pytest.fixture(scope="module")
def web(tmp_path_factory) -> Path:
    """A prepared source of several shards of byte tokens (uint16), left pristine: tests copy-free, each
    test uses its own cache directory."""
    out = tmp_path_factory.mktemp("resident") / "web"
    docs = [f"speech {i}: " + "we the people " * (5 + i % 40) for i in range(2000)]
    prepare_source(docs, out, TOK, name="web", shard_tokens=SHARD_TOKENS, progress=False)
    return out


def opened(web: Path, cache_dir: Path, **kwargs) -> PreparedSource:
    return PreparedSource.open(web, cache=ShardCache(cache_dir, **kwargs))


def entry_file(src: PreparedSource, k: int) -> Path:
    return src.cache.directory / f"{src.shards[k].raw_sha256}.bin"


def everything(src: PreparedSource) -> np.ndarray:
    return np.concatenate([np.asarray(src.tokens.shard(k)) for k in range(len(src.shards))])


def test_a_fetched_shard_is_served_from_memory_whatever_happens_to_its_file(web: Path, tmp_path: Path):
    src = opened(web, tmp_path / "cache")
    assert len(src.shards) >= 4
    want = everything(src).copy()
    stats = src.cache.stats
    assert stats.fetches == len(src.shards) and stats.resident_bytes == sum(s.raw_bytes for s in src.shards)
    hits = stats.resident_hits
    rot_in_place(entry_file(src, 0), 5000)  # stat unchanged
    with open(entry_file(src, 1), "r+b") as fh:  # truncated: a memory map of it would SIGBUS
        fh.truncate(100)
    entry_file(src, 2).unlink()
    with open(entry_file(src, 3), "r+b") as fh:  # rewritten with other bytes (stat changes)
        fh.write(b"\xff" * 4096)
    for _ in range(3):
        np.testing.assert_array_equal(everything(src), want)
        np.testing.assert_array_equal(src.tokens[0:len(src.tokens)], want)  # crossing rows too
    assert stats.resident_hits > hits
    assert stats.rebuilt == 0 and stats.fetches == len(src.shards) and stats.verified == 0


def test_a_cached_file_verified_by_a_new_process_becomes_resident(web: Path, tmp_path: Path):
    first = opened(web, tmp_path / "cache", memory_bytes=0)  # fills the disk cache only
    want = everything(first).copy()
    assert first.cache.stats.resident_bytes == 0
    again = opened(web, tmp_path / "cache")  # a new process: hashes each file once, keeps those bytes
    np.testing.assert_array_equal(everything(again), want)
    stats = again.cache.stats
    assert stats.fetches == 0 and stats.verified == len(again.shards)
    assert all(again.cache.is_resident(s) for s in again.shards)
    rot_in_place(entry_file(again, 1), 123)
    np.testing.assert_array_equal(everything(again), want)
    assert stats.verified == len(again.shards) and stats.rebuilt == 0


def test_without_memory_a_flipped_byte_is_still_caught_and_rebuilt(web: Path, tmp_path: Path):
    src = opened(web, tmp_path / "cache", memory_bytes=0)
    want = everything(src).copy()
    assert isinstance(src.tokens.shard(0), CheckedTokens)
    rot_in_place(entry_file(src, 0), 5000)
    np.testing.assert_array_equal(everything(src), want)
    stats = src.cache.stats
    assert stats.rebuilt == 1 and stats.resident_hits == 0 and stats.resident_bytes == 0


def test_resident_tokens_are_read_only(web: Path, tmp_path: Path):
    src = opened(web, tmp_path / "cache")
    tokens = src.tokens.shard(0)
    assert isinstance(tokens, np.ndarray) and tokens.dtype == src.shards[0].dtype
    assert not tokens.flags.writeable
    with pytest.raises(ValueError):
        tokens.flags.writeable = True
    with pytest.raises(ValueError):
        tokens[0] = 1
    with pytest.raises(ValueError):
        tokens[10:20].flags.writeable = True


def test_the_memory_bound_holds_and_the_least_recently_read_copy_goes_first(web: Path, tmp_path: Path):
    size = opened(web, tmp_path / "probe", memory_bytes=0).shards[0].raw_bytes
    src = opened(web, tmp_path / "cache", memory_bytes=2 * size + size // 2)  # room for two shards
    cache, shards, stats = src.cache, src.shards, src.cache.stats
    src.tokens.shard(0)
    src.tokens.shard(1)
    assert cache.is_resident(shards[0]) and cache.is_resident(shards[1])
    src.tokens.shard(0)  # now shard 1 is the least recently read
    src.tokens.shard(2)
    assert [cache.is_resident(s) for s in shards[:3]] == [True, False, True]
    assert stats.resident_evictions == 1 and stats.resident_bytes == 2 * size <= cache.memory_bytes
    # A plain (checked) read of a shard on disk never promotes it into memory.
    assert isinstance(src.tokens.shard(1), CheckedTokens) and not cache.is_resident(shards[1])
    assert stats.resident_bytes <= cache.memory_bytes


def test_a_shard_larger_than_the_memory_bound_is_never_kept(web: Path, tmp_path: Path):
    src = opened(web, tmp_path / "cache", memory_bytes=1000)
    want = everything(src).copy()
    assert src.cache.stats.resident_bytes == 0 and src.cache.stats.resident_evictions == 0
    assert isinstance(src.tokens.shard(0), CheckedTokens)
    np.testing.assert_array_equal(everything(src), want)


def test_the_bound_holds_under_concurrent_reads(web: Path, tmp_path: Path):
    """Request threads and prefetch threads at once, a bound of 1.5 shards: every read right, and the
    resident bytes never above the bound."""
    expect = everything(opened(web, tmp_path / "expect", memory_bytes=0)).copy()
    src = opened(web, tmp_path / "cache", memory_bytes=3 * SHARD_TOKENS)
    cache, bounds = src.cache, src.shard_offsets
    peak, wrong, stop = [0], [], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], cache.stats.resident_bytes)

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(200):
            k = rng.randrange(len(src.shards))
            if rng.random() < 0.2:
                cache.prefetch([src.shards[(k + 1) % len(src.shards)]])
            got = np.asarray(src.tokens.shard(k))
            if not np.array_equal(got, expect[bounds[k]:bounds[k + 1]]):
                wrong.append(k)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    cache.close()
    assert not wrong
    assert 0 < peak[0] <= cache.memory_bytes
    assert cache.stats.resident_hits > 0


def test_a_prefetched_shard_becomes_resident_and_a_resident_one_is_not_fetched_again(web: Path,
                                                                                     tmp_path: Path):
    src = opened(web, tmp_path / "cache")
    for future in src.prefetch([0, 1]):
        future.result()
    assert src.cache.is_resident(src.shards[0]) and src.cache.stats.fetches == 2
    entry_file(src, 0).unlink()  # e.g. evicted from disk: the resident copy stays and is enough
    assert src.prefetch([0]) == []
    src.tokens.shard(0)
    assert src.cache.stats.fetches == 2 and src.cache.stats.resident_hits == 1


@pytest.mark.parametrize("memory", [0, 1 << 30])
def test_token_ids_outside_the_vocabulary_are_refused_resident_or_not(web: Path, tmp_path: Path, memory: int):
    src = opened(web, tmp_path / "cache", memory_bytes=memory)
    shard = src.shards[0]
    tokens = np.asarray(src.tokens.shard(0))
    limit = int(tokens.max())  # the largest id present is now one past the vocabulary
    pos = int(np.flatnonzero(tokens >= limit)[0])
    narrow = dataclasses.replace(shard, vocab_size=limit)
    with pytest.raises(CorruptData, match=f"token id {limit} at token offset {pos} is outside the vocab"):
        src.cache.get(narrow)
    assert src.cache.stats.resident_hits == (1 if memory else 0)


def _engine(source: PreparedSource, order: dict) -> MixingEngine:
    config = JobConfig.parse({"sources": [{"name": "web", "role": "repeat"}], "seq_len": 256,
                              "global_batch": 64, "seed": 9, "total_steps": 100_000, "order": order})
    schedule = Schedule.parse({"phases": [{"start_step": 0, "weights": {"web": 1}}]}, ["web"])
    return MixingEngine.create(config, {"web": source}, [(0, schedule)])


@pytest.mark.parametrize("order", [{"kind": "global"}, {"kind": "window", "window_shards": 2},
                                   {"kind": "sliding", "window_shards": 2}])
def test_batches_are_byte_identical_with_the_tier_on_and_off(web: Path, tmp_path: Path, order: dict):
    """Many steps (epochs wrap: rows cross shards and the end of the stream), several ranks; the memory
    bound of two shards makes every step mix resident and checked shards."""
    on = opened(web, tmp_path / "on")  # the default bound: every shard resident
    small = opened(web, tmp_path / "small", memory_bytes=3 * SHARD_TOKENS)
    off = opened(web, tmp_path / "off", memory_bytes=0)
    engines = {name: _engine(src, order) for name, src in (("on", on), ("small", small), ("off", off))}
    steps = range(0, 3 * len(on.tokens) // (64 * 256) + 5)
    for step in steps:
        for rank, world in ((0, 1), (1, 4)):
            want = engines["off"].batch(step, rank, world).tokens.tobytes()
            assert engines["on"].batch(step, rank, world).tokens.tobytes() == want, (step, rank)
            assert engines["small"].batch(step, rank, world).tokens.tobytes() == want, (step, rank)
    assert on.cache.stats.resident_hits > 0 and off.cache.stats.resident_hits == 0
    assert small.cache.stats.resident_bytes <= small.cache.memory_bytes


def test_a_negative_memory_bound_is_refused(tmp_path: Path):
    with pytest.raises(InvalidInput, match="memory cache must be >= 0"):
        ShardCache(tmp_path / "cache", memory_bytes=-1)
    assert os.listdir(tmp_path) == []
