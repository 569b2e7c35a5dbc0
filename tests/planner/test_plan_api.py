"""Planner endpoints over real HTTP: fits from posted measurements, then the recommendation applied."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from service_helpers import etag_of, new_job
from test_planner_overfitting_law import make_runs, true_argmin


def test_spt_plan_recommends_the_true_optimum_and_its_schedule_applies(server):
    runs = make_runs()
    body = {
        "runs": [
            {"tokens": t, "delta": d, "domain_loss": loss}
            for t, d, loss in zip(runs.tokens, runs.delta, runs.loss, strict=True)
        ],
        "target_tokens": 3e10,
        "domain_tokens": 3e8,
        "bootstrap": 0,
        "tokens_unit": 1.0,  # the test law's constants take T in tokens
        "domain_source": "abc",
        "web_source": "sotu",
    }
    r = httpx.post(f"{server.url}/v1/plan/spt", json=body, timeout=120)
    assert r.status_code == 200, r.text
    rec = r.json()["recommendation"]
    assert abs(rec["delta"] - true_argmin(3e10)) < 0.02
    assert rec["repetitions"] == pytest.approx(3e10 * rec["delta"] / 3e8)
    job = new_job(server.url)
    change = {"schedule": r.json()["schedule"], "author": "planner", "reason": "apply δ*"}
    applied = httpx.put(f"{server.url}/v1/jobs/{job}/schedule", json=change, 
                        headers={"If-Match": etag_of(server.url, job)})
    assert applied.status_code == 200, applied.text
    assert float(applied.json()["schedule"]["phases"][0]["weights"]["abc"]) == pytest.approx(
        rec["delta"], abs=1e-6
    )


def spt_body(n_runs: int, bootstrap: int = 0) -> dict:
    runs = make_runs()
    rows = [{"tokens": float(t), "delta": float(d), "domain_loss": float(v)}
            for t, d, v in zip(runs.tokens, runs.delta, runs.loss, strict=True)]
    return {"runs": (rows * (n_runs // len(rows) + 1))[:n_runs], "target_tokens": 3e10,
            "domain_tokens": 3e8, "bootstrap": bootstrap}


@pytest.fixture(scope="module")
def small_server(sources_dir, start_server):
    limits = ["--plan-max-runs", "50", "--plan-max-bootstrap", "5", "--plan-max-points", "10"]
    return start_server(sources_dir, extra_args=limits)


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        ("/v1/plan/spt", spt_body(51), "runs: 51 asked, this server allows at most 50"),
        ("/v1/plan/spt", spt_body(20, bootstrap=6), "bootstrap refits: 6 asked, this server allows at most"),
        ("/v1/plan/storage", {"points": [{"n": 1e3, "bytes_per_sample": 100.0, "error": 0.1}] * 11,
                              "budgets": [1e6], "bootstrap": 0}, "points: 11 asked"),
    ],
)
def test_work_over_the_configured_limits_is_refused_with_413_naming_it(small_server, path, body, named):
    r = httpx.post(f"{small_server.url}{path}", json=body, timeout=60)
    assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
    assert named in r.json()["detail"]


def test_plan_routes_document_their_problem_responses(server):
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    for path in ("/v1/plan/spt", "/v1/plan/storage"):
        documented = paths[path]["post"]["responses"]
        for status in ("413", "422"):
            assert "application/problem+json" in documented[status]["content"], (path, status)
        body_schema = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body_schema["$ref"].endswith("Request")  # a typed model, not a free-form dict


def test_storage_plan_returns_an_allocation_within_budget(server):
    rng = np.random.default_rng(0)
    n = np.repeat([1e3, 4e3, 1.6e4, 6.4e4], 4)
    size = np.tile([200.0, 400.0, 800.0, 1600.0], 4)
    err = 0.05 + 6.7 * n**-0.33 + 1355 * size**-1.06 + rng.normal(0, 1e-4, n.size)
    body = {
        "points": [{"n": a, "bytes_per_sample": b, "error": e} for a, b, e in zip(n, size, err, strict=True)],
        "budgets": [1e6, 1e7],
        "bootstrap": 0,
    }
    r = httpx.post(f"{server.url}/v1/plan/storage", json=body, timeout=120)
    assert r.status_code == 200, r.text
    for alloc in r.json()["allocations"]:
        assert alloc["bytes_per_sample"] * alloc["num_samples"] <= alloc["budget"] * (1 + 1e-9)


@pytest.mark.parametrize(
    "body",
    [
        {
            "runs": [{"tokens": 1e9, "delta": 0.01, "domain_loss": 2.0}],
            "target_tokens": 1e10,
            "domain_tokens": 1e8,
        },
        {
            "runs": [{"tokens": -1, "delta": 0.01, "domain_loss": 2.0}],
            "target_tokens": 1e10,
            "domain_tokens": 1e8,
        },
        {"runs": [], "target_tokens": 1e10, "domain_tokens": 1e8},
        dict(spt_body(72), domain_source="abc"),  # a schedule needs both sources
        dict(spt_body(72), holdout_delta=0.3),  # no runs at that δ
    ],
)
def test_degenerate_spt_inputs_get_422(server, body):
    r = httpx.post(f"{server.url}/v1/plan/spt", json=body, timeout=60)
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"


def test_spt_plan_is_strict_json_and_answers_several_budgets(server):
    body = dict(spt_body(72), target_tokens=[1e10, 3e10], tokens_unit=1.0)
    r = httpx.post(f"{server.url}/v1/plan/spt", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [x["target_tokens"] for x in out["recommendations"]] == [1e10, 3e10]
    assert out["fit"]["params"][0]["std"] is None  # no bootstrap: no NaN in the body


def test_a_fit_over_its_budget_is_413_and_the_bootstrap_stops_in_time(server):
    r = httpx.post(f"{server.url}/v1/plan/spt", json=dict(spt_body(72), max_seconds=0.001), timeout=60)
    assert r.status_code == 413 and "did not finish within" in r.json()["detail"]
    r = httpx.post(f"{server.url}/v1/plan/spt", json=dict(spt_body(72, bootstrap=200), max_seconds=6),
                   timeout=60)
    assert r.status_code == 200, r.text
    assert any("bootstrap stopped after" in w for w in r.json()["warnings"])


def test_ill_posed_runs_are_422_naming_the_row(server):
    body = spt_body(72)
    body["runs"][5]["tokens"] = 1e-291
    r = httpx.post(f"{server.url}/v1/plan/spt", json=body, timeout=60)
    assert r.status_code == 422 and "runs[5]" in r.json()["detail"]


def test_a_client_that_leaves_cancels_its_fit(server):
    import time

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/plan/spt", json=spt_body(72, bootstrap=200), timeout=2)
    deadline = time.monotonic() + 10
    while "planner request cancelled" not in server.tail() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "planner request cancelled: the client left" in server.tail()
