"""Bounded work and refusals that say why (issue 17, items 8 and 9), through real servers.

Each test starts from what was observed (an accepted schedule that 500s later, a text/plain 500, scrapers
that stall batches, bare text/plain 503s past uvicorn's cap, a hung object store) and asserts what
replaced it: every accepted request can be served, and every refusal is problem+json with ``fault`` and
``Retry-After``.
"""

from __future__ import annotations

import logging
import random

import httpx
import pytest
from fastapi.testclient import TestClient
from service_helpers import JOB, Server, etag_of
from test_service import new_job

from mixer_service.engine.schedule import MAX_PHASES
from mixer_service.service.app import Settings, create_app
from mixer_service.service.auth import Tokens
from mixer_service.service.sources import SourceRegistry
from mixer_service.store import open_store
from mixer_service.values import WEIGHT_DIGITS


def problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    return response.json()


def put_schedule(url: str, job: str, schedule: dict) -> httpx.Response:
    body = {"schedule": schedule, "requested_step": 0, "author": "ops", "reason": "test"}
    return httpx.put(f"{url}/v1/jobs/{job}/schedule", json=body, headers={"If-Match": etag_of(url, job)})


@pytest.fixture(scope="module")
def server(sources_dir, tmp_path_factory):
    srv = Server(sources_dir, tmp_path_factory.mktemp("state")).start()
    yield srv
    srv.stop()


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
