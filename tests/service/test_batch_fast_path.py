"""The batch route's fast path (``routes.batches.BatchFastPath``) answers byte for byte as the FastAPI route
does, keeps the limits, roles and metrics, and leaves every request it does not fully understand to the
route. A query parameter the route ignores (``via=route``) sends a request down the route, so each pair
below is the same request answered both ways by one real server."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from service_helpers import JOB, OPERATOR_TOKEN, READER, SCHEDULE, TOKENS, new_job

from mixer_contract import wire
from mixer_service.service.app import Settings, create_app
from mixer_service.service.auth import Tokens
from mixer_service.service.routes.batches import BatchFastPath
from mixer_service.service.source_registry import SourceRegistry
from mixer_service.store import open_store

CASES = [
    "", "rank=1&world=4", "rank=3&world=4&compression=zstd", "boundaries=true", "boundaries=1&rank=0&world=2",
    "compression=zstd&boundaries=false",
    "rank=4&world=4",  # a rank outside the world: the route's 422
    "steps=3", "steps=2&rank=1&world=4&compression=zstd&boundaries=true",
    "world=0", "rank=-1", "compression=gzip", "boundaries=maybe", "rank=01",  # the route decides these
    "steps=0", "steps=65", "steps=03", "steps=2000",
]


def answer(response: httpx.Response) -> tuple:
    return response.status_code, response.headers.get("content-type"), response.headers.get(
        "content-length"), response.headers.get("retry-after"), response.content


@pytest.mark.parametrize("query", CASES)
def test_each_request_is_answered_as_the_route_answers_it(server, query) -> None:
    job = new_job(server.url)
    for step in (0, 5):
        path = f"{server.url}/v1/jobs/{job}/batches/{step}"
        fast = httpx.get(f"{path}?{query}")
        routed = httpx.get(f"{path}?{query}&via=route" if query else f"{path}?via=route")
        assert answer(fast) == answer(routed), (query, fast.text[:200], routed.text[:200])


@pytest.mark.parametrize("where", ["/v1/jobs/no-such-job/batches/0", "/v1/jobs/{job}/batches/2000",
                                   "/v1/jobs/{job}/batches/99999999999999999999", "/v1/jobs/a b/batches/0",
                                   "/v1/jobs/{job}/batches/007"])
def test_refusals_are_the_route_s_problems(server, where) -> None:
    """Unknown job (404), a step past the end, and path values the route refuses or reads its own way."""
    url = server.url + where.format(job=new_job(server.url))
    fast, routed = httpx.get(url), httpx.get(url + "?via=route")
    assert answer(fast) == answer(routed)
    assert fast.status_code != 500


def test_fast_requests_are_counted_under_the_route_template(server) -> None:
    job = new_job(server.url)

    def served() -> float:
        metrics = httpx.get(f"{server.url}/metrics").text
        found = re.search(r'mixer_requests_total\{method="GET",route="/v1/jobs/\{job_id\}/batches/\{step\}",'
                          r'status="200"\} (\S+)', metrics)
        return float(found[1]) if found else 0.0

    before = served()
    for step in range(7):
        assert httpx.get(f"{server.url}/v1/jobs/{job}/batches/{step}").status_code == 200
    assert served() == before + 7
    assert f'mixer_batches_served_total{{job="{job}"}} 7.0' in httpx.get(f"{server.url}/metrics").text


def test_roles_apply_and_a_missing_token_gets_the_route_s_401(start_server, server_sources) -> None:
    srv = start_server(server_sources, env=TOKENS)
    job = new_job(srv.url, token=OPERATOR_TOKEN)
    path = f"{srv.url}/v1/jobs/{job}/batches/0"
    missing, wrong = httpx.get(path), httpx.get(path, headers={"Authorization": "Bearer nope"})
    for refused in (missing, wrong):
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert refused.headers["content-type"] == "application/problem+json"
    reader = httpx.get(path, headers=READER)
    assert reader.status_code == 200
    assert answer(reader) == answer(httpx.get(path + "?via=route", headers=READER))


def test_a_canonical_request_never_reaches_the_framework(sources_dir, tmp_path) -> None:
    """In process, on a real app and store: the fast path answers a canonical request itself (the app below
    it refuses everything), and hands a non-canonical one down."""
    app = create_app(Settings(open_store(None, tmp_path / "state.sqlite"),
                              SourceRegistry.load(sources_dir, tmp_path / "cache"), Tokens(None, None)))
    app.state.jobs.create("j", JOB, SCHEDULE, "test", "t")
    reached: list[str] = []

    async def framework(scope, receive, send) -> None:
        reached.append(scope["query_string"].decode())
        await send({"type": "http.response.start", "status": 599, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    fast = BatchFastPath(framework, api=app)

    async def get(query: str) -> tuple[int, bytes]:
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/v1/jobs/j/batches/3", "raw_path": b"",
                 "query_string": query.encode(), "headers": [], "app": app, "root_path": "",
                 "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1)}
        await fast(scope, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    status, body = asyncio.run(get("rank=1&world=2"))
    assert status == 200 and wire.decode(body).header["step"] == 3 and reached == []
    assert asyncio.run(get("rank=1&world=2&extra=1"))[0] == 599 and reached == ["rank=1&world=2&extra=1"]
