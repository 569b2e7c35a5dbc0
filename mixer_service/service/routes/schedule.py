from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Header, Response
from pydantic import BaseModel, Field

from mixer_service.service.auth import require_operator, require_reader
from mixer_service.service.jobs import JobManager
from mixer_service.service.problems import ProblemError
from mixer_service.service.routes.deps import jobs
from mixer_service.store import ScheduleVersion

router = APIRouter(prefix="/v1/jobs/{job_id}/schedule", tags=["schedule"])


class ScheduleChange(BaseModel):
    schedule: dict[str, Any] = Field(description="phases: [{start_step, weights, ramp}]")
    requested_step: int = Field(default=0, ge=0, description="takes effect at max(this, first step not yet "
                                "served or committed)")
    author: str = Field(min_length=1, max_length=200)
    reason: str = Field(min_length=1, max_length=2000)


def etag(version: int) -> str:
    return f'"v{version}"'


def _parse_if_match(value: str | None) -> int:
    if value is None:
        raise ProblemError(428, "Precondition required", 'schedule changes need If-Match: "v<version>" '
                           "from GET .../schedule")
    raw = value.strip().removeprefix("W/").strip('"')
    if not raw.startswith("v") or not raw[1:].isdigit():
        raise ProblemError(412, "Precondition failed", f'If-Match must look like "v3", got {value!r}')
    return int(raw[1:])


@router.get("", dependencies=[Depends(require_reader)])
def get_schedule(job_id: str, response: Response, manager: JobManager = Depends(jobs)) -> dict[str, Any]:
    current = manager.get(job_id).versions[-1]
    response.headers["ETag"] = etag(current.version)
    return current.to_dict()


@router.get("/history", dependencies=[Depends(require_reader)])
def schedule_history(job_id: str, manager: JobManager = Depends(jobs)) -> dict[str, Any]:
    return {"job": job_id, "versions": [v.to_dict() for v in manager.store.schedule_log(job_id)]}


@router.put("", dependencies=[Depends(require_operator)])
def change_schedule(job_id: str, body: ScheduleChange, response: Response,
                    if_match: str | None = Header(default=None),
                    manager: JobManager = Depends(jobs)) -> dict[str, Any]:
    expected = _parse_if_match(if_match)
    new, warnings = manager.change_schedule(job_id, expected, body.requested_step, body.schedule,
                                            body.author, body.reason)
    response.headers["ETag"] = etag(new.version)
    return _with_warnings(new, warnings)


def _with_warnings(version: ScheduleVersion, warnings: list[str]) -> dict[str, Any]:
    return version.to_dict() | {"warnings": warnings}
