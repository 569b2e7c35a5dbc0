"""In-process engine throughput vs. mosaicml-streaming on the same tokens, in one run.

Job: B=512 sequences of L=2048 GPT-2 tokens per step, 5% domain (ABC tunes, role repeat) / 95% web (State
of the Union, role once). SOTU holds ~2.07 M tokens = 1013 sequences, about two steps' worth at 95%, so the
job is created with ``allow_wrap=True`` (the web source starts further passes); the peer likewise repeats
its web stream (streaming upsamples a stream whose proportion needs more samples than it has).

Engine: ``MixingEngine.batch(step)`` -> a [512, 2048] uint16 array, timed over ``--steps`` fresh steps
after ``--warmup`` steps. Peer: ``StreamingDataset`` with two local ``Stream``s (proportion 0.95 web / 0.05
domain, no remote), ``batch_size=512``, ``shuffle=True``, ``epoch_size`` = the same number of samples, each
sample's ``tokens`` copied into a [512, 2048] batch buffer (the same output the engine gives). Engine and
peer run round-robin ``--rounds`` times so background load hits both alike; the table shows the best round
of each and the ratio line also gives the median of the per-round ratios.

    python bench/bench_engine.py [--steps 64] [--rounds 5] [--loader-workers 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import (
    DOMAIN,
    WEB,
    describe_sources,
    fmt_rate,
    job_config,
    mds_datasets,
    open_sources,
    print_table,
    schedule,
)

B, L, DOMAIN_WEIGHT = 512, 2048, 0.05
ENGINE_TARGET = 20.0


def make_engine(sources: dict, seq_len: int = L, global_batch: int = B, total_steps: int = 100_000):
    from mixer_contract.job import JobConfig
    from mixer_contract.schedule import Schedule
    from mixer_service.engine import MixingEngine

    # parse_new: the order a job created through the API gets (the default), not a stored config's
    config = JobConfig.parse_new(job_config(seq_len, global_batch, total_steps, allow_wrap=True))
    sched = Schedule.parse(schedule(DOMAIN_WEIGHT), config.source_names)
    return MixingEngine.create(config, sources, [(0, sched)])


def time_engine(engine, first_step: int, steps: int, rank: int = 0, world: int = 1) -> float:
    """Seconds for ``steps`` consecutive fresh steps (rank slice ``rank``/``world``)."""
    t0 = time.perf_counter()
    for step in range(first_step, first_step + steps):
        engine.batch(step, rank, world)
    return time.perf_counter() - t0


class StreamingPeer:
    """mosaicml-streaming over the local MDS copies (see common.py); one dataset, one epoch per run."""

    def __init__(self, samples: int, seq_len: int = L, batch_size: int = B, seed: int = 1234) -> None:
        from streaming import Stream, StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        mds = mds_datasets(seq_len)
        t0 = time.perf_counter()
        self.dataset = StreamingDataset(
            streams=[Stream(local=str(mds[WEB]), proportion=1 - DOMAIN_WEIGHT),
                     Stream(local=str(mds[DOMAIN]), proportion=DOMAIN_WEIGHT)],
            batch_size=batch_size, shuffle=True, shuffle_seed=seed, epoch_size=samples)
        self.init_s = time.perf_counter() - t0
        self.samples, self.seq_len, self.batch_size = samples, seq_len, batch_size

    def run(self) -> tuple[float, float, int]:
        """One full epoch: (seconds to first sample, seconds from first sample to the end, samples)."""
        buf = np.empty((self.batch_size, self.seq_len), dtype=np.uint16)
        t0 = time.perf_counter()
        first = None
        n = 0
        for sample in self.dataset:
            if first is None:
                first = time.perf_counter()
            buf[n % self.batch_size] = sample["tokens"]
            n += 1
        end = time.perf_counter()
        return first - t0, end - first, n


def peer_tokens_per_s(tokens: int, rounds: int = 3) -> dict:
    """Best steady-state tokens/s of the streaming peer over ``tokens`` tokens (used by bench_service)."""
    peer = StreamingPeer(tokens // L)
    runs = [peer.run() for _ in range(rounds)]
    best = min(runs, key=lambda r: r[1])
    return {"tokens_per_s": (best[2] - 1) * L / best[1], "startup_s": best[0], "samples": best[2]}


class LoaderPeer:
    """Streaming through a torch DataLoader with ``workers`` spawned, persistent worker processes."""

    def __init__(self, samples: int, workers: int) -> None:
        from torch.utils.data import DataLoader

        self.peer = StreamingPeer(samples)
        self.loader = DataLoader(self.peer.dataset, batch_size=B, num_workers=workers, collate_fn=_collate,
                                 multiprocessing_context="spawn", persistent_workers=True)

    def run(self) -> float:
        """Steady-state tokens/s of one epoch, from the first batch on (that batch not counted)."""
        first, n = None, 0
        for batch in self.loader:
            if first is None:
                first = time.perf_counter()
            else:
                n += batch.shape[0]
        return n * L / (time.perf_counter() - first)


def _collate(samples: list[dict]):
    import torch

    out = np.empty((len(samples), L), dtype=np.uint16)
    for i, s in enumerate(samples):
        out[i] = s["tokens"]
    return torch.from_numpy(out)


def index_load_times(sources: dict, repeat: int = 7) -> dict:
    """Open (cache present) + create a one-source job over the largest corpus; also a cold open."""
    from mixer_contract.job import JobConfig
    from mixer_contract.schedule import Schedule
    from mixer_service.engine import MixingEngine
    from mixer_service.sources.prepared import PreparedSource

    name = max(sources, key=lambda n: sources[n].meta.num_tokens)
    path = sources[name].meta.path
    config = JobConfig.parse({"sources": [{"name": name, "role": "repeat"}], "seq_len": L, "global_batch": B,
                              "seed": 1, "total_steps": 1_000_000})
    sched = [(0, Schedule.parse({"phases": [{"start_step": 0, "weights": {name: 1}}]}, [name]))]
    warm = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        src = PreparedSource.open(path)
        t1 = time.perf_counter()
        MixingEngine.create(config, {name: src}, sched)
        warm.append((t1 - t0, time.perf_counter() - t1))
    with tempfile.TemporaryDirectory() as tmp:  # no cache yet: decompress + verify every shard
        t0 = time.perf_counter()
        PreparedSource.open(path, cache_dir=Path(tmp))
        cold = time.perf_counter() - t0
    return {"name": name, "tokens": sources[name].meta.num_tokens, "docs": sources[name].meta.num_docs,
            "open": statistics.median(w[0] for w in warm), "create": statistics.median(w[1] for w in warm),
            "cold_open": cold}


class InMemory:
    """A source's tokens read once into memory: the K-source table measures the engine, not a shard cache."""

    def __init__(self, source) -> None:
        self.doc_offsets = np.asarray(source.doc_offsets)
        self.shard_offsets = np.asarray(source.shard_offsets)
        self.tokens = np.asarray(source.tokens[0:int(self.doc_offsets[-1])])


def many_source_engine(source, num_sources: int, total_steps: int = 100_000):
    """A K-source job, weights 1..K ramping to uniform (two schedule pieces). Each source is the whole
    corpus under its own name (so its own epoch order): K slices of a 2 M-token corpus would be so small
    that every source started a new epoch every step, which no real job does."""
    from mixer_contract.job import JobConfig
    from mixer_contract.schedule import Schedule
    from mixer_service.engine import MixingEngine

    names = [f"s{i}" for i in range(num_sources)]
    sources = {n: source for n in names}
    config = JobConfig.parse({"sources": [{"name": n, "role": "repeat"} for n in names], "seq_len": L,
                              "global_batch": B, "seed": 1, "total_steps": total_steps})
    skewed = {n: f"{i + 1}/{num_sources * (num_sources + 1) // 2}" for i, n in enumerate(names)}
    sched = Schedule.parse({"phases": [{"start_step": 0, "weights": skewed, "ramp": True},
                                       {"start_step": total_steps // 2, "weights": {n: f"1/{num_sources}"
                                                                                    for n in names}}]}, names)
    return MixingEngine.create(config, sources, [(0, sched)])


def source_count_scaling(source, counts=(2, 8, 64), steps: int = 32, rounds: int = 3) -> list[list]:
    """ms per fresh step (whole batch, and the mixture arithmetic alone) for K-source jobs, same corpus."""
    rows = []
    for k in counts:
        engine = many_source_engine(source, k)
        first, batch_s, plan_s = 1000, [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for step in range(first, first + steps):
                engine.plan.realized(step + 1)  # the arithmetic alone, on steps not yet computed
            plan_s.append(time.perf_counter() - t0)
            batch_s.append(time_engine(engine, first, steps))  # arithmetic now cached: gather + assignment
            first += steps
        plan_ms, rest_ms = min(plan_s) / steps * 1e3, min(batch_s) / steps * 1e3
        total_ms = plan_ms + rest_ms
        rows.append([k, len(engine.plan.pieces), f"{plan_ms:.2f}", f"{rest_ms:.2f}", f"{total_ms:.2f}"])
    return rows


def print_sources_table(sources: dict) -> None:
    print()
    print_table(["sources K", "pieces", "mixture ms/step", "rows+gather ms/step", "total ms/step"],
                source_count_scaling(InMemory(sources[WEB])))
    print(f"(K sources, each all of {WEB} in memory under its own name, B={B} L={L}, weights 1..K ramping "
          "to uniform; "
          "best of 3 rounds of 32 fresh "
          "steps; K=2 is the strongest peer: the shape every job had before issue 10)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=64, help="timed steps per round (B*L tokens each)")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--loader-workers", type=int, default=0,
                    help="also time streaming through a torch DataLoader with this many workers")
    ap.add_argument("--sources-only", action="store_true",
                    help="only the sources-per-job table (K = 2, 8, 64), without the streaming peer")
    args = ap.parse_args()

    sources = open_sources()
    if args.sources_only:
        print_sources_table(sources)
        return
    print(f"cpus={os.cpu_count()}  loadavg(1m)={os.getloadavg()[0]:.2f}  "
          f"B={B} L={L} domain={DOMAIN_WEIGHT:.0%}  "
          f"steps/round={args.steps} rounds={args.rounds} (best round shown)")
    print("\n".join(describe_sources(sources)))
    engine = make_engine(sources)
    for w in engine.warnings:
        print(f"NOTE: {w}")
    tokens = args.steps * B * L
    peer = StreamingPeer(args.steps * B)
    for step in range(args.warmup):
        engine.batch(step)
    peer.run()  # warm-up epoch (page cache, shared memory, partition code paths)
    loader = None
    if args.loader_workers:
        loader = LoaderPeer(args.steps * B, args.loader_workers)
        loader.run()  # warm-up epoch: spawns the workers

    eng_s, peer_runs, ratios, loader_tps, loader_ratios = [], [], [], [], []
    next_step = args.warmup
    for _ in range(args.rounds):
        eng_s.append(time_engine(engine, next_step, args.steps))
        next_step += args.steps
        peer_runs.append(peer.run())
        ratios.append((tokens / eng_s[-1]) / ((peer_runs[-1][2] - 1) * L / peer_runs[-1][1]))
        if loader:
            loader_tps.append(loader.run())
            loader_ratios.append((tokens / eng_s[-1]) / loader_tps[-1])
    e = min(eng_s)
    p = min(peer_runs, key=lambda r: r[1])
    eng_tps, peer_tps = tokens / e, (p[2] - 1) * L / p[1]
    idx = index_load_times(sources)

    rows = [
        ["engine MixingEngine.batch (in-process)", args.steps, tokens, f"{e:.3f}", fmt_rate(eng_tps),
         f"{args.steps / e:.1f}", f"{e / args.steps * 1e3:.2f}"],
        ["peer streaming StreamingDataset (in-process)", p[2], (p[2]) * L, f"{p[1]:.3f}", fmt_rate(peer_tps),
         f"{(p[2] - 1) / B / p[1]:.1f}", f"{p[1] / ((p[2] - 1) / B) * 1e3:.2f}"],
    ]
    strongest = ("streaming in-process", peer_tps)
    if loader:
        lt = max(loader_tps)
        rows.append([f"peer streaming + DataLoader({args.loader_workers} workers)", "", "", "", fmt_rate(lt),
                     f"{lt / (B * L):.1f}", f"{B * L / lt * 1e3:.2f}"])
        if lt > peer_tps:
            strongest = (f"streaming + DataLoader({args.loader_workers} workers)", lt)
    print()
    print_table(["throughput", "batches/samples", "tokens", "sec", "tok/s", "batch/s", "ms/batch"], rows)
    ratio = eng_tps / strongest[1]
    print(f"\nengine / strongest peer ({strongest[0]}) tokens/s = {ratio:.1f}x (best round of each); "
          f"target >= {ENGINE_TARGET:.0f}x: {'MET' if ratio >= ENGINE_TARGET else 'MISSED'}")
    print(f"engine / streaming in-process, per round (paired, same background load): "
          f"{' '.join(f'{r:.1f}x' for r in ratios)}; median {statistics.median(ratios):.1f}x")
    if loader:
        print(f"engine / streaming + DataLoader({args.loader_workers} workers), per round: "
              f"{' '.join(f'{r:.1f}x' for r in loader_ratios)}; "
              f"median {statistics.median(loader_ratios):.1f}x")
    print(f"peer startup: StreamingDataset() {peer.init_s * 1e3:.1f} ms, time to first sample of an epoch "
          f"{p[0] * 1e3:.1f} ms (excluded from its tok/s)")
    print()
    print_table(["index load (largest corpus)", "docs", "tokens", "open ms", "create ms", "total ms",
                 "cold open ms"],
                [[idx["name"], idx["docs"], idx["tokens"], f"{idx['open'] * 1e3:.2f}",
                  f"{idx['create'] * 1e3:.2f}",
                  f"{(idx['open'] + idx['create']) * 1e3:.2f}", f"{idx['cold_open'] * 1e3:.1f}"]])
    print("(open = PreparedSource.open with its token cache present, median of 7; "
          "create = MixingEngine.create "
          "for a one-source job; cold open = first open, decompressing and hashing every shard)")
    print_sources_table(sources)


if __name__ == "__main__":
    import logging

    logging.getLogger("mixer_service").setLevel(logging.ERROR)  # the expected allow_wrap warning
    main()
