"""Reusable pieces of an end-to-end run: corpora -> prepared sources -> `mixer serve` -> a mixture job.

Shared by the demo (`python -m mixer_demo`) and the SPT experiment (`experiments.spt`). The corpora are the
ones `scripts/fetch_corpora.sh` puts in data/raw/: ABC folk tunes (the domain) and State of the Union
addresses (web). Everything here is deterministic: the same documents always give the same splits,
sources and jobs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client import MixerClient
from mixer_contract.schedule import Schedule
from mixer_service.prepare.readers import iter_documents
from mixer_service.prepare.tokenizer import TextTokenizer
from mixer_service.prepare.writer import prepare_source
from mixer_service.service.process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "data" / "raw"
HOLDOUT_EVERY = 20  # every 20th document is held out for validation
WEB_HOLDOUT_EVERY = 10  # the web corpus has few, long documents: hold out every 10th


def split_docs(docs: Iterable[str], every: int = HOLDOUT_EVERY) -> tuple[list[str], list[str]]:
    """(train, val): every `every`-th document goes to validation, the rest to training."""
    train_docs: list[str] = []
    val_docs: list[str] = []
    for i, doc in enumerate(docs):
        (val_docs if i % every == every - 1 else train_docs).append(doc)
    return train_docs, val_docs


def to_sequences(docs: list[str], tokenizer: TextTokenizer, length: int, limit: int) -> torch.Tensor:
    """Held-out text as [n, length] token rows (each doc followed by EOS), for evaluation."""
    ids = np.concatenate([np.append(np.asarray(t, dtype=np.int64), tokenizer.eos_id)
                          for t in tokenizer.encode_batch(docs)])
    n = min(limit, len(ids) // length)
    return torch.from_numpy(ids[: n * length].reshape(n, length))


def domain_docs(raw: Path = RAW) -> tuple[list[str], list[str]]:
    """ABC tunes (one document per `X:` header), split into (train, val)."""
    return split_docs(iter_documents([raw / "abc"], fmt="text", split_regex=r"^X:", glob="**/*.abc"))


def web_docs(raw: Path = RAW) -> tuple[list[str], list[str]]:
    """State of the Union addresses (one document per file), split into (train, val)."""
    return split_docs(iter_documents([raw / "sotu"], fmt="text", glob="*.txt"), every=WEB_HOLDOUT_EVERY)


def prepare_sources(sources: Path, tokenizer: TextTokenizer, named_docs: dict[str, list[str]]) -> None:
    """Prepare each named document list as a source under `sources/` unless it is there already."""
    for name, docs in named_docs.items():
        if not (sources / name / "meta.json").is_file():
            prepare_source(docs, sources / name, tokenizer, name=name)


@contextmanager
def serve(sources: Path, state: Path) -> Iterator[str]:
    """A local `mixer serve` (embedded state) while the block runs: yields its url, always stops it."""
    with ServerProcess(sources, state) as server:
        yield server.url


def job_body(job_id: str, weights: dict[str, float], roles: dict[str, str], seq_len: int, batch: int,
             total_steps: int, *, seed: int = 0, author: str = "demo", reason: str = "README demo",
             allow_wrap: bool = False) -> dict[str, Any]:
    """The POST /v1/jobs document for a constant mixture `weights` from step 0 (sources in `roles` order)."""
    config: dict[str, Any] = {"sources": [{"name": n, "role": r} for n, r in roles.items()],
                              "seq_len": seq_len, "global_batch": batch, "seed": seed,
                              "total_steps": total_steps}
    if allow_wrap:
        config["allow_wrap"] = True
    return {"job_id": job_id, "author": author, "reason": reason, "config": config,
            "schedule": Schedule.constant(weights)}


def create_job(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST a job_body(...) document; raises client.ClientRequestError (with the problem) on a refusal."""
    with MixerClient(url) as client:
        return client.create_job(body)
