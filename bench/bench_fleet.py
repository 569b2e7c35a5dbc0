"""A fleet-sized load model (issue 20): N replicas on one Redis, R simulated ranks pulling open-loop.

Each rank asks for its own slice (rank r of R) of step k at ``t0 + phase_r + k * T`` whether or not its
earlier answers came back (a trainer's cadence, no coordinated omission), through replica ``r mod N``.
The job is bench_service's (B=512 rows of L=2048, 5% ABC / 95% SOTU); ``--jobs J`` splits the ranks over
J jobs. Redis runs with AOF ``appendfsync always``, as deploy/ runs it. Per cell it reports:

* p50 / p99 latency from the scheduled send time, and how many answers were not 200;
* store round trips per batch: commands clients sent (scripts, and the plain commands the store sends
  outside scripts), and every command Redis executed, scripts' inner commands included (``INFO
  commandstats``), over batches served;
* Redis CPU seconds per 1000 batches (``INFO cpu``) and replica CPU milliseconds per batch (/proc);

and fits replica CPU per batch as ``a + b * rows`` so docs/scale.md can size a fleet from measured numbers.

    python bench/bench_fleet.py [--duration 6] [--ranks 64,256,512] [--replicas 1,2,3] [--rate 150]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis
from bench_engine import B
from bench_latency import pct
from bench_service import cpu_seconds, create_job
from common import log, prepared_sources, print_table

from mixer_service.service.process import ServerProcess, start_redis

AOF_ALWAYS = ("--save", "", "--appendonly", "yes", "--appendfsync", "always")


@dataclass
class Cell:
    replicas: int
    ranks: int
    jobs: int
    batches: int
    failed: int
    p50_ms: float
    p99_ms: float
    round_trips_per_batch: float
    commands_per_batch: float
    redis_cpu_per_1000: float
    replica_cpu_ms_per_batch: float
    offered_rps: float

    @property
    def rows(self) -> int:
        return B // self.ranks


async def _pull(urls: list[str], jobs: list[str], ranks: int, rate_rps: float, duration: float,
                step_base: int) -> tuple[list[float], int]:
    """Every rank on its own schedule; returns latencies (ms) of 200s and the count of other answers."""
    import aiohttp

    loop = asyncio.get_running_loop()
    period = ranks / rate_rps  # seconds between a rank's requests
    rng = random.Random(0)
    latencies: list[float] = []
    failed = 0
    timeout = aiohttp.ClientTimeout(total=60)
    sessions = [aiohttp.ClientSession(u, connector=aiohttp.TCPConnector(limit=1024), timeout=timeout)
                for u in urls]
    per_job = ranks // len(jobs)
    t0 = loop.time() + 0.3

    async def ask(rank: int, step: int, due: float) -> None:
        nonlocal failed
        job, slot = jobs[rank // per_job], rank % per_job
        session = sessions[rank % len(sessions)]
        try:
            async with session.get(f"/v1/jobs/{job}/batches/{step}",
                                   params={"rank": slot, "world": per_job}) as r:
                await r.read()
                ok = r.status == 200
        except (TimeoutError, aiohttp.ClientError):
            ok = False
        if ok:
            latencies.append((loop.time() - due) * 1e3)
        else:
            failed += 1

    async def rank_loop(rank: int) -> None:
        phase, pending, k = rng.random() * period, [], 0
        while (due := t0 + phase + k * period) < t0 + duration:
            await asyncio.sleep(max(0.0, due - loop.time()))
            pending.append(asyncio.create_task(ask(rank, step_base + k, due)))
            k += 1
        await asyncio.gather(*pending)

    try:
        await asyncio.gather(*(rank_loop(r) for r in range(ranks)))
    finally:
        for s in sessions:
            await s.close()
    return latencies, failed


# What the store sends as a request of its own (redis_store.py): scripts, and commands it never runs
# inside one. INFO is this benchmark's own reading.
ROUND_TRIPS = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_smembers", "cmdstat_ping", "cmdstat_info")


def redis_counters(client: redis.Redis) -> tuple[int, int, float]:
    """Round trips and commands executed so far, and CPU seconds used so far by the Redis server."""
    stats = client.info("commandstats")
    trips = sum(int(v["calls"]) for k, v in stats.items() if k in ROUND_TRIPS)
    calls = sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_"))
    cpu = client.info("cpu")
    return trips, calls, float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def run_cell(servers: list[ServerProcess], client: redis.Redis, ranks: int, jobs: int, rate: float,
             duration: float, step_base: int) -> Cell:
    job_ids = [create_job(servers[0].url) for _ in range(jobs)]
    trips0, calls0, rcpu0 = redis_counters(client)
    cpu0 = sum(cpu_seconds(s) for s in servers)
    latencies, failed = asyncio.run(_pull([s.url for s in servers], job_ids, ranks, rate, duration,
                                          step_base))
    trips1, calls1, rcpu1 = redis_counters(client)
    cpu1 = sum(cpu_seconds(s) for s in servers)
    n = max(1, len(latencies))
    return Cell(len(servers), ranks, jobs, len(latencies), failed, pct(latencies, 50), pct(latencies, 99),
                (trips1 - trips0 - 2) / n, (calls1 - calls0 - 2) / n,  # less the two INFO calls
                (rcpu1 - rcpu0) / n * 1000, (cpu1 - cpu0) / n * 1e3, rate)


def fit_cost(cells: list[Cell]) -> tuple[float, float]:
    """Least squares of replica CPU ms per batch against rows per request: (a, b) in ms and ms/row."""
    rows = np.array([c.rows for c in cells], dtype=float)
    cost = np.array([c.replica_cpu_ms_per_batch for c in cells])
    design = np.stack([np.ones_like(rows), rows], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, cost, rcond=None)
    return float(a), float(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds of load per cell")
    parser.add_argument("--ranks", default="64,256,512")
    parser.add_argument("--replicas", default="1,2,3")
    parser.add_argument("--rate", type=float, default=150.0, help="offered requests/s over all ranks")
    parser.add_argument("--jobs", type=int, default=8,
                        help="also run the largest cell split over this many jobs")
    args = parser.parse_args()
    sources = prepared_sources()
    ranks_list = [int(x) for x in args.ranks.split(",")]
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        work = Path(tmp)
        store = start_redis(work, persistence=AOF_ALWAYS)
        client = redis.Redis.from_url(store.url, decode_responses=True)
        try:
            for n in (int(x) for x in args.replicas.split(",")):
                servers = [ServerProcess(sources, work / f"r{n}-{i}", redis_url=store.url) for i in range(n)]
                try:
                    for s in servers:
                        s.start()
                    for i, ranks in enumerate(ranks_list):
                        log(f"bench: {n} replica(s), {ranks} ranks, {args.rate:g} req/s offered")
                        cells.append(run_cell(servers, client, ranks, 1, args.rate, args.duration,
                                              i * 100_000))
                    if args.jobs > 1:
                        ranks = max(ranks_list)
                        log(f"bench: {n} replica(s), {ranks} ranks over {args.jobs} jobs")
                        cells.append(run_cell(servers, client, ranks, args.jobs, args.rate, args.duration,
                                              900_000))
                finally:
                    for s in servers:
                        s.stop()
        finally:
            client.close()
            store.stop()
    print_table(
        ["replicas", "ranks", "jobs", "rows/req", "offered req/s", "200s", "other", "p50 ms", "p99 ms",
         "round trips/batch", "Redis cmds/batch", "Redis CPU s/1000 batches", "replica CPU ms/batch"],
        [[c.replicas, c.ranks, c.jobs, c.rows, f"{c.offered_rps:g}", c.batches, c.failed, f"{c.p50_ms:.1f}",
          f"{c.p99_ms:.1f}", f"{c.round_trips_per_batch:.2f}", f"{c.commands_per_batch:.2f}",
          f"{c.redis_cpu_per_1000:.3f}",
          f"{c.replica_cpu_ms_per_batch:.2f}"] for c in cells])
    a, b = fit_cost([c for c in cells if c.jobs == 1])
    redis_ms = float(np.median([c.redis_cpu_per_1000 for c in cells]))  # s per 1000 = ms per batch
    print(f"\nreplica CPU per batch ~ {a:.2f} ms + {b:.3f} ms/row; Redis CPU per batch ~ {redis_ms:.3f} ms")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
