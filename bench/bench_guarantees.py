"""The price of each guarantee in requests/s and in server CPU per request (issue 21).

The same server with one guarantee off at a time; on a shared machine CPU per request is the steadier figure.

Variants of this tree's ``mixer serve`` (1 uvicorn worker, embedded store), all up at once, each measured
``--reps`` times per cell with wrk, in turn, so drift hits all alike:

* ``all on``: the defaults (fresh head read per request, checked reads, limits);
* ``verification off``: ``--verify off`` (no hash at first use, no xxh3 on reads; lengths still checked);
* ``head read off``: the runtime this process holds, no store round trip
  (``MIXER_UNSAFE_BENCHMARK_ONLY_DISABLE=head_read``: benchmarks only, logged at start, no flag for it);
* ``limits off``: no in-flight or body-size middleware (``...=limits``);
* ``all off``: the three together.

    python bench/bench_guarantees.py [--rows 64] [--clients 1 64] [--reps 3] [--duration 3]
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
from pathlib import Path

import numpy as np
from bench_engine import L
from bench_service import CELL_STEPS, run_cell_wrk
from common import ROOT, log
from compare_commits import serve

from mixer_service.service.app import UNSAFE_ENV
from mixer_service.service.process import ServerProcess

VARIANTS = {
    "all on (defaults)": ([], ""),
    "verification off": (["--verify", "off"], ""),
    "head read off": ([], "head_read"),
    "limits off": ([], "limits"),
    "all off": (["--verify", "off"], "head_read,limits"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[64])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--compression", default="none")
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    print(f"cpus={os.cpu_count()}  loadavg(1m)={os.getloadavg()[0]:.2f}  wrk, {args.duration:g} s a run, "
          f"{args.reps} runs a cell a variant, in turn; 1 uvicorn worker, embedded store")
    results: dict[tuple[int, int], dict[str, list[dict]]] = {}
    loads = []
    with tempfile.TemporaryDirectory(prefix="bench-guarantees-") as tmp:
        servers: dict[str, ServerProcess] = {}
        try:
            for k, (name, (extra, off)) in enumerate(VARIANTS.items()):
                servers[name] = serve(ROOT, Path(tmp) / f"state-{k}", ["--workers", "1", *extra],
                                      env={UNSAFE_ENV: off})
            cells = list(itertools.product(args.rows, args.clients))
            for idx, (rows, clients) in enumerate(cells):
                log(f"guarantees: cell {rows}x{L} {clients} connections")
                got = results[rows, clients] = {name: [] for name in servers}
                for rep in range(args.reps):
                    order = list(servers) if rep % 2 == 0 else list(reversed(servers))
                    for name in order:
                        base = (idx * args.reps + rep) * CELL_STEPS
                        got[name].append(run_cell_wrk(servers[name], "bench", rows, args.compression,
                                                      clients, base, args.duration))
                        loads.append(os.getloadavg()[0])
        finally:
            for server in servers.values():
                server.stop()
    for (rows, clients), got in results.items():
        on = got["all on (defaults)"]
        print(f"\n{rows}x{L} zstd={args.compression} {clients} connections   req/s  vs all on   "
              "cpu/request  vs all on   guarantee's cost (req/s; cpu)")
        for name, runs in got.items():
            rps = float(np.median([r["rps"] for r in runs]))
            cpu = float(np.median([r["cpu_ms_per_request"] for r in runs]))
            ratio = float(np.median([r["rps"] / o["rps"] for r, o in zip(runs, on, strict=True)]))
            cpu_ratio = float(np.median([r["cpu_ms_per_request"] / o["cpu_ms_per_request"]
                                         for r, o in zip(runs, on, strict=True)]))
            cost = "" if name.startswith("all on") else f"{1 - 1 / ratio:+.0%}; {1 - cpu_ratio:+.0%}"
            print(f"  {name:<20} {rps:8.0f}   {ratio:6.2f}x   {cpu:8.2f} ms   {cpu_ratio:6.2f}x   {cost}")
    print("(medians over the runs; ratios are taken run pair by run pair; cpu: server CPU time per request)")
    print(f"loadavg(1m) during the runs: {min(loads):.2f}-{max(loads):.2f}")


if __name__ == "__main__":
    main()
