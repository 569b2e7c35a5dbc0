"""Real servers for tests: prepared sources from real corpora and uvicorn processes on loopback."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

from mixer_service.prepare.meta import META_FILE, OFFSETS_FILE, IndexBlocks, MetaFile
from mixer_service.prepare.readers import iter_documents
from mixer_service.prepare.tokenizer import load_tokenizer
from mixer_service.prepare.writer import prepare_source
from mixer_service.service.process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "data" / "raw"


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


def etag_of(url: str, job: str, headers: dict[str, str] | None = None) -> str:
    """The schedule's current ETag, as an operator reads it before a change (If-Match)."""
    import httpx

    return httpx.get(f"{url}/v1/jobs/{job}/schedule", headers=headers).headers["etag"]


Server = ServerProcess  # tests say Server(sources, state, port, redis_url=..., env=...)


def reblock(directory: Path, entries: int) -> None:
    """Re-describe a prepared source's index in blocks of ``entries`` (the fingerprint does not change)."""
    info = MetaFile.load(directory)
    blocks = IndexBlocks.of_file(directory / OFFSETS_FILE, entries)
    (directory / META_FILE).write_text(dataclasses.replace(info, doc_index=blocks).to_json())
