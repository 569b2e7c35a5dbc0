"""Shared fixtures: real Redis servers and free ports, so tests exercise real sockets instead of mocks.

Tests never touch a Redis that may already run on the machine: each server here is private, on a free
port, without persistence, and is stopped when its fixture ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from service_helpers import prepare_real_sources

from mixer_service.service.process import NO_PERSISTENCE, free_port, start_redis, start_redis_cluster
from mixer_service.service.process import RedisProcess as RedisServer


def start_redis_server(directory: Path, port: int | None = None,
                       persistence: tuple[str, ...] = NO_PERSISTENCE) -> RedisServer:
    """``start_redis`` for tests: a missing or failing redis-server fails the test with its log."""
    try:
        return start_redis(directory, port, persistence)
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(name="free_port")
def free_port_fixture() -> int:
    """A free TCP port, e.g. for a uvicorn process started by a test."""
    return free_port()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a private Redis shared by the whole session (state persists between tests)."""
    server = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.stop()


@pytest.fixture
def clean_redis_url(redis_url: str) -> str:
    """The session Redis, emptied before the test."""
    import redis

    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()
    return redis_url


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL (``redis+cluster://``) of a private 3-master Redis Cluster shared by the session."""
    try:
        cluster = start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"))
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield cluster.url
    cluster.stop()


@pytest.fixture
def clean_redis_cluster_url(redis_cluster_url: str) -> str:
    """The session cluster, every master emptied before the test."""
    from mixer_service.store.redis_store import connect

    client = connect(redis_cluster_url, 5.0, 1)
    try:
        client.flushall(target_nodes="primaries")
    finally:
        client.close()
    return redis_cluster_url


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own, which the test may stop, kill or pause."""
    server = start_redis_server(tmp_path)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sources_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real corpora (ABC tunes + State of the Union) prepared once for every test that serves them."""
    return prepare_real_sources(tmp_path_factory.mktemp("sources"))
