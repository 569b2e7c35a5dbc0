"""Domain errors -> RFC 9457 problem+json responses: the handlers and their OpenAPI description.

The table (which error is which status, title and ``fault``) is the contract's (``mixer_contract.errors``),
so clients read the same one.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from mixer_contract.errors import TITLES, MixerError, fault_of, status_of
from mixer_service.service.routes.models import Problem

log = logging.getLogger(__name__)
MEDIA_TYPE = "application/problem+json"
RETRY_AFTER_S = 2

def responses(*statuses: int, ok: dict[str, Any] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the problem statuses a route can answer (401, 422 and 503 apply
    everywhere), plus ``ok`` as the 200 response when the route's success is not JSON."""
    documented: dict[int | str, dict[str, Any]] = {200: ok} if ok else {}
    return documented | {
        status: {"model": Problem, "description": TITLES[status],
                 "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
        for status in sorted(set(statuses) | {401, 422, 503})
    }


class ProblemError(Exception):
    """An HTTP-level problem raised by the service itself (auth, size limits, missing If-Match)."""

    def __init__(self, status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.headers = status, title, detail, headers or {}


def problem(status: int, title: str, detail: str, instance: str, headers: dict[str, str] | None = None,
            fault: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status, "detail": detail,
                            "instance": instance}
    if fault is not None:
        body["fault"] = fault
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def from_error(request: Request, exc: MixerError) -> JSONResponse:
    """A domain error as the problem+json every route answers with (the fault counted and logged)."""
    status, title = status_of(exc)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    fault = fault_of(exc)
    if fault is not None:
        request.app.state.metrics.faults.labels(fault).inc()
    if status >= 500:
        log.error("request failed", extra={"path": request.url.path, "error": str(exc), "fault": fault})
    return problem(status, title, str(exc), request.url.path, headers, fault)


def install(app: FastAPI) -> None:
    @app.exception_handler(MixerError)
    async def _mixer(request: Request, exc: MixerError):
        return from_error(request, exc)

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError):
        return problem(exc.status, exc.title, exc.detail, request.url.path, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return problem(422, "Invalid input", detail, request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # A bug, not a fault of the request or the data: the client gets problem+json without ``fault``
        # (nothing to wait for), the log gets the traceback.
        log.error("unexpected error", exc_info=exc, extra={"path": request.url.path})
        return problem(500, "Internal error", "unexpected error on this replica; it is logged",
                       request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        # Starlette's own errors (404 for unknown paths, 405) keep their headers; a 405's Allow lists the
        # methods of every route on the path, not only the first one Starlette matched.
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return problem(exc.status_code, TITLES.get(exc.status_code, str(exc.detail)), str(exc.detail),
                       request.url.path, headers)


def _allowed_methods(request: Request) -> list[str]:
    """Methods some route fully matches on this path (asked the router itself, nested routers included)."""
    allowed = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
        scope = dict(request.scope) | {"method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed
