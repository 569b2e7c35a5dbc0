"""Prometheus metrics; names are a contract with deploy/ (dashboard and alert rules)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from fastapi.concurrency import run_in_threadpool
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
QUANTILES = ("0", "0.5", "0.9", "1")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mixer_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.latency = Histogram(
            "mixer_request_duration_seconds",
            "Request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("mixer_tokens_served", "Tokens served", ["job", "source"], registry=r)
        self.batches = Counter("mixer_batches_served", "Batches served", ["job"], registry=r)
        self.repetition = Gauge(
            "mixer_repetition_count",
            "Repetition count quantiles over domain documents at the trained step",
            ["job", "source", "quantile"],
            registry=r,
        )
        self.schedule_version = Gauge(
            "mixer_schedule_version", "Current schedule version", ["job"], registry=r
        )
        self.faults = Counter(
            "mixer_faults",
            "Requests answered 503 because state or data could not be proven current, by cause",
            ["fault"],
            registry=r,
        )
        self.shard_cache = Gauge(
            "mixer_shard_cache",
            "Shard cache of this replica: cumulative hits, misses, fetches, fetched_bytes, hashes, "
            "evictions, resident_hits (hits answered from memory), resident_evictions; and used_bytes / "
            "limit_bytes (disk), resident_bytes / memory_limit_bytes (this process's memory)",
            ["stat"],
            registry=r,
        )
        self.store_up = Gauge("mixer_store_up", "1 when the state store answers", registry=r)
        self.trained_step = Gauge("mixer_trained_step", "Step trainers reported", ["job"], registry=r)
        self.high_water = Gauge("mixer_served_high_water", "Highest step served", ["job"], registry=r)
        self.forecast_steps = Gauge(
            "mixer_forecast_steps_to_overfit",
            "Steps from the last eval until the domain held-out loss is forecast to turn up "
            "(+Inf: not before the end)", ["job", "source"], registry=r)
        self.forecast_auto_applies = Counter(
            "mixer_forecast_auto_applies",
            "Decisions of the overfitting watch's auto-apply policy on warned proposals, by outcome "
            "(applied, outside_limits, conflict, failed)", ["job", "outcome"], registry=r)
        self.exposition = Exposition(r)


class Exposition:
    """The /metrics body: one render at a time, shared by every scrape that arrives during it.

    Job gauges are read from the store (O(jobs)), so that part is reused for ``min_age_s`` or twice its
    own time, whichever is longer: it then takes at most a third of one thread however many jobs the store
    holds. Concurrent scrapes wait for the render in progress on the event loop, holding no pool thread,
    so a scrape storm costs one render at a time. Counters are rendered fresh on every render.
    """

    def __init__(self, registry: CollectorRegistry, min_age_s: float = 1.0) -> None:
        self.registry, self.min_age_s = registry, min_age_s
        self._refresh_due = 0.0
        self._rendering: asyncio.Future[bytes] | None = None

    async def get(self, refresh: Callable[[], None]) -> bytes:
        """The exposition; ``refresh`` sets the job gauges (called in a pool thread when they are due)."""
        if self._rendering is None:
            self._rendering = asyncio.ensure_future(self._render(refresh))
        return await asyncio.shield(self._rendering)  # a scraper that leaves does not cancel the others'

    async def _render(self, refresh: Callable[[], None]) -> bytes:
        try:
            return await run_in_threadpool(self._render_now, refresh)
        finally:
            self._rendering = None

    def _render_now(self, refresh: Callable[[], None]) -> bytes:
        if time.monotonic() >= self._refresh_due:
            start = time.monotonic()
            refresh()
            self._refresh_due = time.monotonic() + max(self.min_age_s, 2 * (time.monotonic() - start))
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every request by its route template (not the raw path: bounded cardinality)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(name, scope["method"], str(status["code"])).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - start)
