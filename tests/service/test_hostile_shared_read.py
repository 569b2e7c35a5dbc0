"""Found by a hostile review of ``SharedHeadRead``: what a group's shared ``mark_served`` raises the served
high water to when a member is cancelled, and what its members answer when the leader fails."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import anyio
import pytest
from service_helpers import JOB, SCHEDULE
from test_shared_head_read import STEP_LIMIT, WORLD, CountingStore

from mixer_service.service.jobs import JobManager
from mixer_service.service.routes.batches import serve_batch
from mixer_service.service.source_registry import SourceRegistry


@pytest.fixture
def manager(sources_dir, tmp_path):
    store = CountingStore(tmp_path / "state.sqlite")
    manager = JobManager(store, SourceRegistry.load(sources_dir, tmp_path / "cache"))
    manager.create("j", JOB, SCHEDULE, "test", "t")
    yield manager
    store.close()


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
