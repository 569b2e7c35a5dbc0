"""Small in-memory token sources and random job/schedule generators for engine tests."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from mixer_contract.job import JobConfig
from mixer_contract.schedule import Schedule
from mixer_service.engine import MixingEngine


class ArraySource:
    """A token source held in memory: documents of given lengths, each followed by EOS."""

    def __init__(self, doc_lengths: list[int], vocab: int = 1000, eos: int = 0, salt: int = 0,
                 shard_docs: int = 4) -> None:
        rng = np.random.default_rng(salt)
        parts = []
        for n in doc_lengths:
            parts.append(rng.integers(1, vocab, size=n, dtype=np.uint16))
            parts.append(np.array([eos], dtype=np.uint16))
        self.tokens = np.concatenate(parts)
        self.doc_offsets = np.concatenate([[0], np.cumsum(np.array(doc_lengths) + 1)]).astype(np.int64)
        self.shard_offsets = np.unique(np.r_[self.doc_offsets[::shard_docs], self.doc_offsets[-1]])


@st.composite
def schedules(draw, names: list[str], max_start: int = 30) -> dict:
    n_phases = draw(st.integers(1, 3))
    starts = [0] + sorted(
        draw(st.sets(st.integers(1, max_start), min_size=n_phases - 1, max_size=n_phases - 1))
    )
    phases = []
    for i, start in enumerate(starts):
        raw = draw(
            st.lists(st.sampled_from([0, 0, 1, 2, 3, 7, 50]), min_size=len(names), max_size=len(names))
        )
        if not sum(raw):
            raw[0] = 1
        phases.append(
            {
                "start_step": start,
                "weights": {n: f"{r}/{sum(raw)}" for n, r in zip(names, raw, strict=True)},
                "ramp": i + 1 < len(starts) and draw(st.booleans()),
            }
        )
    return {"phases": phases}


SLIDING_ORDERS = [{"kind": "sliding", "window_shards": w} for w in (1, 2, 3, 16)]
ORDERS = [None, *[{"kind": "window", "window_shards": w} for w in (1, 2, 5)], *SLIDING_ORDERS[1::2]]


@st.composite
def jobs(draw, max_steps: int = 40, max_sources: int = 4, min_sources: int = 1, orders: list = ORDERS):
    """A random job (any epoch order, or one of ``orders``): config, sources and a schedule log with changes
    mid-run."""
    n = draw(st.integers(min_sources, max_sources))
    names = [f"s{i}" for i in range(n)]
    roles = [draw(st.sampled_from(["repeat", "once"])) for _ in names]
    seq_len = draw(st.integers(2, 12))
    batch = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12]))
    sources = {}
    for i, name in enumerate(names):
        lengths = draw(st.lists(st.integers(1, 30), min_size=1, max_size=25))
        if sum(lengths) + len(lengths) < seq_len:
            lengths.append(seq_len)
        sources[name] = ArraySource(lengths, salt=i, shard_docs=draw(st.integers(1, 6)))
    config = JobConfig.parse(
        {
            "sources": [{"name": nm, "role": r} for nm, r in zip(names, roles, strict=True)],
            "seq_len": seq_len,
            "global_batch": batch,
            "seed": draw(st.integers(0, 2**32)),
            "total_steps": max_steps,
            "allow_wrap": True,
            "order": draw(st.sampled_from(orders)),
        }
    )
    n_versions = draw(st.integers(1, 3))
    effective = [0] + sorted(
        draw(st.sets(st.integers(1, max_steps - 1), min_size=n_versions - 1, max_size=n_versions - 1))
    )
    log = [(eff, Schedule.parse(draw(schedules(names)), names)) for eff in effective]
    return MixingEngine.create(config, sources, log), sources


def cut_log(engine: MixingEngine, served: int) -> MixingEngine:
    """The engine as it stood when ``served`` was the highest step served: later versions not yet made."""
    log = [(e, s) for e, s in engine.schedule_log if e <= served]
    return MixingEngine(engine.config, engine.layouts, log)
