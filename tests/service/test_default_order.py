"""New jobs get the locality-aware (sliding) epoch order, written into their stored config; jobs stored
before a default changed keep the order (global, or window) and the bytes they were served with."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from service_helpers import JOB, SCHEDULE, Server, engine_for

from mixer_contract import wire
from mixer_contract.job import DEFAULT_WINDOW_SHARDS, JobConfig
from mixer_contract.schedule import Schedule
from mixer_service.engine import MixingEngine
from mixer_service.store import open_store

SLIDING = {"kind": "sliding", "window_shards": DEFAULT_WINDOW_SHARDS}


def served(url: str, job: str, steps) -> list[wire.WireBatch]:
    batches = []
    for step in steps:
        r = httpx.get(f"{url}/v1/jobs/{job}/batches/{step}")
        assert r.status_code == 200, r.text
        batches.append(wire.decode(r.content))
    return batches


def assert_same(batches: list[wire.WireBatch], engine: MixingEngine, steps) -> None:
    for got, step in zip(batches, steps, strict=True):
        np.testing.assert_array_equal(got.tokens, engine.batch(step).tokens)


STEPS = (0, 1, 57, 400)


def test_a_new_job_without_an_order_gets_the_sliding_order_in_its_stored_config(sources_dir, tmp_path,
                                                                                free_port):
    with Server(sources_dir, tmp_path / "state", free_port) as server:
        r = httpx.post(f"{server.url}/v1/jobs", json={"job_id": "new", "config": JOB, "schedule": SCHEDULE})
        assert r.status_code == 201, r.text
        stored = httpx.get(f"{server.url}/v1/jobs/new").json()["config"]
        assert stored["order"] == SLIDING
        batches = served(server.url, "new", STEPS)
    assert_same(batches, engine_for(sources_dir, JobConfig.parse(stored)), STEPS)
    # and the order matters: the global or window order would have served other rows
    for other in ({"kind": "global"}, SLIDING | {"kind": "window"}):
        engine = engine_for(sources_dir, JobConfig.parse(JOB | {"order": other}))
        assert any(not np.array_equal(b.tokens, engine.batch(s).tokens)
                   for b, s in zip(batches, STEPS, strict=True))


@pytest.mark.parametrize("stored", [None, SLIDING | {"kind": "window"}], ids=["global", "window"])
def test_a_job_stored_before_a_default_changed_keeps_its_order_and_bytes(sources_dir, tmp_path, free_port,
                                                                         stored):
    """What the store held before: the config's canonical JSON without an ``order`` key (before the window
    default), or with the window default written in (before the sliding one)."""
    config = JobConfig.parse(JOB if stored is None else JOB | {"order": stored})
    assert config.to_json().get("order") == stored
    store = open_store(None, tmp_path / "state" / "state.sqlite")
    store.create_job("old", config.to_json(), Schedule.parse(SCHEDULE, config.source_names).to_json(
        config.source_names), "test", "created before the default changed")
    store.close()
    with Server(sources_dir, tmp_path / "state", free_port) as server:
        assert httpx.get(f"{server.url}/v1/jobs/old").json()["config"].get("order") == stored
        batches = served(server.url, "old", STEPS)
    assert_same(batches, engine_for(sources_dir, config), STEPS)


@pytest.mark.parametrize("order", [{"kind": "global"}, {"kind": "window", "window_shards": 2},
                                   {"kind": "window", "window_shards": DEFAULT_WINDOW_SHARDS},
                                   {"kind": "sliding", "window_shards": 2}])
def test_an_order_given_at_creation_is_kept(sources_dir, tmp_path, free_port, order):
    with Server(sources_dir, tmp_path / "state", free_port) as server:
        body = {"job_id": "given", "config": JOB | {"order": order}, "schedule": SCHEDULE}
        assert httpx.post(f"{server.url}/v1/jobs", json=body).status_code == 201
        stored = httpx.get(f"{server.url}/v1/jobs/given").json()["config"]
        batches = served(server.url, "given", STEPS)
    assert stored.get("order", {"kind": "global"}) == order
    assert_same(batches, engine_for(sources_dir, JobConfig.parse(JOB | {"order": order})), STEPS)
