"""The engine contracts for jobs of 1 to 64 sources, with schedule changes mid-run
(docs/design.md "Contracts")."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from engine_fixtures import ArraySource, cut_log, jobs, schedules
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mixer_contract.job import MAX_SOURCES, JobConfig
from mixer_contract.schedule import Schedule
from mixer_service.engine import MixingEngine
from mixer_service.engine.mixture import UNBOUNDED_HORIZON, error_bound

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = {"max_steps": 30, "max_sources": 64}


def test_error_bound_is_half_the_tree_depth():
    assert [error_bound(k) for k in (1, 2, 3, 4, 5, 8, 9, 64, 65, MAX_SOURCES)] == [
        0, Fraction(1, 2), 1, 1, Fraction(3, 2), Fraction(3, 2), 2, 3, Fraction(7, 2), 4]


@SETTINGS
@given(jobs(**MANY))
def test_counts_stay_within_the_bound_monotone_and_sum_to_the_batch(job):
    engine, _ = job
    plan, k = engine.plan, len(engine.layouts)
    previous = (0,) * k
    for tau in range(engine.config.total_steps + 1):
        realized, target = plan.realized(tau), plan.target(tau)
        assert sum(realized) == engine.config.global_batch * tau
        assert max(abs(n - c) for n, c in zip(realized, target, strict=True)) <= error_bound(k)
        assert all(n >= p for n, p in zip(realized, previous, strict=True))
        assert all(plan.realized_one(tau, s) == realized[s] for s in (0, k // 2, k - 1))
        previous = realized


@SETTINGS
@given(jobs(**MANY), st.data())
def test_a_change_at_the_first_changeable_step_never_rewrites_served_steps(job, data):
    engine, _ = job
    names, total = engine.config.source_names, engine.config.total_steps
    served = data.draw(st.integers(0, total - 2))
    before = cut_log(engine, served)
    change_at = before.first_changeable_step(served)
    assume(change_at < total)
    new = Schedule.parse(data.draw(schedules(names)), names)
    changed = before.with_log(before.schedule_log + [(change_at, new)])
    for tau in range(served + 2):
        assert changed.plan.realized(tau) == before.plan.realized(tau)
    step = data.draw(st.integers(0, served))
    np.testing.assert_array_equal(changed.batch(step).tokens, before.batch(step).tokens)
    assert changed.version_at(change_at) == len(changed.schedule_log)


@SETTINGS
@given(jobs(**MANY), st.data())
def test_last_safe_high_water_is_exact_for_many_sources(job, data):
    engine, _ = job
    effective = data.draw(st.integers(0, engine.config.total_steps - 1))
    bound = engine.last_safe_high_water(effective)
    assert bound <= effective - 1
    assert bound == -1 or engine.first_changeable_step(bound) <= effective
    assert bound == effective - 1 or engine.first_changeable_step(bound + 1) > effective


@SETTINGS
@given(jobs(**MANY), st.data())
def test_many_source_batches_follow_counts_repeat_by_epochs_and_tile_by_rank(job, data):
    engine, sources = job
    step = data.draw(st.integers(0, engine.config.total_steps - 1))
    whole = engine.batch(step)
    counts = np.bincount(whole.source_ids, minlength=len(engine.layouts))
    assert tuple(counts) == engine.plan.step_counts(step)
    for row, seq in enumerate(engine.provenance(step)):
        src = sources[seq.source]
        pieces = [src.tokens[src.doc_offsets[s.doc] + s.offset:][: s.length] for s in seq.spans]
        np.testing.assert_array_equal(np.concatenate(pieces), whole.tokens[row])
    for k, lay in enumerate(engine.layouts):
        e = engine.sequences_served(step)[k] // lay.num_chunks
        assert set(np.unique(engine.repetition_counts(lay.name, step)).tolist()) <= {e, e + 1}
    b = engine.config.global_batch
    world = data.draw(st.sampled_from([w for w in range(1, b + 1) if b % w == 0]))
    parts = [engine.batch(step, rank, world) for rank in range(world)]
    np.testing.assert_array_equal(np.concatenate([p.tokens for p in parts]), whole.tokens)
    np.testing.assert_array_equal(np.concatenate([p.source_ids for p in parts]), whole.source_ids)


def three_source_plan_with_a_pending_fraction():
    """Sources 1 and 2 stop at step 3 while their node is ahead of its final target by a fraction."""
    names = ["a", "b", "c"]
    config = JobConfig.parse({"sources": [{"name": n, "role": "repeat"} for n in names], "seq_len": 4,
                              "global_batch": 5, "total_steps": 50})
    first = Schedule.parse({"phases": [{"start_step": 0, "weights": {"a": "3/7", "b": "2/7", "c": "2/7"}},
                                       {"start_step": 3, "weights": {"a": 1}}]}, names)
    sources = {n: ArraySource([9] * 6, salt=i) for i, n in enumerate(names)}
    return MixingEngine.create(config, sources, [(0, first)]), names


def test_a_subtree_stopped_with_an_undecided_fraction_refuses_changes():
    """Restarting b and c could re-split a sequence already served (the engine before issue 10 did so)."""
    engine, names = three_source_plan_with_a_pending_fraction()
    assert engine.plan.horizon(6) == UNBOUNDED_HORIZON
    assert engine.first_changeable_step(5) >= engine.config.total_steps
    restart = Schedule.parse({"phases": [{"start_step": 0, "weights": {"b": "1/2", "c": "1/2"}}]}, names)
    rewritten = engine.with_log(engine.schedule_log + [(6, restart)])
    assert any(rewritten.plan.realized(t) != engine.plan.realized(t) for t in range(6))


def test_a_stopped_subtree_whose_rounding_is_settled_still_accepts_changes():
    names = ["a", "b", "c"]
    config = JobConfig.parse({"sources": [{"name": n, "role": "repeat"} for n in names], "seq_len": 4,
                              "global_batch": 4, "total_steps": 50})
    first = Schedule.parse({"phases": [{"start_step": 0, "weights": {"a": "1/2", "b": "1/4", "c": "1/4"}},
                                       {"start_step": 3, "weights": {"a": 1}}]}, names)
    sources = {n: ArraySource([9] * 6, salt=i) for i, n in enumerate(names)}
    engine = MixingEngine.create(config, sources, [(0, first)])
    assert engine.first_changeable_step(10) == 11


@pytest.mark.parametrize("num_sources", [2, 8, 64, MAX_SOURCES])
def test_far_steps_of_a_many_source_ramp_cost_no_replay(num_sources):
    """Step 10**12 - 1 of a ramped K-source job is computed directly (pytest-timeout fails a replay)."""
    names = [f"s{i}" for i in range(num_sources)]
    config = JobConfig.parse({"sources": [{"name": n, "role": "repeat"} for n in names], "seq_len": 8,
                              "global_batch": 512, "seed": 1, "total_steps": 10**12})
    skewed = {n: f"{i + 1}/{num_sources * (num_sources + 1) // 2}" for i, n in enumerate(names)}
    even = {n: f"1/{num_sources}" for n in names}
    sched = Schedule.parse({"phases": [{"start_step": 0, "weights": skewed, "ramp": True},
                                       {"start_step": 10**11, "weights": even}]}, names)
    engine = MixingEngine.create(config, {n: ArraySource([20] * 5, salt=i) for i, n in enumerate(names)},
                                 [(0, sched)])
    for tau in (10**11 - 1, 10**12 - 1):
        realized, target = engine.plan.realized(tau), engine.plan.target(tau)
        assert sum(realized) == 512 * tau
        assert max(abs(n - c) for n, c in zip(realized, target, strict=True)) <= error_bound(num_sources)
    assert engine.batch(10**12 - 1).tokens.shape == (512, 8)
