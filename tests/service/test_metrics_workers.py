"""With several ``--workers`` (the default: one per core) ``/metrics`` and ``/v1/stats`` answer for the whole
server, whichever worker a scrape reaches. Each worker used to report only its own counters, so two scrapes
of one target could disagree and a rate over them was meaningless; a killed worker's replacement must not be
counted twice, nor its counts lost."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest
from service_helpers import Server, new_job, worker_pids

from mixer_service.service.serve_command import METRIC_FILE_BYTES, METRIC_FILES

STEPS = 24
MEMORY = 64 << 20


def samples(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric in an exposition."""
    return {m[1]: float(m[2]) for m in re.finditer(rf"^{name}\{{(.*?)\}} (\S+)$", text, re.M)}


def scrape(url: str) -> str:
    return httpx.get(f"{url}/metrics").text  # a fresh connection: either worker answers


def until(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture
def server(sources_dir, tmp_path):
    args = ["--memory-cache", str(MEMORY)]
    with Server(sources_dir, tmp_path / "state", workers=2, extra_args=args) as srv:
        until(lambda: _workers(srv), 30)
        yield srv


def test_every_scrape_counts_what_every_worker_served(server) -> None:
    job = new_job(server.url)
    with httpx.Client(base_url=server.url) as one, httpx.Client(base_url=server.url) as other:
        for step in range(STEPS):  # two connections, and a fresh one a step: both workers serve
            for client in (one, other, httpx):
                assert client.get(f"{server.url}/v1/jobs/{job}/batches/{step}",
                                  params={"rank": 0, "world": 1}).status_code == 200
    served = 3 * STEPS  # a step asked again is served again (and counted)
    tokens = served * 8 * 64  # JOB's global_batch x seq_len

    def consistent() -> None:
        for _ in range(12):
            text = scrape(server.url)
            assert samples(text, "mixer_batches_served_total") == {f'job="{job}"': served}
            assert sum(samples(text, "mixer_tokens_served_total").values()) == tokens
            assert samples(text, "mixer_served_high_water") == {f'job="{job}"': STEPS - 1}
            cache = samples(text, "mixer_shard_cache")
            assert cache['stat="memory_limit_bytes"'] == 2 * MEMORY  # summed over the live workers
            assert 'stat="used_bytes"' in cache  # the shared directory: once, not once a worker
            stats = httpx.get(f"{server.url}/v1/stats").json()
            assert stats["jobs"][job]["batches"] == served
            assert sum(stats["jobs"][job]["tokens"].values()) == tokens

    until(consistent)
    old = worker_pids(server)
    killed = min(old)
    metrics_dir = Path((Path("/proc") / str(killed) / "environ").read_bytes().split(
        b"PROMETHEUS_MULTIPROC_DIR=")[1].split(b"\0")[0].decode())
    assert metrics_dir.is_dir()
    for pid in old:  # every file prometheus-client maps was allocated before (a full $TMPDIR: no SIGBUS)
        files = {p.name: p.stat() for p in metrics_dir.glob(f"*_{pid}.db")}
        assert set(files) == {f"{kind}_{pid}.db" for kind in METRIC_FILES}
        assert all(st.st_blocks * 512 >= METRIC_FILE_BYTES for st in files.values())
    os.kill(killed, signal.SIGKILL)
    until(lambda: _workers(server, without=killed), 30)
    until(consistent)  # what the killed worker served still counts; its memory no longer does
    server.stop()
    assert not metrics_dir.exists()


def _workers(server: Server, without: int | None = None) -> None:
    pids = worker_pids(server)
    assert len(pids) == 2 and without not in pids, pids
