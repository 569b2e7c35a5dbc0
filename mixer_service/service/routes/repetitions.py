from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Query

from mixer_service.errors import InvalidInput
from mixer_service.service.auth import require_reader
from mixer_service.service.jobs import JobManager, JobRuntime
from mixer_service.service.routes.deps import jobs

router = APIRouter(
    prefix="/v1/jobs/{job_id}/repetitions", tags=["repetitions"], dependencies=[Depends(require_reader)]
)

STEP_HELP = "counts after this step; default: the job's trained step (-1: nothing trained yet)"


@dataclass(frozen=True)
class Counted:
    """A repetition query resolved once: the job's engine, the source (default: the first repeat
    source) and the step (default: the job's trained step)."""

    job_id: str
    runtime: JobRuntime
    source: str
    step: int

    def counts(self) -> np.ndarray:
        return self.runtime.engine.repetition_counts(self.source, self.step)

    def head(self) -> dict[str, Any]:
        return {"job": self.job_id, "source": self.source, "step": self.step}


def counted(
    job_id: str,
    source: str | None = None,
    step: int | None = Query(default=None, description=STEP_HELP),
    manager: JobManager = Depends(jobs),
) -> Counted:
    runtime = manager.get(job_id)
    if source is None:
        repeat = [s.name for s in runtime.config.sources if s.role == "repeat"]
        source = repeat[0] if repeat else runtime.config.source_names[0]
    runtime.engine.source_index(source)
    if step is None:
        step = manager.store.trained_step(job_id)
    elif step != -1:
        runtime.engine.check_step(step)
    return Counted(job_id, runtime, source, step)


@router.get("")
def summary(q: Counted = Depends(counted)) -> dict[str, Any]:
    counts = q.counts()
    k = q.runtime.engine.source_index(q.source)
    chunks = q.runtime.engine.layouts[k].num_chunks
    served = q.runtime.engine.sequences_served(q.step)[k]
    return q.head() | {
        "documents": int(counts.size),
        "min": int(counts.min()),
        "max": int(counts.max()),
        "mean": float(counts.mean()),
        "epoch": served // chunks,
        "epoch_progress": (served % chunks) / chunks,
        "sequences_served": served,
    }


@router.get("/histogram")
def histogram(q: Counted = Depends(counted)) -> dict[str, Any]:
    counts = np.bincount(q.counts())
    return q.head() | {"histogram": {str(k): int(n) for k, n in enumerate(counts) if n}}


@router.get("/documents/{doc}")
def document_count(doc: int, q: Counted = Depends(counted)) -> dict[str, Any]:
    return q.head() | {"doc": doc, "count": q.runtime.engine.repetition_count(q.source, doc, q.step)}


@router.get("/at-least/{k}")
def documents_at_least(
    k: int,
    limit: int = Query(default=100, ge=1, le=10_000),
    offset: int = Query(default=0, ge=0),
    q: Counted = Depends(counted),
) -> dict[str, Any]:
    if k < 0:
        raise InvalidInput(f"k: must be >= 0, got {k}")
    docs = np.flatnonzero(q.counts() >= k)
    return q.head() | {"k": k, "total": int(docs.size), "documents": docs[offset : offset + limit].tolist()}
