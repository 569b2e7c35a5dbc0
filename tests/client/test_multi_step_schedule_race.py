"""Multi-step batch requests (?steps=K) racing schedule changes through a real ``mixer serve --workers 2``,
fast path and FastAPI route: every step any request got must be the bytes a single-step request for it gets
afterwards (a change never alters a step already served), and the high water is the highest last step."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
from service_helpers import SCHEDULE, etag_of, new_job

from mixer_contract import wire

WORLD = 2
OTHER = {"phases": [{"start_step": 0, "weights": {"abc": 0.5, "sotu": 0.5}}]}


def get(url: str, job: str, step: int, steps: int, rank: int, route: bool) -> dict[int, bytes]:
    params = {"rank": str(rank), "world": str(WORLD), "steps": str(steps)}
    if route:
        params["pad"] = "1"  # unknown to the fast path: the route answers
    r = httpx.get(f"{url}/v1/jobs/{job}/batches/{step}", params=params, timeout=60)
    assert r.status_code == 200, r.text
    frames = wire.decode_frames(r.content)
    assert [f.header["step"] for f in frames] == list(range(step, step + steps))
    return {f.header["step"]: f.tokens.tobytes() + f.source_ids.tobytes() for f in frames}


def test_schedule_changes_never_alter_a_step_a_multi_step_request_got(start_server, server_sources):
    srv = start_server(server_sources, workers=2)
    job = new_job(srv.url, SCHEDULE, total_steps=400)
    rng = random.Random(7)
    work = []
    for _ in range(120):
        k = rng.choice([1, 2, 5, 8, 16, 64])
        step = rng.randrange(0, 300 - k)
        work.append((step, k, rng.randrange(WORLD), rng.random() < 0.5))

    def change(i: int) -> int:
        r = httpx.put(f"{srv.url}/v1/jobs/{job}/schedule", headers={"If-Match": etag_of(srv.url, job)},
                      timeout=60, json={"schedule": OTHER if i % 2 else SCHEDULE, "requested_step": 0,
                                        "author": "t", "reason": "race"})
        return r.status_code

    got: dict[tuple[int, int], bytes] = {}
    highest = -1
    with ThreadPoolExecutor(12) as pool:
        futures = [(w, pool.submit(get, srv.url, job, *w)) for w in work]
        changes = [pool.submit(change, i) for i in range(10)]
        for (step, k, rank, _), fut in futures:
            highest = max(highest, step + k - 1)
            for s, body in fut.result().items():
                if (s, rank) in got:
                    assert got[(s, rank)] == body, f"step {s} rank {rank} served two different batches"
                got[(s, rank)] = body
    statuses = [c.result() for c in changes]
    assert all(s in (200, 409, 412) for s in statuses), statuses
    assert 200 in statuses
    assert httpx.get(f"{srv.url}/v1/jobs/{job}").json()["served_high_water"] == highest
    for (s, rank), body in got.items():
        assert get(srv.url, job, s, 1, rank, False)[s] == body, f"step {s} rank {rank} rewritten"
