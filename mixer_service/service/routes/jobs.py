from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from mixer_service.service.auth import require_operator, require_reader
from mixer_service.service.jobs import JobManager
from mixer_service.service.problems import responses
from mixer_service.service.routes.deps import jobs
from mixer_service.service.routes.models import (
    CreateJob,
    JobId,
    Progress,
)

router = APIRouter(prefix="/v1", tags=["jobs"])


@router.post("/jobs", status_code=201, dependencies=[Depends(require_operator)],
             responses=responses(400, 403, 404, 409, 413))
def create_job(body: CreateJob, manager: JobManager = Depends(jobs)) -> dict[str, Any]:
    view = manager.create(body.job_id, body.config.to_doc(), body.schedule.to_doc(), body.author,
                          body.reason)
    return manager.describe(view)


@router.get("/jobs", dependencies=[Depends(require_reader)], responses=responses())
def list_jobs(manager: JobManager = Depends(jobs)) -> dict[str, Any]:
    """Every job; one this replica cannot serve is listed with an ``error`` instead of failing the list."""
    return {"jobs": manager.describe_all()}


@router.get("/jobs/{job_id}", dependencies=[Depends(require_reader)], responses=responses(404))
def get_job(job_id: JobId, manager: JobManager = Depends(jobs)) -> dict[str, Any]:
    return manager.describe(manager.view(job_id))


@router.put("/jobs/{job_id}/progress", dependencies=[Depends(require_reader)],
            responses=responses(400, 404, 413))
def report_progress(job_id: JobId, body: Progress, manager: JobManager = Depends(jobs)) -> dict[str, Any]:
    """Trainers report the step they finished; a run resumed from an older checkpoint rewinds it."""
    manager.report_progress(job_id, body.trained_step)
    return {"job_id": job_id, "trained_step": body.trained_step}


@router.get("/sources", dependencies=[Depends(require_reader)], responses=responses())
def list_sources(manager: JobManager = Depends(jobs)) -> dict[str, Any]:
    return {"sources": manager.sources.describe()}
