from __future__ import annotations

import logging
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mixer_service.errors import MixerError, StoreUnavailable
from mixer_service.service.metrics import QUANTILES

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)


@router.get("/v1/health")
def health() -> dict[str, Any]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/v1/ready")
def ready(request: Request, response: Response) -> dict[str, Any]:
    """Readiness: the state store answers and sources are loaded."""
    try:
        request.app.state.jobs.store.ping()
    except StoreUnavailable as exc:
        response.status_code = 503
        response.headers["Retry-After"] = "2"
        return {"status": "unavailable", "detail": str(exc)}
    return {"status": "ready", "sources": len(request.app.state.jobs.sources.sources)}


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    _refresh_gauges(request.app)
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _refresh_gauges(app) -> None:
    """Job gauges are read from the shared store at scrape time, so every replica reports the same."""
    m, manager = app.state.metrics, app.state.jobs
    try:
        manager.store.ping()
        job_ids = manager.store.list_jobs()
    except StoreUnavailable:
        m.store_up.set(0)
        return
    m.store_up.set(1)
    for job_id in job_ids:
        try:
            runtime = manager.get(job_id)
            trained = manager.store.trained_step(job_id)
            m.schedule_version.labels(job_id).set(runtime.version)
            m.trained_step.labels(job_id).set(trained)
            m.high_water.labels(job_id).set(manager.store.served_high_water(job_id))
            for spec in runtime.config.sources:
                if spec.role == "repeat":
                    counts = runtime.engine.repetition_counts(spec.name, trained)
                    for q in QUANTILES:
                        m.repetition.labels(job_id, spec.name, q).set(float(np.quantile(counts, float(q))))
        except MixerError as exc:  # one broken job must not hide the others' metrics
            log.warning("metrics skipped a job", extra={"job": job_id, "error": str(exc)})
