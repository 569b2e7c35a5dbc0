"""One contract for every state store: the same tests run against embedded SQLite and real Redis.

The central guarantee under test: a step that ``mark_served`` answered with version ``v`` is never affected
by a version ``> v``, however serving and schedule changes interleave, within and across processes.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_fixtures import CONFIG, SCHEDULE, Location

from mixer_contract.canonical import canonical_json, config_digest
from mixer_contract.errors import (
    Conflict,
    CorruptData,
    InvalidInput,
    MixerError,
    NotFound,
    StaleVersion,
    StoreUnavailable,
)
from mixer_service.store import ScheduleVersion, StateStore, open_store
from mixer_service.store.base import MAX_COMMIT_ATTEMPTS, ChangePlan, JobHead, StoreLimits, verify_chain
from mixer_service.store.redis_store import RedisStore, connect, redact_url

ANNEAL = {"phases": [{"weights": {"web": 0.5, "domain": 0.5}}]}
REPO_ROOT = Path(__file__).resolve().parents[2]


def mark_step(store: StateStore, job_id: str, step: int) -> int:
    """Mark ``step`` served for the job's current incarnation; the version the store answered with."""
    return store.mark_served(job_id, step, store.head(job_id).incarnation).version


def commit_change(store: StateStore, job_id: str, expected_version: int, requested_step: int,
           schedule: dict[str, Any], author: str, reason: str,
           validate: Callable[[int], int | None]) -> ScheduleVersion:
    """A schedule change with the plain effective-step rule max(requested, high water + 1); ``validate``
    sees each effective step and may tighten the high-water bound of the commit."""
    log = store.versions(job_id)
    incarnation = store.head(job_id).incarnation
    expected = log[-1] if expected_version == log[-1].version else replace(log[-1], version=expected_version)

    def plan(high_water: int) -> ChangePlan:
        effective = max(requested_step, high_water + 1)
        bound = validate(effective)
        return ChangePlan(effective, effective - 1 if bound is None else min(bound, effective - 1))

    return store.change_schedule(job_id, incarnation, expected, schedule, author, reason, plan)


def accept(effective_step: int) -> None:
    """A validator that allows every effective step."""


def wait_at(barrier: Any) -> Callable[[int], None]:
    """A validator that holds every caller until all have read the head: a real race, every time."""

    def validate(effective_step: int) -> None:
        barrier.wait(timeout=20)

    return validate


@pytest.fixture
def store(location: Location) -> Iterator[StateStore]:
    with location.open() as opened:
        yield opened


@pytest.fixture
def job(store: StateStore) -> str:
    store.create_job("job", CONFIG, SCHEDULE, "alice", "initial mix")
    return "job"


def latest_version(store: StateStore, job_id: str) -> int:
    return store.schedule_log(job_id)[-1].version


# --- jobs -------------------------------------------------------------------------------------------


def test_create_job_starts_schedule_log_at_version_1_step_0(store: StateStore) -> None:
    before = time.time()
    first, incarnation = store.create_job("job-1", CONFIG, SCHEDULE, "alice", "initial mix")
    assert re.fullmatch("[0-9a-f]{32}", incarnation) and store.head("job-1").incarnation == incarnation
    assert first.chain == first.link(incarnation)
    assert (first.version, first.effective_step, first.schedule) == (1, 0, SCHEDULE)
    assert (first.author, first.reason) == ("alice", "initial mix")
    assert before <= first.time <= time.time()
    assert store.get_job("job-1") == CONFIG
    assert store.schedule_log("job-1") == [first]
    assert store.served_high_water("job-1") == -1
    assert store.trained_step("job-1") == -1


def test_list_jobs_is_sorted(store: StateStore) -> None:
    assert store.list_jobs() == []
    for job_id in ["b", "A.2", "a_1", "c-3"]:
        store.create_job(job_id, CONFIG, SCHEDULE, "alice", "")
    assert store.list_jobs() == sorted(["b", "A.2", "a_1", "c-3"])


def test_creating_an_existing_job_conflicts_and_changes_nothing(store: StateStore, job: str) -> None:
    log = store.schedule_log(job)
    with pytest.raises(Conflict, match="already exists"):
        store.create_job(job, {"other": True}, ANNEAL, "bob", "again")
    assert store.get_job(job) == CONFIG
    assert store.schedule_log(job) == log
    assert store.list_jobs() == [job]


UNKNOWN_JOB_CALLS: dict[str, Callable[[StateStore], object]] = {
    "get_job": lambda s: s.get_job("nope"),
    "schedule_log": lambda s: s.schedule_log("nope"),
    "change_schedule": lambda s: commit_change(s, "nope", 1, 0, ANNEAL, "bob", "", accept),
    "mark_served": lambda s: mark_step(s, "nope", 0),
    "served_high_water": lambda s: s.served_high_water("nope"),
    "set_trained_step": lambda s: s.set_trained_step("nope", 3),
    "trained_step": lambda s: s.trained_step("nope"),
}


@pytest.mark.parametrize("call", UNKNOWN_JOB_CALLS.values(), ids=UNKNOWN_JOB_CALLS.keys())
def test_unknown_job_is_not_found_and_not_created(
    store: StateStore, call: Callable[[StateStore], object]
) -> None:
    with pytest.raises(NotFound, match="'nope'"):
        call(store)
    assert store.list_jobs() == []


@pytest.mark.parametrize("job_id", ["", "-lead", ".lead", "a/b", "a b", "{tag}", "x" * 65, "é"])
def test_malformed_job_ids_are_rejected(store: StateStore, job_id: str) -> None:
    with pytest.raises(InvalidInput, match="job id"):
        store.create_job(job_id, CONFIG, SCHEDULE, "alice", "")
    with pytest.raises(InvalidInput, match="job id"):
        mark_step(store, job_id, 0)
    assert store.list_jobs() == []


def test_longest_allowed_job_id_works(store: StateStore) -> None:
    store.create_job("x" * 64, CONFIG, SCHEDULE, "alice", "")
    assert store.list_jobs() == ["x" * 64]


BAD_ARGUMENT_CALLS: dict[str, Callable[[StateStore], object]] = {
    "negative served step": lambda s: mark_step(s, "job", -1),
    "fractional served step": lambda s: mark_step(s, "job", 1.5),  # type: ignore[arg-type]
    "negative trained step": lambda s: s.set_trained_step("job", -2),
    "version zero": lambda s: commit_change(s, "job", 0, 5, ANNEAL, "bob", "", accept),
    "schedule not an object": lambda s: commit_change(s, "job", 1, 5, [1], "bob", "", accept),  # type: ignore[arg-type]
    "schedule not JSON": lambda s: commit_change(s, "job", 1, 5, {"w": {1, 2}}, "bob", "", accept),
    "config not JSON": lambda s: s.create_job("other", {"nan": float("nan")}, SCHEDULE, "bob", ""),
}


@pytest.mark.parametrize("call", BAD_ARGUMENT_CALLS.values(), ids=BAD_ARGUMENT_CALLS.keys())
def test_bad_arguments_are_invalid_input_and_change_nothing(
    store: StateStore, job: str, call: Callable[[StateStore], object]
) -> None:
    with pytest.raises(InvalidInput):
        call(store)
    assert store.list_jobs() == [job]
    assert latest_version(store, job) == 1
    assert (store.served_high_water(job), store.trained_step(job)) == (-1, -1)


# --- serving progress -------------------------------------------------------------------------------


def test_mark_served_answers_the_head_it_found(store: StateStore, job: str) -> None:
    incarnation = store.head(job).incarnation
    assert store.mark_served(job, 4, incarnation).served_high_water == -1
    assert store.mark_served(job, 2, incarnation).served_high_water == 4
    assert store.head(job).served_high_water == 4


def test_mark_served_keeps_the_maximum_and_returns_the_latest_version(store: StateStore, job: str) -> None:
    assert mark_step(store, job, 5) == 1
    assert mark_step(store, job, 3) == 1
    assert store.served_high_water(job) == 5
    commit_change(store, job, 1, 100, ANNEAL, "bob", "anneal", accept)
    assert mark_step(store, job, 7) == 2
    assert store.served_high_water(job) == 7


def test_trained_step_can_rewind_to_an_earlier_checkpoint(store: StateStore, job: str) -> None:
    store.set_trained_step(job, 500)
    store.set_trained_step(job, 200)
    assert store.trained_step(job) == 200
    assert store.served_high_water(job) == -1, "training progress is independent of serving"


# --- schedule changes -------------------------------------------------------------------------------


def test_change_takes_effect_after_the_served_high_water(store: StateStore, job: str) -> None:
    validated: list[int] = []
    mark_step(store, job, 10)
    second = commit_change(store, job, 1, 4, ANNEAL, "bob", "anneal now", validated.append)
    third = commit_change(store, job, 2, 50, SCHEDULE, "carol", "back", validated.append)
    assert (second.version, second.effective_step, third.version, third.effective_step) == (2, 11, 3, 50)
    assert validated == [11, 50]
    assert [(v.author, v.reason) for v in store.schedule_log(job)] == [
        ("alice", "initial mix"),
        ("bob", "anneal now"),
        ("carol", "back"),
    ]
    assert store.schedule_log(job)[1:] == [second, third]


def test_stale_expected_version_is_refused_and_names_the_current_one(store: StateStore, job: str) -> None:
    commit_change(store, job, 1, 10, ANNEAL, "bob", "", accept)
    for stale in (1, 3):
        with pytest.raises(StaleVersion, match="at schedule version 2"):
            commit_change(store, job, stale, 20, SCHEDULE, "carol", "", accept)
    assert latest_version(store, job) == 2


def test_failed_validation_propagates_and_changes_nothing(store: StateStore, job: str) -> None:
    mark_step(store, job, 9)

    def refuse(effective_step: int) -> None:
        raise InvalidInput(f"source 'web' runs out before step {effective_step}")

    with pytest.raises(InvalidInput, match="before step 10"):
        commit_change(store, job, 1, 0, ANNEAL, "bob", "", refuse)
    assert latest_version(store, job) == 1
    assert store.served_high_water(job) == 9


def test_commit_recomputes_the_effective_step_when_steps_were_served_meanwhile(
    store: StateStore, job: str
) -> None:
    validated: list[int] = []

    def serve_while_validating(effective_step: int) -> None:
        validated.append(effective_step)
        if len(validated) == 1:
            mark_step(store, job, 30)  # a trainer fetched step 30 between read and commit

    changed = commit_change(store, job, 1, 20, ANNEAL, "bob", "", serve_while_validating)
    assert validated == [20, 31]
    assert changed.effective_step == 31
    assert store.schedule_log(job)[-1] == changed


def test_served_steps_below_a_future_effective_step_do_not_force_a_retry(store: StateStore, job: str) -> None:
    validated: list[int] = []

    def serve_while_validating(effective_step: int) -> None:
        validated.append(effective_step)
        mark_step(store, job, 5)

    assert commit_change(store, job, 1, 100, ANNEAL, "bob", "", serve_while_validating).effective_step == 100
    assert validated == [100]


def test_validate_can_tighten_the_high_water_bound_of_the_commit(store: StateStore, job: str) -> None:
    """A change that is only safe while at most step 3 has been served is not committed once step 5 was."""
    bounds: list[int] = []

    def safe_below_four(effective_step: int) -> int:
        bounds.append(effective_step)
        mark_step(store, job, 5)  # served after the change read the head
        return 3

    with pytest.raises(Conflict):
        commit_change(store, job, 1, 100, ANNEAL, "bob", "", safe_below_four)
    assert len(store.schedule_log(job)) == 1 and bounds == [100] * len(bounds) and len(bounds) > 1


def test_commit_gives_up_when_serving_keeps_overtaking(store: StateStore, job: str) -> None:
    def always_overtaken(effective_step: int) -> None:
        mark_step(store, job, effective_step)

    with pytest.raises(Conflict, match="retry"):
        commit_change(store, job, 1, 0, ANNEAL, "bob", "", always_overtaken)
    assert latest_version(store, job) == 1
    assert store.served_high_water(job) >= MAX_COMMIT_ATTEMPTS - 1  # every attempt was overtaken


def test_commit_plans_ahead_of_trainers_that_advance_while_it_commits(store: StateStore, job: str) -> None:
    """Found under load (tests/service/test_faults.py, Redis restarting): trainers asking 8 steps a request
    moved the high water past every plan's bound, 8 times in a row, and a change as soon as possible was a
    409. Overtaken twice, an attempt plans twice as far past the last bound as serving went, and lands."""
    def eight_steps_a_request(effective_step: int) -> None:
        mark_step(store, job, store.served_high_water(job) + 8)

    new = commit_change(store, job, 1, 0, ANNEAL, "bob", "", eight_steps_a_request)
    assert latest_version(store, job) == 2 and new.effective_step > store.served_high_water(job)


def test_schedule_version_round_trips_through_a_dict() -> None:
    version = ScheduleVersion(3, 120, ANNEAL, 1_700_000_000.25, "bob", "final anneal")
    assert ScheduleVersion.from_dict(version.to_dict()) == version


# --- concurrency ------------------------------------------------------------------------------------


def test_one_of_eight_concurrent_threads_wins_a_change(store: StateStore, job: str) -> None:
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def change(author: str) -> None:
        try:
            commit_change(store, job, 1, 10, ANNEAL, author, "", wait_at(barrier))
            outcomes.append("won")
        except StaleVersion:
            outcomes.append("stale")

    threads = [threading.Thread(target=change, args=(f"op{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["stale"] * 7 + ["won"]
    assert [v.version for v in store.schedule_log(job)] == [1, 2]


def _change_in_child(location: Location, job_id: str, author: str, barrier: Any, results: Any) -> None:
    """Runs in a separate process: one competitor for the same expected version."""
    with location.open() as store:
        try:
            commit_change(store, job_id, 1, 10, ANNEAL, author, "", wait_at(barrier))
            results.put("won")
        except StaleVersion:
            results.put("stale")
        except MixerError as exc:
            results.put(f"error: {exc!r}")


def test_one_of_two_concurrent_processes_wins_a_change(
    location: Location, store: StateStore, job: str
) -> None:
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    children = [
        context.Process(target=_change_in_child, args=(location, job, f"proc{i}", barrier, results))
        for i in range(2)
    ]
    for child in children:
        child.start()
    outcomes = sorted(results.get(timeout=30) for _ in children)
    for child in children:
        child.join(timeout=10)
    assert outcomes == ["stale", "won"]
    assert [v.version for v in store.schedule_log(job)] == [1, 2]


def test_no_served_step_is_affected_by_a_later_version(store: StateStore, job: str) -> None:
    served: list[tuple[int, int]] = []
    steps = itertools.count()
    changes_done = threading.Event()

    def serve() -> None:
        while not changes_done.is_set():
            step = next(steps)
            served.append((step, mark_step(store, job, step)))
            time.sleep(0.0002)  # trainers fetch a step at a time; an unthrottled loop would starve changes

    def change(author: str) -> None:
        for _ in range(10):
            while True:
                try:
                    commit_change(store, job, latest_version(store, job), 0, ANNEAL, author, "", accept)
                    break
                except (StaleVersion, Conflict):  # what an operator's client does: re-read and retry
                    continue

    servers = [threading.Thread(target=serve) for _ in range(4)]
    changers = [threading.Thread(target=change, args=(f"op{i}",)) for i in range(2)]
    for thread in servers + changers:
        thread.start()
    for thread in changers:
        thread.join()
    changes_done.set()
    for thread in servers:
        thread.join()

    log = store.schedule_log(job)
    assert [v.version for v in log] == list(range(1, 22))
    # first_later_effective[v]: the earliest step any version after v takes effect at.
    first_later_effective = [min((w.effective_step for w in log[v:]), default=sys.maxsize) for v in range(22)]
    assert served and all(step < first_later_effective[version] for step, version in served)
    assert all(later.effective_step > 0 for later in log[1:])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    operations=st.lists(
        st.one_of(
            st.tuples(st.just("serve"), st.integers(0, 50)),
            st.tuples(st.just("change"), st.integers(0, 50)),
            st.tuples(st.just("train"), st.integers(0, 50)),
        ),
        max_size=25,
    ),
    job_number=st.integers(0, 10**9),
)
def test_matches_a_reference_model(
    store: StateStore, operations: list[tuple[str, int]], job_number: int
) -> None:
    """Any sequence of serves, changes and progress reports behaves like the contract's plain arithmetic."""
    job_id = f"model-{job_number}-{len(store.list_jobs())}"
    store.create_job(job_id, CONFIG, SCHEDULE, "alice", "")
    high_water, trained, effective_steps = -1, -1, [0]
    for kind, step in operations:
        if kind == "serve":
            high_water = max(high_water, step)
            assert mark_step(store, job_id, step) == len(effective_steps)
        elif kind == "change":
            changed = commit_change(store, job_id, len(effective_steps), step, ANNEAL, "bob", "", accept)
            effective_steps.append(max(step, high_water + 1))
            assert (changed.version, changed.effective_step) == (len(effective_steps), effective_steps[-1])
        else:
            trained = step
            store.set_trained_step(job_id, step)
    assert [v.effective_step for v in store.schedule_log(job_id)] == effective_steps
    assert (store.served_high_water(job_id), store.trained_step(job_id)) == (high_water, trained)


# --- durability -------------------------------------------------------------------------------------


def test_state_survives_reopening_the_store(location: Location) -> None:
    with location.open() as store:
        store.create_job("job", CONFIG, SCHEDULE, "alice", "initial mix")
        mark_step(store, "job", 41)
        changed = commit_change(store, "job", 1, 0, ANNEAL, "bob", "anneal", accept)
        store.set_trained_step("job", 40)
    with location.open() as reopened:
        assert reopened.get_job("job") == CONFIG
        assert reopened.schedule_log("job")[-1] == changed
        assert (reopened.served_high_water("job"), reopened.trained_step("job")) == (41, 40)


def test_embedded_state_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    writer = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from mixer_service.store import open_store
        from mixer_service.store.base import ChangePlan
        store = open_store(None, Path({str(path)!r}))
        first, incarnation = store.create_job("job", {{"seq_len": 8}}, {{"w": 1}}, "alice", "")
        store.mark_served("job", 7, incarnation)
        plan = lambda hw: ChangePlan(hw + 1, hw)  # noqa: E731
        store.change_schedule("job", incarnation, first, {{"w": 2}}, "bob", "", plan)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    finished = subprocess.run([sys.executable, "-c", writer], env=env, capture_output=True, timeout=60)
    assert finished.returncode == -signal.SIGKILL, finished.stderr.decode()
    with open_store(None, path) as store:
        assert [v.effective_step for v in store.schedule_log("job")] == [0, 8]
        assert store.served_high_water("job") == 7


def test_embedded_store_reports_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(CorruptData, match=str(path)):
        open_store(None, path)


# --- Redis availability -----------------------------------------------------------------------------


def test_open_store_rejects_unknown_url_schemes(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="'http'"):
        open_store("http://user:s3cret@example.com", tmp_path / "state.sqlite3")


def test_redis_url_password_is_redacted() -> None:
    assert redact_url("redis://user:s3cret@host:6380/1") == "redis://user:***@host:6380/1"
    assert redact_url("redis://:s3cret@host/0") == "redis://:***@host/0"
    assert redact_url("redis://host:6380/0") == "redis://host:6380/0"


def test_unreachable_redis_is_unavailable_without_leaking_the_password(free_port: int) -> None:
    with RedisStore(f"redis://user:s3cret@127.0.0.1:{free_port}/0", socket_timeout=0.5) as store:
        with pytest.raises(StoreUnavailable) as raised:
            store.ping()
    assert f"redis://user:***@127.0.0.1:{free_port}/0" in str(raised.value)
    assert "s3cret" not in str(raised.value)


ALL_CALLS: dict[str, Callable[[StateStore], object]] = {
    **UNKNOWN_JOB_CALLS,
    "create_job": lambda s: s.create_job("new", CONFIG, SCHEDULE, "alice", ""),
    "list_jobs": lambda s: s.list_jobs(),
    "ping": lambda s: s.ping(),
}


def test_redis_writes_replayed_after_a_lost_reply_report_success(clean_redis_url: str) -> None:
    """redis-py resends a command whose reply was lost; the resent write must not turn into an error."""
    with RedisStore(clean_redis_url) as store:
        incarnation = "ab" * 16
        first = ScheduleVersion(1, 0, SCHEDULE, time.time(), "alice", "").sealed(incarnation)
        config_json = json.dumps(CONFIG, sort_keys=True, separators=(",", ":"))
        assert store._insert_job("job", config_json, incarnation, first)
        assert store._insert_job("job", config_json, incarnation, first)
        second = ScheduleVersion(2, 5, ANNEAL, time.time(), "bob", "").sealed(first.chain)
        assert store._commit_version("job", incarnation, first.chain, second, -1) is None
        assert store._commit_version("job", incarnation, first.chain, second, -1) is None
        assert not store._insert_job("job", config_json, incarnation, replace(first, author="mallory"))
        other = replace(second, author="mallory").sealed(first.chain)
        blocked = store._commit_version("job", incarnation, first.chain, other, -1)
        assert blocked is not None and (blocked.version, blocked.chain) == (2, second.chain)
        assert store.schedule_log("job") == [first, second]


# --- fencing: incarnations, chains, restores, limits -------------------------------------------------


def test_every_version_chains_onto_the_previous_one(store: StateStore, job: str) -> None:
    commit_change(store, job, 1, 5, ANNEAL, "bob", "", accept)
    commit_change(store, job, 2, 9, SCHEDULE, "carol", "", accept)
    head, log = store.head(job), store.schedule_log(job)
    assert verify_chain(head.incarnation, log) and head.chain == log[-1].chain and head.version == 3
    forged = replace(log[1], reason="rewritten history")
    assert not verify_chain(head.incarnation, [log[0], forged, log[2]])


def test_a_recreated_job_is_another_incarnation_and_old_writes_do_not_touch_it(
    location: Location, store: StateStore
) -> None:
    _, old = store.create_job("job", CONFIG, SCHEDULE, "alice", "")
    mark_step(store, "job", 3)
    _delete_job(location, store, "job")
    _, new = store.create_job("job", CONFIG, SCHEDULE, "alice", "again")
    assert new != old
    head = store.mark_served("job", 50, old)  # a replica that still believes in the old incarnation
    assert (head.incarnation, head.served_high_water) == (new, -1)
    assert store.head("job").served_high_water == -1, "a fenced write changes nothing"
    with pytest.raises(StaleVersion, match="recreated"):
        store.change_schedule("job", old, store.versions("job")[0], ANNEAL, "bob", "",
                              lambda hw: ChangePlan(hw + 1, hw))
    assert store.head("job").version == 1


def _delete_job(location: Location, store: StateStore, job_id: str) -> None:
    """What an operator's FLUSHALL or a restored empty database does to one job."""
    if location.url is None:
        import sqlite3

        with sqlite3.connect(location.path) as conn:
            conn.execute("DELETE FROM schedule_versions WHERE job_id = ?", (job_id,))
            conn.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))
    else:
        with connect(location.url, 5.0, 1) as client:
            client.delete(*client.scan_iter(match=f"mixer:{{{job_id}}}:*"))
            client.srem("mixer:jobs", job_id)


def test_restore_puts_back_lost_versions_and_high_water_only_where_they_chain(
    store: StateStore, job: str
) -> None:
    incarnation = store.head(job).incarnation
    first = store.versions(job)[0]
    second = ScheduleVersion(2, 20, ANNEAL, time.time(), "bob", "lost").sealed(first.chain)
    third = ScheduleVersion(3, 30, SCHEDULE, time.time(), "bob", "lost too").sealed(second.chain)
    head = store.restore(job, incarnation, first.chain, [second, third], 25)
    assert (head.version, head.chain, head.served_high_water) == (3, third.chain, 25)
    assert store.schedule_log(job) == [first, second, third]
    again = store.restore(job, incarnation, first.chain, [second, third], 10)
    assert (again.version, again.served_high_water) == (3, 25), "restores never go backwards or duplicate"
    other = store.restore(job, "cd" * 16, third.chain, [], 99)
    assert other.served_high_water == 25, "another incarnation's restore changes nothing"


def test_job_and_version_limits_are_clear_conflicts(location: Location) -> None:
    with location.open() as store:
        store.limits = StoreLimits(max_jobs=2, max_versions=2)
        store.create_job("a", CONFIG, SCHEDULE, "alice", "")
        store.create_job("b", CONFIG, SCHEDULE, "alice", "")
        with pytest.raises(Conflict, match="limit of 2 jobs"):
            store.create_job("c", CONFIG, SCHEDULE, "alice", "")
        commit_change(store, "a", 1, 0, ANNEAL, "bob", "", accept)
        with pytest.raises(Conflict, match="limit of 2 schedule versions"):
            commit_change(store, "a", 2, 0, SCHEDULE, "bob", "", accept)
        assert store.list_jobs() == ["a", "b"] and store.head("a").version == 2


def test_versions_after_returns_only_the_new_entries(store: StateStore, job: str) -> None:
    for version in range(1, 5):
        commit_change(store, job, version, 0, ANNEAL, "bob", "", accept)
    assert [v.version for v in store.versions(job, after=3)] == [4, 5]
    assert store.versions(job, after=5) == []


def test_stopped_redis_fails_fast_with_store_unavailable(redis_server: Any) -> None:
    with RedisStore(redis_server.url, socket_timeout=0.5) as store:
        store.create_job("nope", CONFIG, SCHEDULE, "alice", "")  # "nope" so UNKNOWN_JOB_CALLS reach Redis
        redis_server.process.kill()
        redis_server.process.wait()
        for name, call in ALL_CALLS.items():
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{redis_server.port}"):
                call(store)
            assert time.monotonic() - started < 3, name


def test_hung_redis_times_out_with_store_unavailable(redis_server: Any) -> None:
    with RedisStore(redis_server.url, socket_timeout=0.3) as store:
        store.create_job("job", CONFIG, SCHEDULE, "alice", "")
        redis_server.process.send_signal(signal.SIGSTOP)  # accepts connections, never answers
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="unavailable"):
            mark_step(store, "job", 1)
        assert time.monotonic() - started < 5
        redis_server.process.send_signal(signal.SIGCONT)
        assert mark_step(store, "job", 1) == 1, "the store recovers once Redis answers again"


# --- issue 17: the log commits to the config; the head names the chain served steps were served under ----


def test_version_one_commits_to_the_config_it_was_created_with(store: StateStore, job: str) -> None:
    first = store.versions(job)[0]
    assert first.config_sha256 == config_digest(canonical_json(store.get_job(job)))
    assert verify_chain(store.head(job).incarnation, [first])
    assert not verify_chain(store.head(job).incarnation, [replace(first, config_sha256="0" * 64)])


def test_the_head_names_the_chain_the_high_water_last_rose_under(store: StateStore, job: str) -> None:
    first = store.versions(job)[0]
    assert store.head(job).served_chain == first.chain
    mark_step(store, job, 4)
    second = commit_change(store, job, 1, 9, ANNEAL, "bob", "", accept)
    assert store.head(job).served_chain == first.chain, "a commit alone serves nothing"
    mark_step(store, job, 3)
    assert store.head(job).served_chain == first.chain, "a step below the high water writes nothing"
    mark_step(store, job, 12)
    assert store.head(job).served_chain == second.chain
    incarnation = store.head(job).incarnation
    head = store.restore(job, incarnation, first.chain, [], 20)
    assert (head.served_high_water, head.served_chain) == (20, first.chain), "the restorer's log is named"


@pytest.mark.parametrize("fields", [
    ("ab" * 16, 1, "cd" * 32, "abc", -1, ""),
    ("ab" * 16, 1, "cd" * 32, 3, "1.5", ""),
    ("not-an-incarnation", 1, "cd" * 32, 3, -1, ""),
    ("ab" * 16, 0, "cd" * 32, 3, -1, ""),
    ("ab" * 16, 1, "cd" * 32, 3, -1, "short"),
    ("ab" * 16, 1, None, 3, -1, ""),
    ("ab" * 16, 1, "cd" * 32, True, -1, ""),
])
def test_a_malformed_head_field_is_corrupt_data_naming_it(fields: tuple) -> None:
    with pytest.raises(CorruptData, match="malformed fields"):
        JobHead.decode("job", fields, "here")
    assert JobHead.decode("job", ("ab" * 16, 1, "cd" * 32, "7", "-1", None), "here").served_high_water == 7


def test_a_damaged_high_water_is_corrupt_data_and_writes_nothing(location: Location, store: StateStore,
                                                                 job: str) -> None:
    incarnation = store.head(job).incarnation
    if location.url is None:
        with sqlite3.connect(location.path) as conn:
            conn.execute("UPDATE jobs SET served_high_water = 'abc' WHERE job_id = 'job'")
    else:
        with connect(location.url, 5.0, 1) as client:
            client.set("mixer:{job}:hw", "abc")
    for call in (lambda: store.head(job), lambda: store.mark_served(job, 5, incarnation),
                 lambda: store.restore(job, incarnation, store.versions(job)[0].chain, [], 9)):
        with pytest.raises(CorruptData, match="served high water 'abc'"):
            call()


def test_restored_versions_become_the_served_chain(store: StateStore, job: str) -> None:
    """A high water raised while the store was behind (the replica refused that step) must not make the
    versions it then puts back look like a rewrite of served steps."""
    incarnation = store.head(job).incarnation
    first = store.versions(job)[0]
    second = ScheduleVersion(2, 20, ANNEAL, time.time(), "bob", "lost").sealed(first.chain)
    mark_step(store, job, 30)  # raised under version 1 while the replica held version 2
    head = store.restore(job, incarnation, first.chain, [second], 10)
    assert (head.version, head.served_high_water, head.served_chain) == (2, 30, second.chain)


def test_every_key_of_a_job_lives_in_one_cluster_slot(clean_redis_cluster_url: str) -> None:
    """Per-job scripts touch one slot (a cross-slot script is refused by a cluster); only the registry of
    job ids lives elsewhere, and it is written by a script of its own."""
    from redis.crc import key_slot

    with open_store(clean_redis_cluster_url, Path("unused")) as store:
        store.create_job("a.job", CONFIG, SCHEDULE, "alice", "")
        mark_step(store, "a.job", 3)
        commit_change(store, "a.job", 1, 9, ANNEAL, "bob", "", accept)
        with connect(clean_redis_cluster_url, 5.0, 1) as client:
            keys = list(client.scan_iter(match="mixer:*"))
        slots = {key_slot(k.encode()) for k in keys if k != "mixer:jobs"}
        assert len(slots) == 1 and len(keys) == 8, keys
        assert store.list_jobs() == ["a.job"]
