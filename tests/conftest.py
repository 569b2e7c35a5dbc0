"""Shared fixtures: real Redis servers and free ports, so tests exercise real sockets instead of mocks.

Tests never touch a Redis that may already run on the machine: each server here is private, on a free
port, without persistence, and is stopped when its fixture ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from service_helpers import RedisServer, Server, prepare_real_sources, start_redis_server
from store_fixtures import URL_FIXTURES, Location

from mixer_service.service.process import free_port, start_redis_cluster


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


@pytest.fixture(params=list(URL_FIXTURES))
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    """A fresh store's location, once per kind of store (the store contract runs against each)."""
    fixture = URL_FIXTURES[request.param]
    url = request.getfixturevalue(fixture) if fixture else None
    return Location(url, tmp_path / "state.sqlite3")


@pytest.fixture(scope="module")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """``start_server(sources, **options)``: a ``mixer serve`` with a state directory of its own, ready;
    every server a module started is stopped when the module ends."""
    started: list[Server] = []

    def start(sources: Path, **options) -> Server:
        srv = Server(sources, tmp_path_factory.mktemp("state"), **options).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def server_sources(sources_dir: Path) -> Path:
    """What a module's ``server`` serves: the session's sources, unless the module overrides this fixture."""
    return sources_dir


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, start_server: Callable[..., Server],
           server_sources: Path) -> Server:
    """One embedded-store server shared by a module's tests; a module marked
    ``pytest.mark.server_env(TOKENS)`` starts it with those ``MIXER_*`` variables (roles on)."""
    marker = request.node.get_closest_marker("server_env")
    return start_server(server_sources, env=marker.args[0] if marker else None)
