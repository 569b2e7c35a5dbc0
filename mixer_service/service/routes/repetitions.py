from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Query

from mixer_contract.values import COUNT, TRAINED_STEP, check_step
from mixer_service.service.auth import require_reader
from mixer_service.service.jobs import JobManager, JobRuntime
from mixer_service.service.problems import responses
from mixer_service.service.routes.deps import jobs
from mixer_service.service.routes.models import JobId, bounded

router = APIRouter(
    prefix="/v1/jobs/{job_id}/repetitions", tags=["repetitions"], dependencies=[Depends(require_reader)],
    responses=responses(404),
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
    job_id: JobId,
    source: str | None = None,
    step: bounded(TRAINED_STEP) | None = Query(default=None, description=STEP_HELP),  # type: ignore[valid-type]
    manager: JobManager = Depends(jobs),
) -> Counted:
    view = manager.view(job_id)
    runtime = view.runtime
    if source is None:
        repeat = [s.name for s in runtime.config.sources if s.role == "repeat"]
        source = repeat[0] if repeat else runtime.config.source_names[0]
    runtime.engine.source_index(source)
    if step is None:
        step = view.head.trained_step
    elif step != -1:
        check_step(step, runtime.config.total_steps)
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
def document_count(doc: bounded(COUNT), q: Counted = Depends(counted)) -> dict[str, Any]:  # type: ignore[valid-type]
    return q.head() | {"doc": doc, "count": q.runtime.engine.repetition_count(q.source, doc, q.step)}


@router.get("/at-least/{k}")
def documents_at_least(
    k: bounded(COUNT),  # type: ignore[valid-type]
    limit: int = Query(default=100, ge=1, le=10_000),
    offset: bounded(COUNT) = Query(default=0),  # type: ignore[valid-type]
    q: Counted = Depends(counted),
) -> dict[str, Any]:
    docs = np.flatnonzero(q.counts() >= k)
    return q.head() | {"k": k, "total": int(docs.size), "documents": docs[offset : offset + limit].tolist()}
