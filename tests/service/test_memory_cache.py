"""``mixer serve --memory-cache BYTES`` / ``MIXER_MEMORY_CACHE``: the bound of each process's resident copies
of proven shards (``ShardCache(memory_bytes=...)``), and what ``/metrics`` shows of them."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from service_helpers import JOB, SCHEDULE, Server, new_job

from mixer_contract.errors import InvalidInput
from mixer_service.cli import build_parser
from mixer_service.service.app import Settings, create_app
from mixer_service.service.auth import Tokens
from mixer_service.service.serve_command import settings_of
from mixer_service.service.settings import ServeSettings, usable_cores, usable_memory
from mixer_service.service.source_registry import SourceRegistry
from mixer_service.sources.cache import DEFAULT_MEMORY_BYTES
from mixer_service.store import open_store


def parsed(tmp_path: Path, *flags: str) -> ServeSettings:
    return settings_of(build_parser().parse_args(["serve", "--sources-dir", str(tmp_path), *flags]))


def test_the_flag_takes_sizes_like_cache_limit_and_the_environment_fills_it_in(tmp_path, monkeypatch):
    monkeypatch.delenv("MIXER_MEMORY_CACHE", raising=False)
    default = parsed(tmp_path)
    assert default.memory_cache is None and DEFAULT_MEMORY_BYTES == 1 << 30
    assert default.memory_cache_bytes == min(1 << 30, usable_memory() // 4 // default.worker_count)
    assert parsed(tmp_path, "--memory-cache", "4G").memory_cache == 4 << 30
    assert parsed(tmp_path, "--memory-cache", "0").memory_cache == 0
    monkeypatch.setenv("MIXER_MEMORY_CACHE", "512M")
    assert parsed(tmp_path).memory_cache == 512 << 20
    assert parsed(tmp_path, "--memory-cache", "1.5G").memory_cache == 3 << 29  # the flag wins
    settings = parsed(tmp_path)
    assert ServeSettings.from_json(settings.to_json()) == settings  # what the workers get
    monkeypatch.setenv("MIXER_MEMORY_CACHE", "lots")
    with pytest.raises(InvalidInput, match="MIXER_MEMORY_CACHE: not a byte count: 'lots'"):
        parsed(tmp_path)
    monkeypatch.delenv("MIXER_MEMORY_CACHE")
    with pytest.raises(SystemExit):
        parsed(tmp_path, "--memory-cache", "-1G")
    for bad in ("inf", "1e400", "infG", "nan", "0.5"):  # found: inf was an OverflowError traceback
        with pytest.raises(SystemExit):
            parsed(tmp_path, "--memory-cache", bad)
        with pytest.raises(SystemExit):
            parsed(tmp_path, "--cache-limit", bad)
    monkeypatch.setenv("MIXER_MEMORY_CACHE", "inf")
    with pytest.raises(InvalidInput, match="MIXER_MEMORY_CACHE: not a byte count: 'inf'"):
        parsed(tmp_path)
    monkeypatch.delenv("MIXER_MEMORY_CACHE")
    with pytest.raises(InvalidInput, match="--memory-cache: must be >= 0"):
        ServeSettings(sources_dir=tmp_path, memory_cache=-1)


def test_the_default_shares_a_quarter_of_memory_among_the_workers(tmp_path) -> None:
    """Found: the default was 1 GiB a worker whatever the worker count (one per core), so a 64-core node
    could hold 64 GiB of shard copies; now the default stays within a quarter of usable memory."""
    many = ServeSettings(sources_dir=tmp_path, workers=4096)
    assert many.memory_cache_bytes * 4096 <= usable_memory() // 4
    given = ServeSettings(sources_dir=tmp_path, workers=4096, memory_cache=1 << 30)
    assert given.memory_cache_bytes == 1 << 30  # a value given is used as given
    assert 0 < usable_memory() <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_a_container_s_limits_bound_the_default_workers_and_memory(tmp_path) -> None:
    """Found: a pod limited to 2 CPUs on a many-core node started one worker per node core (the affinity
    mask is not the CPU limit), each with its own memory cache. A cgroup's ``cpu.max`` and ``memory.max``
    (files like the kernel's, in a directory standing for /sys/fs/cgroup) now cap both."""
    cores, machine = len(os.sched_getaffinity(0)), os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cgroup = tmp_path / "cgroup"
    assert usable_cores(cgroup) == cores and usable_memory(cgroup) == machine  # no cgroup v2 files
    cgroup.mkdir()
    for text, expected in [("max 100000\n", cores), ("50000 100000\n", 1), ("100000 100000\n", 1),
                           (f"{200000 * cores} 100000\n", cores), ("150000 100000\n", min(cores, 2))]:
        (cgroup / "cpu.max").write_text(text)
        assert usable_cores(cgroup) == expected, text
    for text, expected in [("max\n", machine), (f"{4 << 30}\n", min(machine, 4 << 30))]:
        (cgroup / "memory.max").write_text(text)
        assert usable_memory(cgroup) == expected, text
    assert 1 <= ServeSettings(sources_dir=tmp_path).worker_count <= cores


def cache_stats(metrics: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r'mixer_shard_cache\{stat="(\w+)"\} (\S+)', metrics)}


@pytest.mark.parametrize("memory", [0, 64 << 20])
def test_metrics_show_resident_hits_and_bytes(sources_dir: Path, tmp_path: Path, memory: int):
    registry = SourceRegistry.load(sources_dir, tmp_path / "cache", memory_bytes=memory)
    app = create_app(Settings(store=open_store(None, tmp_path / "state.sqlite"), sources=registry,
                              tokens=Tokens(None, None)))
    body = {"job_id": "j", "config": JOB, "schedule": SCHEDULE, "author": "t", "reason": "t"}
    with TestClient(app) as client:
        assert client.post("/v1/jobs", json=body).status_code == 201
        for step in range(20):
            assert client.get(f"/v1/jobs/j/batches/{step}").status_code == 200
        stats = cache_stats(client.get("/metrics").text)
    assert stats["memory_limit_bytes"] == memory
    if memory:
        assert stats["resident_hits"] > 0 and 0 < stats["resident_bytes"] <= memory
    else:
        assert stats["resident_hits"] == 0 and stats["resident_bytes"] == 0 and stats["hits"] > 0


def test_a_server_takes_its_memory_bound_from_the_environment(sources_dir: Path, tmp_path: Path):
    with Server(sources_dir, tmp_path / "state", env={"MIXER_MEMORY_CACHE": "64M"},
                extra_args=["--cache-dir", str(tmp_path / "cache")]) as srv:
        job = new_job(srv.url)
        for step in range(10):
            assert httpx.get(f"{srv.url}/v1/jobs/{job}/batches/{step}").status_code == 200
        stats = cache_stats(httpx.get(f"{srv.url}/metrics").text)
    assert stats["memory_limit_bytes"] == 64 << 20
    assert stats["resident_hits"] > 0 and 0 < stats["resident_bytes"] <= 64 << 20
