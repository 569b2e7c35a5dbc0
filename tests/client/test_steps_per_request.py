"""Several steps in one batch request (``?steps=k``, ``MixerLoader(steps_per_request=k)``): the body is the
single-step bodies back to back, the request's last step is marked served before any of them is made, the
loader hands out exactly what one request a step would, resumes inside a request, and still gets every step
from a server that predates the option (a real proxy on loopback drops ``steps`` from each query)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import numpy as np
import pytest
import torch
from service_helpers import JOB, new_job, problem

from client import MixerLoader
from mixer_contract import wire

STEPS = JOB["total_steps"]


def body(url: str, job: str, step: int, **params) -> bytes:
    r = httpx.get(f"{url}/v1/jobs/{job}/batches/{step}", params=params)
    assert r.status_code == 200, r.text
    return r.content


def high_water(url: str, job: str) -> int:
    return int(httpx.get(f"{url}/v1/jobs/{job}").json()["served_high_water"])


@pytest.mark.parametrize("params", [{}, {"compression": "zstd", "rank": 1, "world": 4},
                                    {"boundaries": "true", "rank": 3, "world": 4}])
def test_a_request_for_several_steps_is_the_single_step_bodies_back_to_back(server, params) -> None:
    job = new_job(server.url)
    several = body(server.url, job, 7, steps=5, **params)
    singles = [body(server.url, job, step, **params) for step in range(7, 12)]
    assert several == b"".join(singles)
    assert [b.header["step"] for b in wire.decode_frames(several)] == list(range(7, 12))


def test_the_last_step_of_a_request_is_marked_served_before_it_answers(server) -> None:
    job = new_job(server.url)
    body(server.url, job, 10, steps=6)
    assert high_water(server.url, job) == 15


@pytest.mark.parametrize("step,steps,status",
                         [(STEPS - 2, 3, 422), (0, 65, 422), (0, 0, 422), (STEPS - 2, 2, 200)])
def test_steps_outside_the_job_or_the_bound_are_refused_and_mark_nothing(server, step, steps, status) -> None:
    job = new_job(server.url)
    r = httpx.get(f"{server.url}/v1/jobs/{job}/batches/{step}", params={"steps": steps})
    assert r.status_code == status, r.text
    assert high_water(server.url, job) == (step + steps - 1 if status == 200 else -1)
    if step + steps > STEPS and steps <= 64:
        assert f"run past the job's last step {STEPS - 1}" in problem(r, 422)["detail"]


def test_the_request_token_bound_counts_every_step(start_server, sources_dir) -> None:
    """64 tokens x 8 rows = 512 a step: 2 steps fit a 1024-token bound, 3 do not (413, nothing marked)."""
    small = start_server(sources_dir, extra_args=["--max-request-tokens", "1024"])
    job = new_job(small.url)
    assert len(wire.decode_frames(body(small.url, job, 0, steps=2))) == 2
    refused = httpx.get(f"{small.url}/v1/jobs/{job}/batches/2", params={"steps": 3})
    assert "fewer steps per request" in problem(refused, 413)["detail"]
    assert high_water(small.url, job) == 1


def test_a_damaged_frame_anywhere_fails_the_whole_body(server) -> None:
    job = new_job(server.url)
    data = bytearray(body(server.url, job, 0, steps=3))
    second = data.index(wire.MAGIC, 1)
    for at in (second - 1, second + 2, len(data) - 1):  # end of frame 1, magic of frame 2, last payload byte
        damaged = bytearray(data)
        damaged[at] ^= 0x10
        with pytest.raises(wire.WireError):
            wire.decode_frames(bytes(damaged))
    with pytest.raises(wire.WireError):
        wire.decode_frames(bytes(data[:-1]))  # a truncated last frame
    with pytest.raises(wire.WireError):
        wire.decode(bytes(data))  # a single-batch reader refuses a body of three


def steps_of(loader: MixerLoader) -> Iterator[tuple[int, np.ndarray]]:
    for batch in loader:
        assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
        yield batch["step"], torch.cat([batch["input_ids"], batch["labels"][:, -1:]], 1).numpy()


@pytest.mark.parametrize("per_request", [3, 4, 16])
def test_the_loader_hands_out_what_one_request_a_step_would(server, per_request) -> None:
    job = new_job(server.url)
    with MixerLoader(server.url, job, end_step=11, rank=1, world=2, steps_per_request=1) as one:
        expected = list(steps_of(one))
    with MixerLoader(server.url, job, end_step=11, rank=1, world=2, steps_per_request=per_request) as many:
        got = list(steps_of(many))
    assert [s for s, _ in got] == list(range(11))
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(expected, got, strict=True))


def test_a_loader_resumed_inside_a_request_continues_at_its_next_step(server) -> None:
    job = new_job(server.url)
    with MixerLoader(server.url, job, end_step=12, steps_per_request=4) as loader:
        whole = list(steps_of(loader))
    with MixerLoader(server.url, job, end_step=12, steps_per_request=4) as loader:
        head = [next(loader) for _ in range(6)]  # steps 0-3 one a request (prefetched before the first
        state = loader.state_dict()              # answer), then 4-7 in one: this stops inside it
    assert state["next_step"] == 6 and head[-1]["step"] == 5
    with MixerLoader(server.url, job, end_step=12, steps_per_request=4) as resumed:
        resumed.load_state_dict(state)
        rest = list(steps_of(resumed))
    assert [s for s, _ in rest] == list(range(6, 12))
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(whole[6:], rest, strict=True))


def test_a_loader_asks_a_server_with_a_lower_request_bound_for_fewer_steps(start_server, sources_dir) -> None:
    """512 tokens a step, a 1024-token bound: asking for 8 gets a 413, then 4 (413), then 2 (served)."""
    small = start_server(sources_dir, extra_args=["--max-request-tokens", "1024"])
    job = new_job(small.url)
    with MixerLoader(small.url, job, end_step=20, steps_per_request=8) as loader:
        assert [s for s, _ in steps_of(loader)] == list(range(20))
        assert loader._per_request == 2


class _DropSteps(BaseHTTPRequestHandler):
    """Forwards GETs to ``upstream`` without their ``steps`` parameter: what a server that predates it
    answers (a route ignores parameters it does not declare)."""

    upstream = ""
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        parts = urlsplit(self.path)
        self.seen.append(parts.query)
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "steps"])
        r = httpx.get(f"{self.upstream}{parts.path}?{query}")
        self.send_response(r.status_code)
        self.send_header("Content-Type", r.headers.get("content-type", "application/octet-stream"))
        self.send_header("Content-Length", str(len(r.content)))
        self.end_headers()
        self.wfile.write(r.content)

    def log_message(self, *args: object) -> None:
        pass


def test_a_server_that_ignores_steps_still_gives_the_loader_every_step(server) -> None:
    job = new_job(server.url)
    handler = type("Old", (_DropSteps,), {"upstream": server.url, "seen": []})
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        old_url = f"http://127.0.0.1:{proxy.server_address[1]}"
        with MixerLoader(old_url, job, end_step=9, steps_per_request=4) as loader:
            got = list(steps_of(loader))
    finally:
        proxy.shutdown()
        proxy.server_close()
    with MixerLoader(server.url, job, end_step=9, steps_per_request=1) as loader:
        expected = list(steps_of(loader))
    assert [s for s, _ in got] == list(range(9))
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(expected, got, strict=True))
    assert any("steps=4" in q for q in handler.seen)  # it did ask for several


def test_large_batches_are_asked_for_a_few_at_a_time(server) -> None:
    """2^19 tokens a step: a request holds at most 2^20 tokens, so 2 steps, not 8."""
    job = new_job(server.url, seq_len=1 << 16, allow_wrap=True)
    with MixerLoader(server.url, job, end_step=5, steps_per_request=8) as loader:
        assert [s for s, _ in steps_of(loader)] == list(range(5))
        assert loader._per_request == 2
