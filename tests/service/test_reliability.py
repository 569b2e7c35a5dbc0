"""Right or loudly unavailable: the reproductions of what issue 9 found, through real servers and Redis.

Each test starts from the failure that was observed (stale views on a second replica, a store that goes
backwards, hostile input, a broken job hiding the others) and asserts the behaviour that replaced it.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import signal
import threading

import httpx
import numpy as np
import pytest
import redis
from service_helpers import JOB, RAW, SCHEDULE, Server, etag_of, fetch, new_job, prepare_real_sources, problem

from mixer_contract import wire
from mixer_contract.errors import StoreBehind
from mixer_service.prepare.readers import iter_documents
from mixer_service.prepare.tokenizer import load_tokenizer
from mixer_service.prepare.writer import prepare_source

ANNEAL = {"phases": [{"start_step": 0, "weights": {"abc": 0.5, "sotu": 0.5}}]}


@pytest.fixture
def replicas(sources_dir, tmp_path, clean_redis_url):
    # Without the high-water watch: these tests prove what a request does when the store lost state; the
    # watch (tests/service/test_faults.py) may otherwise repair it first, between the damage and the request.
    servers = [Server(sources_dir, tmp_path / f"r{i}", redis_url=clean_redis_url,
                      extra_args=["--high-water-watch", "0"]).start() for i in range(2)]
    yield servers
    for s in servers:
        s.stop()


def change(url: str, job: str, schedule=ANNEAL, requested_step: int = 0) -> httpx.Response:
    body = {"schedule": schedule, "requested_step": requested_step, "author": "ops", "reason": "test"}
    return httpx.put(f"{url}/v1/jobs/{job}/schedule", json=body, headers={"If-Match": etag_of(url, job)})


# --- fresh views ------------------------------------------------------------------------------------


def test_a_replica_that_served_nothing_reports_a_change_made_through_another(replicas):
    """Found: B kept reporting version 1 (ETag, provenance, counts, metrics) until it served a batch."""
    a, b = replicas
    job = new_job(a.url)
    for step in range(40):
        fetch(a.url, job, step)
    before = httpx.get(f"{b.url}/v1/jobs/{job}").json()  # B has now seen the job at version 1
    assert before["schedule_version"] == 1
    assert change(a.url, job, {"phases": [{"start_step": 0, "weights": {"abc": 1}}]}).status_code == 200
    seen = httpx.get(f"{b.url}/v1/jobs/{job}").json()
    assert seen["schedule_version"] == 2 and seen["served_high_water"] == 39
    assert etag_of(b.url, job) == etag_of(a.url, job)
    provenance = httpx.get(f"{b.url}/v1/jobs/{job}/provenance/40").json()
    assert {row["source"] for row in provenance["sequences"]} == {"abc"}, "provenance follows version 2"
    assert provenance["sequences"] == httpx.get(f"{a.url}/v1/jobs/{job}/provenance/40").json()["sequences"]
    served = fetch(a.url, job, 40)
    assert served.source_ids.tolist() == [0] * len(served.source_ids)
    metrics = httpx.get(f"{b.url}/metrics").text
    assert f'mixer_schedule_version{{job="{job}"}} 2.0' in metrics


def test_get_then_put_through_either_replica_converges(replicas):
    """Found: GET -> PUT with If-Match through B answered 412 forever."""
    a, b = replicas
    job = new_job(a.url)
    for url in (a.url, b.url, b.url, a.url, b.url):
        assert change(url, job).status_code == 200
    versions = httpx.get(f"{b.url}/v1/jobs/{job}/schedule/history").json()["versions"]
    assert [v["version"] for v in versions] == [1, 2, 3, 4, 5, 6]


# --- fencing: the store went backwards ---------------------------------------------------------------


def _served_twice(a: Server, b: Server, job: str, steps: range) -> None:
    for step in steps:
        assert fetch(a.url, job, step).tokens.tobytes() == fetch(b.url, job, step).tokens.tobytes()


def test_a_lost_high_water_is_refused_once_then_put_back(replicas, clean_redis_url):
    a, b = replicas
    job = new_job(a.url)
    _served_twice(a, b, job, range(20))
    with redis.Redis.from_url(clean_redis_url) as r:
        r.set(f"mixer:{{{job}}}:hw", 5)  # a restore from an older snapshot
    body = problem(httpx.get(f"{b.url}/v1/jobs/{job}/batches/20"), 503)
    assert body["fault"] == "high_water_rollback" and "19" in body["detail"]
    assert httpx.get(f"{b.url}/v1/jobs/{job}").json()["served_high_water"] >= 19, "put back"
    assert 'mixer_faults_total{fault="high_water_rollback"} 1.0' in httpx.get(f"{b.url}/metrics").text
    # A change must not take effect at a step that was served before the loss.
    r = change(a.url, job, requested_step=0)
    assert r.status_code == 200 and r.json()["effective_step"] >= 20


def test_lost_schedule_versions_are_refused_then_restored_from_the_replica(replicas, clean_redis_url):
    a, b = replicas
    job = new_job(a.url)
    _served_twice(a, b, job, range(10))
    assert change(a.url, job, requested_step=12).status_code == 200
    _served_twice(a, b, job, range(10, 15))  # both replicas have now served under version 2
    before = [fetch(a.url, job, s).tokens.tobytes() for s in range(15)]
    key = f"mixer:{{{job}}}"
    with redis.Redis.from_url(clean_redis_url, decode_responses=True) as r:
        first = r.lindex(f"{key}:schedule", 0)
        r.rpop(f"{key}:schedule")  # version 2 lost (AOF everysec, or an older RDB)
        r.set(f"{key}:chain", wire_chain(first))
    body = problem(httpx.get(f"{b.url}/v1/jobs/{job}/batches/13"), 503)
    assert body["fault"] == "version_rollback"
    after = [fetch(u, job, s).tokens.tobytes() for s, u in zip(range(15), itertools.cycle([a.url, b.url]))]
    assert after == before, "no step is ever served under a log that lost a version"
    assert [v["version"] for v in httpx.get(f"{a.url}/v1/jobs/{job}/schedule/history").json()["versions"]] \
        == [1, 2]


def wire_chain(version_json: str) -> str:
    import json

    return json.loads(version_json)["chain"]


def test_a_recreated_job_is_refused_by_every_replica_that_saw_the_old_one(replicas, clean_redis_url):
    """Found: after a delete + recreate with the same id, steps were served again with different bytes."""
    a, b = replicas
    job = new_job(a.url)
    old = fetch(b.url, job, 3)
    with redis.Redis.from_url(clean_redis_url) as r:
        r.delete(*r.keys(f"mixer:{{{job}}}:*"))
        r.srem("mixer:jobs", job)
    assert problem(httpx.get(f"{b.url}/v1/jobs/{job}/batches/4"), 503)["fault"] == "job_missing"
    body = {"job_id": job, "config": JOB | {"seed": 99}, "schedule": SCHEDULE, "reason": "again"}
    assert httpx.post(f"{a.url}/v1/jobs", json=body).status_code == 201
    refused = problem(httpx.get(f"{b.url}/v1/jobs/{job}/batches/3"), 503)
    assert refused["fault"] == "incarnation_changed" and "restart" in refused["detail"]
    fresh = fetch(a.url, job, 3)  # A created the new incarnation itself
    assert fresh.header["incarnation"] != old.header["incarnation"]
    b.stop()
    b.start()
    assert fetch(b.url, job, 3).tokens.tobytes() == fresh.tokens.tobytes(), "a restart accepts the new one"


def test_every_batch_names_its_incarnation_and_the_etag_carries_it(replicas):
    a, _ = replicas
    job = new_job(a.url)
    batch = fetch(a.url, job, 0)
    incarnation = httpx.get(f"{a.url}/v1/jobs/{job}").json()["incarnation"]
    assert batch.header["incarnation"] == incarnation
    assert etag_of(a.url, job) == f'"v1.{incarnation}"'


def test_store_behind_is_a_503_problem_with_its_fault():
    assert StoreBehind("chain_broken", "x").fault == "chain_broken"


# --- a hung store does not take liveness or other requests with it ----------------------------------


def test_health_answers_while_redis_is_hung(sources_dir, tmp_path, redis_server):
    """Found: /v1/health took 6.3 s and /v1/ready 12.8 s with Redis stopped (SIGSTOP)."""
    srv = Server(sources_dir, tmp_path, redis_url=redis_server.url, extra_args=["--max-in-flight", "2"])
    srv.start()
    try:
        job = new_job(srv.url)
        redis_server.process.send_signal(signal.SIGSTOP)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            urls = [f"{srv.url}/v1/jobs/{job}/batches/{s}" for s in range(4)]
            stuck = [pool.submit(httpx.get, url, timeout=30) for url in urls]
            # A store call takes >= 2 s (socket timeout) x retries here; liveness must not wait for it.
            assert httpx.get(f"{srv.url}/v1/health", timeout=1.5).status_code == 200
            ready = httpx.get(f"{srv.url}/v1/ready", timeout=5)
            assert ready.status_code == 503 and "redis" in ready.json()["detail"]
            answers = [f.result() for f in stuck]
            redis_server.process.send_signal(signal.SIGCONT)
        refused = [problem(r, 503) for r in answers if r.status_code != 200]
        assert {p["fault"] for p in refused} <= {"overloaded", "store_unavailable"}
        assert "overloaded" in {p["fault"] for p in refused}, "two in flight at most, the rest refused"
        assert fetch(srv.url, job, 5).header["step"] == 5
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
        srv.stop()


# --- bounded, validated input ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_server(sources_dir, start_server):
    limits = ["--max-jobs", "40", "--max-versions", "3", "--max-request-tokens", "256"]
    return start_server(sources_dir, extra_args=limits)


@pytest.mark.parametrize("weight", ["1e-10000000", "1e400", "1e-5000", "0x10", "1/0", " 1", "-1", "nan"])
def test_weights_are_decimals_or_fractions_with_bounded_digits(small_server, weight):
    job = new_job(small_server.url)
    schedule = {"phases": [{"start_step": 0, "weights": {"abc": weight, "sotu": "1/2"}}]}
    assert "weights" in problem(change(small_server.url, job, schedule), 422)["detail"]
    assert httpx.get(f"{small_server.url}/v1/jobs/{job}").json()["schedule_version"] == 1


def test_huge_json_numbers_are_refused_not_500(small_server):
    job = new_job(small_server.url)
    raw = b'{"schedule": {"phases": [{"start_step": 0, "weights": {"abc": 1e400, "sotu": 0}}]}, ' \
          b'"author": "a", "reason": "r"}'
    r = httpx.put(f"{small_server.url}/v1/jobs/{job}/schedule", content=raw,
                  headers={"If-Match": etag_of(small_server.url, job), "content-type": "application/json"})
    problem(r, 422)


@pytest.mark.parametrize("value", [99999999999999999999, 2**53, False, True, "3", 1.5, -2, 2000])
def test_trained_step_is_a_bounded_integer_below_total_steps(small_server, value):
    job = new_job(small_server.url)
    problem(httpx.put(f"{small_server.url}/v1/jobs/{job}/progress", json={"trained_step": value}), 422)
    assert httpx.get(f"{small_server.url}/v1/jobs/{job}").json()["trained_step"] == -1


def test_trained_step_minus_one_means_nothing_trained(small_server):
    job = new_job(small_server.url)
    for value in (10, -1, JOB["total_steps"] - 1):
        r = httpx.put(f"{small_server.url}/v1/jobs/{job}/progress", json={"trained_step": value})
        assert r.status_code == 200, r.text
    assert httpx.get(f"{small_server.url}/v1/jobs/{job}").json()["trained_step"] == JOB["total_steps"] - 1


@pytest.mark.parametrize("step", ["99999999999999999999", "-1", "1.5", "true", str(2**53)])
def test_steps_in_paths_are_bounded(small_server, step):
    job = new_job(small_server.url)
    problem(httpx.get(f"{small_server.url}/v1/jobs/{job}/batches/{step}"), 422)
    assert httpx.get(f"{small_server.url}/v1/jobs/{job}").json()["served_high_water"] == -1


def test_a_batch_over_the_token_limit_is_413_and_marks_nothing(small_server):
    job = new_job(small_server.url)  # 8 rows x 64 tokens = 512 > 256
    assert "--max-request-tokens" in problem(httpx.get(f"{small_server.url}/v1/jobs/{job}/batches/0"), 413)[
        "detail"]
    assert httpx.get(f"{small_server.url}/v1/jobs/{job}").json()["served_high_water"] == -1
    assert httpx.get(f"{small_server.url}/v1/jobs/{job}/batches/0", params={"world": 2}).status_code == 200


def test_a_chunked_body_over_the_limit_is_413(small_server):
    job = new_job(small_server.url)

    def chunks():
        yield b'{"trained_step": 1, "pad": "'
        for _ in range(1100):
            yield b"x" * 1024
        yield b'"}'

    r = httpx.put(f"{small_server.url}/v1/jobs/{job}/progress", content=chunks(),
                  headers={"content-type": "application/json"})
    problem(r, 413)


def test_versions_per_job_are_capped(small_server):
    job = new_job(small_server.url)
    assert change(small_server.url, job).status_code == 200
    assert change(small_server.url, job).status_code == 200
    assert "limit of 3 schedule versions" in problem(change(small_server.url, job), 409)["detail"]


def test_jobs_per_server_are_capped(small_server):
    created = len(httpx.get(f"{small_server.url}/v1/jobs").json()["jobs"])
    for _ in range(40 - created):
        new_job(small_server.url)
    body = {"job_id": "one-too-many", "config": JOB, "schedule": SCHEDULE}
    assert "limit of 40 jobs" in problem(httpx.post(f"{small_server.url}/v1/jobs", json=body), 409)["detail"]


def test_unsupported_methods_say_what_is_allowed(small_server):
    r = httpx.request("TRACE", f"{small_server.url}/v1/jobs")
    assert r.status_code == 405 and "GET" in r.headers["allow"]


# --- one broken job does not break the listing -------------------------------------------------------


def test_a_job_whose_source_is_gone_is_listed_with_its_error(tmp_path, sources_dir):
    """Found: one job with a missing source made GET /v1/jobs 404 for everyone."""
    full = prepare_real_sources(tmp_path / "full", domain_docs=200, web_docs=20)
    state = tmp_path / "state"
    with Server(full, state) as srv:
        broken = new_job(srv.url, allow_wrap=True)
    (full / "sotu" / "meta.json").rename(tmp_path / "meta.json.away")
    with Server(full, state) as srv:
        healthy_body = {"job_id": "healthy", "config": JOB | {"sources": [{"name": "abc", "role": "repeat"}]},
                        "schedule": {"phases": [{"start_step": 0, "weights": {"abc": 1}}]}}
        assert httpx.post(f"{srv.url}/v1/jobs", json=healthy_body).status_code == 201
        listing = httpx.get(f"{srv.url}/v1/jobs")
        assert listing.status_code == 200
        rows = {row["job_id"]: row for row in listing.json()["jobs"]}
        assert "sotu" in rows[broken]["error"]["detail"] and rows["healthy"]["schedule_version"] == 1
        refused = problem(httpx.get(f"{srv.url}/v1/jobs/{broken}/batches/0"), 503)
        assert refused["fault"] == "source_unavailable"


# --- one effective-step rule, many sources, concurrent serving ---------------------------------------


@pytest.fixture(scope="module")
def four_sources(tmp_path_factory):
    """Four real sources: the usual two plus two more cut from the same corpora."""
    root = tmp_path_factory.mktemp("four")
    tokenizer = load_tokenizer()
    for name, folder, kwargs, window in (
        ("abc", "abc", {"split_regex": r"^X:", "glob": "**/*.abc"}, (0, 400)),
        ("abc2", "abc", {"split_regex": r"^X:", "glob": "**/*.abc"}, (400, 700)),
        ("sotu", "sotu", {"glob": "*.txt"}, (0, 30)),
        ("sotu2", "sotu", {"glob": "*.txt"}, (30, 60)),
    ):
        docs = itertools.islice(iter_documents([RAW / folder], fmt="text", **kwargs), *window)
        prepare_source(docs, root / name, tokenizer, name=name, progress=False)
    return root


@pytest.mark.parametrize("num_sources", [3, 4])
def test_changes_under_concurrent_serving_never_fail_and_never_rewrite_history(
    four_sources, tmp_path, num_sources
):
    """Found: with 3-4 sources, a retry recomputed hw + 1 instead of the horizon rule and failed 8 times."""
    names = ["abc", "sotu", "abc2", "sotu2"][:num_sources]
    config = JOB | {"sources": [{"name": n, "role": "repeat"} for n in names], "global_batch": 16}
    tiny = {n: "1/1000" for n in names[1:]} | {names[0]: f"{1000 - len(names[1:])}/1000"}
    with Server(four_sources, tmp_path) as srv:
        body = {"job_id": "many", "config": config,
                "schedule": {"phases": [{"start_step": 0, "weights": tiny}]}}
        assert httpx.post(f"{srv.url}/v1/jobs", json=body).status_code == 201
        served: dict[int, bytes] = {}
        stop = threading.Event()

        def pull(start: int) -> None:
            with httpx.Client() as http:
                for step in itertools.count(start, 2):
                    if stop.is_set() or step >= 400:
                        return
                    served[step] = http.get(f"{srv.url}/v1/jobs/many/batches/{step}").content

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            pullers = [pool.submit(pull, s) for s in (0, 1)]
            for i in range(6):
                weights = {n: f"{1 + (i + k) % 3}/{sum(1 + (i + j) % 3 for j in range(len(names)))}"
                           for k, n in enumerate(names)}
                r = change(srv.url, "many", {"phases": [{"start_step": 0, "weights": weights}]})
                assert r.status_code == 200, r.text
            stop.set()
            for f in pullers:
                f.result()
        for step, content in served.items():  # every served step still reads the same under the final log
            again = httpx.get(f"{srv.url}/v1/jobs/many/batches/{step}").content
            assert wire.decode(again).tokens.tobytes() == wire.decode(content).tokens.tobytes(), step
        assert np.all(np.diff(sorted(served)) >= 1)
