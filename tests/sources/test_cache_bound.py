"""``--cache-limit`` is a hard bound on what the cache directory holds on disk: shards being fetched (by
requests and by prefetch) and the remote document indexes included, across worker processes. Measured
the way an operator would, by polling ``du`` while a real server serves concurrent batch requests."""

from __future__ import annotations

import fcntl
import itertools
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from service_helpers import FOREIGN_FETCH, RAW, Server, reblock
from test_sources_s3 import BUCKET, CREDENTIALS, s3, upload  # noqa: F401  (s3 is a fixture)

from mixer_contract import wire
from mixer_contract.errors import InvalidInput
from mixer_contract.job import JobConfig
from mixer_contract.schedule import Schedule
from mixer_service.engine import MixingEngine
from mixer_service.prepare.readers import iter_documents
from mixer_service.prepare.tokenizer import load_tokenizer
from mixer_service.prepare.writer import prepare_source
from mixer_service.sources import PreparedSource, ShardCache
from mixer_service.sources.disk_budget import LOCK_FILE, CacheFull

SHARD_TOKENS = 1 << 17
WORLD = 4
STEPS = 12
JOBS = {
    "global": {"sources": [{"name": "web", "role": "repeat"}], "seq_len": 512, "global_batch": 32,
               "seed": 3, "total_steps": 1000, "order": {"kind": "global"}},
    "window": {"sources": [{"name": "web", "role": "repeat"}], "seq_len": 512, "global_batch": 32,
               "seed": 4, "total_steps": 1000, "order": {"kind": "window", "window_shards": 4}},
}
SCHEDULE = {"phases": [{"start_step": 0, "weights": {"web": 1}}]}


@pytest.fixture(scope="module")
def web(tmp_path_factory) -> Path:
    """Every State of the Union address in shards of 2^17 tokens: dozens of shards, a cache of a third."""
    out = tmp_path_factory.mktemp("bound") / "web"
    docs = iter_documents([RAW / "sotu"], fmt="text", glob="*.txt")
    prepare_source(docs, out, load_tokenizer(), name="web", shard_tokens=SHARD_TOKENS, progress=False)
    return out


def disk_usage(directory: Path) -> int:
    """``du -s -B1``: allocated bytes, as an operator measures them (files vanishing mid-walk are fine)."""
    out = subprocess.run(["du", "-s", "-B1", str(directory)], capture_output=True, text=True).stdout
    return int(out.split()[0]) if out else 0


def disk_usage_locked(directory: Path) -> int:
    """``flock -s DIR/.budget.lock du -s -B1 DIR``: ``du`` walks a directory one name at a time, so a walk
    that spans an eviction and the fetch that reuses its room counts both; under a shared hold of the
    budget's lock (every allocation, eviction and install takes it exclusively) the walk is a snapshot."""
    with open(directory / LOCK_FILE, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        try:
            return disk_usage(directory)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class DuPoller:
    """Polls ``du`` of a directory in a thread as fast as it answers: the largest snapshot (under the
    budget's lock) and the largest unlocked walk."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.peak, self.peak_unlocked, self.samples = directory, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, disk_usage_locked(self.directory))
            self.peak_unlocked = max(self.peak_unlocked, disk_usage(self.directory))
            self.samples += 1

    def __enter__(self) -> DuPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def serve(s3: str, tmp_path: Path, limit: int, workers: int = 1) -> Server:  # noqa: F811
    (tmp_path / "empty").mkdir(exist_ok=True)
    return Server(tmp_path / "empty", tmp_path / "state", env=CREDENTIALS, workers=workers, extra_args=[
        "--sources-url", f"s3://{BUCKET}/bound", "--s3-endpoint", s3, "--cache-dir", str(tmp_path / "cache"),
        "--cache-limit", str(limit),
        "--memory-cache", "0"])  # the disk bound under test: no resident copy outlives a disk eviction


def minimum_limit(s3: str, tmp_path: Path) -> tuple[int, str]:  # noqa: F811
    """Start a server (two workers, as on a multi-core host) with a 1-byte limit: it refuses, naming the
    smallest limit that works."""
    with pytest.raises(RuntimeError) as refused:
        serve(s3, tmp_path, 1, workers=2).start()
    message = str(refused.value)
    found = re.search(r"give at least --cache-limit (\d+)", message)
    assert found, message
    return int(found.group(1)), message


def test_a_limit_below_one_window_is_refused_at_start_with_the_minimum(s3, web, tmp_path) -> None:  # noqa: F811
    upload(s3, web, "bound/web")
    minimum, message = minimum_limit(s3, tmp_path)
    shard_bytes = SHARD_TOKENS * 2
    assert "exited with 2" in message and "the default (sliding) order" in message
    assert "(18 shards, or all of them if fewer" in message
    assert minimum >= 18 * shard_bytes  # a sliding block's 16, the one it admits, a neighbour; plus indexes
    with pytest.raises(RuntimeError, match=f"give at least --cache-limit {minimum}"):
        serve(s3, tmp_path, minimum - 1, workers=2).start()
    with serve(s3, tmp_path, minimum) as srv:  # the minimum works, for a new job in the default order
        default = {k: v for k, v in JOBS["window"].items() if k != "order"}
        body = {"job_id": "j", "config": default, "schedule": SCHEDULE, "author": "t", "reason": "t"}
        assert httpx.post(f"{srv.url}/v1/jobs", json=body).status_code == 201
        assert httpx.get(f"{srv.url}/v1/jobs/j/batches/0").status_code == 200


def test_disk_usage_never_exceeds_the_limit_under_concurrent_load(s3, web, tmp_path) -> None:  # noqa: F811
    """Two worker processes, a global-order job and a window-order job, 4 ranks each asking at once, every
    step prefetching the next ones: ``du`` of the cache directory never shows more than the limit, and
    every batch is the one the engine computes from the local source."""
    upload(s3, web, "bound/web")
    local = {"web": PreparedSource.open(web, cache_dir=tmp_path / "expect")}
    assert len(local["web"].shards) >= 40
    minimum, _ = minimum_limit(s3, tmp_path)
    limit = minimum + 2 * SHARD_TOKENS * 2  # a third of the source: the global order thrashes
    schedule = [(0, Schedule.parse(SCHEDULE, ["web"]))]
    engines = {name: MixingEngine.create(JobConfig.parse(job), local, schedule) for name, job in JOBS.items()}

    def ask(job: str, rank: int) -> list[str]:
        wrong = []
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            for step in range(STEPS):
                r = client.get(f"/v1/jobs/{job}/batches/{step}", params={"rank": rank, "world": WORLD})
                if r.status_code != 200:
                    wrong.append(f"{job} step {step} rank {rank}: {r.status_code} {r.text[:300]}")
                elif wire.decode(r.content).tokens.tobytes() != \
                        engines[job].batch(step, rank, WORLD).tokens.tobytes():
                    wrong.append(f"{job} step {step} rank {rank}: wrong tokens")
        return wrong

    with serve(s3, tmp_path, limit, workers=2) as srv:
        for name, job in JOBS.items():
            body = {"job_id": name, "config": job, "schedule": SCHEDULE, "author": "t", "reason": "t"}
            assert httpx.post(f"{srv.url}/v1/jobs", json=body).status_code == 201
        with DuPoller(tmp_path / "cache") as du, ThreadPoolExecutor(2 * WORLD) as pool:
            asks = [pool.submit(ask, job, rank) for job in JOBS for rank in range(WORLD)]
            wrong = list(itertools.chain(*(a.result() for a in asks)))
        # /metrics counts per worker process (docs/operations.md): ask on fresh connections, which land on
        # either worker, until one that evicted answers.
        evicting = [httpx.get(f"{srv.url}/metrics").text for _ in range(30)]
    assert not wrong, wrong[:5]
    assert du.samples > 20, "du was not polled under load"
    assert du.peak <= limit, f"du showed {du.peak} bytes under a {limit}-byte limit " \
                             f"(unlocked walks: {du.peak_unlocked})"
    assert du.peak > limit - 4 * SHARD_TOKENS * 2, "the load never filled the cache: nothing was tested"
    assert any(re.search(r'mixer_shard_cache\{stat="evictions"\} [1-9]', m) for m in evicting), \
        "nothing was evicted"


def test_a_shard_larger_than_the_limit_is_refused_and_a_prefetch_that_would_evict_hot_shards_skipped(
        s3, web, tmp_path) -> None:  # noqa: F811
    """In process: what cannot fit is a clear ``CacheFull`` (503) for a request and a skipped prefetch,
    never bytes past the limit."""
    upload(s3, web, "bound/web")
    from mixer_service.sources.origins import S3Origin, s3_client

    origin = S3Origin(s3_client(s3), BUCKET, "bound/web")
    shard_bytes = SHARD_TOKENS * 2
    tiny = ShardCache(tmp_path / "tiny", limit_bytes=shard_bytes // 2)
    remote = PreparedSource.open_remote(origin, tmp_path / "index", tiny)
    tiny.budget.demand_wait_s = 0.1
    refusal = (r"s3://corpora/bound/web/tokens-00000\.zst: the cache at .* cannot hold "
               rf"{shard_bytes} more bytes within --cache-limit {shard_bytes // 2}")
    with pytest.raises(CacheFull, match=refusal):
        remote.tokens.shard(0)
    assert disk_usage(tmp_path / "tiny") <= shard_bytes // 2
    two = ShardCache(tmp_path / "two", limit_bytes=2 * shard_bytes + 2 * 4096)  # two shards and the directory
    remote = PreparedSource.open_remote(origin, tmp_path / "index", two)
    remote.tokens.shard(0)  # what a request reads now: the recent half, kept from prefetch
    for ahead in ([1], [2]):  # 2 would have to evict 0 (read now) or 1 (prefetched, not read yet)
        for future in remote.prefetch(ahead):
            future.result()
    assert two.stats.prefetch_skipped == 1 and two.stats.evictions == 0
    assert remote.shards[0] in two and remote.shards[1] in two
    remote.tokens.shard(2)  # a request may evict it
    assert two.stats.evictions == 1 and disk_usage(tmp_path / "two") <= 2 * shard_bytes + 2 * 4096


def test_remote_index_blocks_count_and_are_given_back_when_a_request_needs_the_room(s3, tmp_path) -> None:  # noqa: F811
    """The sparse local copy of a remote document index is under the limit too: each block is allocated
    before it is fetched, and when nothing else can go a block becomes a hole again (fetched on next use)."""
    docs = iter_documents([RAW / "abc"], fmt="text", split_regex=r"^X:", glob="**/*.abc")
    source = tmp_path / "abc"
    prepare_source(docs, source, load_tokenizer(), name="abc", shard_tokens=SHARD_TOKENS, progress=False)
    reblock(source, 2048)  # 16 KiB index blocks
    upload(s3, source, "indexed/abc")
    local = PreparedSource.open(source, cache_dir=tmp_path / "expect")
    blocks = len(local.info.doc_index.firsts)
    assert blocks >= 6
    from mixer_service.sources.origins import S3Origin, s3_client

    root = tmp_path / "cache"
    opened = ShardCache(root / "shards", limit_bytes=1 << 30, root=root)
    PreparedSource.open_remote(S3Origin(s3_client(s3), BUCKET, "indexed/abc"), root / "index", opened)
    opened.close()
    limit = disk_usage(root) + SHARD_TOKENS * 2 + 4 * 16384  # a shard and a few index blocks
    cache = ShardCache(root / "shards", limit_bytes=limit, root=root)
    remote = PreparedSource.open_remote(S3Origin(s3_client(s3), BUCKET, "indexed/abc"), root / "index", cache)
    for i in range(0, len(local), 97):
        assert remote.document(i).tobytes() == local.document(i).tobytes()
        assert disk_usage(root) <= limit
    assert remote.doc_offsets.verified_blocks < blocks  # some were given back
    assert cache.stats.evictions > 0


def test_a_warm_document_index_does_not_raise_the_smallest_limit(s3, tmp_path) -> None:  # noqa: F811
    """Blocks of a remote document index fetched by one run are given back when a request needs the room, so
    the next start asks no larger limit than a cold one did: they were counted as fixed, and a server
    restarted at the limit it had accepted refused to start once its index was warm."""
    docs = iter_documents([RAW / "abc"], fmt="text", split_regex=r"^X:", glob="**/*.abc")
    source = tmp_path / "abc"
    prepare_source(docs, source, load_tokenizer(), name="abc", shard_tokens=SHARD_TOKENS, progress=False)
    reblock(source, 2048)
    upload(s3, source, "indexed/abc")
    from mixer_service.sources.origins import S3Origin, s3_client

    root = tmp_path / "cache"

    def opened() -> tuple[ShardCache, PreparedSource]:
        cache = ShardCache(root / "shards", limit_bytes=1 << 30, root=root)
        origin = S3Origin(s3_client(s3), BUCKET, "indexed/abc")
        return cache, PreparedSource.open_remote(origin, root / "index", cache)

    def smallest_limit() -> int:
        cache, remote = opened()
        assert cache.budget is not None
        cache.budget.limit = 1
        with pytest.raises(InvalidInput) as refused:
            cache.check_limit([remote])
        cache.close()
        found = re.search(r"give at least --cache-limit (\d+)", str(refused.value))
        assert found, refused.value
        return int(found.group(1))

    cold, before = smallest_limit(), disk_usage(root)
    cache, remote = opened()
    for i in range(0, len(remote), 7):
        remote.document(i)
    cache.close()
    assert disk_usage(root) > before + 4 * 16384  # index blocks (and shards) now on disk
    assert smallest_limit() == cold
    stray = root / "shards" / "notes.bin.orig"  # nothing a cache writes, so nothing it may evict
    stray.write_bytes(b"x" * 65536)
    assert smallest_limit() == cold + stray.stat().st_blocks * 512


def test_a_partial_shard_is_removed_at_start_unless_its_writer_holds_it(web, tmp_path) -> None:
    """Found: a partial file named after a live process id (pid 1, or one reused after a container restart)
    was never removed and counted as unevictable forever. Only a writer's lock keeps one now."""
    import fcntl
    import os

    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    orphan = cache_dir / ".abc.bin.tmp-1-7"  # pid 1 is always alive
    orphan.write_bytes(b"x" * 65536)
    held = cache_dir / f".def.bin.tmp-{os.getpid()}-8"
    held.write_bytes(b"y" * 4096)
    with open(held, "rb") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)
        ShardCache(cache_dir, limit_bytes=1 << 30)
        assert not orphan.exists() and held.exists()


def test_a_cache_directory_deleted_while_serving_is_made_again(web, tmp_path) -> None:
    """Found: after ``rm -rf`` of the cache directory every fetch was a 500 and readiness stayed 200."""
    import shutil

    cache = ShardCache(tmp_path / "cache" / "shards", limit_bytes=1 << 30, root=tmp_path / "cache")
    source = PreparedSource.open(web, cache=cache)
    first = source.tokens.shard(0)[:100].copy()
    assert cache.problems() == []
    shutil.rmtree(tmp_path / "cache" / "shards")
    cache._entries.clear()  # as a fresh worker would: nothing cached in memory either
    assert (source.tokens.shard(1)[:1].size == 1) and (source.tokens.shard(0)[:100] == first).all()


@pytest.mark.parametrize("workers", [1, 2])
def test_the_minimum_limit_holds_while_another_worker_is_fetching(s3, web, tmp_path, workers) -> None:  # noqa: F811
    """The smallest limit a server names is accepted again however busy the cache is: a fetch in flight
    (another worker's, or another server's on the same directory) is not a fixed cost. It was counted as one,
    so the second worker of a server at the minimum refused to start while the first fetched (CI, stop 26:
    the server went down mid-test), and a restart beside a busy worker refused the flags it had accepted."""
    upload(s3, web, "bound/web")
    minimum, _ = minimum_limit(s3, tmp_path)
    shards = tmp_path / "cache" / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    in_flight = 3 * SHARD_TOKENS * 2
    writer = subprocess.Popen([sys.executable, "-c", FOREIGN_FETCH, str(shards / f".{'a' * 64}.bin.tmp-1-1"),
                               str(in_flight)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "holding\n"
        assert disk_usage(tmp_path / "cache") >= in_flight
        with serve(s3, tmp_path, minimum, workers=workers) as srv:
            body = {"job_id": "j", "config": {k: v for k, v in JOBS["window"].items() if k != "order"},
                    "schedule": SCHEDULE, "author": "t", "reason": "t"}
            assert httpx.post(f"{srv.url}/v1/jobs", json=body).status_code == 201
            for step in range(3):  # on fresh connections: either worker
                assert httpx.get(f"{srv.url}/v1/jobs/j/batches/{step}").status_code == 200
            assert "too small" not in srv.tail(100_000) and "died" not in srv.tail(100_000)
    finally:
        writer.kill()
        writer.wait()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_refused_start_leaves_the_cache_as_it_was(s3, web, tmp_path, where) -> None:  # noqa: F811
    """Found by a new user: a start refused for a limit too small (a typo: ``--cache-limit 20`` for ``20G``)
    first evicted down to that limit, emptying the cache another server was serving from."""
    upload(s3, web, "bound/web")

    def server(limit: int) -> Server:
        if where == "s3":
            return serve(s3, tmp_path, limit)
        return Server(web.parent, tmp_path / "state", extra_args=[
            "--cache-dir", str(tmp_path / "cache"), "--cache-limit", str(limit)])

    with server(1 << 30) as srv:
        body = {"job_id": "j", "config": {k: v for k, v in JOBS["window"].items() if k != "order"},
                "schedule": SCHEDULE, "author": "t", "reason": "t"}
        assert httpx.post(f"{srv.url}/v1/jobs", json=body).status_code == 201
        for step in range(3):
            assert httpx.get(f"{srv.url}/v1/jobs/j/batches/{step}").status_code == 200
        cached = {p.name for p in (tmp_path / "cache" / "shards").glob("*.bin")}
        assert cached
        for limit in (1, 20):
            with pytest.raises(RuntimeError, match="too small"):
                server(limit).start()
            # a subset: the running server's prefetch may add shards meanwhile (within 1 GiB, none go)
            assert cached <= {p.name for p in (tmp_path / "cache" / "shards").glob("*.bin")}
        assert httpx.get(f"{srv.url}/v1/jobs/j/batches/3").status_code == 200
