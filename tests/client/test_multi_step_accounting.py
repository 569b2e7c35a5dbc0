"""What one K-step request counts (mixer_batches_served, tokens per source, the job's description, the high
water) must equal what K single-step requests count, on the fast path and on the FastAPI route alike."""

from __future__ import annotations

import httpx
from service_helpers import new_job


def counts(url: str, job: str) -> tuple[float, dict, int]:
    text = httpx.get(f"{url}/metrics").text
    batches = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("mixer_batches_served_total{") and f'job="{job}"' in line)
    tokens = {line.split(" ")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("mixer_tokens_served_total{") and f'job="{job}"' in line}
    tokens = {k.replace(job, "J"): v for k, v in tokens.items()}
    described = httpx.get(f"{url}/v1/jobs/{job}").json()
    return batches, tokens, described["served_high_water"], described.get("tokens_served")


def test_a_k_step_request_counts_as_k_single_requests(server) -> None:
    single, fast, route = (new_job(server.url, seed=3) for _ in range(3))
    for step in range(5, 13):
        assert httpx.get(f"{server.url}/v1/jobs/{single}/batches/{step}", params={"rank": 1, "world": 2}
                         ).status_code == 200
    assert httpx.get(f"{server.url}/v1/jobs/{fast}/batches/5", params={"rank": 1, "world": 2, "steps": 8}
                     ).status_code == 200
    assert httpx.get(f"{server.url}/v1/jobs/{route}/batches/5",
                     params={"rank": "1", "world": "2", "steps": "08"}).status_code == 200  # route: "08"
    a, b, c = counts(server.url, single), counts(server.url, fast), counts(server.url, route)
    assert a == b == c, (a, b, c)
