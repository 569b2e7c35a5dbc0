"""This working tree's HTTP service against another commit's, side by side in one run (issue 21).

The commit is checked out into a temporary ``git worktree`` (the main checkout is never touched); each tree
prepares the bench sources with its own code (``bench/common.py``, GPT-2 on the same raw corpora) and runs
its own ``mixer serve`` (1 uvicorn worker unless ``--args-*`` say otherwise, embedded store, every other
setting at its default). Both servers stay up; each cell of ``bench_service.py --generator wrk`` is then
run ``--reps`` times on each, in turn (A B B A A B ...), so machine drift hits both alike, and the ratio
A / B is taken pair by pair.

    python bench/compare_commits.py [--commit de34881] [--rows 64] [--clients 1 64] [--reps 3]
        [--args-a "--workers 2"] [--args-b ""]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
from bench_engine import DOMAIN_WEIGHT, B, L
from bench_service import CELL_STEPS, TOTAL_STEPS, run_cell_wrk
from common import ROOT, job_config, log, schedule

from mixer_service.service.process import ServerProcess


def worktree(commit: str, where: Path) -> Path:
    """``commit`` checked out (detached) at ``where``, with the raw corpora and tokenizer linked in."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), commit], check=True,
                   capture_output=True)
    (where / "data").mkdir(exist_ok=True)
    for name in ("raw", "tokenizer"):
        if not (where / "data" / name).exists():
            (where / "data" / name).symlink_to(ROOT / "data" / name)
    return where


def prepare(tree: Path) -> Path:
    """The bench sources prepared by ``tree``'s own code (cached under its data/bench)."""
    code = "import sys; sys.path.insert(0, 'bench'); from common import prepared_sources as p; print(p())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=_env(tree), capture_output=True,
                         text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def _env(tree: Path) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MIXER_")} | {"PYTHONPATH": str(tree)}


def serve(tree: Path, state: Path, args: list[str], env: dict[str, str] | None = None,
          total_steps: int = TOTAL_STEPS) -> ServerProcess:
    """``mixer serve`` from ``tree``'s code (its directory first on the path) with a bench job."""
    server = ServerProcess(prepare(tree), state, env={"PYTHONPATH": str(tree)} | (env or {}), extra_args=args)
    with contextlib.chdir(tree):  # ``python -m`` puts the working directory first on sys.path
        server.start()
    body = {"job_id": "bench", "config": job_config(L, B, total_steps, allow_wrap=True),
            "schedule": schedule(DOMAIN_WEIGHT), "author": "bench", "reason": "compare_commits"}
    httpx.post(f"{server.url}/v1/jobs", json=body, timeout=60).raise_for_status()
    return server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commit", default="de34881", help="B: the commit to compare against")
    ap.add_argument("--rows", type=int, nargs="+", default=[64])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--compression", nargs="+", default=["none", "zstd"])
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run")
    ap.add_argument("--reps", type=int, default=3, help="runs of each cell on each side")
    ap.add_argument("--args-a", default="--workers 1", help="extra `mixer serve` arguments of this tree")
    ap.add_argument("--args-b", default="--workers 1", help="extra `mixer serve` arguments of the commit")
    args = ap.parse_args()
    print(f"cpus={os.cpu_count()}  loadavg(1m)={os.getloadavg()[0]:.2f}  A = this working tree "
          f"({args.args_a or 'defaults'}), B = {args.commit} ({args.args_b or 'defaults'}); wrk, "
          f"{args.duration:g} s a run, {args.reps} runs a cell a side, in turn")
    with tempfile.TemporaryDirectory(prefix="compare-commits-") as tmp:
        old = worktree(args.commit, Path(tmp) / "old")
        servers: dict[str, ServerProcess] = {}
        try:
            log("compare: starting both servers")
            cells = list(itertools.product(args.rows, args.compression, args.clients))
            total = max(TOTAL_STEPS, (len(cells) * args.reps + 1) * CELL_STEPS)  # every run on fresh steps
            servers["A"] = serve(ROOT, Path(tmp) / "state-a", shlex.split(args.args_a), total_steps=total)
            servers["B"] = serve(old, Path(tmp) / "state-b", shlex.split(args.args_b), total_steps=total)
            rows_out, loads = [], []
            for idx, (rows, comp, clients) in enumerate(cells):
                log(f"compare: cell {idx + 1}/{len(cells)}: {rows}x{L} {comp} {clients} connections")
                got: dict[str, list[dict]] = {"A": [], "B": []}
                for rep in range(args.reps):
                    for side in ("AB" if rep % 2 == 0 else "BA"):
                        base = (idx * args.reps + rep) * CELL_STEPS
                        got[side].append(run_cell_wrk(servers[side], "bench", rows, comp, clients, base,
                                                      args.duration))
                        loads.append(os.getloadavg()[0])
                ratios = [a["rps"] / b["rps"] for a, b in zip(got["A"], got["B"], strict=True)]
                cpu_ratios = [b["cpu_ms_per_request"] / a["cpu_ms_per_request"]
                              for a, b in zip(got["A"], got["B"], strict=True)]
                medians = {s: {k: float(np.median([r[k] for r in got[s]])) for k in ("rps", "p50",
                                                                                   "cpu_ms_per_request")}
                        for s in got}
                rows_out.append((f"{rows}x{L}", "yes" if comp == "zstd" else "no", clients, medians["A"],
                                 medians["B"], rows * L, float(np.median(ratios)),
                                 float(np.median(cpu_ratios)), " ".join(f"{r:.2f}" for r in ratios)))
        finally:
            for server in servers.values():
                server.stop()
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)],
                           capture_output=True)
    print(f"\n{'cell':<8} {'zstd':<4} {'conns':>5}  {'A req/s':>8} {'A tok/s':>9} {'A p50':>8} {'A cpu':>7}  "
          f"{'B req/s':>8} {'B tok/s':>9} {'B p50':>8} {'B cpu':>7}  {'A/B':>5} {'cpu B/A':>7}  A/B per pair")
    for cell, z, c, a, b, tokens, ratio, cpu_ratio, pairs in rows_out:
        sides = "  ".join(f"{x['rps']:8.0f} {x['rps'] * tokens / 1e6:7.1f} M {x['p50']:6.2f}ms "
                          f"{x['cpu_ms_per_request']:5.2f}ms" for x in (a, b))
        print(f"{cell:<8} {z:<4} {c:>5}  {sides}  {ratio:5.2f} {cpu_ratio:7.2f}  {pairs}")
    print("(p50: wrk's median latency; cpu: server CPU time per request, all its processes, median of the "
          "runs; A/B: median over pairs of A req/s / B req/s; cpu B/A: the same for CPU per request, > 1 = A "
          "cheaper)")
    print(f"loadavg(1m) during the runs: {min(loads):.2f}-{max(loads):.2f}")


if __name__ == "__main__":
    main()
