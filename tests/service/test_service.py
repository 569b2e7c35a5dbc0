"""The HTTP service against real uvicorn processes on loopback (embedded store unless stated)."""

from __future__ import annotations

import concurrent.futures
import itertools
import re

import httpx
import numpy as np
import pytest
from service_helpers import (
    JOB,
    OPERATOR,
    READER,
    SCHEDULE,
    TOKENS,
    Server,
    etag_of,
    fetch,
    local_engine,
    new_job,
)

from mixer_contract import wire
from mixer_service.service.process import free_port
from mixer_service.sources.prepared import PreparedSource


def test_batches_over_http_equal_the_in_process_engine(server, sources_dir):
    job = new_job(server.url)
    engine = local_engine(sources_dir)
    for step in (0, 1, 57):
        got = fetch(server.url, job, step, compression="zstd")
        want = engine.batch(step)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_array_equal(got.source_ids, want.source_ids)
        assert got.header["sources"] == ["abc", "sotu"] and got.header["step"] == step
        assert got.tokens.dtype == np.uint16  # byte-level vocabulary fits


def test_zstd_and_plain_payloads_carry_the_same_tokens(server):
    job = new_job(server.url)
    plain, packed = fetch(server.url, job, 3), fetch(server.url, job, 3, compression="zstd")
    np.testing.assert_array_equal(plain.tokens, packed.tokens)
    assert packed.header["payload_bytes"] < plain.header["payload_bytes"]


def test_rank_slices_over_http_tile_the_global_batch(server):
    job = new_job(server.url)
    whole = fetch(server.url, job, 5).tokens
    parts = [fetch(server.url, job, 5, rank=r, world=4).tokens for r in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_corrupted_payload_fails_its_checksum(server):
    job = new_job(server.url)
    raw = bytearray(httpx.get(f"{server.url}/v1/jobs/{job}/batches/0").content)
    raw[-1] ^= 0xFF
    with pytest.raises(wire.WireError, match="checksum"):
        wire.decode(bytes(raw))


def test_provenance_spans_rebuild_the_served_tokens(server, sources_dir):
    job = new_job(server.url)
    batch = fetch(server.url, job, 9)
    prov = httpx.get(f"{server.url}/v1/jobs/{job}/provenance/9").json()
    srcs = {n: PreparedSource.open(sources_dir / n) for n in ("abc", "sotu")}
    for row, seq in enumerate(prov["sequences"]):
        src = srcs[seq["source"]]
        rebuilt = np.concatenate(
            [src.tokens[src.doc_offsets[s["doc"]] + s["offset"] :][: s["length"]] for s in seq["spans"]]
        )
        np.testing.assert_array_equal(rebuilt, batch.tokens[row])


def history(url, job):
    return httpx.get(f"{url}/v1/jobs/{job}/schedule/history").json()["versions"]


def test_schedule_change_takes_effect_after_the_highest_served_step(server):
    job = new_job(server.url)
    for step in range(12):
        fetch(server.url, job, step)
    current = httpx.get(f"{server.url}/v1/jobs/{job}/schedule")
    assert re.fullmatch(r'"v1\.[0-9a-f]{32}"', current.headers["etag"])
    change = {
        "schedule": {"phases": [{"start_step": 0, "weights": {"abc": 1}}]},
        "requested_step": 3,
        "author": "ops",
        "reason": "domain-only anneal",
    }
    r = httpx.put(f"{server.url}/v1/jobs/{job}/schedule", json=change,
                  headers={"If-Match": current.headers["etag"]})
    assert r.status_code == 200, r.text
    assert r.json()["effective_step"] == 12
    assert r.headers["etag"] == current.headers["etag"].replace("v1", "v2")
    assert set(fetch(server.url, job, 12).source_ids.tolist()) == {0}
    assert set(fetch(server.url, job, 11).source_ids.tolist()) != {0}
    versions = history(server.url, job)
    assert [v["version"] for v in versions] == [1, 2]
    assert versions[1]["author"] == "ops" and versions[1]["reason"] == "domain-only anneal"
    assert versions[1]["time"] >= versions[0]["time"]


@pytest.mark.parametrize(
    "headers, body, status, detail",
    [
        ({"If-Match": '"v7.' + "0" * 32 + '"'}, None, 412, "version"),
        ({"If-Match": '"v²"'.encode()}, None, 412, "If-Match"),
        ({}, None, 428, "If-Match"),
        (
            {"If-Match": '"v1"'},
            {"phases": [{"start_step": 0, "weights": {"abc": 0.5, "sotu": 0.6}}]},
            422,
            "must sum to 1",
        ),
        (
            {"If-Match": '"v1"'},
            {"phases": [{"start_step": 0, "weights": {"chem": 1}}]},
            422,
            "unknown source",
        ),
        ({"If-Match": '"v1"'}, {"phases": [{"start_step": 0, "weights": {"sotu": 1}}]}, 422, "runs out"),
    ],
)
def test_bad_schedule_changes_are_refused_and_change_nothing(server, headers, body, status, detail):
    half = {"phases": [{"start_step": 0, "weights": {"abc": 0.5, "sotu": 0.5}}]}
    job = new_job(server.url, global_batch=32, schedule=half)  # web lasts at 50%, runs out at 100%
    change = {
        "schedule": body or {"phases": [{"start_step": 0, "weights": {"abc": 1}}]},
        "author": "ops",
        "reason": "r",
    }
    if headers.get("If-Match") == '"v1"':  # the current ETag, so only the body is wrong
        headers = {"If-Match": etag_of(server.url, job)}
    r = httpx.put(f"{server.url}/v1/jobs/{job}/schedule", json=change, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert detail in r.json()["detail"]
    assert len(history(server.url, job)) == 1


def test_repetition_counts_follow_trained_progress_and_rewind(server, sources_dir):
    job = new_job(server.url, global_batch=64, allow_wrap=True)
    engine = local_engine(sources_dir, global_batch=64, allow_wrap=True)
    base = f"{server.url}/v1/jobs/{job}"
    assert httpx.get(f"{base}/repetitions").json()["max"] == 0  # nothing trained yet
    assert httpx.put(f"{base}/progress", json={"trained_step": 1500}).status_code == 200
    counts = engine.repetition_counts("abc", 1500)
    summary = httpx.get(f"{base}/repetitions").json()
    assert (summary["min"], summary["max"], summary["step"]) == (counts.min(), counts.max(), 1500)
    hist = httpx.get(f"{base}/repetitions/histogram", params={"step": 1500}).json()["histogram"]
    assert hist == {str(k): int(n) for k, n in enumerate(np.bincount(counts)) if n}
    doc = int(np.argmax(counts))
    assert httpx.get(f"{base}/repetitions/documents/{doc}").json()["count"] == counts[doc]
    at_least = httpx.get(f"{base}/repetitions/at-least/{counts.max()}", params={"limit": 5}).json()
    assert at_least["total"] == int((counts >= counts.max()).sum())
    httpx.put(f"{base}/progress", json={"trained_step": 10})  # resumed from an older checkpoint
    assert httpx.get(f"{base}/repetitions").json()["step"] == 10


@pytest.mark.parametrize(
    "method, path, body, status",
    [
        ("GET", "/v1/jobs/nope", None, 404),
        ("GET", "/v1/jobs/{job}/batches/999999", None, 422),
        ("GET", "/v1/jobs/{job}/batches/-1", None, 422),
        ("GET", "/v1/jobs/{job}/batches/0?world=3", None, 422),
        ("GET", "/v1/jobs/{job}/batches/abc", None, 422),
        ("GET", "/v1/jobs/{job}/repetitions?source=nope", None, 404),
        ("GET", "/v1/jobs/{job}/repetitions/documents/99999999", None, 404),
        ("POST", "/v1/jobs", {"job_id": "x", "config": JOB | {"seq_len": 0}, "schedule": SCHEDULE}, 422),
        ("POST", "/v1/jobs", {"job_id": "bad id!", "config": JOB, "schedule": SCHEDULE}, 422),
        (
            "POST",
            "/v1/jobs",
            {
                "job_id": "fp",
                "config": JOB
                | {
                    "sources": [
                        {"name": "abc", "role": "repeat", "fingerprint": "0" * 64},
                        {"name": "sotu", "role": "once"},
                    ]
                },
                "schedule": SCHEDULE,
            },
            409,
        ),
        ("POST", "/v1/jobs", "x" * (2 << 20), 413),
    ],
)
def test_bad_requests_get_problem_json_and_change_nothing(server, method, path, body, status):
    job = new_job(server.url)
    before = httpx.get(f"{server.url}/v1/jobs").json()
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    r = httpx.request(method, server.url + path.format(job=job), **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["status"] == status and r.json()["detail"]
    after = httpx.get(f"{server.url}/v1/jobs").json()
    assert [j["job_id"] for j in after["jobs"]] == [j["job_id"] for j in before["jobs"]]
    assert all(
        a["served_high_water"] == b["served_high_water"]
        for a, b in zip(after["jobs"], before["jobs"], strict=True)
    )


def test_creating_an_existing_job_conflicts(server):
    job = new_job(server.url)
    r = httpx.post(f"{server.url}/v1/jobs", json={"job_id": job, "config": JOB, "schedule": SCHEDULE})
    assert r.status_code == 409


def test_metrics_expose_the_documented_series(server):
    job = new_job(server.url)
    fetch(server.url, job, 0)
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "mixer_requests_total",
        "mixer_request_duration_seconds_bucket",
        "mixer_tokens_served_total",
        "mixer_batches_served_total",
        "mixer_repetition_count",
        "mixer_schedule_version",
        "mixer_store_up 1.0",
        "mixer_trained_step",
        "mixer_served_high_water",
    ):
        assert name in text
    assert f'mixer_tokens_served_total{{job="{job}",source="sotu"}}' in text


def test_openapi_documents_the_versioned_api(server):
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    for p in (
        "/v1/jobs",
        "/v1/jobs/{job_id}/batches/{step}",
        "/v1/jobs/{job_id}/schedule",
        "/v1/jobs/{job_id}/schedule/history",
        "/v1/jobs/{job_id}/repetitions/histogram",
    ):
        assert p in paths


def test_roles_and_tokens(sources_dir, tmp_path):
    srv = Server(sources_dir, tmp_path, free_port(), env=TOKENS).start()
    try:
        assert httpx.get(f"{srv.url}/v1/jobs").status_code == 401
        assert httpx.get(f"{srv.url}/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        body = {"job_id": "j", "config": JOB, "schedule": SCHEDULE}
        assert httpx.post(f"{srv.url}/v1/jobs", json=body, headers=READER).status_code == 403
        assert httpx.post(f"{srv.url}/v1/jobs", json=body, headers=OPERATOR).status_code == 201
        assert httpx.get(f"{srv.url}/v1/jobs/j/batches/0", headers=READER).status_code == 200
        assert (
            httpx.put(f"{srv.url}/v1/jobs/j/progress", json={"trained_step": 0}, headers=READER).status_code
            == 200
        )
        change = {"schedule": SCHEDULE, "author": "a", "reason": "r"}
        r = httpx.put(f"{srv.url}/v1/jobs/j/schedule", json=change, headers=READER | {"If-Match": '"v1"'})
        assert r.status_code == 403
        assert httpx.get(f"{srv.url}/v1/health").status_code == 200
    finally:
        srv.stop()


def test_non_loopback_bind_without_tokens_is_refused(sources_dir, tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mixer_service.cli",
            "serve",
            "--sources-dir",
            str(sources_dir),
            "--host",
            "0.0.0.0",
            "--state-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in __import__("os").environ.items() if not k.startswith("MIXER_")},
    )
    assert r.returncode == 2 and "non-loopback" in r.stderr


def test_sigkill_and_restart_serves_the_same_bytes(sources_dir, tmp_path):
    port = free_port()
    srv = Server(sources_dir, tmp_path, port).start()
    job = new_job(srv.url)
    before = [httpx.get(f"{srv.url}/v1/jobs/{job}/batches/{s}").content for s in range(6)]
    change = {
        "schedule": {"phases": [{"start_step": 0, "weights": {"abc": 0.5, "sotu": 0.5}}]},
        "author": "a",
        "reason": "r",
    }
    assert (
        httpx.put(f"{srv.url}/v1/jobs/{job}/schedule", json=change,
                  headers={"If-Match": etag_of(srv.url, job)}).status_code
        == 200
    )
    srv.kill()
    srv = Server(sources_dir, tmp_path, port).start()
    try:
        after = [httpx.get(f"{srv.url}/v1/jobs/{job}/batches/{s}").content for s in range(6)]
        assert after == before
        assert httpx.get(f"{srv.url}/v1/jobs/{job}").json()["schedule_version"] == 2
    finally:
        srv.stop()


@pytest.fixture
def replicas(sources_dir, tmp_path, clean_redis_url):
    servers = [
        Server(sources_dir, tmp_path / f"r{i}", free_port(), redis_url=clean_redis_url).start()
        for i in range(2)
    ]
    yield servers
    for s in servers:
        s.stop()


def test_two_replicas_on_redis_serve_identical_bytes_and_honour_changes(replicas):
    a, b = replicas
    job = new_job(a.url)
    urls = itertools.cycle([a.url, b.url])
    for step in range(8):
        x = httpx.get(f"{next(urls)}/v1/jobs/{job}/batches/{step}").content
        y = httpx.get(f"{next(urls)}/v1/jobs/{job}/batches/{step}").content
        assert x == y
    change = {
        "schedule": {"phases": [{"start_step": 0, "weights": {"abc": 1}}]},
        "author": "a",
        "reason": "r",
    }
    r = httpx.put(f"{a.url}/v1/jobs/{job}/schedule", json=change, headers={"If-Match": etag_of(b.url, job)})
    assert r.status_code == 200 and r.json()["effective_step"] == 8
    from_b = wire.decode(httpx.get(f"{b.url}/v1/jobs/{job}/batches/8").content)
    assert set(from_b.source_ids.tolist()) == {0} and from_b.header["schedule_version"] == 2
    assert (
        httpx.get(f"{b.url}/v1/jobs/{job}/batches/7").content
        == httpx.get(f"{a.url}/v1/jobs/{job}/batches/7").content
    )


def test_concurrent_changes_with_the_same_if_match_have_one_winner(replicas):
    a, b = replicas
    job = new_job(a.url)
    change = {
        "schedule": {"phases": [{"start_step": 0, "weights": {"abc": 0.1, "sotu": 0.9}}]},
        "author": "a",
        "reason": "r",
    }

    expected = etag_of(a.url, job)

    def put(url):
        headers = {"If-Match": expected}
        return httpx.put(f"{url}/v1/jobs/{job}/schedule", json=change, headers=headers).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(put, [a.url, b.url] * 4))
    assert sorted(codes) == [200] + [412] * 7
    assert len(history(a.url, job)) == 2


def test_redis_down_gives_503_with_retry_after(sources_dir, tmp_path, redis_server):
    srv = Server(sources_dir, tmp_path, free_port(), redis_url=redis_server.url).start()
    try:
        job = new_job(srv.url)
        redis_server.stop()
        r = httpx.get(f"{srv.url}/v1/jobs/{job}/batches/0", timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"]
        assert httpx.get(f"{srv.url}/v1/ready", timeout=30).status_code == 503
    finally:
        srv.stop()
