"""Domain errors -> RFC 9457 problem+json responses; one table, one handler."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mixer_service.errors import (
    Conflict,
    CorruptData,
    InvalidInput,
    MixerError,
    NotFound,
    StaleVersion,
    SourceUnavailable,
    StoreBehind,
    StoreUnavailable,
)

log = logging.getLogger(__name__)
MEDIA_TYPE = "application/problem+json"
RETRY_AFTER_S = 2

_STATUS: list[tuple[type[MixerError], int, str]] = [
    (InvalidInput, 422, "Invalid input"),
    (NotFound, 404, "Not found"),
    (Conflict, 409, "Conflict"),
    (StaleVersion, 412, "Precondition failed"),
    (StoreUnavailable, 503, "State store unavailable"),
    (StoreBehind, 503, "State store is behind this replica"),
    (SourceUnavailable, 503, "Source unavailable"),
    (CorruptData, 500, "Corrupt source data"),
]


class ProblemError(Exception):
    """An HTTP-level problem raised by the service itself (auth, size limits, missing If-Match)."""

    def __init__(self, status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.headers = status, title, detail, headers or {}


def problem(status: int, title: str, detail: str, instance: str, headers: dict[str, str] | None = None):
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, "instance": instance}
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(MixerError)
    async def _mixer(request: Request, exc: MixerError):
        for cls, status, title in _STATUS:
            if isinstance(exc, cls):
                headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
                if status >= 500:
                    log.error("request failed", extra={"path": request.url.path, "error": str(exc)})
                return problem(status, title, str(exc), request.url.path, headers)
        return problem(500, "Internal error", str(exc), request.url.path)

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError):
        return problem(exc.status, exc.title, exc.detail, request.url.path, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return problem(422, "Invalid input", detail, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return problem(exc.status_code, str(exc.detail), str(exc.detail), request.url.path)
