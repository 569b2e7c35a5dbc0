"""Property tests of every engine contract in docs/architecture.md (docs/design.md "Contracts").

Each property is written once and runs on three families of random jobs: FEW (1 to 4 sources, 40 steps)
and MANY (1 to 64 sources, 30 steps) in any epoch order, and SLIDING (FEW in the default order of new jobs,
W from 1 to past the number of shards), all with schedule changes mid-run.
"""

from __future__ import annotations

import hashlib
import tracemalloc
from collections import defaultdict
from fractions import Fraction

import numpy as np
import pytest
from engine_fixtures import SLIDING_ORDERS, ArraySource, cut_log, jobs, schedules
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mixer_contract.errors import InvalidInput, NotFound
from mixer_contract.job import MAX_SOURCES, JobConfig
from mixer_contract.schedule import Schedule
from mixer_service.engine import MixingEngine
from mixer_service.engine.mixture import UNBOUNDED_HORIZON, error_bound

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = jobs()
MANY = jobs(max_steps=30, max_sources=64)
SLIDING = jobs(orders=SLIDING_ORDERS)


def on_each_job_family(test):
    """Run a property on each family of random jobs: in the test, ``data.draw(job_family)`` is one job."""
    test = SETTINGS(given(data=st.data())(test))
    return pytest.mark.parametrize("job_family", [pytest.param(FEW, id="few-sources"),
                                                  pytest.param(MANY, id="many-sources"),
                                                  pytest.param(SLIDING, id="sliding-order")])(test)


def two_source_engine(total_steps=100, weights=None, allow_wrap=False, web_docs=400, seq_len=16, batch=8):
    config = JobConfig.parse(
        {
            "sources": [{"name": "dom", "role": "repeat"}, {"name": "web", "role": "once"}],
            "seq_len": seq_len,
            "global_batch": batch,
            "seed": 7,
            "total_steps": total_steps,
            "allow_wrap": allow_wrap,
        }
    )
    sources = {"dom": ArraySource([5, 7, 30, 3] * 5, salt=1), "web": ArraySource([50] * web_docs, salt=2)}
    sched = Schedule.parse(
        {"phases": [{"start_step": 0, "weights": weights or {"dom": 0.05, "web": 0.95}}]}, config.source_names
    )
    return MixingEngine.create(config, sources, [(0, sched)])


def test_error_bound_is_half_the_tree_depth():
    assert [error_bound(k) for k in (1, 2, 3, 4, 5, 8, 9, 64, 65, MAX_SOURCES)] == [
        0, Fraction(1, 2), 1, 1, Fraction(3, 2), Fraction(3, 2), 2, 3, Fraction(7, 2), 4]


@on_each_job_family
def test_counts_stay_within_the_bound_monotone_and_sum_to_the_batch(job_family, data):
    """Within ⌈log2 K⌉/2 of the target (so within one up to 4 sources), monotone, exact sum."""
    engine, _ = data.draw(job_family)
    plan, k = engine.plan, len(engine.layouts)
    previous = (0,) * k
    for tau in range(engine.config.total_steps + 1):
        realized, target = plan.realized(tau), plan.target(tau)
        assert sum(realized) == engine.config.global_batch * tau
        assert max(abs(n - c) for n, c in zip(realized, target, strict=True)) <= error_bound(k)
        assert all(n >= p for n, p in zip(realized, previous, strict=True))
        assert all(plan.realized_one(tau, s) == realized[s] for s in (0, k // 2, k - 1))
        previous = realized


@on_each_job_family
def test_batch_rows_follow_step_counts(job_family, data):
    engine, _ = data.draw(job_family)
    step = data.draw(st.integers(0, engine.config.total_steps - 1))
    batch = engine.batch(step)
    counts = np.bincount(batch.source_ids, minlength=len(engine.layouts))
    assert tuple(counts) == engine.plan.step_counts(step)
    assert batch.tokens.shape == (engine.config.global_batch, engine.config.seq_len)


@on_each_job_family
def test_repeat_source_counts_are_e_or_e_plus_one(job_family, data):
    engine, _ = data.draw(job_family)
    step = data.draw(st.integers(0, engine.config.total_steps - 1))
    for k, lay in enumerate(engine.layouts):
        served = engine.sequences_served(step)[k]
        counts = engine.repetition_counts(lay.name, step)
        e = served // lay.num_chunks
        assert set(np.unique(counts)) <= {e, e + 1}


def replay_counts(engine: MixingEngine, last_step: int) -> dict[str, np.ndarray]:
    """Repetition counts from provenance alone: a doc counts once per epoch in which all its tokens came."""
    covered: dict[tuple[str, int, int], np.ndarray] = {}
    for step in range(last_step + 1):
        for seq in engine.provenance(step):
            lay = engine.layouts[engine.source_index(seq.source)]
            epoch = seq.seq_id // lay.num_chunks
            for span in seq.spans:
                key = (seq.source, epoch, span.doc)
                if key not in covered:
                    offs = lay.source.doc_offsets
                    covered[key] = np.zeros(int(offs[span.doc + 1] - offs[span.doc]), dtype=bool)
                covered[key][span.offset : span.offset + span.length] = True
    out = {lay.name: np.zeros(lay.num_docs, dtype=np.int64) for lay in engine.layouts}
    for (source, _epoch, doc), mask in covered.items():
        out[source][doc] += int(mask.all())
    return out


@pytest.mark.parametrize("job_family", [
    pytest.param(jobs(max_steps=25), id="any-order"),
    pytest.param(jobs(max_steps=25, orders=SLIDING_ORDERS), id="sliding-order")])
@SETTINGS
@given(data=st.data())
def test_replay_of_provenance_equals_repetition_counts(job_family, data):
    engine, _ = data.draw(job_family)
    step = data.draw(st.integers(0, engine.config.total_steps - 1))
    replayed = replay_counts(engine, step)
    for lay in engine.layouts:
        np.testing.assert_array_equal(replayed[lay.name], engine.repetition_counts(lay.name, step))
        doc = data.draw(st.integers(0, lay.num_docs - 1))
        assert engine.repetition_count(lay.name, doc, step) == replayed[lay.name][doc]


@on_each_job_family
def test_provenance_reconstructs_batch_tokens(job_family, data):
    engine, sources = data.draw(job_family)
    step = data.draw(st.integers(0, engine.config.total_steps - 1))
    batch = engine.batch(step)
    for row, seq in enumerate(engine.provenance(step)):
        src = sources[seq.source]
        rebuilt = np.concatenate(
            [src.tokens[src.doc_offsets[s.doc] + s.offset :][: s.length] for s in seq.spans]
        )
        np.testing.assert_array_equal(rebuilt, batch.tokens[row])


@on_each_job_family
def test_rank_slices_tile_the_global_batch_for_any_world(job_family, data):
    engine, _ = data.draw(job_family)
    step = data.draw(st.integers(0, engine.config.total_steps - 1))
    whole = engine.batch(step)
    b = engine.config.global_batch
    for world in [w for w in range(1, b + 1) if b % w == 0]:
        parts = [engine.batch(step, rank, world) for rank in range(world)]
        np.testing.assert_array_equal(np.concatenate([p.tokens for p in parts]), whole.tokens)
        np.testing.assert_array_equal(np.concatenate([p.source_ids for p in parts]), whole.source_ids)


def change_after(engine: MixingEngine, data: st.DataObject,
                 schedule: dict) -> tuple[int, MixingEngine, MixingEngine]:
    """A drawn highest served step, the engine as it stood then, and that engine with ``schedule`` committed
    at the first step a change may take effect: (served, before, changed)."""
    names = engine.config.source_names
    served = data.draw(st.integers(0, engine.config.total_steps - 2))
    before = cut_log(engine, served)
    change_at = before.first_changeable_step(served)
    assume(change_at < engine.config.total_steps)
    changed = before.with_log(before.schedule_log + [(change_at, Schedule.parse(schedule, names))])
    assert changed.version_at(change_at) == len(changed.schedule_log)
    return served, before, changed


@on_each_job_family
def test_a_change_at_the_first_changeable_step_never_rewrites_served_steps(job_family, data):
    engine, _ = data.draw(job_family)
    served, before, changed = change_after(engine, data, data.draw(schedules(engine.config.source_names)))
    for tau in range(served + 2):
        assert changed.plan.realized(tau) == before.plan.realized(tau)
    for step in range(served + 1):
        np.testing.assert_array_equal(changed.batch(step).tokens, before.batch(step).tokens)


@SETTINGS
@given(FEW, st.data())
def test_a_change_to_the_last_source_alone_leaves_the_others_at_most_one_owed_seat(job, data):
    """Up to 4 sources: from the change on only the last source is scheduled; the others may still get a
    seat already owed (<= 1), and every served step keeps its bytes."""
    engine, _ = job
    names = engine.config.source_names
    only_last = {"phases": [{"start_step": 0, "weights": {names[-1]: 1}}]}
    served, before, changed = change_after(engine, data, only_last)
    for step in range(served + 1):
        np.testing.assert_array_equal(changed.batch(step).tokens, before.batch(step).tokens)
    owed = changed.plan.realized(changed.schedule_log[-1][0])
    final = changed.plan.realized(engine.config.total_steps)
    assert all(final[k] - owed[k] <= 1 for k in range(len(names) - 1))


@on_each_job_family
def test_last_safe_high_water_is_the_exact_bound_for_a_change(job_family, data):
    engine, _ = data.draw(job_family)
    effective = data.draw(st.integers(0, engine.config.total_steps - 1))
    bound = engine.last_safe_high_water(effective)
    assert bound <= effective - 1
    assert bound == -1 or engine.first_changeable_step(bound) <= effective
    assert bound == effective - 1 or engine.first_changeable_step(bound + 1) > effective


@on_each_job_family
def test_batches_are_a_pure_function_of_config_sources_and_log(job_family, data):
    engine, sources = data.draw(job_family)
    again = MixingEngine.create(engine.config, sources, engine.schedule_log)
    for step in range(0, engine.config.total_steps, 7):
        assert engine.batch(step).tokens.tobytes() == again.batch(step).tokens.tobytes()


def test_golden_batch_bytes_are_stable_across_machines_and_versions():
    """Pins the permutation, hashing and apportionment: a change here changes every user's data order."""
    engine = two_source_engine()
    digest = hashlib.sha256()
    for step in (0, 1, 17, 99):
        b = engine.batch(step)
        digest.update(b.tokens.tobytes() + b.source_ids.tobytes())
    assert digest.hexdigest() == GOLDEN


GOLDEN = "1b54c1383741c56ef2d1774b54e6b4891dfb97265166c9414cfddab2af25caa7"


def test_domain_fraction_is_exact_at_five_percent():
    engine = two_source_engine(total_steps=1000, web_docs=6000, batch=20)
    realized = engine.plan.realized(1000)
    assert realized == (1000, 19000)  # 5% of 20 * 1000 sequences, exactly


def test_once_source_that_runs_out_is_refused_with_the_step():
    with pytest.raises(InvalidInput, match=r"'web' \(role once\) runs out at step \d+"):
        two_source_engine(total_steps=2000)


def test_once_source_wraps_with_a_warning_when_allowed():
    engine = two_source_engine(total_steps=2000, allow_wrap=True)
    assert engine.warnings and "wraps" in engine.warnings[0]
    assert engine.repetition_counts("web", 1999).min() >= 1


def test_bad_rank_world_and_step_are_refused():
    engine = two_source_engine()
    for kwargs, field in [
        ({"step": 100}, "step"),
        ({"step": -1}, "step"),
        ({"step": 0, "world": 3}, "world"),
        ({"step": 0, "rank": 2, "world": 2}, "rank"),
    ]:
        with pytest.raises(InvalidInput, match=field):
            engine.batch(**kwargs)
    with pytest.raises(NotFound):
        engine.repetition_count("dom", 10**6, 5)


def skewed_then_even(num_sources: int) -> tuple[dict[str, str], dict[str, str]]:
    """Weights 1..K (normalised) for the ramp, then 1/K each: every source's share changes."""
    names = [f"s{i}" for i in range(num_sources)]
    total = num_sources * (num_sources + 1) // 2
    return {n: f"{i + 1}/{total}" for i, n in enumerate(names)}, {n: f"1/{num_sources}" for n in names}


@pytest.mark.parametrize(
    "ramp_from, then",
    [pytest.param({"dom": 0.05, "web": 0.95}, {"dom": 0.5, "web": 0.5}, id="domain-5-to-50-percent"),
     *(pytest.param(*skewed_then_even(k), id=f"{k}-sources") for k in (2, 8, 64, MAX_SOURCES))],
)
def test_far_steps_cost_no_replay(ramp_from, then):
    """Step 10**12 - 1 of a ramped K-source job is computed directly (pytest-timeout fails a replay)."""
    names = list(ramp_from)
    config = JobConfig.parse({"sources": [{"name": n, "role": "repeat"} for n in names], "seq_len": 8,
                              "global_batch": 512, "seed": 1, "total_steps": 10**12})
    sched = Schedule.parse({"phases": [{"start_step": 0, "weights": ramp_from, "ramp": True},
                                       {"start_step": 10**11, "weights": then}]}, names)
    engine = MixingEngine.create(config, {n: ArraySource([20] * 5, salt=i) for i, n in enumerate(names)},
                                 [(0, sched)])
    for tau in (10**11 - 1, 10**12 - 1):
        realized, target = engine.plan.realized(tau), engine.plan.target(tau)
        assert sum(realized) == 512 * tau
        assert max(abs(n - c) for n, c in zip(realized, target, strict=True)) <= error_bound(len(names))
    assert engine.batch(10**12 - 1).tokens.shape == (512, 8)
    counts = engine.repetition_counts(names[0], 10**12 - 1)
    assert counts.max() - counts.min() <= 1 and counts.min() > 10**9


def test_engine_index_memory_is_bounded_per_document():
    """The engine adds no per-document state beyond the source's offsets (budget: 16 bytes/doc)."""
    docs = 1_000_000
    source = ArraySource.__new__(ArraySource)
    source.doc_offsets = np.arange(docs + 1, dtype=np.int64) * 10
    source.tokens = np.zeros(docs * 10, dtype=np.uint16)
    config = JobConfig.parse(
        {"sources": [{"name": "web", "role": "once"}], "seq_len": 64, "global_batch": 8, "total_steps": 100}
    )
    sched = Schedule.parse({"phases": [{"start_step": 0, "weights": {"web": 1}}]}, ["web"])
    tracemalloc.start()
    engine = MixingEngine.create(config, {"web": source}, [(0, sched)])
    engine.batch(50)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16 * docs


def test_counts_grow_by_epochs_on_a_repeated_domain():
    engine = two_source_engine(total_steps=1000, weights={"dom": 0.5, "web": 0.5}, allow_wrap=True)
    by_step = defaultdict(list)
    for step in (0, 100, 500, 999):
        counts = engine.repetition_counts("dom", step)
        by_step[step] = counts
        assert counts.max() - counts.min() <= 1
    assert by_step[999].min() > by_step[100].max()


def three_sources_of_which_b_and_c_stop_at_step_3(global_batch: int, first: dict[str, str]) -> MixingEngine:
    """Sources a, b, c mixed as ``first`` until step 3, then a alone."""
    names = ["a", "b", "c"]
    config = JobConfig.parse({"sources": [{"name": n, "role": "repeat"} for n in names], "seq_len": 4,
                              "global_batch": global_batch, "total_steps": 50})
    schedule = Schedule.parse({"phases": [{"start_step": 0, "weights": first},
                                          {"start_step": 3, "weights": {"a": 1}}]}, names)
    sources = {n: ArraySource([9] * 6, salt=i) for i, n in enumerate(names)}
    return MixingEngine.create(config, sources, [(0, schedule)])


def test_a_subtree_stopped_with_an_undecided_fraction_refuses_changes():
    """Restarting b and c could re-split a sequence already served (the engine before issue 10 did so).
    Sources b and c stop at step 3 while their node is ahead of its final target by a fraction."""
    engine = three_sources_of_which_b_and_c_stop_at_step_3(5, {"a": "3/7", "b": "2/7", "c": "2/7"})
    assert engine.plan.horizon(6) == UNBOUNDED_HORIZON
    assert engine.first_changeable_step(5) >= engine.config.total_steps
    restart = Schedule.parse({"phases": [{"start_step": 0, "weights": {"b": "1/2", "c": "1/2"}}]},
                             engine.config.source_names)
    rewritten = engine.with_log(engine.schedule_log + [(6, restart)])
    assert any(rewritten.plan.realized(t) != engine.plan.realized(t) for t in range(6))


def test_a_stopped_subtree_whose_rounding_is_settled_still_accepts_changes():
    engine = three_sources_of_which_b_and_c_stop_at_step_3(4, {"a": "1/2", "b": "1/4", "c": "1/4"})
    assert engine.first_changeable_step(10) == 11
