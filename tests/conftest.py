"""Shared fixtures: real Redis servers and free ports, so tests exercise real sockets instead of mocks.

Tests never touch a Redis that may already run on the machine: each server here is private, on a free
port, without persistence, and is stopped when its fixture ends.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from service_helpers import prepare_real_sources

from mixer_service.service.process import free_port

REDIS_START_TIMEOUT_S = 10.0


@dataclass
class RedisServer:
    """A private ``redis-server`` process; ``url`` points at its database 0."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        """Terminate the server (idempotent, also when paused); SIGKILL if it does not exit promptly."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


NO_PERSISTENCE = ("--save", "", "--appendonly", "no")


def start_redis_server(directory: Path, port: int | None = None,
                       persistence: tuple[str, ...] = NO_PERSISTENCE) -> RedisServer:
    """Start ``redis-server`` on a free port (or ``port``, to restart one) and wait until it answers PING.

    Retries on a new port if another process grabbed the chosen one between probing and binding.
    ``persistence`` replaces the default "none" (tests/fault_harness.py restarts a Redis with AOF).
    """
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.fail(
            "redis-server is not on PATH; install it (e.g. `apt-get install redis-server`)", pytrace=False
        )
    for _ in range(3):
        chosen = port or free_port()
        log = directory / f"redis-{chosen}.log"
        command = [executable, "--port", str(chosen), "--bind", "127.0.0.1", *persistence]
        command += ["--dir", str(directory), "--logfile", str(log)]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = RedisServer(process, chosen, log)
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while process.poll() is None and time.monotonic() < deadline:
            if _answers_ping(chosen):
                return server
            time.sleep(0.02)
        server.stop()
    output = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    pytest.fail(f"redis-server did not start; last log:\n{output}", pytrace=False)


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
