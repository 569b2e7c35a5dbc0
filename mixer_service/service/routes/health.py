"""Liveness, readiness and Prometheus metrics.

Liveness never touches the store or the thread pool (an ``async def`` that only returns), so a hung Redis
or a saturated pool cannot make Kubernetes restart a healthy replica. Readiness asks the store with its own
short timeout, off the event loop, and checks the sources on disk.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST

from mixer_contract.errors import MixerError, StoreUnavailable
from mixer_service.service.metrics import QUANTILES

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)

READY_TIMEOUT_S = 1.0


@router.get("/v1/health")
async def health() -> dict[str, Any]:
    """Liveness: the process and its event loop answer."""
    return {"status": "ok"}


@router.get("/v1/ready", responses={503: {"description": "store unreachable or a source missing/changed"}})
async def ready(request: Request, response: Response) -> dict[str, Any]:
    """Readiness: the state store answers within READY_TIMEOUT_S and every source is intact."""
    manager = request.app.state.jobs
    problems: list[str] = []
    try:
        await asyncio.wait_for(run_in_threadpool(manager.store.ping, READY_TIMEOUT_S), READY_TIMEOUT_S * 2)
    except StoreUnavailable as exc:
        problems.append(str(exc))
    except TimeoutError:
        problems.append(f"state store did not answer within {READY_TIMEOUT_S * 2:g} s")
    problems += await run_in_threadpool(manager.sources.problems)
    if problems:
        response.status_code = 503
        response.headers["Retry-After"] = "2"
        return {"status": "unavailable", "detail": "; ".join(problems), "problems": problems}
    return {"status": "ready", "sources": len(manager.sources.sources)}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus exposition; concurrent scrapes share one render, job gauges are reused for a second."""
    body = await request.app.state.metrics.exposition.get(lambda: _refresh_gauges(request.app))
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _refresh_gauges(app) -> None:
    """Job gauges are read from the shared store at scrape time, so every replica reports the same."""
    m, manager = app.state.metrics, app.state.jobs
    m.set_cache_stats(manager.sources.cache_stats())
    try:
        job_ids = manager.store.list_jobs()
    except StoreUnavailable:
        m.store_up.set(0)
        return
    m.store_up.set(1)
    for job_id in job_ids:
        try:
            view = manager.view(job_id)
        except StoreUnavailable:
            m.store_up.set(0)
            return
        except MixerError as exc:  # one broken job must not hide the others' metrics
            log.warning("metrics skipped a job", extra={"job": job_id, "error": str(exc)})
            continue
        runtime, head = view.runtime, view.head
        m.schedule_version.labels(job_id).set(runtime.version)
        m.trained_step.labels(job_id).set(head.trained_step)
        m.high_water.labels(job_id).set(head.served_high_water)
        for spec in runtime.config.sources:
            if spec.role == "repeat":
                counts = runtime.engine.repetition_counts(spec.name, head.trained_step)
                for q in QUANTILES:
                    m.repetition.labels(job_id, spec.name, q).set(float(np.quantile(counts, float(q))))
