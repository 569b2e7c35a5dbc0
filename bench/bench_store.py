"""What fencing costs per request, and what a schedule change costs as the history grows.

Every request now reads the job's head (incarnation, version, chain, high water, trained step) in one store
round trip, and the serve path gets it from the same atomic ``mark_served``. Measured here, in process:

* head read and mark_served, embedded SQLite and Redis (a private ``redis-server`` on a free port), against
  the cheapest possible round trip to the same store (SQLite ``SELECT 1``, Redis ``GET``): the ratio is
  what the fencing adds on top of simply talking to the store;
* a schedule change through ``JobManager`` at 10, 100 and 1000 versions of history (it must stay flat:
  only the new entry is parsed and chained).

    python bench/bench_store.py [--repeat 2000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import redis
from common import DOMAIN, ROLES, WEB, log, prepared_sources

from mixer_contract.schedule import Schedule
from mixer_service.service.jobs import JobManager, etag
from mixer_service.service.process import start_redis
from mixer_service.service.source_registry import SourceRegistry
from mixer_service.store import StateStore
from mixer_service.store.base import StoreLimits
from mixer_service.store.embedded import EmbeddedStore
from mixer_service.store.redis_store import RedisStore

CONFIG = {"sources": [{"name": n, "role": ROLES[n]} for n in (DOMAIN, WEB)], "seq_len": 1025,
          "global_batch": 64, "seed": 0, "total_steps": 10**9, "allow_wrap": True}


def schedule(domain: str) -> dict:
    return Schedule.constant({DOMAIN: domain, WEB: str(1 - Decimal(domain))})


def per_call_us(fn: Callable[[], object], repeat: int) -> float:
    """Median of 5 batches of ``repeat`` calls, in microseconds per call."""
    batches = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        batches.append((time.perf_counter() - start) / repeat * 1e6)
    return statistics.median(batches)


def measure_store(name: str, store: StateStore, floor: Callable[[], object], repeat: int) -> None:
    store.create_job("bench", CONFIG, schedule("0.05"), "bench", "")
    incarnation = store.head("bench").incarnation
    floor_us = per_call_us(floor, repeat)
    head_us = per_call_us(lambda: store.head("bench"), repeat)
    step = iter(range(10**9))
    mark_us = per_call_us(lambda: store.mark_served("bench", next(step), incarnation), repeat)
    print(f"| {name} | {floor_us:.1f} | {head_us:.1f} ({head_us / floor_us:.2f}x) | "
          f"{mark_us:.1f} ({mark_us / floor_us:.2f}x) |")


def measure_changes(store: StateStore, sources: SourceRegistry) -> None:
    manager = JobManager(store, sources)
    view = manager.create("history", CONFIG, schedule("0.05"), "bench", "")
    runtime = view.runtime
    print("\n| versions in history | schedule change (ms, median of 10) |\n|---:|---:|")
    for target in (10, 100, 1000):
        while runtime.version < target - 10:
            runtime, _ = manager.change_schedule("history", runtime.etag(), 0, schedule("0.06"), "bench", "")
        times = []
        for i in range(10):
            start = time.perf_counter()
            runtime, _ = manager.change_schedule("history", etag(runtime.version, runtime.incarnation), 0,
                                                 schedule(f"0.0{i % 9 + 1}"), "bench", "")
            times.append((time.perf_counter() - start) * 1e3)
        print(f"| {runtime.version} | {statistics.median(times):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    sources = SourceRegistry.load(prepared_sources())
    with tempfile.TemporaryDirectory() as tmp:
        log("measuring per-request store operations")
        print("| store | floor round trip (us) | head read (us, x floor) | mark_served (us, x floor) |")
        print("|---|---:|---:|---:|")
        embedded = EmbeddedStore(Path(tmp) / "state.sqlite")
        measure_store("embedded SQLite (floor: SELECT 1)", embedded,
                      lambda: embedded._conn.execute("SELECT 1").fetchone(), args.repeat)
        server = start_redis(Path(tmp))
        url = server.url
        try:
            store = RedisStore(url)
            raw = redis.Redis.from_url(url)
            raw.set("x", "1")
            measure_store("Redis on loopback (floor: GET)", store, lambda: raw.get("x"), args.repeat)
            log("measuring schedule changes as the history grows")
            limits = StoreLimits(max_versions=2000)
            measure_changes(EmbeddedStore(Path(tmp) / "changes.sqlite", limits=limits), sources)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
