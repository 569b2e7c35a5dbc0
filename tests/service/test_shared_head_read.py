"""Batch requests of one job waiting at the same moment share one ``mark_served`` round trip, and still
each see every change committed before they arrived (issue 21: the per-request head read was 14-23% of a
request's CPU)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import anyio
import pytest
from service_helpers import JOB, SCHEDULE

from mixer_contract.errors import InvalidInput, StoreBehind, TooLarge
from mixer_service.service.jobs import JobManager
from mixer_service.service.routes.batches import serve_batch
from mixer_service.service.source_registry import SourceRegistry
from mixer_service.store import open_store
from mixer_service.store.embedded import EmbeddedStore

STEP_LIMIT = 1 << 20
WORLD = 4


class CountingStore(EmbeddedStore):
    """The real embedded store, counting ``mark_served`` calls; ``hold`` pauses the next one mid-flight."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.marks: list[int] = []
        self.hold: threading.Event | None = None
        self.entered = threading.Event()

    def mark_served(self, job_id, step, incarnation):
        self.marks.append(step)
        if self.hold is not None:
            self.entered.set()
            self.hold.wait(10)
        return super().mark_served(job_id, step, incarnation)


@pytest.fixture
def manager(sources_dir, tmp_path):
    store = CountingStore(tmp_path / "state.sqlite")
    manager = JobManager(store, SourceRegistry.load(sources_dir, tmp_path / "cache"))
    manager.create("j", JOB, SCHEDULE, "test", "t")
    yield manager
    store.close()


def test_requests_admitted_together_make_one_store_round_trip_for_the_highest_step(manager):
    store = manager.store
    requests = [(step, rank) for step in (3, 5, 4) for rank in range(WORLD)]
    groups = [manager.admit("j", step, rank, WORLD, STEP_LIMIT) for step, rank in requests]
    assert len({id(g) for g in groups}) == 1
    with ThreadPoolExecutor(4) as pool:
        views = list(pool.map(lambda r: manager.serve("j", *r[0], WORLD, STEP_LIMIT, r[1]),
                              zip(requests, groups, strict=True)))
    assert store.marks == [5], "one round trip, for the highest step of the group"
    assert {id(view) for view, _ in views} == {id(views[0][0])}
    assert [ranks.rank for _, ranks in views] == [rank for _, rank in requests]
    assert manager.view("j").head.served_high_water == 5
    # The group is closed: the next arrival opens a new one, with a read of its own.
    later = manager.admit("j", 1, 0, WORLD, STEP_LIMIT)
    manager.serve("j", 1, 0, WORLD, STEP_LIMIT, later)
    assert store.marks == [5, 1]


def test_a_request_arriving_after_the_shared_read_started_reads_again_and_sees_a_change(manager):
    """Sharing never hands a request a head read before it arrived: a schedule change committed while a
    group's read is in flight is seen by every request that arrives after the change."""
    store = manager.store
    first = manager.admit("j", 2, 0, WORLD, STEP_LIMIT)
    store.hold = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        early = pool.submit(manager.serve, "j", 2, 0, WORLD, STEP_LIMIT, first)
        assert store.entered.wait(10)
        store.hold.set()
        store.hold = None
        early.result(10)
    runtime = manager.view("j").runtime
    manager.change_schedule("j", runtime.etag(), 10, SCHEDULE, "test", "a change")
    other = JobManager(store, manager.sources)  # a second worker process's view of the same store
    late = other.admit("j", 2, 1, WORLD, STEP_LIMIT)
    assert late is None, "a process that holds no runtime reads on its own"
    view, _ = other.serve("j", 2, 1, WORLD, STEP_LIMIT)
    assert view.head.version == 2
    again = manager.admit("j", 2, 2, WORLD, STEP_LIMIT)
    assert again is not first
    view, _ = manager.serve("j", 2, 2, WORLD, STEP_LIMIT, again)
    assert view.head.version == 2 and store.marks[-1] == 2


def test_a_request_joining_an_open_group_sees_a_change_committed_before_it_arrived(manager):
    other = JobManager(manager.store, manager.sources)
    other.view("j")
    group = manager.admit("j", 1, 0, WORLD, STEP_LIMIT)
    runtime = other.view("j").runtime
    other.change_schedule("j", runtime.etag(), 10, SCHEDULE, "test", "a change")  # another process's change
    joined = manager.admit("j", 1, 1, WORLD, STEP_LIMIT)
    assert joined is group
    view, _ = manager.serve("j", 1, 1, WORLD, STEP_LIMIT, joined)
    assert view.head.version == 2, "the group's read starts when its first member runs, after every arrival"


def test_a_bad_request_is_refused_on_arrival_and_raises_nobody_s_step(manager):
    group = manager.admit("j", 1, 0, WORLD, STEP_LIMIT)
    with pytest.raises(TooLarge):
        manager.admit("j", 2, 0, 1, 16)
    with pytest.raises(InvalidInput, match=r"step: must be an integer in \[0, "):
        manager.admit("j", JOB["total_steps"], 0, WORLD, STEP_LIMIT)
    manager.serve("j", 1, 0, WORLD, STEP_LIMIT, group)
    assert manager.store.marks == [1]


def test_a_fault_found_by_the_shared_read_is_every_member_s_answer_and_counted_for_each(sources_dir,
                                                                                        tmp_path):
    faults: list[str] = []
    store = open_store(None, tmp_path / "state.sqlite")
    manager = JobManager(store, SourceRegistry.load(sources_dir, tmp_path / "cache"), on_fault=faults.append)
    manager.create("j", JOB, SCHEDULE, "test", "t")
    manager.serve("j", 6, 0, WORLD, STEP_LIMIT)
    with store._transaction(write=True) as conn:  # a store restored from an older copy
        conn.execute("UPDATE jobs SET served_high_water = 2 WHERE job_id = 'j'")
    groups = [manager.admit("j", 3, rank, WORLD, STEP_LIMIT) for rank in range(3)]
    with ThreadPoolExecutor(3) as pool:
        outcomes = list(pool.map(lambda r: _outcome(manager, r, groups[r]), range(3)))
    assert all(isinstance(o, StoreBehind) and o.fault == "high_water_rollback" for o in outcomes)
    assert faults == ["high_water_rollback"] * 3
    assert manager.view("j").head.served_high_water >= 6, "put back"


def _outcome(manager: JobManager, rank: int, group):
    try:
        return manager.serve("j", 3, rank, WORLD, STEP_LIMIT, group)
    except StoreBehind as exc:
        return exc


# Found by a hostile review: a member cancelled in the queue, a leader's unexpected error.


def test_a_request_cancelled_while_queued_does_not_raise_the_high_water(manager):
    """``admit`` runs on the event loop, before the request waits for one of the batch threads; a request
    cancelled in that wait (``anyio.to_thread.run_sync`` is cancellable until the thread starts: server
    shutdown, an in-process ASGI client's timeout) never reaches ``serve``. Its step must leave the group:
    it stayed in it, and the job's next request marked a step nobody was served (a schedule change at step
    50 then took effect after 100). Cancelled through ``serve_batch`` itself, with its batch threads busy."""
    limiter = anyio.CapacityLimiter(1)
    state = SimpleNamespace(unsafe_off=frozenset(), jobs=manager, prefetched={}, batch_limiter=limiter,
                            limits=SimpleNamespace(max_request_tokens=STEP_LIMIT))

    async def cancelled_while_queued() -> None:
        release = anyio.Event()

        async def busy() -> None:  # every batch thread busy with another request
            async with limiter:
                await release.wait()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(busy)
            await anyio.sleep(0.05)
            with anyio.move_on_after(0.2) as scope:
                await serve_batch(state, "j", 100, 0, WORLD, "none", False)
            assert scope.cancelled_caught
            release.set()
    anyio.run(cancelled_while_queued)
    group = manager.admit("j", 3, 0, WORLD, STEP_LIMIT)
    manager.serve("j", 3, 0, WORLD, STEP_LIMIT, group)
    assert manager.store.marks == [3]
    assert manager.view("j").head.served_high_water == 3


def test_an_unexpected_error_of_the_leader_is_every_member_s_answer_and_the_next_group_recovers(manager):
    store = manager.store
    groups = [manager.admit("j", 4, rank, WORLD, STEP_LIMIT) for rank in range(WORLD)]
    real = store.mark_served
    calls = []

    def boom(job_id, step, incarnation):
        calls.append(step)
        raise RuntimeError("driver bug")
    store.mark_served = boom
    with ThreadPoolExecutor(WORLD) as pool:
        futures = [pool.submit(manager.serve, "j", 4, rank, WORLD, STEP_LIMIT, g)
                   for rank, g in enumerate(groups)]
        errors = [f.exception(10) for f in futures]
    assert calls == [4] and all(isinstance(e, RuntimeError) for e in errors)
    store.mark_served = real
    group = manager.admit("j", 4, 0, WORLD, STEP_LIMIT)
    view, _ = manager.serve("j", 4, 0, WORLD, STEP_LIMIT, group)
    assert view.head.served_high_water in (-1, 4) and manager.view("j").head.served_high_water == 4
