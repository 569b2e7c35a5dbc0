"""The window epoch order: a bijection per epoch, local to W shards at a time, and exact prefetch lists."""

from __future__ import annotations

import numpy as np
import pytest
from engine_fixtures import ArraySource, jobs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixer_contract.errors import InvalidInput
from mixer_contract.job import DEFAULT_WINDOW_SHARDS, JobConfig, OrderSpec
from mixer_contract.schedule import Schedule
from mixer_service.engine import MixingEngine
from mixer_service.engine.epoch_order import GlobalOrder, WindowOrder
from mixer_service.engine.layout import SourceLayout

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def window_layouts(draw):
    """A layout under the window order over random shard sizes, sequence length and window."""
    doc_lengths = draw(st.lists(st.integers(1, 40), min_size=1, max_size=40))
    source = ArraySource(doc_lengths, shard_docs=draw(st.integers(1, 8)))
    seq_len = draw(st.integers(2, max(2, min(30, int(source.doc_offsets[-1])))))
    order = OrderSpec("window", draw(st.integers(1, 6)))
    return SourceLayout(source, "web", seq_len, draw(st.integers(0, 99)), draw(st.booleans()), order)


def shard_of_chunk(lay: SourceLayout, epoch: int, chunks: np.ndarray) -> np.ndarray:
    starts = (chunks * lay.seq_len + lay.rotation(epoch)) % lay.num_tokens
    return np.searchsorted(lay.shard_offsets, starts, side="right") - 1


@SETTINGS
@given(window_layouts(), st.integers(0, 5))
def test_each_epoch_serves_every_chunk_once(lay, epoch):
    chunks = lay.order.chunks(epoch, np.arange(lay.num_chunks))
    assert sorted(chunks.tolist()) == list(range(lay.num_chunks))


@SETTINGS
@given(window_layouts(), st.integers(0, 5))
def test_the_epoch_walks_windows_of_w_shards_one_after_another(lay, epoch):
    """Positions walk the epoch's permuted shard list window by window: once a window is left, none of its
    shards comes back, and each window holds at most W shards (some may start no chunk at all)."""
    shards = shard_of_chunk(lay, epoch, lay.order.chunks(epoch, np.arange(lay.num_chunks)))
    permuted = lay.order._epoch(epoch).shard_at
    assert sorted(permuted.tolist()) == list(range(len(lay.shard_offsets) - 1))
    window_of = np.empty_like(permuted)
    window_of[permuted] = np.arange(len(permuted)) // lay.order._window
    assert np.all(np.diff(window_of[shards]) >= 0)


def test_the_global_order_is_the_permutation_every_job_had():
    from mixer_service.engine.permutation import Permutation, derive_key

    key = derive_key("layout", 7, "web")
    expected = Permutation(1000, derive_key(key, "epoch", 3)).apply(np.arange(1000))
    np.testing.assert_array_equal(GlobalOrder(key, 1000).chunks(3, np.arange(1000)), expected)


def test_window_order_of_one_shard_window_reads_one_shard_at_a_time():
    source = ArraySource([100] * 64, shard_docs=4)  # 16 shards of 404 tokens
    lay = SourceLayout(source, "web", 16, 3, repeat=True, order=OrderSpec("window", 1))
    shards = shard_of_chunk(lay, 0, lay.order.chunks(0, np.arange(lay.num_chunks)))
    assert np.count_nonzero(np.diff(shards)) == 15  # each shard's chunks are served in one run


def window_engine(window: int | None, steps: int = 200, batch: int = 16):
    names = ["dom", "web"]
    order = {"kind": "window", "window_shards": window} if window else None
    config = JobConfig.parse({"sources": [{"name": n, "role": "repeat"} for n in names], "seq_len": 32,
                              "global_batch": batch, "seed": 5, "total_steps": steps,
                              "order": order})
    sched = Schedule.parse({"phases": [{"start_step": 0, "weights": {"dom": 0.25, "web": 0.75}}]}, names)
    sources = {"dom": ArraySource([40, 9, 70] * 10, salt=1, shard_docs=3),
               "web": ArraySource([120] * 400, salt=2, shard_docs=10)}  # 40 shards
    return MixingEngine.create(config, sources, [(0, sched)]), sources


def shards_read(engine: MixingEngine, sources: dict, step: int, rank: int = 0, world: int = 1) -> dict:
    """The shards a batch actually reads, from its provenance spans."""
    out: dict[str, set[int]] = {}
    for seq in engine.provenance(step, rank, world):
        src = sources[seq.source]
        for span in seq.spans:
            first = src.doc_offsets[span.doc] + span.offset
            ids = np.searchsorted(src.shard_offsets, [first, first + span.length - 1], side="right") - 1
            out.setdefault(seq.source, set()).update(range(int(ids[0]), int(ids[1]) + 1))
    return {k: sorted(v) for k, v in out.items()}


@pytest.mark.parametrize("window", [None, 1, 4])
def test_shards_for_step_names_exactly_the_shards_a_batch_reads(window):
    engine, sources = window_engine(window)
    for step in (0, 1, 57, 199):
        assert engine.shards_for_step(step) == shards_read(engine, sources, step)
        assert engine.shards_for_step(step, 3, 4) == shards_read(engine, sources, step, 3, 4)


def test_a_window_order_touches_few_shards_where_the_global_order_touches_many():
    per_step = {}
    for window in (None, 2):
        engine, _ = window_engine(window)
        per_step[window] = np.mean([len(engine.shards_for_step(s)["web"]) for s in range(200)])
    assert per_step[2] <= 2 * 2 + 1 < per_step[None]


@SETTINGS
@given(jobs(max_steps=25), st.data())
def test_batches_and_counts_do_not_depend_on_how_steps_are_visited(job, data):
    """Random access agrees with sequential access (per-epoch and per-window state is a cache only)."""
    engine, sources = job
    fresh = MixingEngine.create(engine.config, sources, engine.schedule_log)
    steps = data.draw(st.permutations(range(engine.config.total_steps)))[:6]
    for step in steps:
        np.testing.assert_array_equal(fresh.batch(step).tokens, engine.batch(step).tokens)
        assert fresh.shards_for_step(step) == engine.shards_for_step(step)


@pytest.mark.parametrize("order, message", [
    ({"kind": "local"}, r"order\.kind"),
    ({"kind": "window", "window_shards": 0}, r"order\.window_shards"),
    ({"kind": "window", "window_shards": True}, r"order\.window_shards"),
    ({"kind": "global", "window_shards": 4}, r"order: unknown field"),
    ([1], r"order\.kind"),
])
def test_bad_order_options_name_the_field(order, message):
    base = {"sources": [{"name": "a", "role": "once"}], "seq_len": 8, "global_batch": 4, "total_steps": 10}
    with pytest.raises(InvalidInput, match=message):
        JobConfig.parse(base | {"order": order})


def test_order_round_trips_and_a_default_job_document_is_unchanged():
    base = {"sources": [{"name": "a", "role": "once"}], "seq_len": 8, "global_batch": 4, "total_steps": 10}
    assert "order" not in JobConfig.parse(base).to_json()
    assert "order" not in JobConfig.parse(base | {"order": {"kind": "global"}}).to_json()
    window = JobConfig.parse(base | {"order": {"kind": "window"}})
    assert window.to_json()["order"] == {"kind": "window", "window_shards": DEFAULT_WINDOW_SHARDS}
    assert JobConfig.parse(window.to_json()) == window


def test_window_order_keeps_the_source_index_flat_in_corpus_size():
    """Per-epoch state is O(shards), not O(chunks): 10**12 tokens in 4096 shards, any position in O(1)."""
    lay = WindowOrder(key=1, num_chunks=10**12 // 2048, seq_len=2048,
                      shard_offsets=np.linspace(0, 10**12, 4097).astype(np.int64), window=16,
                      rotation=lambda epoch: 12345 * epoch)
    chunks = lay.chunks(1, np.array([0, 1, 10**8, 10**12 // 2048 - 1]))
    assert len(set(chunks.tolist())) == 4 and chunks.max() < 10**12 // 2048


@pytest.mark.parametrize("n", [1, 7, 1000, 70_000])
def test_a_tabulated_permutation_is_the_same_bijection(n):
    from mixer_service.engine.permutation import Permutation

    positions = np.arange(n)
    tabulated = Permutation(n, 11, table_max=n).apply(positions)
    np.testing.assert_array_equal(tabulated, Permutation(n, 11, table_max=0).apply(positions))
    assert tabulated.dtype == np.int64 and sorted(tabulated.tolist()) == list(range(n))


def test_a_lazily_sharded_source_serves_the_same_bytes_reading_each_shard_once_per_batch():
    from mixer_service.sources.tokens import ShardedTokens

    engine, sources = window_engine(1, batch=64)  # 48 web rows a step from one or two shards
    loads = []
    web = sources["web"]

    def load(k: int) -> np.ndarray:
        loads.append(k)
        return web.tokens[web.shard_offsets[k]:web.shard_offsets[k + 1]]

    lazy = ArraySource.__new__(ArraySource)
    lazy.doc_offsets, lazy.shard_offsets = web.doc_offsets, web.shard_offsets
    lazy.tokens = ShardedTokens(web.shard_offsets, web.tokens.dtype, load)
    sharded = MixingEngine.create(engine.config, sources | {"web": lazy}, engine.schedule_log)
    for step in (0, 3, 150):
        loads.clear()
        np.testing.assert_array_equal(sharded.batch(step).tokens, engine.batch(step).tokens)
        assert len(loads) <= 3 * len(sharded.shards_for_step(step)["web"]) + 2  # not one load per row
