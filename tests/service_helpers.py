"""Real servers for tests: prepared sources from real corpora and uvicorn processes on loopback."""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from pathlib import Path

import httpx

from mixer_contract import wire
from mixer_contract.job import JobConfig
from mixer_contract.schedule import Schedule
from mixer_service.engine import MixingEngine
from mixer_service.prepare.readers import iter_documents
from mixer_service.prepare.tokenizer import load_tokenizer
from mixer_service.prepare.writer import prepare_source
from mixer_service.service.process import NO_PERSISTENCE, ServerProcess, start_redis
from mixer_service.service.process import RedisProcess as RedisServer
from mixer_service.sources.prepared import PreparedSource
from mixer_service.sources.source_format import META_FILE, OFFSETS_FILE, IndexBlocks, MetaFile

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "data" / "raw"


def music21_abc_books() -> list[Path]:
    """The ABC tune books of music21's corpus (music21 is a dev dependency), in sorted order; the test is
    skipped where there are none."""
    import pytest

    music21 = pytest.importorskip("music21", reason="music21 (dev dependency) ships the ABC corpus")
    files = sorted((Path(music21.__file__).parent / "corpus").glob("**/*.abc"), key=str)
    if not files:
        pytest.skip("music21 has no ABC corpus files")
    return files


def prepare_real_sources(out: Path, domain_docs: int = 3000, web_docs: int = 60) -> Path:
    """ABC folk tunes (domain) and State of the Union addresses (web), byte-level tokens."""
    for needed in (RAW / "abc", RAW / "sotu"):
        if not needed.is_dir():
            raise RuntimeError(f"{needed} is missing: run scripts/fetch_corpora.sh first")
    tok = load_tokenizer()
    abc = itertools.islice(
        iter_documents([RAW / "abc"], fmt="text", split_regex=r"^X:", glob="**/*.abc"), domain_docs
    )
    prepare_source(abc, out / "abc", tok, name="abc", progress=False)
    sotu = itertools.islice(iter_documents([RAW / "sotu"], fmt="text", glob="*.txt"), web_docs)
    prepare_source(sotu, out / "sotu", tok, name="sotu", progress=False)
    return out


JOB = {
    "sources": [{"name": "abc", "role": "repeat"}, {"name": "sotu", "role": "once"}],
    "seq_len": 64,
    "global_batch": 8,
    "seed": 11,
    "total_steps": 2000,
}
SCHEDULE = {"phases": [{"start_step": 0, "weights": {"abc": 0.05, "sotu": 0.95}}]}

# Roles on: a server started with env=TOKENS wants OPERATOR to write and READER (or OPERATOR) to read.
OPERATOR_TOKEN, READER_TOKEN = "op-secret", "rd-secret"
TOKENS = {"MIXER_OPERATOR_TOKEN": OPERATOR_TOKEN, "MIXER_READER_TOKEN": READER_TOKEN}
OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
READER = {"Authorization": f"Bearer {READER_TOKEN}"}


def new_job(url: str, schedule: dict = SCHEDULE, *, config: dict = JOB, token: str | None = None,
            prefix: str = "job", author: str = "test", reason: str = "t", timeout: float = 5.0,
            **overrides) -> str:
    """Create a job with a fresh id (``config`` with ``overrides``) and return the id; 201 is asserted."""
    job_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {token}"} if token else None
    body = {"job_id": job_id, "config": config | overrides, "schedule": schedule, "author": author,
            "reason": reason}
    r = httpx.post(f"{url}/v1/jobs", json=body, headers=headers, timeout=timeout)
    assert r.status_code == 201, r.text
    return job_id


def fetch(url: str, job: str, step: int, headers: dict[str, str] | None = None, **params) -> wire.WireBatch:
    """A served batch, decoded; a 200 in the wire format is asserted."""
    r = httpx.get(f"{url}/v1/jobs/{job}/batches/{step}", params=params, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == wire.MEDIA_TYPE
    return wire.decode(r.content)


def problem(response: httpx.Response, status: int) -> dict:
    """The problem+json body of a refusal; its status and content type are asserted."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    return response.json()


def engine_for(sources_dir: Path, config: JobConfig, schedule: dict = SCHEDULE) -> MixingEngine:
    """The in-process engine of a job over the prepared sources in ``sources_dir``."""
    sources = {s.name: PreparedSource.open(sources_dir / s.name) for s in config.sources}
    return MixingEngine.create(config, sources, [(0, Schedule.parse(schedule, config.source_names))])


def local_engine(sources_dir: Path, **overrides) -> MixingEngine:
    """The engine a server runs for ``new_job(url, **overrides)`` (the config as it stores a new job)."""
    return engine_for(sources_dir, JobConfig.parse_new(JOB | overrides))


def etag_of(url: str, job: str, headers: dict[str, str] | None = None) -> str:
    """The schedule's current ETag, as an operator reads it before a change (If-Match)."""
    return httpx.get(f"{url}/v1/jobs/{job}/schedule", headers=headers).headers["etag"]


Server = ServerProcess  # tests say Server(sources, state, port, redis_url=..., env=...)


def reblock(directory: Path, entries: int) -> None:
    """Re-describe a prepared source's index in blocks of ``entries`` (the fingerprint does not change)."""
    info = MetaFile.load(directory)
    blocks = IndexBlocks.of_file(directory / OFFSETS_FILE, entries)
    (directory / META_FILE).write_text(dataclasses.replace(info, doc_index=blocks).to_json())


def start_redis_server(directory: Path, port: int | None = None,
                       persistence: tuple[str, ...] = NO_PERSISTENCE,
                       highest_port: int = 65535) -> RedisServer:
    """``start_redis`` for tests: a missing or failing redis-server fails the test with its log."""
    import pytest

    try:
        return start_redis(directory, port, persistence, highest_port)
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


def worker_pids(server: Server) -> set[int]:
    """The server's uvicorn workers: the children of its process that multiprocessing spawned."""
    assert server.proc is not None
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == server.proc.pid and b"spawn_main" in cmdline:
            found.add(int(stat.parent.name))
    return found


# `python -c FOREIGN_FETCH PATH BYTES`: another process fetching a shard into PATH (a partial file it holds
# flocked, BYTES allocated) that never finishes; prints "holding" once it does.
FOREIGN_FETCH = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)  # as a worker holds the file it fetches into
os.posix_fallocate(fd, 0, int(sys.argv[2]))
print("holding", flush=True)
time.sleep(600)
"""
