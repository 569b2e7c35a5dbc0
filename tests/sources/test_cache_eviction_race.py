"""Another worker process evicts a cache file between this one's stat and its open (CI found it as a 503
'cannot open (No such file or directory)' under two workers sharing a bounded cache): the shard is fetched
again, never refused. Real files; the other process's unlink is injected at the exact point of the race."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard

from mixer_service.sources import ShardCache
from mixer_service.sources import cache as cache_module
from mixer_service.sources.cache import Shard
from mixer_service.sources.origins import LocalOrigin

DTYPE = np.dtype("<u2")


def shard_at(directory: Path) -> tuple[Shard, np.ndarray]:
    want = np.random.default_rng(1).integers(0, 50257, 100_003, dtype=np.uint64).astype(DTYPE)
    raw = want.tobytes()
    obj = zstandard.ZstdCompressor(level=3).compress(raw)
    directory.mkdir(parents=True)
    (directory / "s.zst").write_bytes(obj)
    return Shard(LocalOrigin(directory), "s.zst", len(want), DTYPE, hashlib.sha256(obj).hexdigest(),
                 hashlib.sha256(raw).hexdigest(), vocab_size=50257), want


@pytest.mark.parametrize("memory", [1 << 30, 0])
def test_a_cached_file_evicted_between_stat_and_open_is_fetched_again(tmp_path, monkeypatch, memory):
    shard, want = shard_at(tmp_path / "src")
    first = ShardCache(tmp_path / "cache", memory_bytes=memory)
    assert np.array_equal(first.get(shard), want)  # the file another process finds on disk
    first.close()
    cached = tmp_path / "cache" / f"{shard.raw_sha256}.bin"
    real_of = cache_module.FileStamp.of

    evicted = []

    def stat_then_evicted(path):
        stamp = real_of(path)
        if Path(path) == cached and stamp is not None and sys._getframe(1).f_code.co_name == "_load":
            cached.unlink()  # the other worker's eviction lands right after the stat that decides to open
            evicted.append(path)
        return stamp

    monkeypatch.setattr(cache_module.FileStamp, "of", staticmethod(stat_then_evicted))
    second = ShardCache(tmp_path / "cache", memory_bytes=memory)
    assert np.array_equal(second.get(shard)[:], want)
    assert evicted and second.stats.fetches == 1
    second.close()


@pytest.mark.parametrize("memory", [1 << 30, 0])
def test_a_file_evicted_as_soon_as_it_is_installed_is_still_read_through_its_handle(tmp_path, monkeypatch,
                                                                                    memory):
    shard, want = shard_at(tmp_path / "src")
    real_install = ShardCache._install

    def install_then_evicted(self, tmp, path):
        real_install(self, tmp, path)
        path.unlink()  # evicted by another worker before this one opened it

    monkeypatch.setattr(ShardCache, "_install", install_then_evicted)
    cache = ShardCache(tmp_path / "cache", memory_bytes=memory)
    assert np.array_equal(cache.get(shard)[:], want)
    assert np.array_equal(cache.get(shard)[:], want)  # read again: resident, or refetched once
    cache.close()
