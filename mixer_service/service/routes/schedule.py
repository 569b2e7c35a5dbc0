from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends, Header, Response

from mixer_service.service.auth import require_operator, require_reader
from mixer_service.service.jobs import JobManager
from mixer_service.service.problems import ProblemError, responses
from mixer_service.service.routes.deps import jobs
from mixer_service.service.routes.models import JobId, ScheduleChange

router = APIRouter(prefix="/v1/jobs/{job_id}/schedule", tags=["schedule"])

# A strong ETag as ``etag()`` writes it; weak ones (W/) are refused by RFC 9110 for If-Match on PUT.
_ETAG = re.compile(r'^"v[0-9]{1,16}\.[0-9a-f]{32}"$')


def _parse_if_match(value: str | None) -> str:
    if value is None:
        raise ProblemError(428, "Precondition required", "schedule changes need If-Match with the ETag of "
                           "GET .../schedule")
    value = value.strip()
    if not _ETAG.fullmatch(value):
        raise ProblemError(412, "Precondition failed", f'If-Match must be the ETag of GET .../schedule, like '
                           f'"v3.<incarnation>", got {value[:80]!r}')
    return value


@router.get("", dependencies=[Depends(require_reader)], responses=responses(404))
def get_schedule(job_id: JobId, response: Response, manager: JobManager = Depends(jobs)) -> dict[str, Any]:
    runtime = manager.view(job_id).runtime
    response.headers["ETag"] = runtime.etag()
    return runtime.current.to_dict() | {"incarnation": runtime.incarnation}


@router.get("/history", dependencies=[Depends(require_reader)], responses=responses(404))
def schedule_history(job_id: JobId, manager: JobManager = Depends(jobs)) -> dict[str, Any]:
    runtime = manager.view(job_id).runtime
    return {"job": job_id, "incarnation": runtime.incarnation,
            "versions": [v.to_dict() for v in runtime.versions]}


@router.put("", dependencies=[Depends(require_operator)],
            responses=responses(400, 403, 404, 409, 412, 413, 428))
def change_schedule(job_id: JobId, body: ScheduleChange, response: Response,
                    if_match: str | None = Header(default=None),
                    manager: JobManager = Depends(jobs)) -> dict[str, Any]:
    expected = _parse_if_match(if_match)
    runtime, warnings = manager.change_schedule(job_id, expected, body.requested_step, body.schedule.to_doc(),
                                                body.author, body.reason)
    response.headers["ETag"] = runtime.etag()
    return runtime.current.to_dict() | {"incarnation": runtime.incarnation, "warnings": warnings}
