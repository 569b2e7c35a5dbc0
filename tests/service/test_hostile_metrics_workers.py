"""Hostile review of multi-worker metrics (commit 7038fea): the environment an operator leaves, and a crash.

``mixer serve`` owns prometheus-client's multiprocess switch: it drops ``PROMETHEUS_MULTIPROC_DIR`` and sets
its own fresh directory (several workers) or none (one worker). prometheus-client reads the switch, in either
case (the lower-case name is deprecated but honoured, ``prometheus_client/values.py``), when it is imported."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest
from service_helpers import Server, new_job

STEPS = 3


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _served(url: str, job: str) -> float:
    found = re.search(rf'^mixer_batches_served_total\{{job="{job}"\}} (\S+)$', httpx.get(f"{url}/metrics").text,
                      re.M)
    assert found, "no mixer_batches_served_total for the job"
    return float(found.group(1))


@pytest.mark.parametrize("name", ["PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"])
def test_one_worker_ignores_an_operators_multiprocess_dir(sources_dir, tmp_path, name) -> None:
    """Found: with ``PROMETHEUS_MULTIPROC_DIR`` in the environment, ``--workers 1`` did not start at all
    ("Error loading ASGI app factory: expected str, bytes or os.PathLike object, not NoneType"):
    ``_metrics_directory`` imported ``metrics.py`` (hence prometheus-client, which picks its multiprocess value
    class from the environment at import) before it dropped the variable, so the metrics were built in
    multiprocess mode with no directory. With the lower-case name (never dropped) a missing directory
    stopped it (FileNotFoundError: .../gauge_mostrecent_PID.db) and an existing one received its values."""
    missing = tmp_path / "no-such-dir"
    with Server(sources_dir, tmp_path / "state", workers=1, env={name: str(missing)}) as srv:
        job = new_job(srv.url)
        for step in range(STEPS):
            assert httpx.get(f"{srv.url}/v1/jobs/{job}/batches/{step}").status_code == 200
        assert _served(srv.url, job) == STEPS
    stale = tmp_path / "stale"
    stale.mkdir()
    with Server(sources_dir, tmp_path / "state2", workers=1, env={name: str(stale)}) as srv:
        assert httpx.get(f"{srv.url}/metrics").status_code == 200
    assert not list(stale.iterdir()), "one worker wrote its metric values into the operator's directory"


def test_two_workers_ignore_an_operators_stale_multiprocess_dir(sources_dir, tmp_path) -> None:
    """Held: an operator's directory (upper and lower case) is replaced by a fresh one; nothing is read from
    or written to it, and a scrape counts only this server's batches."""
    stale = tmp_path / "stale"
    stale.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(stale), "prometheus_multiproc_dir": str(stale)}
    with Server(sources_dir, tmp_path / "state", workers=2, env=env) as srv:
        job = new_job(srv.url)
        for step in range(STEPS):
            assert httpx.get(f"{srv.url}/v1/jobs/{job}/batches/{step}").status_code == 200
        assert _served(srv.url, job) == STEPS
    assert not list(stale.iterdir())


def test_a_killed_servers_metrics_directory_is_not_left_for_good(sources_dir, tmp_path) -> None:
    """Found: a fresh ``mixer-metrics-*`` directory per start under ``$TMPDIR`` is removed at a clean stop only;
    one a SIGKILLed server left (an OOM kill, a node drain with no grace) is never removed, by this start or
    any later one, so every crash leaks one directory of the workers' mmap files."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {"TMPDIR": str(tmpdir)}
    srv = Server(sources_dir, tmp_path / "state", workers=2, env=env).start()
    try:
        assert srv.proc is not None
        workers = _children(srv.proc.pid)
        assert [p.name for p in tmpdir.iterdir() if p.name.startswith("mixer-metrics-")]
    finally:
        srv.kill()
        for pid in workers:  # orphaned by the kill: end them as the node's reboot would
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for _ in range(100):
        if not any(Path(f"/proc/{pid}").exists() for pid in workers):
            break
        time.sleep(0.1)
    with Server(sources_dir, tmp_path / "state", workers=2, env=env, port=srv.port):
        pass  # the next start of the same server, stopped cleanly
    left = [p.name for p in tmpdir.iterdir() if p.name.startswith("mixer-metrics-")]
    assert not left, f"left in $TMPDIR after a crash and a clean restart: {left}"
