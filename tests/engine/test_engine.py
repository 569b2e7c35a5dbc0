"""Property tests of every engine contract in docs/architecture.md (docs/design.md "Contracts")."""

from __future__ import annotations

import hashlib
import tracemalloc
from collections import defaultdict

import numpy as np
import pytest
from engine_fixtures import ArraySource, cut_log, jobs
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mixer_contract.errors import InvalidInput, NotFound
from mixer_contract.job import JobConfig
from mixer_contract.schedule import Schedule
from mixer_service.engine import MixingEngine

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


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


@SETTINGS
@given(jobs())
def test_exact_mixture_within_one_of_target(job):
    engine, _ = job
    plan = engine.plan
    previous = None
    for tau in range(engine.config.total_steps + 1):
        realized, target = plan.realized(tau), plan.target(tau)
        assert sum(realized) == engine.config.global_batch * tau
        assert all(abs(n - c) <= 1 for n, c in zip(realized, target, strict=True))
        if previous is not None:
            assert all(n >= p for n, p in zip(realized, previous, strict=True))
        previous = realized


@SETTINGS
@given(jobs(), st.data())
def test_batch_rows_follow_step_counts(job, data):
    engine, _ = job
    step = data.draw(st.integers(0, engine.config.total_steps - 1))
    batch = engine.batch(step)
    counts = np.bincount(batch.source_ids, minlength=len(engine.layouts))
    assert tuple(counts) == engine.plan.step_counts(step)
    assert batch.tokens.shape == (engine.config.global_batch, engine.config.seq_len)


@SETTINGS
@given(jobs(), st.data())
def test_repeat_source_counts_are_e_or_e_plus_one(job, data):
    engine, _ = job
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


@SETTINGS
@given(jobs(max_steps=25), st.data())
def test_replay_of_provenance_equals_repetition_counts(job, data):
    engine, _ = job
    step = data.draw(st.integers(0, engine.config.total_steps - 1))
    replayed = replay_counts(engine, step)
    for lay in engine.layouts:
        np.testing.assert_array_equal(replayed[lay.name], engine.repetition_counts(lay.name, step))
        doc = data.draw(st.integers(0, lay.num_docs - 1))
        assert engine.repetition_count(lay.name, doc, step) == replayed[lay.name][doc]


@SETTINGS
@given(jobs(), st.data())
def test_provenance_reconstructs_batch_tokens(job, data):
    engine, sources = job
    step = data.draw(st.integers(0, engine.config.total_steps - 1))
    batch = engine.batch(step)
    for row, seq in enumerate(engine.provenance(step)):
        src = sources[seq.source]
        rebuilt = np.concatenate(
            [src.tokens[src.doc_offsets[s.doc] + s.offset :][: s.length] for s in seq.spans]
        )
        np.testing.assert_array_equal(rebuilt, batch.tokens[row])


@SETTINGS
@given(jobs(), st.data())
def test_rank_slices_tile_the_global_batch_for_any_world(job, data):
    engine, _ = job
    step = data.draw(st.integers(0, engine.config.total_steps - 1))
    whole = engine.batch(step)
    b = engine.config.global_batch
    for world in [w for w in range(1, b + 1) if b % w == 0]:
        parts = [engine.batch(step, rank, world) for rank in range(world)]
        np.testing.assert_array_equal(np.concatenate([p.tokens for p in parts]), whole.tokens)
        np.testing.assert_array_equal(np.concatenate([p.source_ids for p in parts]), whole.source_ids)


@SETTINGS
@given(jobs(), st.data())
def test_schedule_change_never_rewrites_history(job, data):
    engine, _ = job
    names = engine.config.source_names
    served = data.draw(st.integers(0, engine.config.total_steps - 2))
    before = cut_log(engine, served)
    change_at = before.first_changeable_step(served)
    assume(change_at < engine.config.total_steps)
    new = Schedule.parse({"phases": [{"start_step": 0, "weights": {names[-1]: 1}}]}, names)
    changed = before.with_log(before.schedule_log + [(change_at, new)])
    for step in range(served + 1):
        np.testing.assert_array_equal(changed.batch(step).tokens, before.batch(step).tokens)
    # From change_at on only the last source is scheduled; others may still get a seat already owed (<= 1).
    owed = changed.plan.realized(change_at)
    final = changed.plan.realized(engine.config.total_steps)
    assert all(final[k] - owed[k] <= 1 for k in range(len(names) - 1))
    assert changed.version_at(change_at) == len(changed.schedule_log)


@SETTINGS
@given(jobs(), st.data())
def test_last_safe_high_water_is_the_exact_bound_for_a_change(job, data):
    engine, _ = job
    effective = data.draw(st.integers(0, engine.config.total_steps - 1))
    bound = engine.last_safe_high_water(effective)
    assert bound <= effective - 1
    assert bound == -1 or engine.first_changeable_step(bound) <= effective
    assert bound == effective - 1 or engine.first_changeable_step(bound + 1) > effective


@SETTINGS
@given(jobs())
def test_batches_are_a_pure_function_of_config_sources_and_log(job):
    engine, sources = job
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


@pytest.mark.parametrize(
    "phases, field",
    [
        ([{"start_step": 0, "weights": {"dom": 0.5, "web": 0.6}}], r"phases\[0\]\.weights: must sum to 1"),
        ([{"start_step": 0, "weights": {"dom": -0.1, "web": 1.1}}], r"weights\.dom: weight must be >= 0"),
        ([{"start_step": 0, "weights": {"chem": 1}}], r"unknown source\(s\) \['chem'\]"),
        ([{"start_step": 5, "weights": {"web": 1}}], r"phases\[0\]\.start_step: the first phase must start"),
        (
            [{"start_step": 0, "weights": {"web": 1}}, {"start_step": 0, "weights": {"dom": 1}}],
            r"phases\[1\]\.start_step: steps must increase",
        ),
        ([{"start_step": 0, "weights": {"web": 1}, "ramp": True}], r"phases\[0\]\.ramp: the last phase"),
        ([{"start_step": 0, "weights": {"web": "x"}}], r"weights\.web: weight strings must be decimals"),
        ([], r"schedule\.phases: must be a non-empty list"),
    ],
)
def test_invalid_schedules_name_the_field(phases, field):
    with pytest.raises(InvalidInput, match=field):
        Schedule.parse({"phases": phases}, ["dom", "web"])


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"seq_len": 1}, "seq_len"),
        ({"global_batch": 0}, "global_batch"),
        ({"total_steps": "9"}, "total_steps"),
        ({"sources": [{"name": "a", "role": "twice"}]}, r"sources\[0\]\.role"),
        ({"sources": [{"name": "a", "role": "once"}] * 2}, "names must be unique"),
        ({"sources": [{"name": f"s{i}", "role": "once"} for i in range(257)]}, "1 to 256 sources"),
        ({"colour": 1}, r"unknown field\(s\) \['colour'\]"),
    ],
)
def test_invalid_job_configs_name_the_field(patch, field):
    base = {"sources": [{"name": "a", "role": "once"}], "seq_len": 8, "global_batch": 4, "total_steps": 10}
    with pytest.raises(InvalidInput, match=field):
        JobConfig.parse(base | patch)


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


def test_far_steps_cost_no_replay():
    """Step 10**12 - 1 is computed directly (pytest-timeout fails a replaying engine)."""
    config = JobConfig.parse(
        {
            "sources": [{"name": "dom", "role": "repeat"}, {"name": "web", "role": "repeat"}],
            "seq_len": 8,
            "global_batch": 512,
            "seed": 1,
            "total_steps": 10**12,
        }
    )
    names = config.source_names
    sched = Schedule.parse(
        {
            "phases": [
                {"start_step": 0, "weights": {"dom": 0.05, "web": 0.95}, "ramp": True},
                {"start_step": 10**11, "weights": {"dom": 0.5, "web": 0.5}},
            ]
        },
        names,
    )
    engine = MixingEngine.create(
        config, {"dom": ArraySource([20] * 50), "web": ArraySource([20] * 50)}, [(0, sched)]
    )
    batch = engine.batch(10**12 - 1)
    assert batch.tokens.shape == (512, 8)
    counts = engine.repetition_counts("dom", 10**12 - 1)
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
