from __future__ import annotations

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


def _resolve(
    manager: JobManager, job_id: str, source: str | None, step: int | None
) -> tuple[JobRuntime, str, int]:
    runtime = manager.get(job_id)
    if source is None:
        repeat = [s.name for s in runtime.config.sources if s.role == "repeat"]
        source = repeat[0] if repeat else runtime.config.source_names[0]
    runtime.engine.source_index(source)
    if step is None:
        step = manager.store.trained_step(job_id)
    elif step != -1:
        runtime.engine.check_step(step)
    return runtime, source, step


@router.get("")
def summary(
    job_id: str,
    source: str | None = None,
    step: int | None = Query(default=None, description=STEP_HELP),
    manager: JobManager = Depends(jobs),
) -> dict[str, Any]:
    runtime, source, step = _resolve(manager, job_id, source, step)
    counts = runtime.engine.repetition_counts(source, step)
    lay = runtime.engine.layouts[runtime.engine.source_index(source)]
    served = runtime.engine.sequences_served(step)[runtime.engine.source_index(source)]
    return {
        "job": job_id,
        "source": source,
        "step": step,
        "documents": int(counts.size),
        "min": int(counts.min()),
        "max": int(counts.max()),
        "mean": float(counts.mean()),
        "epoch": served // lay.num_chunks,
        "epoch_progress": (served % lay.num_chunks) / lay.num_chunks,
        "sequences_served": served,
    }


@router.get("/histogram")
def histogram(
    job_id: str,
    source: str | None = None,
    step: int | None = Query(default=None, description=STEP_HELP),
    manager: JobManager = Depends(jobs),
) -> dict[str, Any]:
    runtime, source, step = _resolve(manager, job_id, source, step)
    counts = np.bincount(runtime.engine.repetition_counts(source, step))
    return {
        "job": job_id,
        "source": source,
        "step": step,
        "histogram": {str(k): int(n) for k, n in enumerate(counts) if n},
    }


@router.get("/documents/{doc}")
def document_count(
    job_id: str,
    doc: int,
    source: str | None = None,
    step: int | None = Query(default=None, description=STEP_HELP),
    manager: JobManager = Depends(jobs),
) -> dict[str, Any]:
    runtime, source, step = _resolve(manager, job_id, source, step)
    return {
        "job": job_id,
        "source": source,
        "step": step,
        "doc": doc,
        "count": runtime.engine.repetition_count(source, doc, step),
    }


@router.get("/at-least/{k}")
def documents_at_least(
    job_id: str,
    k: int,
    source: str | None = None,
    step: int | None = Query(default=None, description=STEP_HELP),
    limit: int = Query(default=100, ge=1, le=10_000),
    offset: int = Query(default=0, ge=0),
    manager: JobManager = Depends(jobs),
) -> dict[str, Any]:
    if k < 0:
        raise InvalidInput(f"k: must be >= 0, got {k}")
    runtime, source, step = _resolve(manager, job_id, source, step)
    docs = np.flatnonzero(runtime.engine.repetition_counts(source, step) >= k)
    return {
        "job": job_id,
        "source": source,
        "step": step,
        "k": k,
        "total": int(docs.size),
        "documents": docs[offset : offset + limit].tolist(),
    }
