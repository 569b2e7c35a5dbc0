"""The FastAPI application: wiring only (routers, error handlers, auth, limits, metrics)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.to_thread
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mixer_contract.errors import InvalidInput
from mixer_service.service import problems
from mixer_service.service.auth import Tokens
from mixer_service.service.jobs import JobManager
from mixer_service.service.metrics import Metrics, MetricsMiddleware
from mixer_service.service.routes import (
    batches,
    dashboard,
    forecast,
    health,
    image_batches,
    jobs,
    plan,
    repetitions,
    schedule,
)
from mixer_service.service.settings import PlanLimits, ServiceLimits
from mixer_service.service.source_registry import SourceRegistry
from mixer_service.store import StateStore

log = logging.getLogger(__name__)


@dataclass
class Settings:
    store: StateStore
    sources: SourceRegistry
    tokens: Tokens
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    plan: PlanLimits = field(default_factory=PlanLimits)


class BodyLimit:
    """413 for request bodies over the limit, before the body reaches a handler.

    A declared Content-Length is checked up front; a chunked body is buffered up to the limit (at most
    ``limit`` bytes are ever held) and replayed to the app, so the 413 can still be sent.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    def _too_large(self, scope: Scope) -> ASGIApp:
        return problems.problem(413, "Content too large", f"request bodies are limited to {self.limit} bytes",
                                scope["path"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        http1 = scope.get("http_version") in ("1.0", "1.1")  # HTTP/2 may frame a body with neither header
        if http1 and length is None and b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body (RFC 9112 section 6.3): nothing to count or replay
            return
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                await self._too_large(scope)(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._too_large(scope)(scope, receive, send)
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


class InFlightLimit:
    """503 problem+json (``fault: overloaded``, Retry-After) once ``limit`` requests are in flight.

    Requests stuck on a hung store would otherwise pile up until uvicorn's own connection limit answers
    a bare text/plain 503. Probes are never refused: they must answer precisely then. ``/metrics`` counts
    like any request (a scrape storm must not crowd out batches); its render is shared and cached.
    """

    EXEMPT = ("/v1/health", "/v1/ready")

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit, self.in_flight = app, limit, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.EXEMPT:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            response = problems.problem(503, "Service unavailable", f"{self.in_flight} requests are in "
                                        "flight on this replica; retry (or another replica)", scope["path"],
                                        {"Retry-After": "1"}, fault="overloaded")
            await response(scope, receive, send)
            return
        self.in_flight += 1  # one event loop: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


UNSAFE_ENV = "MIXER_UNSAFE_BENCHMARK_ONLY_DISABLE"
UNSAFE_SWITCHES = ("head_read", "limits")


def unsafe_switches() -> frozenset[str]:
    """Guarantees a benchmark turned off to put a price on them (``bench/bench_guarantees.py``): a comma
    list in ``MIXER_UNSAFE_BENCHMARK_ONLY_DISABLE``. No flag exposes this; a server with any off says so
    in its log at start."""
    names = frozenset(filter(None, os.environ.get(UNSAFE_ENV, "").split(",")))
    if names - set(UNSAFE_SWITCHES):
        raise InvalidInput(f"{UNSAFE_ENV}: unknown {sorted(names - set(UNSAFE_SWITCHES))}; "
                           f"known: {UNSAFE_SWITCHES}")
    if names:
        log.warning("GUARANTEES TURNED OFF FOR A BENCHMARK: never serve a trainer from this process",
                    extra={"event": "unsafe.benchmark", "off": sorted(names)})
    return names


CACHE_STATS_INTERVAL_S = 1.0


async def _watch_high_water(app: FastAPI, interval_s: float) -> None:
    """Put back, within ``interval_s``, what a restored store forgot of the steps this process served."""
    while True:
        await asyncio.sleep(interval_s)
        for fault in await run_in_threadpool(app.state.jobs.watch_high_water):
            app.state.metrics.faults.labels(fault).inc()


async def _publish_cache_stats(app: FastAPI, interval_s: float = CACHE_STATS_INTERVAL_S) -> None:
    """One worker of several: its shard cache's counts reach the scrapes the other workers answer (within
    ``interval_s``); the directory's bytes, which a scrape measures itself, are left out (a ``du`` walk)."""
    while True:
        app.state.metrics.set_cache_stats(app.state.jobs.sources.cache_stats(disk=False))
        await asyncio.sleep(interval_s)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.limits.threads
        app.state.batch_limiter = anyio.CapacityLimiter(settings.limits.batch_threads)
        tasks = []
        if settings.limits.high_water_watch_s > 0:
            tasks.append(asyncio.create_task(_watch_high_water(app, settings.limits.high_water_watch_s)))
        if app.state.metrics.workers is not None:
            tasks.append(asyncio.create_task(_publish_cache_stats(app)))
        yield
        for task in tasks:
            task.cancel()
        app.state.metrics.forget()

    app = FastAPI(title="mixer-service", version="1", lifespan=lifespan,
                  description="Exact, deterministic data mixing for specialized pretraining. Wire format: "
                  "docs/protocol.md. Every error is RFC 9457 problem+json.")
    app.state.jobs = JobManager(settings.store, settings.sources)
    app.state.tokens = settings.tokens
    app.state.limits = settings.limits
    app.state.plan_limits = settings.plan
    app.state.metrics = Metrics()
    app.state.prefetched = {}
    app.state.unsafe_off = unsafe_switches()
    problems.install(app)
    for module in (jobs, batches, image_batches, schedule, repetitions, plan, forecast, health, dashboard):
        app.include_router(module.router)
    app.add_middleware(batches.BatchFastPath, api=app)  # innermost: under the limits and the metrics
    if "limits" not in app.state.unsafe_off:
        app.add_middleware(BodyLimit, limit=settings.limits.max_body_bytes)
        app.add_middleware(InFlightLimit, limit=settings.limits.max_in_flight)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app
