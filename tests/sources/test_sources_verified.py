"""Verified data through real ``mixer serve`` processes: a wrong byte in any source file (shard cache,
compressed shard, document index, meta.json) gives a 503 naming the file, never a 200 with wrong tokens.

Each test works on its own copy of the session's prepared sources, so corrupting it harms no other test.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_helpers import JOB, SCHEDULE, Server

from mixer_contract import wire
from mixer_contract.errors import MixerError
from mixer_contract.job import JobConfig
from mixer_contract.schedule import Schedule
from mixer_service.engine import MixingEngine
from mixer_service.prepare.tokenizer import ByteTokenizer
from mixer_service.prepare.writer import prepare_source
from mixer_service.service.source_registry import SOURCE_RECHECK_S
from mixer_service.sources import PreparedSource

STEPS = range(6)


@pytest.fixture
def root(sources_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "sources"
    shutil.copytree(sources_dir, out, ignore=shutil.ignore_patterns(".cache"))
    return out


def expected(root: Path, cache: Path) -> list[bytes]:
    """Token bytes of STEPS from the intact files, computed in this process before anything is corrupted."""
    config = JobConfig.parse_new(JOB)  # as the server stores a new job
    srcs = {n: PreparedSource.open(root / n, cache_dir=cache) for n in config.source_names}
    engine = MixingEngine.create(config, srcs, [(0, Schedule.parse(SCHEDULE, config.source_names))])
    return [engine.batch(step).tokens.tobytes() for step in STEPS]


def create_job(url: str, job_id: str = "j") -> httpx.Response:
    body = {"job_id": job_id, "config": JOB, "schedule": SCHEDULE, "author": "t", "reason": "t"}
    return httpx.post(f"{url}/v1/jobs", json=body)


def batch(url: str, step: int, job_id: str = "j") -> httpx.Response:
    return httpx.get(f"{url}/v1/jobs/{job_id}/batches/{step}")


def served(url: str) -> list[bytes]:
    out = []
    for step in STEPS:
        r = batch(url, step)
        assert r.status_code == 200, r.text
        out.append(wire.decode(r.content).tokens.tobytes())
    return out


def assert_unavailable(r: httpx.Response, *names: str) -> None:
    """503 naming every one of ``names``: problem+json, except /v1/ready's own status document."""
    assert r.status_code == 503, r.text
    if not r.url.path.endswith("/ready"):
        assert r.headers["content-type"].startswith("application/problem+json")
    for name in names:
        assert name in r.text, r.text


def refused_within_recheck(url: str, step: int, pinned: bytes, *names: str) -> None:
    """``step`` is refused (503 naming ``names``) within ``SOURCE_RECHECK_S`` of a change to a source's
    files; until then every answer is the bytes the job pinned, never others."""
    deadline = time.monotonic() + SOURCE_RECHECK_S + 5
    while (r := batch(url, step)).status_code == 200:
        assert wire.decode(r.content).tokens.tobytes() == pinned, "a wrong byte served inside the window"
        assert time.monotonic() < deadline, f"step {step} still served long after the change"
        time.sleep(0.05)
    assert_unavailable(r, *names)


def flip_every(path: Path, stride: int = 97) -> None:
    """XOR one bit every ``stride`` bytes: every served row of 64 uint16 tokens crosses a flipped byte."""
    data = bytearray(path.read_bytes())
    for i in range(0, len(data), stride):
        data[i] ^= 0x01
    path.write_bytes(bytes(data))


def server(root: Path, state: Path, *extra: str) -> Server:
    """Not started yet: ``with server(...) as srv`` starts it and stops it."""
    srv = Server(root, state)
    srv.args += list(extra)
    return srv


@contextlib.contextmanager
def launch(root: Path, state: Path, *extra: str) -> Iterator[Server]:
    """A server that is expected never to become ready: started without waiting for /v1/ready."""
    srv = Server(root, state)
    srv.args += list(extra)
    srv.proc = subprocess.Popen(srv.args, env=srv.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield srv
    finally:
        srv.stop()


def first_answer(url: str, timeout: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return httpx.get(url, timeout=1)
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"no answer from {url} in {timeout:g} s")


def test_flipped_shard_cache_is_rebuilt_not_served(root: Path, tmp_path: Path) -> None:
    want = expected(root, tmp_path / "expect-cache")
    with server(root, tmp_path / "state") as srv:
        assert create_job(srv.url).status_code == 201
        assert served(srv.url) == want
    cached = sorted((root / ".cache" / "shards").glob("*.bin"))
    assert len(cached) == 2  # one shard per source, decompressed on first use
    for path in cached:
        flip_every(path)  # a bad disk or a stray write while no server runs
    with server(root, tmp_path / "state") as srv:
        assert served(srv.url) == want  # re-hashed before first use, rebuilt from the verified shard
        for path in cached:
            flip_every(path)  # ... and while it runs, after the first use
        assert served(srv.url) == want
        assert httpx.get(f"{srv.url}/v1/ready").status_code == 200


def test_corrupt_shard_answers_503_naming_it(root: Path, tmp_path: Path) -> None:
    with server(root, tmp_path / "state") as srv:
        assert create_job(srv.url).status_code == 201
        flip_every(root / "sotu" / "tokens-00000.zst", stride=1000)  # not yet cached: read on first use
        assert_unavailable(batch(srv.url, 0), "sotu", "tokens-00000.zst", "checksum mismatch")
        assert_unavailable(httpx.get(f"{srv.url}/v1/ready"), "sotu", "tokens-00000.zst")
        assert_unavailable(batch(srv.url, 1), "sotu")


def test_verify_full_refuses_a_corrupt_shard_before_ready(root: Path, tmp_path: Path) -> None:
    flip_every(root / "sotu" / "tokens-00000.zst", stride=5000)
    with launch(root, tmp_path / "state", "--verify", "full") as srv:
        ready = first_answer(f"{srv.url}/v1/ready")
        assert_unavailable(ready, "sotu", "tokens-00000.zst", "checksum mismatch")
        assert_unavailable(create_job(srv.url), "sotu")


def test_edited_index_of_the_same_shape_is_refused(root: Path, tmp_path: Path) -> None:
    index = root / "abc" / "doc_offsets.npy"
    offsets = np.load(index)
    offsets[10] += 3  # same shape, same ends: the old check passed it and served shifted provenance
    np.save(index, offsets)
    with launch(root, tmp_path / "state") as srv:
        assert_unavailable(first_answer(f"{srv.url}/v1/ready"), "abc", "doc_offsets.npy")
        assert_unavailable(create_job(srv.url), "abc")


def test_index_edited_in_place_under_a_running_server(root: Path, tmp_path: Path) -> None:
    with server(root, tmp_path / "state") as srv:
        assert create_job(srv.url).status_code == 201
        pinned = served(srv.url)
        mapped = np.load(root / "abc" / "doc_offsets.npy", mmap_mode="r+")
        mapped[10] += 3  # the server maps this very file
        mapped.flush()
        del mapped
        assert_unavailable(httpx.get(f"{srv.url}/v1/ready"), "doc_offsets.npy")
        refused_within_recheck(srv.url, STEPS[1], pinned[1], "abc", "doc_offsets.npy")


def test_meta_removed_under_a_running_server(root: Path, tmp_path: Path) -> None:
    with server(root, tmp_path / "state") as srv:
        assert create_job(srv.url).status_code == 201
        pinned = served(srv.url)
        (root / "sotu" / "meta.json").unlink()
        assert_unavailable(httpx.get(f"{srv.url}/v1/ready"), "sotu", "meta.json")
        refused_within_recheck(srv.url, STEPS[1], pinned[1], "sotu", "meta.json")
        assert batch(srv.url, STEPS[0]).status_code == 503  # not even a step served before the change


def test_a_shard_put_back_is_accepted_again(tmp_path: Path) -> None:
    """Readiness reports a changed shard until it holds the expected bytes again, then recovers."""
    docs = [f"tune {i} " * 200 for i in range(300)]
    prepare_source(docs, tmp_path / "src", ByteTokenizer(), shard_tokens=20_000, progress=False)
    src = PreparedSource.open(tmp_path / "src")
    shard = sorted((tmp_path / "src").glob("tokens-*.zst"))[1]
    original = shard.read_bytes()
    shard.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    assert any(shard.name in p for p in src.problems())
    with pytest.raises(MixerError, match=shard.name):
        src.tokens[int(src.shard_offsets[1]) : int(src.shard_offsets[2])]
    shard.write_bytes(original)  # restored from a backup: new mtime, same bytes
    assert src.tokens[int(src.shard_offsets[1]) : int(src.shard_offsets[2])].size > 0
    assert src.problems() == []
