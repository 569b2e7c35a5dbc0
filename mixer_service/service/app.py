"""The FastAPI application: wiring only (routers, error handlers, auth, limits, metrics)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mixer_service.service import problems
from mixer_service.service.auth import Tokens
from mixer_service.service.jobs import JobManager
from mixer_service.service.metrics import Metrics, MetricsMiddleware
from mixer_service.service.routes import batches, dashboard, health, images, jobs, plan, repetitions, schedule
from mixer_service.service.sources import SourceRegistry
from mixer_service.store import StateStore

MAX_BODY_BYTES = 1 << 20


@dataclass
class Settings:
    store: StateStore
    sources: SourceRegistry
    tokens: Tokens


class BodyLimit:
    """413 for request bodies over the limit, checked before the body is read into memory."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and int(length) > self.limit:
                response = problems.problem(413, "Content too large", f"request bodies are limited to "
                                            f"{self.limit} bytes", scope["path"])
                await response(scope, receive, send)
                return
            seen = 0

            async def limited() -> Message:
                nonlocal seen
                message = await receive()
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise problems.ProblemError(413, "Content too large", f"limit is {self.limit} bytes")
                return message

            await self.app(scope, limited, send)
            return
        await self.app(scope, receive, send)


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="mixer-service", version="1", description="Exact, deterministic data mixing for "
                  "specialized pretraining. Wire format: docs/protocol.md.")
    app.state.jobs = JobManager(settings.store, settings.sources)
    app.state.tokens = settings.tokens
    app.state.metrics = Metrics()
    problems.install(app)
    for module in (jobs, batches, images, schedule, repetitions, plan, health, dashboard):
        app.include_router(module.router)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app
