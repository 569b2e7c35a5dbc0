"""Latency under a realistic load (issue 9): 64 trainer ranks at a fixed rate, half the measured capacity,
and liveness while Redis is hung; plus what ``appendfsync always`` costs the serving path.

One real ``mixer serve`` (1 uvicorn worker) on a private Redis with AOF ``appendfsync always`` (as deploy/
runs it) serves bench_service's job: B=512, L=2048, 5% ABC / 95% SOTU; a rank asks for its 8x2048 slice
(world 64). In one run:

1. capacity: the closed-loop benchmark (``bench_service.run_cell``: 64 keep-alive clients, each asking as
   soon as its last answer came back) -> req/s.
2. open loop (asyncio + aiohttp): 64 simulated ranks, each with a fixed random phase, ask for their slice
   of step k at ``t0 + phase + k / step_rate`` whether or not earlier answers came back, offered at 50% of
   (1) in total.
   Latency is measured from the *scheduled* send time (no coordinated omission): p50/p99 per request.
   ``/v1/health`` is probed every 20 ms from a separate process meanwhile.
3. the same open load with Redis hung (SIGSTOP) for ``--hang`` seconds: ``/v1/health`` p99 during the hang,
   and what the batch requests got (200 after the hang, or 503 problem+json).
4. ``appendfsync`` always vs everysec vs no persistence: the store's ``mark_served`` alone when the high
   water moves (one AOF write, fsynced before the reply under ``always``) and when it does not (no write);
   then one sequential HTTP client (server restarted per setting) asking every request for a fresh step,
   and for all 64 ranks of each step (one high-water write per 64 requests, as trainers do).

    python bench/bench_latency.py [--duration 8] [--hang 4] [--no-fsync]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from bench_engine import B, L
from bench_service import cpu_seconds, create_job, run_cell
from common import log, prepared_sources, print_table

from mixer_service.service.process import RedisProcess, ServerProcess, start_redis

# tests/ is on the path only for this import: it mirrors the source tree (tests/client/ ...), and left on the
# path its folders shadowed the packages of the same name in the health probe's spawned process.
_TESTS = str(Path(__file__).resolve().parent.parent / "tests")
sys.path.append(_TESTS)
try:
    from fault_harness import DurableRedis  # the fault suite's restartable AOF Redis
finally:
    sys.path.remove(_TESTS)

RANKS = 64
ROWS = B // RANKS
LOAD_FRACTION = 0.5
P99_TARGET_MS = 50.0
PROBE_INTERVAL_S = 0.02


@dataclass
class Sample:
    scheduled: float  # loop time the request was due
    done: float
    status: int  # 0: no HTTP answer
    problem: bool = False  # the answer was problem+json (the service's own 503, not uvicorn's limit)

    @property
    def latency_ms(self) -> float:
        return (self.done - self.scheduled) * 1e3


async def _open_loop(url: str, job: str, rate_rps: float, duration: float, step_base: int,
                     hang: Hang | None) -> list[Sample]:
    """RANKS tasks, each due to ask for step ``step_base + k`` at ``t0 + phase + k / step_rate``.

    aiohttp, not httpx: httpx's async connection pool queued requests for seconds at ~60 in flight here
    (server-side handler times stayed at 10-50 ms), which would measure the generator, not the service.
    """
    import aiohttp

    loop = asyncio.get_running_loop()
    step_rate = rate_rps / RANKS
    rng = random.Random(0)
    phases = [rng.random() / step_rate for _ in range(RANKS)]
    samples: list[Sample] = []
    connector, timeout = aiohttp.TCPConnector(limit=512), aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as client:
        t0 = loop.time() + 0.2

        async def one(rank: int, k: int, due: float) -> None:
            params = {"rank": rank, "world": RANKS}
            status, problem = 0, False
            try:
                async with client.get(f"/v1/jobs/{job}/batches/{step_base + k}", params=params) as r:
                    await r.read()
                    status, problem = r.status, r.content_type == "application/problem+json"
            except (TimeoutError, aiohttp.ClientError):
                pass
            samples.append(Sample(due, loop.time(), status, problem))

        async def rank_task(rank: int) -> None:
            pending = []
            k = 0
            while (due := t0 + phases[rank] + k / step_rate) < t0 + duration:
                await asyncio.sleep(max(0.0, due - loop.time()))
                pending.append(asyncio.create_task(one(rank, k, due)))
                k += 1
            await asyncio.gather(*pending)

        async def hang_redis(h: Hang) -> None:
            await asyncio.sleep(h.start + 0.2)
            h.redis.pause()
            h.paused_at = time.monotonic()
            await asyncio.sleep(h.seconds)
            h.redis.resume()
            h.resumed_at = time.monotonic()

        extra = [hang_redis(hang)] if hang else []
        await asyncio.gather(*(rank_task(r) for r in range(RANKS)), *extra)
    return samples


@dataclass
class Hang:
    """Stop ``redis`` (SIGSTOP) ``start`` s into an open-loop run for ``seconds``; records when it did."""

    redis: DurableRedis
    start: float
    seconds: float
    paused_at: float = 0.0
    resumed_at: float = 0.0


def open_loop(url: str, job: str, rate_rps: float, duration: float, step_base: int,
              hang: Hang | None = None) -> list[Sample]:
    try:
        import uvloop  # the generator needs all the speed it can get on a shared machine

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(_open_loop(url, job, rate_rps, duration, step_base, hang))


def _probe(url: str, started, stop, out) -> None:
    """Child process: GET /v1/health every PROBE_INTERVAL_S; sends (monotonic sent, seconds, status)."""
    rows = []
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            started.set()
            t = time.monotonic()
            try:
                status = client.get(f"{url}/v1/health").status_code
            except httpx.TransportError:
                status = 0
            rows.append((t, time.monotonic() - t, status))
            time.sleep(max(0.0, PROBE_INTERVAL_S - (time.monotonic() - t)))
    out.send(rows)


class HealthProbe:
    """``/v1/health`` probed from its own process, so the load generator's GIL does not delay it."""

    def __init__(self, url: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.started, self.stop = ctx.Event(), ctx.Event()
        self.recv, send = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_probe, args=(url, self.started, self.stop, send), daemon=True)

    def __enter__(self) -> HealthProbe:
        self.proc.start()
        if not self.started.wait(60):
            raise RuntimeError("health probe process did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.rows = self.recv.recv()
        self.proc.join(10)

    def latencies_ms(self, start: float = 0.0, end: float = float("inf")) -> np.ndarray:
        """Latencies of the probes that were in flight at some moment of [start, end]."""
        return np.array([s * 1e3 for t, s, _ in self.rows if t <= end and t + s >= start])


def pct(values: np.ndarray | list[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def peak(values: np.ndarray | list[float]) -> float:
    return float(np.max(values)) if len(values) else float("nan")


SETTINGS = ("always", "everysec", "none")


def redis_with(setting: str, directory: Path) -> RedisProcess:
    """A private redis-server with AOF ``appendfsync <setting>``, or without persistence for "none"."""
    directory.mkdir(parents=True)
    return DurableRedis(directory, setting).server if setting != "none" else start_redis(directory)


def realistic_load(sources: Path, workdir: Path, duration: float, hang_s: float) -> dict:
    redis_server = DurableRedis(workdir / "redis", "always")
    server = ServerProcess(sources, workdir / "state", redis_url=redis_server.url).start()
    try:
        job = create_job(server.url)
        log(f"bench: closed loop, {RANKS} clients, {ROWS}x{L} slices, {duration:g} s")
        capacity = run_cell(server, job, ROWS, "none", RANKS, 0, duration, 1.0)
        offered = LOAD_FRACTION * capacity["rps"]
        log(f"bench: capacity {capacity['rps']:.0f} req/s; open loop at {offered:.0f} req/s, {duration:g} s")
        with HealthProbe(server.url) as probe:
            cpu = cpu_seconds(server), time.process_time(), time.perf_counter()
            steady = open_loop(server.url, job, offered, duration, 100_000)
            elapsed = time.perf_counter() - cpu[2]
            cpu_use = ((cpu_seconds(server) - cpu[0]) / elapsed, (time.process_time() - cpu[1]) / elapsed)
        health_steady = probe.latencies_ms()
        log(f"bench: open loop again with Redis hung (SIGSTOP) for {hang_s:g} s")
        hang = Hang(redis_server, 1.0, hang_s)
        with HealthProbe(server.url) as hung_probe:
            hung = open_loop(server.url, job, offered, hang_s + 2.0, 200_000, hang)
        health_hung = hung_probe.latencies_ms(hang.paused_at, hang.resumed_at)
    finally:
        server.stop()
        redis_server.stop()
    ok = [s.latency_ms for s in steady if s.status == 200]
    return {"capacity": capacity, "offered": offered, "steady": steady, "ok": ok, "cpu": cpu_use,
            "health_steady": health_steady, "hung": hung, "health_hung": health_hung, "hang_s": hang_s}


def fsync_cost(sources: Path, workdir: Path, seconds: float) -> list[list[str]]:
    """Sequential client, per Redis persistence setting: fresh step per request, and 64 ranks per step."""
    rows = []
    for setting in SETTINGS:
        directory = workdir / f"redis-{setting}"
        redis_server = redis_with(setting, directory)
        server = ServerProcess(sources, directory / "state", redis_url=redis_server.url).start()
        try:
            job = create_job(server.url)
            _sequential(server.url, job, RANKS, 1.0, 900_000)  # warm-up: shard cache, page cache, pools
            for pattern, world in (("fresh step each request", 1), (f"{RANKS} ranks per step", RANKS)):
                lat = _sequential(server.url, job, world, seconds, 500_000 * (world != 1))
                rows.append([setting, pattern, f"{len(lat) / seconds:.0f}", f"{pct(lat, 50):.2f}",
                             f"{pct(lat, 99):.2f}"])
        finally:
            server.stop()
            redis_server.stop()
    return rows


def store_cost(workdir: Path, calls: int) -> list[list[str]]:
    """``mark_served`` alone (one Lua script round trip), per persistence setting: when the high water moves
    (one AOF write, fsynced before the reply under ``always``) and when it does not (no write at all)."""
    from mixer_service.store import open_store

    rows = []
    for setting in SETTINGS:
        directory = workdir / f"store-{setting}"
        server = redis_with(setting, directory)
        try:
            store = open_store(server.url, directory / "unused.sqlite")
            _, incarnation = store.create_job("cost", {"bench": 1}, {"phases": []}, "bench", "cost")
            for label, step_of in (("high water moves", lambda i: i), ("high water stays", lambda i: 0)):
                lat = []
                for i in range(calls):
                    t = time.perf_counter()
                    store.mark_served("cost", step_of(i) + 1, incarnation)
                    lat.append((time.perf_counter() - t) * 1e3)
                rows.append([setting, f"mark_served, {label}", f"{calls / sum(lat) * 1e3:.0f}",
                             f"{pct(lat, 50):.3f}", f"{pct(lat, 99):.3f}"])
        finally:
            server.stop()
    return rows


def _sequential(url: str, job: str, world: int, seconds: float, step_base: int) -> list[float]:
    """One keep-alive client, closed loop: request i is (step base + i // world, rank i % world), 8 rows."""
    lat = []
    params = {"world": RANKS}
    with httpx.Client(base_url=url, timeout=30) as client:
        i, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            step, rank = step_base + i // world, i % world
            t = time.perf_counter()
            r = client.get(f"/v1/jobs/{job}/batches/{step}", params=params | {"rank": rank})
            lat.append((time.perf_counter() - t) * 1e3)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
            i += 1
    return lat


def report(load: dict) -> None:
    cap, steady, hung = load["capacity"], load["steady"], load["hung"]
    print(f"\nclosed loop ({RANKS} clients, {ROWS}x{L} slices): {cap['rps']:.0f} req/s, "
          f"p50 {cap['p50']:.1f} ms, p99 {cap['p99']:.1f} ms")
    span = max(s.scheduled for s in steady) - min(s.scheduled for s in steady)
    bad = sum(s.status != 200 for s in steady)
    srv, gen = load["cpu"]
    print_table(
        ["open loop", "offered req/s", "answered req/s", "non-200", "p50 ms", "p99 ms", "max ms"],
        [[f"{RANKS} ranks at {LOAD_FRACTION:.0%} capacity", f"{load['offered']:.0f}",
          f"{len(steady) / span:.0f}", bad, f"{pct(load['ok'], 50):.1f}", f"{pct(load['ok'], 99):.1f}",
          f"{peak(load['ok']):.1f}"],
         ["/v1/health meanwhile (every 20 ms)", "", "", "", f"{pct(load['health_steady'], 50):.1f}",
          f"{pct(load['health_steady'], 99):.1f}", f"{peak(load['health_steady']):.1f}"]],
    )
    print(f"(latency from each request's scheduled send time; CPU during the open loop: server {srv:.0%}, "
          f"generator {gen:.0%} of one core)")
    kinds = Counter(f"{s.status}{' problem+json' if s.problem else ''}" for s in hung)
    statuses = dict(sorted(kinds.items()))
    health = load["health_hung"]
    print(f"\nRedis hung {load['hang_s']:g} s under the same load: /v1/health p50 {pct(health, 50):.1f} ms, "
          f"p99 {pct(health, 99):.1f} ms, max {peak(health):.1f} ms over {len(health)} probes; batch answers "
          f"during the run: {statuses} (0 = no answer)")
    p99, hp99 = pct(load["ok"], 99), pct(health, 99)
    print(f"targets: open-loop p99 {p99:.1f} ms < {P99_TARGET_MS:.0f}: "
          f"{'MET' if p99 < P99_TARGET_MS else 'MISSED'}; /v1/health p99 with Redis hung {hp99:.1f} ms < "
          f"{P99_TARGET_MS:.0f}: {'MET' if hp99 < P99_TARGET_MS else 'MISSED'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=8.0, help="seconds of the closed and open loops")
    ap.add_argument("--hang", type=float, default=4.0, help="seconds Redis stays stopped")
    ap.add_argument("--fsync-seconds", type=float, default=3.0, help="seconds per appendfsync cell")
    ap.add_argument("--store-calls", type=int, default=2000, help="mark_served calls per store cell")
    ap.add_argument("--no-fsync", action="store_true", help="skip the appendfsync comparison")
    args = ap.parse_args()
    sources = prepared_sources()
    print(f"cpus={os.cpu_count()}  loadavg(1m)={os.getloadavg()[0]:.2f}  B={B} L={L}  {RANKS} ranks x "
          f"{ROWS}x{L}  server: 1 uvicorn worker, Redis AOF appendfsync always")
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        report(realistic_load(sources, Path(tmp), args.duration, args.hang))
        if not args.no_fsync:
            log("bench: appendfsync always vs everysec vs none")
            print()
            print_table(["appendfsync", "store call", "calls/s", "p50 ms", "p99 ms"],
                        store_cost(Path(tmp), args.store_calls))
            print()
            print_table(["appendfsync", "requests", "req/s", "p50 ms", "p99 ms"],
                        fsync_cost(sources, Path(tmp), args.fsync_seconds))
            print("(one sequential keep-alive client, 8x2048 slices; the high water is written only when it "
                  "moves)")


if __name__ == "__main__":
    import logging

    logging.getLogger("mixer_service").setLevel(logging.ERROR)  # the expected allow_wrap warning
    main()
