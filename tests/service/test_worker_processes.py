"""The workers of a server with several ``--workers`` (the default: one per core) log as ``mixer serve`` does
and end with it. Found by a new user: spawned workers logged bare text (nothing below WARNING), and after a
SIGKILL of ``mixer serve`` they kept serving on the port, so a restart failed."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
from service_helpers import Server, new_job, worker_pids


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited


def wait_for(check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_each_worker_logs_one_json_object_a_line(sources_dir, tmp_path) -> None:
    sources = {p.name for p in sources_dir.iterdir() if (p / "meta.json").is_file()}
    with Server(sources_dir, tmp_path / "state", workers=2, env={"MIXER_LOG_LEVEL": "INFO"}) as srv:
        wait_for(lambda: len(worker_pids(srv)) == 2)
        job = new_job(srv.url)
        assert httpx.get(f"{srv.url}/v1/jobs/{job}/batches/0").status_code == 200

        def opened() -> list[dict]:
            lines = [line for line in srv.tail(1 << 20).splitlines() if line.startswith("{")]
            return [r for r in map(json.loads, lines) if r["msg"] == "source opened"]

        wait_for(lambda: len(opened()) == 2 * len(sources))
    for name in sources:  # once a worker (without --cache-limit the parent opens nothing), with its fields
        assert sum(r["source"] == name for r in opened()) == 2
    assert all(r["level"] == "info" and r["event"] == "source.opened" for r in opened())


def test_workers_end_with_a_sigkilled_server_and_its_port_and_metrics_are_taken_back(sources_dir,
                                                                                      tmp_path) -> None:
    srv = Server(sources_dir, tmp_path / "state", workers=2).start()
    pids: set[int] = set()
    try:
        wait_for(lambda: len(worker_pids(srv)) == 2)
        pids = worker_pids(srv)
        environ = Path(f"/proc/{min(pids)}/environ").read_bytes()
        metrics = Path(environ.split(b"PROMETHEUS_MULTIPROC_DIR=")[1].split(b"\0")[0].decode())
        srv.kill()  # the parent only, as the OOM killer or kill -9 would
        wait_for(lambda: not any(running(pid) for pid in pids))
        assert metrics.is_dir()  # nothing could remove it
        with Server(sources_dir, tmp_path / "again", port=srv.port, workers=2) as again:  # the port is free
            assert httpx.get(f"{again.url}/v1/ready").status_code == 200
            assert not metrics.exists()  # the next start removed the dead server's
    finally:
        for pid in pids:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
