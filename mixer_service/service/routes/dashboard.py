"""The dashboard page (static HTML + vanilla JS over the JSON API) and the counters it polls.

The page itself is public: it holds no data, only code. Every number on it comes from the reader-protected
JSON API, called with the token from the page's ``?token=`` parameter when there is one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse

from mixer_contract.errors import NotFound
from mixer_service.service.auth import require_reader

router = APIRouter(tags=["dashboard"])

STATIC = Path(__file__).resolve().parents[1] / "static"
_ASSETS = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
# Nothing but this server's own scripts and styles; the token in the URL never leaves as a Referer.
_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'",
            "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache"}


@router.api_route("/dashboard", methods=["GET", "HEAD"], include_in_schema=False,
                  response_class=HTMLResponse)
def dashboard_page() -> HTMLResponse:
    return HTMLResponse((STATIC / "dashboard.html").read_text(encoding="utf-8"), headers=_HEADERS)


@router.get("/dashboard/{asset}", include_in_schema=False)
def dashboard_asset(asset: str) -> Response:
    if asset not in _ASSETS:  # a fixed list: no paths from the request ever reach the filesystem
        raise NotFound(f"no dashboard asset {asset!r}")
    return Response((STATIC / asset).read_bytes(), media_type=_ASSETS[asset], headers=_HEADERS)


@router.get("/v1/stats", tags=["stats"], dependencies=[Depends(require_reader)])
def serving_stats(request: Request) -> dict[str, Any]:
    """Batches and tokens this replica (all its worker processes) has served per job since it started.

    Monotonic counters (the same ones ``/metrics`` exports); a rate is the difference of two reads over
    the difference of their ``time``. Each replica counts only what it served itself — for a
    deployment-wide rate use the served high water of ``GET /v1/jobs`` or sum ``/metrics`` over replicas.
    """
    jobs: dict[str, dict[str, Any]] = {}

    def entry(job: str) -> dict[str, Any]:
        return jobs.setdefault(job, {"batches": 0, "tokens": {}})

    for family in request.app.state.metrics.served():
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            if family.name == "mixer_batches_served":
                entry(sample.labels["job"])["batches"] = int(sample.value)
            else:
                entry(sample.labels["job"])["tokens"][sample.labels["source"]] = int(sample.value)
    return {"time": time.time(), "scope": "replica", "jobs": jobs}
