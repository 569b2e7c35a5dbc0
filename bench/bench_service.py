"""HTTP service throughput and latency under concurrent keep-alive clients, vs. the in-process engine and
the in-process mosaicml-streaming peer, on the same real GPT-2 tokens (see common.py).

One real ``mixer serve`` process (embedded SQLite store, loopback, 1 uvicorn worker) serves a job with
global batch B=512, L=2048, 5% ABC / 95% SOTU (``allow_wrap``: SOTU is ~2 steps long). Clients fetch rank
slices like data-parallel trainers: request i is (step = i // world, rank = i % world), so ``world`` = 64
gives 8x2048-token responses and ``world`` = 8 gives 64x2048. Every request goes through the trainer's own
``client.MixerClient.batch`` (zstd if used, CRC-32, header echo check, numpy view; no retries, so an error
surfaces). Each load generator thread owns one client (one keep-alive connection). Latency = request sent
-> body received and verified, per request.

Cells: {8, 64} rows x {none, zstd} x {1, 64} clients, ``--duration`` s each after a short warm-up, each on
fresh steps. Server and load generator share the machine's cores; the table shows the CPU each used.

    python bench/bench_service.py [--duration 4] [--clients 1 64] [--generator wrk]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from bench_engine import DOMAIN_WEIGHT, B, L, make_engine, peer_tokens_per_s
from common import fmt_rate, job_config, log, open_sources, prepared_sources, print_table, schedule

from client import MixerClient
from mixer_contract import wire
from mixer_service.service.process import ServerProcess

PEER_TARGET, P99_TARGET_MS = 5.0, 50.0
TOTAL_STEPS = 1_000_000
CELL_STEPS = 50_000  # each cell starts on fresh steps: base = cell index * CELL_STEPS
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(server: ServerProcess) -> float:
    """CPU seconds (user + system) the server has used so far: its process and every live child of it
    (``--workers N`` runs each event loop in a child process)."""
    return sum(_process_cpu(pid) for pid in _process_tree(server.proc.pid))


def _process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        for task in Path(f"/proc/{tree[-1]}/task").glob("*"):
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                todo += [int(c) for c in (task / "children").read_text().split()]
    return tree


def _process_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # exited meanwhile
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def create_job(url: str) -> str:
    job_id = f"bench-{uuid.uuid4().hex[:8]}"
    body = {
        "job_id": job_id,
        "config": job_config(L, B, TOTAL_STEPS, allow_wrap=True),
        "schedule": schedule(DOMAIN_WEIGHT),
        "author": "bench",
        "reason": "bench_service",
    }
    with MixerClient(url, timeout=60) as client:
        client.create_job(body)
    return job_id


def run_cell(
    server: ServerProcess,
    job: str,
    rows: int,
    compression: str,
    clients: int,
    step_base: int,
    duration: float,
    warmup: float,
) -> dict:
    world = B // rows
    counter = itertools.count()
    stop, measuring = threading.Event(), threading.Event()
    lat: list[list[float]] = [[] for _ in range(clients)]
    payload = [0] * clients
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            with MixerClient(server.url, timeout=60, max_retries=0) as c:
                while not stop.is_set():
                    i = next(counter)
                    t0 = time.perf_counter()
                    batch = c.batch(job, step_base + i // world, i % world, world, compression)
                    t1 = time.perf_counter()
                    if batch.tokens.shape != (rows, L):
                        raise RuntimeError(f"shape {batch.tokens.shape}")
                    if measuring.is_set():
                        lat[k].append(t1 - t0)
                        payload[k] += batch.header["payload_bytes"]
        except BaseException as exc:  # surface in the main thread
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    time.sleep(warmup)
    cpu_srv, cpu_cli = cpu_seconds(server), time.process_time()
    measuring.set()
    t0 = time.perf_counter()
    time.sleep(duration)
    measuring.clear()
    elapsed = time.perf_counter() - t0
    cpu_srv, cpu_cli = cpu_seconds(server) - cpu_srv, time.process_time() - cpu_cli
    stop.set()
    for t in threads:
        t.join(60)
    if errors:
        raise RuntimeError(f"client failed: {errors[0]!r}; server stderr: {server.tail()}")
    all_lat = np.array([x for per in lat for x in per])
    n = len(all_lat)
    return {
        "rows": rows,
        "compression": compression,
        "clients": clients,
        "requests": n,
        "rps": n / elapsed,
        "tps": n * rows * L / elapsed,
        "p50": np.percentile(all_lat, 50) * 1e3,
        "p99": np.percentile(all_lat, 99) * 1e3,
        "mb_s": sum(payload) / elapsed / 1e6,
        "cpu_srv": cpu_srv / elapsed,
        "cpu_cli": cpu_cli / elapsed,
    }


_WRK_LUA = """
counter = 0
request = function()
  local i = counter
  counter = counter + 1
  return wrk.format("GET", "/v1/jobs/{job}/batches/" .. ({base} + math.floor(i / {world})) ..
    "?rank=" .. (i % {world}) .. "&world={world}&compression={compression}")
end
"""


def _wrk_ms(text: str) -> float:
    value, unit = float(text.rstrip("mus")), text[len(text.rstrip("mus")) :]
    return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def run_cell_wrk(
    server: ServerProcess,
    job: str,
    rows: int,
    compression: str,
    clients: int,
    step_base: int,
    duration: float,
) -> dict:
    """The same request sequence from wrk (C, 2 threads): latency without a GIL-bound generator's queueing.

    wrk does not decode bodies; each of its threads walks the (step, rank) sequence from its own offset.
    """
    world = B // rows
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_LUA.format(job=job, base=step_base, world=world, compression=compression))
    cpu_srv = cpu_seconds(server)
    out = subprocess.run(
        [
            "wrk",
            f"-t{min(2, clients)}",
            f"-c{clients}",
            f"-d{duration:g}s",
            "--latency",
            "-s",
            script.name,
            server.url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(script.name)
    cpu_srv = cpu_seconds(server) - cpu_srv
    fields = dict(line.split(None, 1) for line in out.splitlines() if line.strip().startswith(("50%", "99%")))
    rps = float(out.split("Requests/sec:")[1].split()[0])
    requests = int(out.split(" requests in ")[0].split()[-1])
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors: {out}")
    return {
        "rows": rows,
        "compression": compression,
        "clients": clients,
        "requests": requests,
        "rps": rps,
        "tps": rps * rows * L,
        "p50": _wrk_ms(fields["50%"].strip()),
        "p99": _wrk_ms(fields["99%"].strip()),
        "mb_s": float("nan"),
        "cpu_srv": cpu_srv / duration,
        "cpu_ms_per_request": cpu_srv / requests * 1e3,
        "cpu_cli": float("nan"),
    }


def in_process(engine, rows: int, compression: str | None, seconds: float, step_base: int) -> float:
    """Tokens/s of engine.batch (+ wire.encode when ``compression``) over the same (step, rank) sequence."""
    world = B // rows
    n, t0 = 0, time.perf_counter()
    while True:
        for i in range(n, n + world):
            step, rank = step_base + i // world, i % world
            batch = engine.batch(step, rank, world)
            if compression:
                wire.encode(batch.tokens, batch.source_ids, {"job": "j", "step": step}, compression)
        n += world
        if time.perf_counter() - t0 >= seconds:
            return n * rows * L / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=4.0, help="measured seconds per cell")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per cell")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 64])
    ap.add_argument(
        "--generator",
        choices=("python", "wrk"),
        default="python",
        help="load generator: threads with MixerClient (verify every body) or wrk (apt-get install wrk)",
    )
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below on SIGTERM too

    sources_dir = prepared_sources()
    print(
        f"cpus={os.cpu_count()}  loadavg(1m)={os.getloadavg()[0]:.2f}  "
        f"B={B} L={L} domain={DOMAIN_WEIGHT:.0%}  "
        f"cell={args.duration:g}s (+{args.warmup:g}s warm-up)  server: 1 uvicorn worker, embedded store"
    )

    # In-process references first, on an idle machine (no server running).
    log("bench: streaming peer (in-process)")
    peer = peer_tokens_per_s(32 * B * L, rounds=3)
    engine = make_engine(open_sources(), total_steps=TOTAL_STEPS)
    ref: dict[tuple[int, str], float] = {}
    for rows in args.rows:
        in_process(engine, rows, None, 0.3, 900_000)  # warm-up
        ref[rows, "engine"] = in_process(engine, rows, None, 2.0, 910_000 + rows * 1000)
        for comp in ("none", "zstd"):
            base = 920_000 + rows * 1000 + (comp == "zstd") * 500
            ref[rows, comp] = in_process(engine, rows, comp, 2.0, base)

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-service-") as state:
        server = ServerProcess(sources_dir, Path(state))
        try:
            log(f"bench: starting mixer serve on {server.url}")
            server.start()
            job = create_job(server.url)
            cells = list(itertools.product(args.rows, ("none", "zstd"), args.clients))
            for idx, (rows, comp, clients) in enumerate(cells):
                log(f"bench: cell {idx + 1}/{len(cells)}: {rows}x{L} compression={comp} clients={clients}")
                if args.generator == "wrk":
                    results.append(
                        run_cell_wrk(server, job, rows, comp, clients, idx * CELL_STEPS, args.duration)
                    )
                else:
                    results.append(
                        run_cell(
                            server, job, rows, comp, clients, idx * CELL_STEPS, args.duration, args.warmup
                        )
                    )
        finally:
            server.stop()

    print()
    print_table(
        [
            "rows x L",
            "zstd",
            "clients",
            "requests",
            "req/s",
            "tok/s",
            "MB/s wire",
            "p50 ms",
            "p99 ms",
            "srv CPU",
            "gen CPU",
            "in-proc/svc",
            "svc/peer",
        ],
        [
            [
                f"{r['rows']}x{L}",
                "yes" if r["compression"] == "zstd" else "no",
                r["clients"],
                r["requests"],
                f"{r['rps']:.0f}",
                fmt_rate(r["tps"]),
                f"{r['mb_s']:.0f}",
                f"{r['p50']:.2f}",
                f"{r['p99']:.2f}",
                f"{r['cpu_srv']:.0%}",
                f"{r['cpu_cli']:.0%}",
                f"{ref[r['rows'], 'engine'] / r['tps']:.1f}x",
                f"{r['tps'] / peer['tokens_per_s']:.2f}x",
            ]
            for r in results
        ],
    )
    print(
        "(srv/gen CPU: CPU time of the server process / the load generator per wall second, "
        "100% = one core; "
        "in-proc/svc: in-process engine.batch tok/s for the same slices / service tok/s)"
    )
    print()
    print_table(
        ["in-process reference (single thread)", "rows x L", "tok/s"],
        [
            [
                f"engine.batch{' + wire.encode(' + k + ')' if k != 'engine' else ''}",
                f"{rows}x{L}",
                fmt_rate(v),
            ]
            for (rows, k), v in ref.items()
        ]
        + [["streaming StreamingDataset, 512-sample batches", f"{B}x{L}", fmt_rate(peer["tokens_per_s"])]],
    )
    best = max(results, key=lambda r: r["tps"])
    hi = [r for r in results if r["clients"] == max(args.clients)]
    worst_p99 = max(r["p99"] for r in hi)
    print(
        f"\nbest service cell: {best['rows']}x{L} zstd={best['compression']} clients={best['clients']}: "
        f"{fmt_rate(best['tps'])}tok/s = {best['tps'] / peer['tokens_per_s']:.2f}x the streaming peer "
        f"(target >= {PEER_TARGET:.0f}x: "
        f"{'MET' if best['tps'] / peer['tokens_per_s'] >= PEER_TARGET else 'MISSED'})"
    )
    p99s = " / ".join(f"{r['p99']:.1f}" for r in hi)
    print(
        f"p99 at {max(args.clients)} clients: {p99s} ms "
        f"(target < {P99_TARGET_MS:.0f} ms: {'MET' if worst_p99 < P99_TARGET_MS else 'MISSED'} "
        f"in {sum(r['p99'] < P99_TARGET_MS for r in hi)}/{len(hi)} cells)"
    )


if __name__ == "__main__":
    import logging

    logging.getLogger("mixer_service").setLevel(logging.ERROR)  # the expected allow_wrap warning
    main()
