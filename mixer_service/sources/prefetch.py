"""Fetch the shards the next steps will read before they are asked for: the schedule makes them known.

A serving path calls ``prefetch_ahead`` after answering step ``t``; the loads run on the shard cache's own
threads, so steady-state requests find their shards present and never wait on the object store.
"""

from __future__ import annotations

from concurrent.futures import Future


def prefetch_ahead(engine, step: int, rank: int = 0, world: int = 1, lookahead: int = 2) -> list[Future]:
    """Start loading every shard that steps ``step + 1 .. step + lookahead`` of this rank slice read.

    ``engine`` is a ``MixingEngine`` (its ``shards_for_step`` is O(rows) and reads no tokens); sources
    without a ``prefetch`` (in-memory arrays) are skipped. Returns the futures of the loads started.
    """
    sources = {lay.name: lay.source for lay in engine.layouts}
    futures: list[Future] = []
    for t in range(step + 1, min(step + 1 + lookahead, engine.config.total_steps)):
        for name, shard_ids in engine.shards_for_step(t, rank, world).items():
            prefetch = getattr(sources[name], "prefetch", None)
            if prefetch is not None:
                futures += prefetch(shard_ids)
    return futures
