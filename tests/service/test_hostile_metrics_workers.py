"""Hostile review of multi-worker metrics (commit 7038fea): the environment an operator leaves, and a crash.

``mixer serve`` owns prometheus-client's multiprocess switch: it drops ``PROMETHEUS_MULTIPROC_DIR`` and sets
its own fresh directory (several workers) or none (one worker). prometheus-client reads the switch, in either
case (the lower-case name is deprecated but honoured, ``prometheus_client/values.py``), when it is
imported."""

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
    text = httpx.get(f"{url}/metrics").text
    found = re.search(rf'^mixer_batches_served_total\{{job="{job}"\}} (\S+)$', text, re.M)
    assert found, "no mixer_batches_served_total for the job"
    return float(found.group(1))


@pytest.mark.parametrize("name", ["PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"])
def test_one_worker_ignores_an_operators_multiprocess_dir(sources_dir, tmp_path, name) -> None:
    """Found: with ``PROMETHEUS_MULTIPROC_DIR`` in the environment, ``--workers 1`` did not start at all
    ("Error loading ASGI app factory: expected str, bytes or os.PathLike object, not NoneType"):
    ``_metrics_directory`` imported ``metrics.py`` (hence prometheus-client, which picks its multiprocess
    value class from the environment at import) before it dropped the variable, so the metrics were built in
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
    """Found: a fresh ``mixer-metrics-*`` directory per start under ``$TMPDIR`` is removed at a clean stop
    only;
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


@pytest.fixture
def full_tmpdir(tmp_path):
    """A 128 KiB tmpfs with 32 KiB left: ``$TMPDIR`` on a full disk (root only; skipped elsewhere)."""
    import subprocess

    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (not root)")
    try:
        (mount / "filler").write_bytes(b"x" * (96 << 10))
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_tmpdir_does_not_put_the_workers_in_a_crash_loop(sources_dir, tmp_path, full_tmpdir) -> None:
    """Found: with ``$TMPDIR`` full, ``mkdtemp`` still succeeds, but prometheus-client's value files there are
    sparse and ``mmap``ed: the first write to a page the file system cannot back kills the worker with
    SIGBUS. Every worker died at its first requests ("Child process [N] died", nothing else in the log) and
    uvicorn restarted it, forever: the server never became ready. Before 7038fea metrics were in memory and a
    full /tmp cost nothing. A server must serve, or stop with a message that says why."""
    srv = Server(sources_dir, tmp_path / "state", workers=2, env={"TMPDIR": str(full_tmpdir)})
    try:
        srv.start(timeout=30)
    except RuntimeError as exc:
        assert srv.proc is not None and srv.proc.poll() is not None, f"neither serving nor stopped: {exc}"
        assert "space" in str(exc).lower() or "TMPDIR" in str(exc), exc
        return
    try:
        job = new_job(srv.url)
        for step in range(STEPS):
            for _ in range(3):  # fresh connections: either worker
                assert httpx.get(f"{srv.url}/v1/jobs/{job}/batches/{step}").status_code == 200
        assert httpx.get(f"{srv.url}/metrics").status_code == 200
        assert "died" not in srv.tail(100_000)
        assert "no room for them in the shared metrics directory" in srv.tail(100_000)  # and it says so
    finally:
        srv.stop()
