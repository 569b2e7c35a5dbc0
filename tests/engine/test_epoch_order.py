"""The shard-local epoch orders (window, sliding): a bijection per epoch, local to W shards at a time, and
exact prefetch lists."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import pytest
from engine_fixtures import ArraySource, jobs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixer_contract.errors import InvalidInput
from mixer_contract.job import DEFAULT_WINDOW_SHARDS, JobConfig, OrderSpec
from mixer_contract.schedule import Schedule
from mixer_service.engine import MixingEngine
from mixer_service.engine.epoch_order import GlobalOrder, SlidingOrder, WindowOrder
from mixer_service.engine.layout import SourceLayout

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


SHARDED = ("window", "sliding")


@st.composite
def window_layouts(draw, kind: str = "window"):
    """A layout under a shard-local order over random shard sizes, sequence length and window (W from 1 to
    past the number of shards; shards with fewer chunks than W, or none)."""
    doc_lengths = draw(st.lists(st.integers(1, 40), min_size=1, max_size=40))
    source = ArraySource(doc_lengths, shard_docs=draw(st.integers(1, 8)))
    seq_len = draw(st.integers(2, max(2, min(30, int(source.doc_offsets[-1])))))
    order = OrderSpec(kind, draw(st.integers(1, 12)))
    return SourceLayout(source, "web", seq_len, draw(st.integers(0, 99)), draw(st.booleans()), order)


def shard_of_chunk(lay: SourceLayout, epoch: int, chunks: np.ndarray) -> np.ndarray:
    starts = (chunks * lay.seq_len + lay.rotation(epoch)) % lay.num_tokens
    return np.searchsorted(lay.shard_offsets, starts, side="right") - 1


@pytest.mark.parametrize("kind", SHARDED)
@SETTINGS
@given(data=st.data(), epoch=st.integers(0, 5))
def test_each_epoch_serves_every_chunk_once(kind, data, epoch):
    lay = data.draw(window_layouts(kind))
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


def sliding_epoch(lay: SourceLayout, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position of a sliding epoch: its output block, the permuted slot of the shard its chunk starts
    in, and the chunk id."""
    state = lay.order._epoch(epoch)
    positions = np.arange(lay.num_chunks)
    chunks = lay.order.chunks(epoch, positions)
    slot_of = np.empty_like(state.shard_at)
    slot_of[state.shard_at] = np.arange(len(state.shard_at))
    block = np.searchsorted(state.block_start, positions, side="right") - 1
    return block, slot_of[shard_of_chunk(lay, epoch, chunks)], chunks


@SETTINGS
@given(window_layouts("sliding"), st.integers(0, 5))
def test_sliding_blocks_follow_the_staircase(lay, epoch):
    """Block ``j`` serves exactly slice ``j - i`` (``[t n // W, (t + 1) n // W)`` of its ``n`` chunks) of
    permuted shard ``i``, for every shard: one shard at the start, at most W at once, each shard over W
    consecutive blocks, then never again; the shard's last chunk in its last block. W past the number of
    shards acts as the number of shards."""
    state = lay.order._epoch(epoch)
    w, counts = state.window, state.counts
    assert w == min(lay.order._window, len(counts))
    block, slot, chunks = sliding_epoch(lay, epoch)
    served = np.zeros((len(counts), w), dtype=np.int64)
    np.add.at(served, (slot, block - slot), 1)  # raises if a shard is served outside its W blocks
    t = np.arange(w)
    np.testing.assert_array_equal(served, (t + 1) * counts[:, None] // w - t * counts[:, None] // w)
    assert len(set(slot[: int(state.block_start[1])].tolist())) == (1 if state.block_start[1] else 0)
    position_of = np.empty_like(chunks)
    position_of[chunks] = np.arange(lay.num_chunks)
    wrap = lay.order._wrap(lay.rotation(epoch))
    last = (state.rank(np.arange(len(counts)), counts - 1) + wrap) % lay.num_chunks  # each shard's last chunk
    has = counts > 0
    np.testing.assert_array_equal(block[position_of[last[has]]], np.flatnonzero(has) + w - 1)


def sliding_layout(window: int, shard_docs: int = 10, seed: int = 3) -> SourceLayout:
    source = ArraySource([100] * 640, shard_docs=shard_docs)  # 64 shards of 1010 tokens: 63 chunks of 16
    return SourceLayout(source, "web", 16, seed, repeat=True, order=OrderSpec("sliding", window))


@pytest.mark.parametrize("window", [2, 4, 16])
def test_the_first_sliding_block_reads_one_shard_and_any_block_at_most_w_plus_one(window):
    """Counting every shard a chunk reads (the next shard, for the one chunk per shard that runs into it):
    block 0 reads one shard, and any block its W shards plus the neighbour of the shard it retires."""
    lay = sliding_layout(window)
    for epoch in (0, 1, 2):
        block, _, chunks = sliding_epoch(lay, epoch)
        starts = (chunks * lay.seq_len + lay.rotation(epoch)) % lay.num_tokens
        first = starts[block == 0]
        assert len(first) >= 3 and len(lay.shards_touched(first)) == 1
        widest = max(len(lay.shards_touched(starts[block == j])) for j in np.unique(block).tolist())
        assert widest == window + 1


def test_the_sliding_order_is_deterministic_and_differs_by_epoch_and_seed():
    order, again, other = (sliding_layout(4, seed=s).order for s in (3, 3, 4))
    positions = np.arange(sliding_layout(4).num_chunks)
    np.testing.assert_array_equal(order.chunks(1, positions), again.chunks(1, positions))
    assert not np.array_equal(order.chunks(0, positions), order.chunks(1, positions))
    assert not np.array_equal(order.chunks(0, positions), other.chunks(0, positions))


def test_a_sliding_block_holds_no_more_stream_neighbours_than_a_window():
    """The per-shard scramble spreads a shard's neighbouring chunks over its W slices: among pairs of a
    block's positions, the share that are consecutive chunks of the stream is the window order's (about
    2 / (W n)), not W times it as slices of consecutive chunks would give."""
    for window in (2, 4, 8):
        share = {}
        for kind in SHARDED:
            source = ArraySource([100] * 640, shard_docs=10)
            lay = SourceLayout(source, "web", 16, 3, repeat=True, order=OrderSpec(kind, window))
            state, positions = lay.order._epoch(0), np.arange(lay.num_chunks)
            block = (np.searchsorted(state.block_start, positions, side="right") - 1 if kind == "sliding"
                     else (np.searchsorted(state.before, positions, side="right") - 1) // window)
            block_of = np.empty_like(block)
            block_of[lay.order.chunks(0, positions)] = block
            sizes = np.bincount(block)
            share[kind] = np.count_nonzero(block_of[:-1] == block_of[1:]) / (sizes * (sizes - 1) / 2).sum()
        assert share["sliding"] < 1.25 * share["window"]


@pytest.mark.parametrize("window", [4, 40])
def test_blocks_resolved_per_position_give_the_tabulated_order(window, monkeypatch):
    """Blocks past the table bound (a shard of over 2^20 chunks) resolve each position through the slices
    and scrambles; W past 31 leaves the scrambles untabulated. Both are the same order."""
    from mixer_service.engine import epoch_order

    positions = np.arange(sliding_layout(window).num_chunks)
    tabulated = [sliding_layout(window).order.chunks(epoch, positions) for epoch in (0, 1)]
    monkeypatch.setattr(epoch_order, "_WINDOW_TABLE_MAX", 0)
    lay = sliding_layout(window)
    for epoch, expected in enumerate(tabulated):
        np.testing.assert_array_equal(lay.order.chunks(epoch, positions), expected)
        assert lay.order._epoch(epoch).block(3).ranks is None
    assert sorted(tabulated[0].tolist()) == positions.tolist()


def lru_fetches(lay: SourceLayout, rows: int, capacity: int, neighbours: bool) -> int:
    """Shard loads of an LRU cache of ``capacity`` shards serving one epoch, ``rows`` positions a step,
    each step reading its shards in id order: the shards its chunks start in, or (``neighbours``) every
    shard they read, the next one for a chunk running past its shard's end included."""
    cache: OrderedDict[int, None] = OrderedDict()
    loads = 0
    for step in range(lay.num_chunks // rows):
        starts = lay.sequence_starts(np.arange(step * rows, (step + 1) * rows))
        read = (lay.shards_touched(starts) if neighbours
                else np.unique(np.searchsorted(lay.shard_offsets, starts, side="right") - 1))
        for shard in read.tolist():
            if shard in cache:
                cache.move_to_end(shard)
                continue
            loads += 1
            cache[shard] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return loads


@pytest.mark.parametrize("window", [4, 8])
def test_a_cache_of_w_plus_two_shards_serves_a_sliding_epoch(window):
    """What ``ShardCache.check_limit`` demands. The step into the next block reads the W shards in use
    and the one it admits: with room for W + 1 each shard's own chunks load it once per epoch, with W an
    admitted shard evicts one still in use and blocks refetch. The retiring shard's last chunk also reads
    the next shard of the stream (a random one): W + 2 then loads about what a cache twice the size does
    (each shard, and the neighbours), W + 1 far more."""
    lay = sliding_layout(window)
    num_shards = len(lay.shard_offsets) - 1
    assert lru_fetches(lay, 16, window + 1, neighbours=False) == num_shards
    assert lru_fetches(lay, 16, window, neighbours=False) > 1.5 * num_shards
    roomy = lru_fetches(lay, 16, 2 * window + 2, neighbours=True)
    assert lru_fetches(lay, 16, window + 2, neighbours=True) <= 1.2 * roomy < lru_fetches(
        lay, 16, window + 1, neighbours=True)


def test_the_global_order_is_the_permutation_every_job_had():
    from mixer_service.engine.permutation import Permutation, derive_key

    key = derive_key("layout", 7, "web")
    expected = Permutation(1000, derive_key(key, "epoch", 3)).apply(np.arange(1000))
    np.testing.assert_array_equal(GlobalOrder(key, 1000).chunks(3, np.arange(1000)), expected)


@pytest.mark.parametrize("kind", SHARDED)
def test_a_one_shard_window_reads_one_shard_at_a_time(kind):
    source = ArraySource([100] * 64, shard_docs=4)  # 16 shards of 404 tokens
    lay = SourceLayout(source, "web", 16, 3, repeat=True, order=OrderSpec(kind, 1))
    shards = shard_of_chunk(lay, 0, lay.order.chunks(0, np.arange(lay.num_chunks)))
    assert np.count_nonzero(np.diff(shards)) == 15  # each shard's chunks are served in one run
    state = lay.order._epoch(0)
    serial = np.searchsorted(state.before, np.arange(lay.num_chunks), side="right") - 1
    np.testing.assert_array_equal(shards, state.shard_at[serial])  # in the epoch's shard order


def window_engine(window: int | None, steps: int = 200, batch: int = 16, kind: str = "window"):
    names = ["dom", "web"]
    order = {"kind": kind, "window_shards": window} if window else None
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


@pytest.mark.parametrize("kind, window", [("global", None), *[(k, w) for k in SHARDED for w in (1, 4)]])
def test_shards_for_step_names_exactly_the_shards_a_batch_reads(kind, window):
    engine, sources = window_engine(window, kind=kind)
    for step in (0, 1, 57, 199):
        assert engine.shards_for_step(step) == shards_read(engine, sources, step)
        assert engine.shards_for_step(step, 3, 4) == shards_read(engine, sources, step, 3, 4)


def test_a_window_order_touches_few_shards_where_the_global_order_touches_many():
    per_step = {}
    for kind, window in (("global", None), ("window", 2), ("sliding", 2)):
        engine, _ = window_engine(window, kind=kind)
        per_step[kind] = np.mean([len(engine.shards_for_step(s)["web"]) for s in range(200)])
    assert max(per_step["window"], per_step["sliding"]) <= 2 * 2 + 1 < per_step["global"]


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


# Batch hashes of a job stored with the window order, computed on main before the sliding order came
# (issue 18): the shared shard-sequence helper must not move a window job's bytes.
WINDOW_BATCHES = {1: "e52378e54d011331d9a89f687012068c056d6acd9e2cc5cb63d672bce10c886f",
                  4: "084b272c82e1b994c8346b27f3018baf5e991d45b08ce9ceee7ccd79185cbf72",
                  16: "4d2ef6cb0a27ec948d3e0c429cc49b4e19362a0a5228a383581ad3c76edf44e8"}


@pytest.mark.parametrize("window", sorted(WINDOW_BATCHES))
def test_a_stored_window_job_serves_the_bytes_it_served_before_the_sliding_order(window):
    engine, _ = window_engine(window)
    digest = hashlib.sha256()
    for step in (0, 1, 57, 130, 199):  # both sources through several epochs (rotations) each
        batch = engine.batch(step)
        digest.update(batch.tokens.tobytes() + batch.source_ids.tobytes())
    assert digest.hexdigest() == WINDOW_BATCHES[window]


@pytest.mark.parametrize("order, message", [
    ({"kind": "local"}, r"order\.kind"),
    ({"kind": "window", "window_shards": 0}, r"order\.window_shards"),
    ({"kind": "window", "window_shards": True}, r"order\.window_shards"),
    ({"kind": "sliding", "window_shards": 0}, r"order\.window_shards"),
    ({"kind": "sliding", "window_shards": 2**20 + 1}, r"order\.window_shards"),
    ({"kind": "sliding", "shards": 4}, r"order: unknown field"),
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
    for kind in SHARDED:
        sharded = JobConfig.parse(base | {"order": {"kind": kind}})
        assert sharded.to_json()["order"] == {"kind": kind, "window_shards": DEFAULT_WINDOW_SHARDS}
        assert JobConfig.parse(sharded.to_json()) == sharded


@pytest.mark.parametrize("order", [WindowOrder, SlidingOrder])
def test_window_order_keeps_the_source_index_flat_in_corpus_size(order):
    """Per-epoch state is O(shards), not O(chunks): 10**12 tokens in 4096 shards, any position in O(1)."""
    lay = order(key=1, num_chunks=10**12 // 2048, seq_len=2048,
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
