"""``mixer serve`` as a child process on loopback: what the demo, experiments, benchmarks and tests run.

One place knows how to start, probe and stop a real server, so every caller exercises the same command line
an operator would type.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx


def free_port(highest: int = 65535) -> int:
    """A TCP port on 127.0.0.1, at most ``highest``, that nothing listens on right now (the OS picks it)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port <= highest:
            return port


# A cluster node also listens on its port + 10000 (the cluster bus), so its own port must leave room.
CLUSTER_PORT_MAX = 65535 - 10000


REDIS_START_TIMEOUT_S = 10.0
NO_PERSISTENCE = ("--save", "", "--appendonly", "no")


@dataclass
class RedisProcess:
    """A private ``redis-server`` process on loopback (tests and benchmarks); ``url`` is its database 0."""

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


def start_redis(directory: Path, port: int | None = None,
                persistence: tuple[str, ...] = NO_PERSISTENCE, highest_port: int = 65535) -> RedisProcess:
    """Start ``redis-server`` on a free port (or ``port``, to restart one) and wait until it answers PING.

    Retries on a new port if another process grabbed the chosen one between probing and binding.
    ``persistence`` replaces the default "none" (the fault suite restarts a Redis with AOF).
    """
    executable = shutil.which("redis-server")
    if executable is None:
        raise RuntimeError("redis-server is not on PATH; install it (e.g. `apt-get install redis-server`)")
    log = directory / "redis.log"
    for _ in range(3):
        chosen = port or free_port(highest_port)
        log = directory / f"redis-{chosen}.log"
        command = [executable, "--port", str(chosen), "--bind", "127.0.0.1", *persistence]
        command += ["--dir", str(directory), "--logfile", str(log)]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = RedisProcess(process, chosen, log)
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while process.poll() is None and time.monotonic() < deadline:
            if _answers_ping(chosen):
                return server
            time.sleep(0.02)
        server.stop()
    output = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    raise RuntimeError(f"redis-server did not start; last log:\n{output}")


CLUSTER_NODE = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")


@dataclass
class RedisClusterProcesses:
    """A private Redis Cluster of ``redis-server`` masters on loopback, one directory each, every slot
    assigned (tests and benchmarks); ``url`` names every node, as a replica would be configured."""

    nodes: list[RedisProcess]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_redis_cluster(directory: Path, masters: int = 3,
                        persistence: tuple[str, ...] = NO_PERSISTENCE) -> RedisClusterProcesses:
    """Start ``masters`` cluster-enabled servers and join them with ``redis-cli --cluster create``."""
    nodes: list[RedisProcess] = []
    try:
        for i in range(masters):
            (directory / f"node{i}").mkdir(parents=True, exist_ok=True)
            nodes.append(start_redis(directory / f"node{i}", persistence=(*persistence, *CLUSTER_NODE),
                                     highest_port=CLUSTER_PORT_MAX))
        addresses = [f"127.0.0.1:{n.port}" for n in nodes]
        created = subprocess.run(["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0",
                                  "--cluster-yes"], capture_output=True, text=True, timeout=60)
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-1000:]}{created.stderr}")
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S * 3
        while not all(_cluster_ok(n.port) for n in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return RedisClusterProcesses(nodes)


def _cluster_ok(port: int) -> bool:
    info = subprocess.run(["redis-cli", "-p", str(port), "cluster", "info"], capture_output=True, text=True)
    return "cluster_state:ok" in info.stdout


class ServerProcess:
    """A ``mixer serve`` process; ``MIXER_*`` variables are not inherited, only those passed in ``env``."""

    def __init__(self, sources_dir: Path, state_dir: Path, port: int | None = None, *,
                 redis_url: str | None = None, env: dict[str, str] | None = None, workers: int | None = 1,
                 extra_args: list[str] | None = None) -> None:
        """``workers=None``: ``mixer serve``'s own default (one per usable core)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "mixer_service.cli", "serve", "--sources-dir", str(sources_dir),
                     "--state-dir", str(state_dir), "--port", str(self.port)]
        if workers is not None:
            self.args += ["--workers", str(workers)]
        if redis_url:
            self.args += ["--redis-url", redis_url]
        self.args += extra_args or []
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("MIXER_")}
        self.env = inherited | {"MIXER_LOG_LEVEL": "WARNING"} | (env or {})
        self.proc: subprocess.Popen | None = None
        self._stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty server never blocks

    def start(self, timeout: float = 60) -> ServerProcess:
        """Start and wait until ``/v1/ready`` answers 200 (store reachable, sources loaded)."""
        if self.proc is not None and self.proc.poll() is None:  # a second process would be leaked
            raise RuntimeError(f"mixer serve on port {self.port} is already running")
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=subprocess.DEVNULL, stderr=self._stderr)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mixer serve exited with {self.proc.returncode}: {self.tail()}")
                try:
                    if httpx.get(f"{self.url}/v1/ready", timeout=1).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            raise RuntimeError(f"mixer serve did not become ready in {timeout:g} s: {self.tail()}")
        except BaseException:  # also a SIGTERM or Ctrl-C while waiting: never leave the server running
            self.stop()
            raise

    def tail(self, chars: int = 2000) -> str:
        """The end of the server's stderr, for error messages."""
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-chars:]

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """Graceful stop (SIGTERM), SIGKILL if it does not exit within 10 s."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if exc_type is not None:  # what the server said is the first thing a failure report needs
            print(f"mixer serve on port {self.port} (stderr, last 8000 chars):\n{self.tail(8000)}",
                  file=sys.stderr)
