"""The worker processes of one server share a cache directory: one of them fetches and decodes a shard, the
others wait and verify the file it installed (before, each fetched it itself: 138 fetches of ~65 shards with
two workers in the 8-rank head-to-head). A builder killed mid-build (SIGKILL) releases the shard to the next.
A builder stopped (SIGSTOP) holds the lock: the others wait a bounded time, then build the shard themselves.
Real processes, a real cache directory; the store is slowed so that the processes overlap."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from test_cache_eviction_race import shard_at

ROOT = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent("""
    import json, sys, time, hashlib
    from pathlib import Path
    import numpy as np
    from mixer_service.sources import ShardCache, cache as cache_module
    from mixer_service.sources.cache import Shard
    from mixer_service.sources.origins import LocalOrigin

    src, cache_dir, go, delay, out, wait = sys.argv[1:7]
    cache_module.BUILD_WAIT_S = float(wait)

    class SlowStore(LocalOrigin):  # an object store that takes `delay` seconds to answer
        def read(self, name):
            Path(out + ".reading").touch()
            time.sleep(float(delay))
            return super().read(name)

    meta = json.loads(Path(src, "shard.json").read_text())
    shard = Shard(SlowStore(Path(src)), "s.zst", meta["n"], np.dtype("<u2"), meta["sha"], meta["raw_sha"],
                  vocab_size=50257)
    cache = ShardCache(Path(cache_dir), memory_bytes=0)
    while not Path(go).exists():
        time.sleep(0.005)
    tokens = np.asarray(cache.get(shard)[:])
    Path(out).write_text(json.dumps({"fetches": cache.stats.fetches, "verified": cache.stats.verified,
                                     "digest": hashlib.sha256(tokens.tobytes()).hexdigest(),
                                     "raw_sha": shard.raw_sha256}))
""")


def start(tmp_path: Path, name: str, delay: float, wait: float = 60.0) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "src"), str(tmp_path / "cache"),
                             str(tmp_path / "go"), str(delay), str(tmp_path / name), str(wait)], env=env)


def setup(tmp_path: Path) -> str:
    shard, want = shard_at(tmp_path / "src")
    (tmp_path / "src" / "shard.json").write_text(json.dumps(
        {"n": shard.num_tokens, "sha": shard.sha256, "raw_sha": shard.raw_sha256}))
    return hashlib.sha256(want.tobytes()).hexdigest()


def wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_two_workers_needing_one_shard_fetch_it_once(tmp_path) -> None:
    want = setup(tmp_path)
    procs = [start(tmp_path, f"w{i}", delay=1.0) for i in range(2)]
    (tmp_path / "go").touch()
    assert all(p.wait(120) == 0 for p in procs)
    results = [json.loads((tmp_path / f"w{i}").read_text()) for i in range(2)]
    assert all(r["digest"] == want for r in results)
    assert sorted(r["fetches"] for r in results) == [0, 1]  # one fetched, the other waited
    assert sorted(r["verified"] for r in results) == [0, 1]  # ... and verified what the first installed
    assert not list((tmp_path / "cache").glob(".*.building"))


def test_a_builder_killed_mid_fetch_hands_the_shard_to_the_next(tmp_path) -> None:
    want = setup(tmp_path)
    stuck = start(tmp_path, "stuck", delay=600.0)
    (tmp_path / "go").touch()
    wait_for(tmp_path / "stuck.reading")  # it holds the build lock and waits on its store
    other = start(tmp_path, "other", delay=0.0)
    time.sleep(1.0)
    assert other.poll() is None  # waiting for the stuck builder
    stuck.send_signal(signal.SIGKILL)
    stuck.wait(30)
    assert other.wait(60) == 0
    result = json.loads((tmp_path / "other").read_text())
    assert result["digest"] == want and result["fetches"] == 1
    assert [p.name for p in (tmp_path / "cache").glob("*.bin")] == [f"{result['raw_sha']}.bin"]
    assert not list((tmp_path / "cache").glob(".*.building"))  # the next builder removed the dead one's


def test_a_stopped_builder_delays_the_others_only_for_the_wait_bound(tmp_path) -> None:
    want = setup(tmp_path)
    stopped = start(tmp_path, "stopped", delay=1.0)
    (tmp_path / "go").touch()
    wait_for(tmp_path / "stopped.reading")
    stopped.send_signal(signal.SIGSTOP)  # holds the build lock, frozen
    try:
        other = start(tmp_path, "other", delay=0.0, wait=1.0)
        assert other.wait(60) == 0  # built it itself once the bound passed
        result = json.loads((tmp_path / "other").read_text())
        assert result["digest"] == want and result["fetches"] == 1
    finally:
        stopped.send_signal(signal.SIGCONT)
    assert stopped.wait(60) == 0  # and the stopped one, resumed, installs the same bytes
    assert json.loads((tmp_path / "stopped").read_text())["digest"] == want
    assert not list((tmp_path / "cache").glob(".*.building"))


def test_a_lock_file_deleted_by_someone_else_costs_a_fetch_and_no_other_lock(tmp_path) -> None:
    """Found by review: A's release unlinked the lock file B had made after an outsider deleted A's, so a
    third worker overlapped B too. A and B may both fetch (the outsider broke A's lock); C waits for B."""
    want = setup(tmp_path)
    first = start(tmp_path, "first", delay=2.0)
    (tmp_path / "go").touch()
    wait_for(tmp_path / "first.reading")
    [lock] = (tmp_path / "cache").glob(".*.building")
    lock.unlink()  # an operator's rm, a tmp reaper
    second = start(tmp_path, "second", delay=5.0)
    wait_for(tmp_path / "second.reading")  # it made and holds a lock file of its own
    assert first.wait(60) == 0  # A releases while B builds: B's lock file must stay
    third = start(tmp_path, "third", delay=0.0)
    assert second.wait(60) == 0 and third.wait(60) == 0
    results = {n: json.loads((tmp_path / n).read_text()) for n in ("first", "second", "third")}
    assert all(r["digest"] == want for r in results.values())
    assert results["third"]["fetches"] == 0 and results["third"]["verified"] == 1
    assert not list((tmp_path / "cache").glob(".*.building"))
