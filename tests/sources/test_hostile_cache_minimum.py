"""Hostile review of the cache-limit minimum (commits 44b3b1d, 1909d2a): odd entries in the shard directory
and a fetch that never ends, against a real ``mixer serve`` at the smallest limit it accepts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from service_helpers import FOREIGN_FETCH, RAW, Server

from mixer_service.prepare.readers import iter_documents
from mixer_service.prepare.tokenizer import load_tokenizer
from mixer_service.prepare.writer import prepare_source

SHARD_TOKENS = 1 << 17
SHARD_BYTES = SHARD_TOKENS * 2
WORLD = 4
JOB = {"sources": [{"name": "web", "role": "repeat"}], "seq_len": 512, "global_batch": 32, "seed": 3,
       "total_steps": 1000}
SCHEDULE = {"phases": [{"start_step": 0, "weights": {"web": 1}}]}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """Every State of the Union address in shards of 2^17 tokens (dozens of shards), as a local source."""
    root = tmp_path_factory.mktemp("hostile") / "sources"
    docs = iter_documents([RAW / "sotu"], fmt="text", glob="*.txt")
    prepare_source(docs, root / "web", load_tokenizer(), name="web", shard_tokens=SHARD_TOKENS,
                   progress=False)
    return root


def serve(sources: Path, tmp_path: Path, limit: int, workers: int = 1) -> Server:
    return Server(sources, tmp_path / "state", workers=workers, extra_args=[
        "--cache-dir", str(tmp_path / "cache"), "--cache-limit", str(limit), "--memory-cache", "0"])


def minimum_limit(sources: Path, tmp_path: Path) -> int:
    with pytest.raises(RuntimeError) as refused:
        serve(sources, tmp_path, 1, workers=2).start()
    found = re.search(r"give at least --cache-limit (\d+)", str(refused.value))
    assert found, refused.value
    return int(found.group(1))


def failures(url: str, order: dict | None, steps: int) -> list[str]:
    config = JOB | ({"order": order} if order else {})
    body = {"job_id": "j", "config": config, "schedule": SCHEDULE, "author": "t", "reason": "t"}
    assert httpx.post(f"{url}/v1/jobs", json=body).status_code == 201
    wrong = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for step in range(steps):
            for rank in range(WORLD):
                r = client.get(f"/v1/jobs/j/batches/{step}", params={"rank": rank, "world": WORLD})
                if r.status_code != 200:
                    wrong.append(f"step {step} rank {rank}: {r.status_code} {r.text[:200]}")
    return wrong


def test_a_directory_named_like_a_shard_does_not_break_eviction(sources, tmp_path) -> None:
    """Found: a directory in the shard directory named like a shard (``KEY.bin``: a restore, an operator's
    ``mkdir``, a failing disk's lost+found) was adopted as a cached shard and, being the oldest, chosen by
    the first eviction: ``unlink`` raised IsADirectoryError. A start that had to fit the directory into the
    limit died with that traceback instead of naming the smallest limit, and a server that did start failed
    every request that needed room (500) once the cache was full, for as long as it ran."""
    odd = tmp_path / "cache" / "shards" / f"{'c' * 64}.bin"
    odd.mkdir(parents=True)
    os.utime(odd, (1, 1))  # older than any shard: the first chosen
    with serve(sources, tmp_path, minimum_limit(sources, tmp_path)) as srv:
        wrong = failures(srv.url, {"kind": "global"}, 12)  # the global order reads the whole source
        log = srv.tail(100_000)
    assert not wrong, wrong[:3]
    assert "IsADirectoryError" not in log




def test_a_fetch_that_never_ends_is_not_left_out_of_the_minimum(sources, tmp_path) -> None:
    """Held: a partial shard held by a writer that never finishes (another server on the same directory,
    SIGSTOPped or hung on its origin) counts as evictable in the minimum since 44b3b1d; a server at the limit
    named while 4 shards' worth of it sits there still serves 40 steps of the default order on 4 ranks."""
    shards = tmp_path / "cache" / "shards"
    shards.mkdir(parents=True)
    writer = subprocess.Popen([sys.executable, "-c", FOREIGN_FETCH, str(shards / f".{'a' * 64}.bin.tmp-1-1"),
                               str(4 * SHARD_BYTES)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "holding\n"
        limit = minimum_limit(sources, tmp_path)
        with serve(sources, tmp_path, limit) as srv:
            wrong = failures(srv.url, None, 40)  # the default (sliding) order the minimum is for
        assert not wrong, f"{len(wrong)} failed at the accepted limit {limit}: {wrong[:2]}"
    finally:
        writer.kill()
        writer.wait()


BUSY_SERVER = """
import sys, traceback
from pathlib import Path
from mixer_service.sources import PreparedSource, ShardCache
root, source, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cache = ShardCache(root / "shards", limit_bytes=2 << 20, root=root, memory_bytes=0)  # thrashes: fetch, evict
src = PreparedSource.open(source, cache=cache)
print("ready", flush=True)
failed = 0
for _ in range(rounds):
    for i in range(len(src.shards)):
        try:
            src.tokens.shard(i)[:1]
        except Exception:
            failed += 1
            traceback.print_exc()
print("failed", failed, flush=True)
"""


def _named_minimum(root: Path, source: Path) -> int:
    """What a server starting on ``root`` (the parent's check, ``SourceRegistry.load``) names as the
    minimum."""
    from mixer_contract.errors import InvalidInput
    from mixer_service.sources import PreparedSource, ShardCache

    cache = ShardCache(root / "shards", limit_bytes=1 << 40, root=root, memory_bytes=0)
    try:
        src = PreparedSource.open(source, cache=cache)
        assert cache.budget is not None
        cache.budget.limit = 1
        with pytest.raises(InvalidInput) as refused:
            cache.check_limit([src])
    finally:
        cache.close()
    found = re.search(r"give at least --cache-limit (\d+)", str(refused.value))
    assert found, refused.value
    return int(found.group(1))


def test_the_minimum_is_the_same_while_another_server_fetches_and_evicts(sources, tmp_path) -> None:
    """Found: ``DiskBudget.fixed`` walks the root (``du``) and then lists the tenants' files without the
    budget's lock, which every allocation and eviction takes: a shard allocated or evicted by another server
    on the same directory between the two counts once and not the other, so the minimum a start names moved
    by a shard (refusing a restart at the limit it had accepted, the case 44b3b1d set out to fix) or fell
    below the true one (12 of 100 starts here named
    4718592, 4726784 or 4988928 bytes)."""
    root = tmp_path / "cache"
    quiet = _named_minimum(root, sources / "web")
    busy = subprocess.Popen([sys.executable, "-c", BUSY_SERVER, str(root), str(sources / "web"), "1000000"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert busy.stdout is not None and busy.stdout.readline() == "ready\n"
        named = [_named_minimum(root, sources / "web") for _ in range(400)]
    finally:
        busy.kill()
        busy.wait()
    assert set(named) == {quiet}, f"quiet: {quiet}; while another server fetched: {sorted(set(named))}"


def test_a_starting_cache_does_not_remove_a_fetch_in_flight(sources, tmp_path) -> None:
    """Found: a fetch's partial file was unlocked twice: between its creation (``DiskBudget.create``) and the
    writer's ``flock``, and between the close of the written file (which drops the ``flock``) and its rename.
    A shard cache opening the directory then (a worker uvicorn restarts, a second server, the parent's limit
    check) took it for a dead writer's and unlinked it: the fetch failed at its rename (FileNotFoundError, a
    request's 500), after writing bytes ``du`` no longer saw."""
    root = tmp_path / "cache"
    busy = subprocess.Popen([sys.executable, "-c", BUSY_SERVER, str(root), str(sources / "web"), "12"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    from mixer_service.sources import ShardCache

    assert busy.stdout is not None and busy.stdout.readline() == "ready\n"
    try:
        while busy.poll() is None:
            ShardCache(root / "shards", limit_bytes=1 << 40, root=root, memory_bytes=0).close()
            time.sleep(0.002)  # leave the busy server room to fetch
        out, err = busy.communicate()
    finally:
        busy.kill()
        busy.wait()
    assert "failed 0\n" in out, f"{out.strip()}: {err[-600:]}"
