"""Prometheus metrics; names are a contract with deploy/ (dashboard and alert rules).

With several ``--workers``, ``mixer serve`` gives the workers one fresh directory for prometheus-client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``): each worker writes its values there and a scrape, answered
by any of them, reads every worker's. Counters and latencies are the sums over the server's workers (a
worker that died still counts what it served), job gauges are the most recent a worker read from the store,
and the shard cache's per-process stats are summed over the live workers, while the bytes of the cache
directory they share are read by the worker that answers.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from fastapi.concurrency import run_in_threadpool
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.samples import Sample
from starlette.types import ASGIApp, Receive, Scope, Send

from mixer_service.service.settings import MULTIPROCESS_DIR_ENV, process_gone

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
QUANTILES = ("0", "0.5", "0.9", "1")
SHARED_CACHE_STATS = frozenset({"used_bytes", "limit_bytes"})  # of the directory the workers share
SERVED = ("mixer_batches_served", "mixer_tokens_served")


def multiprocess_dir() -> Path | None:
    """The directory this process's metric values are written to, when it is one worker of several."""
    value = os.environ.get(MULTIPROCESS_DIR_ENV)
    return Path(value) if value else None


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
            registry=r, multiprocess_mode="mostrecent",
        )
        self.schedule_version = Gauge(
            "mixer_schedule_version", "Current schedule version", ["job"], registry=r,
            multiprocess_mode="mostrecent",
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
            "limit_bytes (disk), resident_bytes / memory_limit_bytes (memory); with several workers, summed "
            "over the live ones (used_bytes and limit_bytes: the directory they share)",
            ["stat"],
            registry=r, multiprocess_mode="livesum",
        )
        self.store_up = Gauge("mixer_store_up", "1 when the state store answers", registry=r,
                              multiprocess_mode="mostrecent")
        self.trained_step = Gauge("mixer_trained_step", "Step trainers reported", ["job"], registry=r,
                                  multiprocess_mode="mostrecent")
        self.high_water = Gauge("mixer_served_high_water", "Highest step served", ["job"], registry=r,
                                multiprocess_mode="mostrecent")
        self.forecast_steps = Gauge(
            "mixer_forecast_steps_to_overfit",
            "Steps from the last eval until the domain held-out loss is forecast to turn up "
            "(+Inf: not before the end)", ["job", "source"], registry=r, multiprocess_mode="mostrecent")
        self.forecast_auto_applies = Counter(
            "mixer_forecast_auto_applies",
            "Decisions of the overfitting watch's auto-apply policy on warned proposals, by outcome "
            "(applied, outside_limits, conflict, failed)", ["job", "outcome"], registry=r)
        self.shared_cache: dict[str, float] = {}
        directory = multiprocess_dir()
        self.workers = Workers(directory, self.shared_cache) if directory is not None else None
        self.exposition = Exposition(self.workers.registry if self.workers is not None else r)

    def set_cache_stats(self, stats: dict[str, int | None]) -> None:
        """The shard cache's stats: this process's into ``mixer_shard_cache`` (summed over the workers), the
        shared directory's bytes kept for the worker that answers a scrape."""
        for stat, value in stats.items():
            if value is None:
                continue
            if self.workers is not None and stat in SHARED_CACHE_STATS:
                self.shared_cache[stat] = value
            else:
                self.shard_cache.labels(stat).set(value)

    def served(self) -> list[Metric]:
        """The families of batches and tokens served, by every worker of this server."""
        families = self.workers.collect() if self.workers is not None else \
            [*self.batches.collect(), *self.tokens.collect()]
        return [family for family in families if family.name in SERVED]

    def forget(self) -> None:
        """At a worker's exit: its live gauges no longer count (its counters do)."""
        if self.workers is not None:
            _drop_live_gauges(self.workers.directory, os.getpid())


class Workers:
    """Every worker's values (prometheus-client's files in ``directory``) as one exposition, with the shared
    cache directory's bytes as this worker last measured them."""

    def __init__(self, directory: Path, shared_cache: dict[str, float]) -> None:
        self.directory, self.shared_cache = directory, shared_cache
        self._files = MultiProcessCollector(None, str(directory))
        self.registry = CollectorRegistry()
        self.registry.register(self)  # type: ignore[arg-type]

    def collect(self) -> Iterator[Metric]:
        _forget_dead(self.directory)
        for family in self._files.collect():
            if family.name == "mixer_shard_cache":
                family.samples += [Sample(family.name, {"stat": stat}, float(value))
                                   for stat, value in sorted(self.shared_cache.items())]
            yield family


def _forget_dead(directory: Path) -> None:
    """A worker killed (or crashed) never says it died: its live gauges (resident bytes, say) would be added
    to its replacement's for as long as the server runs."""
    for path in directory.glob("gauge_live*_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        if process_gone(pid):
            _drop_live_gauges(directory, pid)


def _drop_live_gauges(directory: Path, pid: int) -> None:
    """prometheus-client's ``mark_process_dead``, when a scrape on another worker may have done it first."""
    for path in directory.glob(f"gauge_live*_{pid}.db"):
        path.unlink(missing_ok=True)


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
