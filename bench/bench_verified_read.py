"""What checking every read costs: 64 rows of 2048 tokens read from a verified shard-cache entry through
a memory map with no check (the read path before issue 17), through ``pread`` with length checks only, and
through ``pread`` with every 4 KiB block checked against its xxh3 (``sources.checked``, the path of a
shard not resident), and from the shard's resident copy (the proven bytes ``ShardCache`` keeps in memory,
the path of a resident shard); then a whole engine batch (64 x 2048, boundaries included) over a prepared
source, the number the check is measured against.

    .venv/bin/python bench/bench_verified_read.py [--tokens 4e6] [--repeat 200]
                                                  [--order global|window|sliding]

Run it from another checkout (``PYTHONPATH=<old tree>``) to time the engine batch of older code; the
read rows need ``sources.checked``. Page cache is warm (the numbers are CPU cost, as a steady server sees).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from mixer_contract.job import JobConfig
from mixer_contract.schedule import Schedule
from mixer_service.engine import MixingEngine
from mixer_service.prepare.tokenizer import ByteTokenizer
from mixer_service.prepare.writer import prepare_source
from mixer_service.sources import PreparedSource

ROWS, SEQ = 64, 2048


def timed(fn, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def make_source(directory: Path, tokens: int) -> PreparedSource:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    docs, total = [], 0
    while total < tokens:
        n = int(rng.integers(100, 1900))
        docs.append(" ".join(rng.choice(words, n // 6)))
        total += len(docs[-1]) + 1
    prepare_source(docs, directory, ByteTokenizer(), name="web", shard_tokens=1 << 20, progress=False)
    return opened(directory, 0)


def opened(directory: Path, memory_bytes: int | None, verify: str = "fast") -> PreparedSource:
    """The source with its own cache keeping ``memory_bytes`` resident (None: the default; older trees
    without the resident tier ignore it)."""
    try:
        from mixer_service.sources import ShardCache

        cache = ShardCache(directory / ".cache" / "shards", verify=verify, **(
            {} if memory_bytes is None else {"memory_bytes": memory_bytes}))
    except TypeError:
        return PreparedSource.open(directory, verify=verify)
    return PreparedSource.open(directory, verify=verify, cache=cache)


def read_rows(tokens, starts: np.ndarray, out: np.ndarray) -> None:
    for row, start in enumerate(starts.tolist()):
        out[row] = tokens[start : start + SEQ]


def gather_rows(tokens, starts: np.ndarray, out: np.ndarray) -> None:
    tokens.gather_rows(starts, SEQ, out, np.arange(len(starts)))


class PlainSource:
    """The same source as in-memory arrays: the read path with no pread and no check (the floor)."""

    def __init__(self, src: PreparedSource) -> None:
        self.tokens = np.asarray(src.tokens.read(0, src.tokens.size))
        self.doc_offsets = np.asarray(src.doc_offsets)
        self.shard_offsets = np.asarray(src.shard_offsets)


def engine_rounds(engines: dict[str, MixingEngine], repeat: int, rounds: int,
                  boundaries: bool = True) -> dict[str, list[float]]:
    """Median seconds per batch (+ boundaries) of each engine, ``rounds`` rounds taken in turn so the
    machine's drift hits every engine alike; each round asks every engine for the same steps."""
    def one(engine: MixingEngine, steps) -> None:
        step = next(steps)
        engine.batch(step)
        if boundaries:
            engine.row_boundaries(step)

    out: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(rounds):
        for name, engine in engines.items():
            steps = iter(range(r * (repeat + 1), (r + 1) * (repeat + 1)))
            out[name].append(timed(functools.partial(one, engine, steps), repeat))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=float, default=4e6)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--order", choices=("global", "window", "sliding"), default="global",
                    help="the engine job's epoch order (global: what this bench always timed)")
    args = ap.parse_args()
    print(f"loadavg(1m)={os.getloadavg()[0]:.2f}  {ROWS} x {SEQ} uint16 rows, {args.tokens:.0e} tokens")
    with tempfile.TemporaryDirectory() as tmp:
        src = make_source(Path(tmp) / "web", int(args.tokens))
        rows: dict[str, float] = {}
        if importlib.util.find_spec("mixer_service.sources.checked") is not None:
            from mixer_service.sources.checked import CheckedRegion, CheckedTokens

            view = src.tokens.shard(0)  # a verified cache entry, read through its checksum table
            region = view.region
            plain = np.memmap(region.handle.name, dtype=view.dtype, mode="r")
            unchecked = CheckedTokens(CheckedRegion(region.handle, 0, region.length, None, region.label),
                                      view.dtype, view.size)
            starts = np.random.default_rng(1).integers(0, view.size - SEQ, ROWS)
            out = np.empty((ROWS, SEQ), dtype=view.dtype)
            rows["rows: memory map, unchecked (before)"] = timed(lambda: read_rows(plain, starts, out),
                                                                 args.repeat)
            rows["rows: pread per row, length checks only"] = timed(lambda: read_rows(unchecked, starts, out),
                                                                    args.repeat)
            rows["rows: pread + xxh3 per row"] = timed(lambda: read_rows(view, starts, out), args.repeat)
            if hasattr(view, "gather_rows"):
                rows["rows: coalesced preads, length checks only"] = timed(
                    lambda: gather_rows(unchecked, starts, out), args.repeat)
                rows["rows: coalesced preads + xxh3 per block"] = timed(
                    lambda: gather_rows(view, starts, out), args.repeat)
            resident = opened(Path(tmp) / "web", None).tokens.shard(0)
            if isinstance(resident, np.ndarray):  # the resident tier: the proven bytes, in memory
                rows["rows: resident copy, slice per row (tier on)"] = timed(
                    lambda: read_rows(resident, starts, out), args.repeat)
        for name, seconds in rows.items():
            print(f"{name:48s} {seconds * 1e6:9.1f} us per batch")
        config = JobConfig.parse({"sources": [{"name": "web", "role": "repeat"}], "seq_len": SEQ,
                                  "global_batch": ROWS, "seed": 3, "total_steps": 100_000,
                                  "order": {"kind": args.order}})
        schedule = Schedule.parse({"phases": [{"start_step": 0, "weights": {"web": 1}}]}, ["web"])
        trusting = opened(Path(tmp) / "web", 0, verify="off")
        variants = {"checked (pread + xxh3, --memory-cache 0)": src,
                    "pread, no checksums (--verify off)": trusting,
                    "in-memory arrays, no pread, no check": PlainSource(src),
                    "resident tier (default --memory-cache)": opened(Path(tmp) / "web", None)}
        engines = {name: MixingEngine.create(config, {"web": source}, [(0, schedule)])
                   for name, source in variants.items()}
        times = engine_rounds(engines, args.repeat, args.rounds)
        print(f"\nengine batch + row_boundaries, {ROWS} x {SEQ}, {args.order} order, median of {args.repeat} "
              f"per round, {args.rounds} rounds in turn:")
        for name, per_round in times.items():
            print(f"  {name:42s} " + " ".join(f"{t * 1e6:7.1f}" for t in per_round) + " us")
        checked, off, memory, resident = (np.array(times[n]) for n in variants)
        print(f"resident tier vs checked, median of rounds: {np.median(resident / checked):.2f}x the time, "
              f"vs in-memory arrays: {np.median(resident / memory):.2f}x")
        share = np.median((checked - off) / checked)
        whole = np.median((checked - memory) / checked)
        print(f"verification (xxh3) share of a checked batch, median of rounds: {share:.1%} (target <= 10%)")
        print(f"whole integrity read path (pread + xxh3 vs in-memory) share: {whole:.1%}")
        batch_only = engine_rounds(engines, args.repeat, args.rounds, boundaries=False)
        print(f"\nengine batch alone (the token rows; row_boundaries reads the document index, which has no "
              f"resident tier), {args.rounds} rounds in turn:")
        for name, per_round in batch_only.items():
            print(f"  {name:42s} " + " ".join(f"{t * 1e6:7.1f}" for t in per_round) + " us")
        print(f"loadavg(1m) at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
