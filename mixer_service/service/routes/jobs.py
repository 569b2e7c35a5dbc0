from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from mixer_service.service.auth import require_operator, require_reader
from mixer_service.service.jobs import JobManager
from mixer_service.service.routes.deps import jobs

router = APIRouter(prefix="/v1", tags=["jobs"])


class CreateJob(BaseModel):
    job_id: str = Field(description="^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    config: dict[str, Any] = Field(description="sources (name, role, fingerprint?), seq_len, global_batch, "
                                   "seed, total_steps, allow_wrap")
    schedule: dict[str, Any] = Field(description="phases: [{start_step, weights, ramp}]")
    author: str = Field(default="", max_length=200)
    reason: str = Field(default="", max_length=2000)


class Progress(BaseModel):
    trained_step: int = Field(ge=-1)


@router.post("/jobs", status_code=201, dependencies=[Depends(require_operator)])
def create_job(body: CreateJob, manager: JobManager = Depends(jobs)) -> dict[str, Any]:
    runtime = manager.create(body.job_id, body.config, body.schedule, body.author, body.reason)
    return manager.describe(runtime)


@router.get("/jobs", dependencies=[Depends(require_reader)])
def list_jobs(manager: JobManager = Depends(jobs)) -> dict[str, Any]:
    return {"jobs": [manager.describe(manager.get(j)) for j in manager.store.list_jobs()]}


@router.get("/jobs/{job_id}", dependencies=[Depends(require_reader)])
def get_job(job_id: str, manager: JobManager = Depends(jobs)) -> dict[str, Any]:
    return manager.describe(manager.get(job_id))


@router.put("/jobs/{job_id}/progress", dependencies=[Depends(require_reader)])
def report_progress(job_id: str, body: Progress, manager: JobManager = Depends(jobs)) -> dict[str, Any]:
    """Trainers report the step they finished; a run resumed from an older checkpoint rewinds it."""
    manager.get(job_id)
    manager.store.set_trained_step(job_id, body.trained_step)
    return {"job_id": job_id, "trained_step": body.trained_step}


@router.get("/sources", dependencies=[Depends(require_reader)])
def list_sources(manager: JobManager = Depends(jobs)) -> dict[str, Any]:
    return {"sources": manager.sources.describe()}
