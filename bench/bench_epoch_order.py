"""What a shard-local epoch order (window, sliding) costs in shuffle quality, against the global order and
mosaicml-streaming.

One web source of ``--tokens`` tokens in shards of 2**26 tokens (the prepare default until 2026-12), cut
into sequences of L=2048; each step takes ``--rows`` of them (486 = 95% of a 512-row batch). For every
order the whole first epoch is laid out (position -> chunk -> shard of its first token) and measured per step:

* distinct shards: how many shards one step reads (what a cache must hold for that step);
* same-shard pairs: the share of row pairs of one batch that come from the same shard (global order:
  about 1/num_shards; a window of W shards: about 1/W), and the "effective shards" 1/that share;
* adjacent pairs: row pairs of one batch that are consecutive chunks of the stream (running text split
  across two rows of the same batch), per batch;
* fetches/step: shard loads per step for an LRU cache holding ``--cache-fraction`` of the shards
  (10% by default, the issue's remote setting), over the whole epoch;
* first step ms: time from nothing to the first step's chunk ids (ours: per-epoch shard state plus one
  step; streaming: its whole-epoch shuffle array, O(chunks) memory, built before the first sample);
* ms/step: time per step over consecutive steps from mid-epoch (streaming: that array's cost per step).

Peers, in the same run: our global order (``"order": {"kind": "global"}``, every job's order before issue
10) and mosaicml-streaming's ``py1br`` and ``py1e`` shuffles with a block of the same W shards' samples.

    python bench/bench_epoch_order.py [--tokens 2e10] [--windows 1 2 4 8 16 32 64] [--kinds window sliding]
                                      [--rows 486]
"""

from __future__ import annotations

import argparse
import time
from collections import OrderedDict

import numpy as np
from common import print_table

L = 2048
SHARD_TOKENS = 1 << 26


class _ShapeOnly:
    """``num_tokens`` tokens in fixed shards: the shape alone, no tokens (an order never reads them)."""

    def __init__(self, num_tokens: int) -> None:
        self.tokens = None
        self.doc_offsets = np.array([0, num_tokens], dtype=np.int64)
        self.shard_offsets = np.r_[np.arange(0, num_tokens, SHARD_TOKENS), num_tokens].astype(np.int64)


def our_epoch(source: _ShapeOnly, kind: str, window: int | None, rows: int, steps: int = 100,
              rounds: int = 5) -> tuple[np.ndarray, float, float]:
    """Chunk ids of epoch 0 in serving order; ms for a cold first step; ms per step over ``steps``
    consecutive steps from mid-epoch (per-window state amortised as in serving), best of ``rounds``."""
    from mixer_contract.job import OrderSpec
    from mixer_service.engine.layout import SourceLayout

    order = OrderSpec(kind, window) if window else OrderSpec()
    lay = SourceLayout(source, "web", L, seed=1, repeat=False, order=order)
    t0 = time.perf_counter()
    lay.order.chunks(0, np.arange(rows))
    first_ms = (time.perf_counter() - t0) * 1e3
    first = lay.num_chunks // rows // 2
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for s in range(first, first + steps):
            lay.order.chunks(0, np.arange(s * rows, (s + 1) * rows))
        best = min(best, time.perf_counter() - t0)
        first += steps
    return lay.order.chunks(0, np.arange(lay.num_chunks)), first_ms, best / steps * 1e3


def streaming_epoch(source: _ShapeOnly, algo: str, window: int, rows: int) -> tuple[np.ndarray, float, float]:
    """Streaming materialises the epoch before its first sample: that is its first-step time."""
    from streaming.base.shuffle import get_shuffle

    per_shard = SHARD_TOKENS // L
    num_chunks = -(-int(source.doc_offsets[-1]) // L)
    sizes = np.full(-(-num_chunks // per_shard), per_shard, dtype=np.int64)
    sizes[-1] = num_chunks - per_shard * (len(sizes) - 1)
    t0 = time.perf_counter()
    ids = get_shuffle(algo, sizes, 1, 1, 0, window * per_shard)
    total = time.perf_counter() - t0
    return ids, total * 1e3, total / (num_chunks // rows) * 1e3


def measure(chunks: np.ndarray, rows: int, num_shards: int, cache_shards: int) -> dict[str, float]:
    steps = len(chunks) // rows
    batches = chunks[: steps * rows].reshape(steps, rows)
    shards = np.sort(batches * L // SHARD_TOKENS, axis=1)
    new_shard = np.diff(shards, axis=1) != 0
    distinct = 1 + new_shard.sum(axis=1)
    # same-shard pairs: sum over runs of equal shard ids of c (c - 1), over rows (rows - 1)
    flat = shards + (np.arange(steps) * num_shards)[:, None]
    _, counts = np.unique(flat, return_counts=True)
    same = (counts * (counts - 1)).sum() / (steps * rows * (rows - 1))
    adjacent = (np.diff(np.sort(batches, axis=1), axis=1) == 1).sum(axis=1)
    return {"distinct": float(distinct.mean()), "same": float(same), "adjacent": float(adjacent.mean()),
            "fetches": lru_fetches(shards, new_shard, cache_shards) / steps}


def lru_fetches(shards: np.ndarray, new_shard: np.ndarray, capacity: int) -> int:
    cache: OrderedDict[int, None] = OrderedDict()
    fetches = 0
    for row, starts in zip(shards, new_shard, strict=True):
        for shard in row[np.r_[True, starts]].tolist():
            if shard in cache:
                cache.move_to_end(shard)
            else:
                fetches += 1
                cache[shard] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
    return fetches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=float, default=2e10)
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--kinds", nargs="+", choices=("window", "sliding"), default=["window", "sliding"])
    ap.add_argument("--rows", type=int, default=486, help="rows of this source per step")
    ap.add_argument("--cache-fraction", type=float, default=0.10)
    ap.add_argument("--peer-windows", type=int, nargs="+", default=[8, 16],
                    help="W for the streaming peers (a whole-epoch shuffle each: slow, so fewer)")
    args = ap.parse_args()

    source = _ShapeOnly(int(args.tokens))
    num_shards = len(source.shard_offsets) - 1
    cache = max(1, int(num_shards * args.cache_fraction))
    print(f"source: {int(args.tokens):.3g} tokens, {num_shards} shards of {SHARD_TOKENS} tokens, L={L}, "
          f"{args.rows} rows/step, LRU cache {cache} shards ({args.cache_fraction:.0%})")
    runs = [("global (before issue 10)", None, lambda: our_epoch(source, "global", None, args.rows))]
    runs += [(f"{kind} W={w}", w, lambda w=w, k=kind: our_epoch(source, k, w, args.rows))
             for kind in args.kinds for w in args.windows]
    for algo in ("py1br", "py1e"):
        runs += [(f"streaming {algo} block={w} shards", w,
                  lambda w=w, a=algo: streaming_epoch(source, a, w, args.rows)) for w in args.peer_windows]
    rows = []
    for label, _w, run in runs:
        chunks, first_ms, ms = run()
        m = measure(chunks, args.rows, num_shards, cache)
        rows.append([label, f"{m['distinct']:.1f}", f"{m['same']:.2%}", f"{1 / m['same']:.1f}",
                     f"{m['adjacent']:.2f}", f"{m['fetches']:.2f}", f"{first_ms:.1f}", f"{ms:.3f}"])
        print(f"  measured {label}", flush=True)
    print()
    print_table(["order", "distinct shards/step", "same-shard pairs", "effective shards",
                 "adjacent pairs/batch", "fetches/step (LRU)", "first step ms", "ms/step"], rows)


if __name__ == "__main__":
    main()
