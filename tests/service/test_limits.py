"""Bounded work and refusals that say why (issue 17, items 8 and 9), through real servers.

Each test starts from what was observed (an accepted schedule that 500s later, a text/plain 500, scrapers
that stall batches, bare text/plain 503s past uvicorn's cap, a hung object store) and asserts what
replaced it: every accepted request can be served, and every refusal is problem+json with ``fault`` and
``Retry-After``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import random
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from service_helpers import JOB, SCHEDULE, Server, etag_of, new_job, problem

from mixer_contract.errors import SourceUnavailable
from mixer_contract.schedule import MAX_PHASES
from mixer_contract.values import WEIGHT_DIGITS
from mixer_service.service.app import Settings, create_app
from mixer_service.service.auth import Tokens
from mixer_service.service.source_registry import SourceRegistry
from mixer_service.sources.origins import S3Origin, s3_client
from mixer_service.store import open_store


def put_schedule(url: str, job: str, schedule: dict) -> httpx.Response:
    body = {"schedule": schedule, "requested_step": 0, "author": "ops", "reason": "test"}
    return httpx.put(f"{url}/v1/jobs/{job}/schedule", json=body, headers={"If-Match": etag_of(url, job)})


# --- item 8: every accepted schedule can be served ---------------------------------------------------


def widest_schedule(phases: int, digits: int, total_steps: int, seed: int = 17) -> dict:
    """``phases`` ramped phases whose weights are ``p/q`` with distinct ``digits``-digit denominators:
    the common denominator of the job grows with every phase, as in the report that 500ed."""
    rng = random.Random(seed)
    span = total_steps // phases
    out = []
    for i in range(phases):
        q = rng.randrange(10 ** (digits - 1), 10**digits)
        p = rng.randrange(1, q)
        out.append({"start_step": i * span, "weights": {"abc": f"{p}/{q}", "sotu": f"{q - p}/{q}"},
                    "ramp": i < phases - 1})
    return {"phases": out}


def test_the_widest_accepted_schedule_is_served(server):
    """Found: 8 phases of 30-digit fractions were accepted (201), then batches, provenance and
    repetitions answered text/plain 500 (OverflowError in mixture._first_reaching)."""
    for phases in (8, MAX_PHASES):
        schedule = widest_schedule(phases, WEIGHT_DIGITS, JOB["total_steps"])
        job = new_job(server.url, schedule=schedule)
        for step in (0, 5, JOB["total_steps"] // 2 + 3, JOB["total_steps"] - 1):
            r = httpx.get(f"{server.url}/v1/jobs/{job}/batches/{step}")
            assert r.status_code == 200, r.text
            assert httpx.get(f"{server.url}/v1/jobs/{job}/provenance/{step}").status_code == 200
            r = httpx.get(f"{server.url}/v1/jobs/{job}/repetitions", params={"step": step})
            assert r.status_code == 200, r.text


@pytest.mark.parametrize("weights", [
    {"abc": 1e-40, "sotu": 1},  # a JSON number's exact value has a 41-digit denominator
    {"abc": "1/" + "1" * (WEIGHT_DIGITS + 1), "sotu": 1},
    # each in bounds, but they do not sum to exactly 1: normalised, they need 60 digits
    {"abc": "333333333333333333333333333333/999999999999999999999999999989", "sotu": "2/3"},
])
def test_weights_past_the_digit_bound_are_refused_naming_the_field(server, weights):
    job = new_job(server.url)
    detail = problem(put_schedule(server.url, job, {"phases": [{"start_step": 0, "weights": weights}]}),
                     422)["detail"]
    assert "weights" in detail and "abc" in detail and str(WEIGHT_DIGITS) in detail
    assert httpx.get(f"{server.url}/v1/jobs/{job}").json()["schedule_version"] == 1


def test_an_unexpected_error_is_a_logged_problem_500_without_fault(sources_dir, tmp_path, caplog):
    """Found: an exception no handler knew (OverflowError) reached the client as text/plain 500."""
    app = create_app(Settings(store=open_store(None, tmp_path / "state.sqlite"),
                              sources=SourceRegistry.load(sources_dir, tmp_path / "cache"),
                              tokens=Tokens(None, None)))

    def boom() -> None:
        raise OverflowError("int too large to convert to float")

    app.add_api_route("/v1/boom", boom)
    with caplog.at_level(logging.ERROR), TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/v1/boom")
    assert r.status_code == 500 and r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == 500 and body["instance"] == "/v1/boom" and "fault" not in body
    assert "OverflowError" not in body["detail"], "internals stay in the log"
    assert any("OverflowError" in (rec.exc_text or "") or rec.exc_info for rec in caplog.records)


# --- item 9: bounded work, and every refusal says why -------------------------------------------------


def refused_as_overload(response: httpx.Response) -> bool:
    """A 503 that says why and when to retry (never uvicorn's bare text/plain 503)."""
    return (response.status_code == 503 and response.headers["content-type"] == "application/problem+json"
            and response.json().get("fault") == "overloaded" and "retry-after" in response.headers)


@pytest.fixture(scope="module")
def thousand_jobs(sources_dir, start_server):
    srv = start_server(sources_dir, extra_args=["--max-in-flight", "32"])
    with httpx.Client(base_url=srv.url) as client:
        for i in range(1000):
            r = client.post("/v1/jobs", json={"job_id": f"j{i}", "config": JOB, "schedule": SCHEDULE})
            assert r.status_code == 201, r.text
    return srv


def test_a_scrape_storm_does_not_starve_batches(thousand_jobs):
    """Found: with 1000 jobs, 64 anonymous /metrics scrapers (exempt from --max-in-flight, each render
    O(jobs) in a pool thread) stalled a batch 22.8 s and /v1/ready 38.7 s."""
    url = thousand_jobs.url
    answers: list[httpx.Response] = []

    def scrape(_: int) -> None:
        with httpx.Client(timeout=60) as client:
            answers.extend(client.get(f"{url}/metrics") for _ in range(10))

    served, batch_answers = 0, []
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        storm = [pool.submit(scrape, i) for i in range(64)]
        with httpx.Client(timeout=10) as client:
            for step in range(20):
                for _ in range(50):  # a trainer retries 503s
                    r = client.get(f"{url}/v1/jobs/j{step}/batches/{step}")
                    batch_answers.append(r)
                    if r.status_code == 200:
                        served += 1
                        break
                    time.sleep(0.05)
            assert client.get(f"{url}/v1/ready").status_code in (200, 503)
        for future in storm:
            future.result()
    assert served == 20
    assert all(r.status_code == 200 or refused_as_overload(r) for r in batch_answers)
    assert all(r.status_code == 200 or refused_as_overload(r) for r in answers)
    assert sum(r.status_code == 200 for r in answers) >= 64, "scrapers are served too"
    assert 'mixer_schedule_version{job="j999"} 1.0' in next(r.text for r in answers if r.status_code == 200)


def test_past_the_connection_cap_every_refusal_is_problem_json(sources_dir, tmp_path):
    """Found: 64 clients with --max-in-flight 8 (uvicorn's cap was 4x that) got 10,159 bare text/plain
    503s of 29,536 answers, without ``fault`` or Retry-After."""
    with Server(sources_dir, tmp_path / "state", extra_args=["--max-in-flight", "8"]) as srv:
        job = new_job(srv.url)
        idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(40)]
        answers: list[httpx.Response] = []

        def client(k: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                answers.extend(c.get(f"/v1/jobs/{job}/batches/{k * 10 + i}") for i in range(10))

        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            list(pool.map(client, range(64)))
        for sock in idle:
            sock.close()
    assert len(answers) == 640
    assert all(r.status_code == 200 or refused_as_overload(r) for r in answers), \
        {(r.status_code, r.headers["content-type"]) for r in answers}
    assert sum(r.status_code == 200 for r in answers) > 0


def test_idle_connections_past_the_cap_make_room_for_new_ones(sources_dir, tmp_path):
    """Found: 1,100 idle connections made every new request a bare text/plain 503 until they timed out.
    Now the longest-idle connection is closed (as a keep-alive timeout would) when a new one arrives."""
    with Server(sources_dir, tmp_path / "state", extra_args=["--max-in-flight", "8",
                                                               "--max-connections", "50"]) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(100)]
        r = httpx.get(f"{srv.url}/v1/jobs", timeout=10)
        assert r.status_code == 200, r.text
        idle[0].settimeout(10)
        assert idle[0].recv(1) == b"", "the longest-idle connection was closed"
        for sock in idle:
            sock.close()


@pytest.fixture
def hung_endpoint():
    """A TCP server on loopback that accepts connections and never answers: a hung object store."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for sock in (*held, listener):
        sock.close()


def test_a_hung_object_store_is_refused_within_5_s(hung_endpoint, monkeypatch):
    """Found: a hung S3 endpoint cost 41.5 s per request (4 attempts of a 10 s read timeout) before
    the 503."""
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}.items():
        monkeypatch.setenv(key, value)
    origin = S3Origin(s3_client(hung_endpoint), "corpora", "abc")
    start = time.monotonic()
    with pytest.raises(SourceUnavailable, match="s3://corpora/abc/meta.json"):
        origin.read("meta.json")
    assert time.monotonic() - start < 5


def test_a_missing_sources_dir_is_refused_before_anything_is_written(tmp_path, free_port):
    """Found: ``mixer serve --sources-dir nosuch`` logged "serving" and created its state directory first
    (then its workers failed to start). A process, so a regression that serves ends in the timeout."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "mixer_service.cli", "serve", "--sources-dir", "nosuch",
                          "--state-dir", "state", "--port", str(free_port), "--workers", "1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--sources-dir nosuch: not a directory" in run.stderr
    assert "serving" not in run.stderr and not (tmp_path / "state").exists()


def test_a_busy_port_is_refused_before_anything_is_written(tmp_path, free_port):
    """Found: ``mixer serve`` on a port another process listens on logged "serving", then uvicorn died with a
    bare ``[Errno 98] Address already in use``."""
    import socket
    import subprocess
    import sys

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", free_port))
        holder.listen()
        run = subprocess.run([sys.executable, "-m", "mixer_service.cli", "serve", "--sources-dir", ".",
                              "--state-dir", "state", "--port", str(free_port), "--workers", "1"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and f"--port {free_port}: cannot listen on 127.0.0.1:{free_port}" in run.stderr
    assert "another --port" in run.stderr
    assert "serving" not in run.stderr and not (tmp_path / "state").exists()


@pytest.mark.parametrize("http_version", ["2", "3"])
def test_a_body_without_length_headers_over_http2_is_still_counted(http_version) -> None:
    """Found: the shortcut for requests without a body (no Content-Length, no Transfer-Encoding: none in
    HTTP/1.1) let a 10 KiB HTTP/2 body past a 1,000-byte limit; HTTP/2 and 3 frame bodies without either."""
    import asyncio

    from mixer_service.service.app import BodyLimit

    reached: list[bytes] = []

    async def app(scope, receive, send) -> None:
        reached.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def status(version: str, body: bytes) -> int:
        sent: list[dict] = []
        chunks = [{"type": "http.request", "body": body[i:i + 4096], "more_body": i + 4096 < len(body)}
                  for i in range(0, max(len(body), 1), 4096)]

        async def receive() -> dict:
            return chunks.pop(0)

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/jobs", "headers": [], "http_version": version,
                 "query_string": b"", "root_path": ""}
        asyncio.run(BodyLimit(app, limit=1000)(scope, receive, send))
        return sent[0]["status"]

    assert status(http_version, b"x" * 10240) == 413 and reached == []
    assert status("1.1", b"") == 200 and reached == [b""]  # HTTP/1.1 without either header: no body
