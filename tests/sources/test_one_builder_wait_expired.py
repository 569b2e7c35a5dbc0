"""one_builder's timed-out path (another process holds the build lock past BUILD_WAIT_S) closes its lock fd
before ``yield False``; when the caller's build then raises (a corrupt shard from the store, a full disk...),
the generator's ``except BaseException: os.close(fd)`` closes that fd number a second time. The first
symptom is the build's real error replaced by ``OSError: [Errno 9] Bad file descriptor``; in a threaded
server the number may by then belong to another thread's file or socket, which gets closed under it.

Real processes: the lock holder is a separate process that flock()s the shard's .building file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from test_cache_eviction_race import shard_at

ROOT = Path(__file__).resolve().parents[2]

HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    open(sys.argv[2], "w").close()
    time.sleep(60)
""")

WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    from mixer_service.sources import ShardCache, cache as cache_module
    from mixer_service.sources.cache import Shard
    from mixer_service.sources.origins import LocalOrigin
    src, cache_dir, out = sys.argv[1:4]
    cache_module.BUILD_WAIT_S = 0.5
    meta = json.loads(Path(src, "shard.json").read_text())
    shard = Shard(LocalOrigin(Path(src)), "s.zst", meta["n"], np.dtype("<u2"), meta["sha"], meta["raw_sha"],
                  vocab_size=50257)
    cache = ShardCache(Path(cache_dir), memory_bytes=0)
    try:
        cache.get(shard)
        result = {"error": None}
    except BaseException as exc:
        result = {"error": type(exc).__name__, "message": str(exc)}
    Path(out).write_text(json.dumps(result))
""")


def test_a_failed_build_after_the_wait_expired_reports_its_own_error(tmp_path) -> None:
    shard, _ = shard_at(tmp_path / "src")
    (tmp_path / "src" / "shard.json").write_text(json.dumps(
        {"n": shard.num_tokens, "sha": shard.sha256, "raw_sha": shard.raw_sha256}))
    stored = tmp_path / "src" / "s.zst"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the object store hands back a flipped byte: CorruptData expected
    stored.write_bytes(bytes(data))
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    lock = cache_dir / f".{shard.raw_sha256}.bin.building"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), str(tmp_path / "held")], env=env)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "held").exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        worker = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path / "src"), str(cache_dir),
                                 str(tmp_path / "out")], env=env, timeout=60)
        assert worker.returncode == 0
        result = json.loads((tmp_path / "out").read_text())
    finally:
        holder.kill()
        holder.wait()
    # expected: the store's corruption is reported as such (CorruptData: shard checksum mismatch)
    assert result["error"] == "CorruptData", result
