"""What checking every read costs: 64 rows of 2048 tokens read from a verified shard-cache entry through
a memory map with no check (the read path before issue 17), through ``pread`` with length checks only, and
through ``pread`` with every 4 KiB block checked against its xxh3 (``sources.checked``, the path now);
then a whole engine batch (64 x 2048, boundaries included) over a prepared source, the number the check
is measured against.

    .venv/bin/python bench/bench_verified_read.py [--tokens 4e6] [--repeat 200]

Run it from another checkout (``PYTHONPATH=<old tree>``) to time the engine batch of older code; the
read rows need ``sources.checked``. Page cache is warm (the numbers are CPU cost, as a steady server sees).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from mixer_service.engine import JobConfig, MixingEngine, Schedule
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
    return PreparedSource.open(directory)


def read_rows(tokens, starts: np.ndarray, out: np.ndarray) -> None:
    for row, start in enumerate(starts.tolist()):
        out[row] = tokens[start : start + SEQ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=float, default=4e6)
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
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
            rows["rows: pread, length checks only"] = timed(lambda: read_rows(unchecked, starts, out),
                                                            args.repeat)
            rows["rows: pread + xxh3 per 4 KiB (now)"] = timed(lambda: read_rows(view, starts, out),
                                                              args.repeat)
        config = JobConfig.parse({"sources": [{"name": "web", "role": "repeat"}], "seq_len": SEQ,
                                  "global_batch": ROWS, "seed": 3, "total_steps": 10_000})
        schedule = Schedule.parse({"phases": [{"start_step": 0, "weights": {"web": 1}}]}, ["web"])
        engine = MixingEngine.create(config, {"web": src}, [(0, schedule)])
        steps = iter(range(10_000))
        rows["engine batch + boundaries, 64 x 2048"] = timed(
            lambda: (engine.batch(s := next(steps)), engine.row_boundaries(s)), args.repeat)
        for name, seconds in rows.items():
            print(f"{name:42s} {seconds * 1e6:9.1f} us per batch")
        if "rows: pread + xxh3 per 4 KiB (now)" in rows:
            extra = rows["rows: pread + xxh3 per 4 KiB (now)"] - rows["rows: memory map, unchecked (before)"]
            print(f"{'checked reads cost over unchecked':42s} {extra * 1e6:9.1f} us per batch")


if __name__ == "__main__":
    main()
