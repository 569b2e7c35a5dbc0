"""Fault injection (issue 9): right or loudly unavailable, under every single fault, with real processes.

Two ``mixer serve`` replicas share one Redis with AOF (``appendfsync always``, as deploy/ sets it). A client
pulls >= 300 steps through alternating replicas while schedule changes go through the other one, and each
test breaks one thing, in turn. Every 200 must equal, byte for byte, what a fresh embedded server replaying
the store's final log of that job incarnation serves; every other answer must be a 503 problem+json naming
its fault (never a 500, never a 200 with other bytes). The module prints the table of docs/reliability.md
(``pytest tests/service/test_faults.py -s``; ``FAULT_TABLE=path`` also writes it to a file).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fault_harness import (
    FAULT_AT,
    Cluster,
    DurableRedis,
    DurableRedisCluster,
    Pull,
    TableRow,
    batch_difference,
    check_against_replay,
    corrupt,
    markdown_table,
    new_job,
    put_back,
    row,
    shards,
    token_caches,
)
from service_helpers import JOB, Server

from client import HistoryRewritten, MixerLoader
from mixer_service.store import ScheduleVersion

pytestmark = pytest.mark.slow

FAULT_METRIC = re.compile(r'^mixer_\w*faults_total\{fault="(\w+)"\} (\S+)$', re.M)


@pytest.fixture(scope="module")
def table() -> Iterator[list[TableRow]]:
    rows: list[TableRow] = []
    yield rows
    text = markdown_table(rows)
    print("\n" + text)
    if path := os.environ.get("FAULT_TABLE"):
        Path(path).write_text(text + "\n")


@pytest.fixture(scope="module", params=["redis", "redis-cluster"])
def cluster(request: pytest.FixtureRequest, sources_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two replicas on one AOF Redis (or a 3-master Redis Cluster, every node with AOF), serving a private
    copy of the sources (one test damages its caches)."""
    sources = tmp_path_factory.mktemp("fault-sources")
    shutil.copytree(sources_dir, sources, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".cache"))
    store = DurableRedis if request.param == "redis" else DurableRedisCluster
    redis_server = store(tmp_path_factory.mktemp("redis-aof"))
    replicas = Cluster(sources, tmp_path_factory.mktemp("replicas"), redis_server)
    try:
        yield replicas.start()
    finally:
        replicas.stop()


@pytest.fixture(scope="module")
def reference(sources_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh embedded server (no Redis) on the pristine sources: the replay every answer is held to."""
    with Server(sources_dir, tmp_path_factory.mktemp("reference")) as srv:
        yield srv.url


@pytest.fixture
def healthy(cluster: Cluster) -> Cluster:
    cluster.ensure_running()
    return cluster


def run_fault(name: str, cluster: Cluster, reference: str, table: list[TableRow],
              actions: dict[int, Callable[[Pull], object]], config: dict = JOB) -> Pull:
    pull = Pull(cluster, new_job(cluster.url(0), config), config).run(actions)
    verdict = check_against_replay(pull, reference)
    if isinstance(cluster.redis, DurableRedisCluster):
        name += " (Redis Cluster, 3 masters)"
    table.append(row(name, pull, verdict))
    bad = pull.unexpected()
    assert not bad, f"{len(bad)} answers other than 200 / 503 problem+json, e.g. {bad[0].status}: " \
                    f"{bad[0].body[:300]!r}"
    assert verdict.mismatched_bytes == 0, (
        f"{len(verdict.mismatched_steps)} steps served with other bytes than a replay of the store's final "
        f"log ({verdict.mismatched_bytes} bytes), e.g. steps {verdict.mismatched_steps[:10]}")
    assert verdict.steps_served >= 300
    assert_faults_counted(cluster, pull)
    return pull


def assert_faults_counted(cluster: Cluster, pull: Pull) -> None:
    """Each replica's fault counter covers the 503s it answered since its last restart."""
    for i in range(2):
        answered = Counter(a.fault for a in pull.answers
                           if a.replica == i and a.status == 503 and a.generation == cluster.generation[i])
        if not answered:
            continue
        counted = {f: float(v) for f, v in FAULT_METRIC.findall(httpx.get(f"{cluster.url(i)}/metrics").text)}
        for fault, n in answered.items():
            assert counted.get(fault, 0) >= n, f"replica {i}: {n} x {fault} answered, metrics say {counted}"


def test_a_replica_killed_and_restarted(healthy, reference, table):
    def kill_and_restart(pull: Pull) -> None:
        pull.cluster.kill(1)
        pull.later(0, lambda: pull.cluster.restart(1))

    pull = run_fault("replica SIGKILLed, restarted", healthy, reference, table, {FAULT_AT: kill_and_restart})
    assert any(a.status is None for a in pull.answers), "the client saw the replica gone"


def test_redis_killed_and_restarted_from_its_aof(healthy, reference, table):
    def kill_redis(pull: Pull) -> None:
        pull.cluster.redis.kill()
        pull.later(2.0, pull.cluster.redis.restart)

    pull = run_fault("Redis SIGKILLed, restarted (AOF always)", healthy, reference, table,
                     {FAULT_AT: kill_redis})
    assert {a.fault for a in pull.refusals()} >= {"store_unavailable"}


def test_redis_restored_from_an_older_snapshot(healthy, reference, table, tmp_path):
    """The store goes back to step 60 after versions 3-4 and 90 more steps were committed and served."""
    def snapshot(pull: Pull) -> None:
        pull.cluster.redis.snapshot(tmp_path)

    def restore(pull: Pull) -> None:
        pull.cluster.redis.restore(tmp_path)

    pull = run_fault("Redis restored from an older snapshot", healthy, reference, table,
                     {60: snapshot, FAULT_AT: restore})
    # Noticed by a request (a 503 the client saw) or by a replica's high-water watch before any request
    # came (counted in its metrics, nothing refused): either way the lost state was put back.
    counted = {f for i in range(2)
               for f, _ in FAULT_METRIC.findall(httpx.get(f"{healthy.url(i)}/metrics").text)}
    assert ({a.fault for a in pull.refusals()} | counted) & {"version_rollback", "high_water_rollback"}


def test_the_job_deleted_and_recreated_with_the_same_id(healthy, reference, table):
    def recreate(pull: Pull) -> None:
        pull.recreate(JOB | {"seed": JOB["seed"] + 1}, via=0)

    pull = run_fault("job deleted, recreated with the same id", healthy, reference, table,
                     {FAULT_AT: recreate})
    assert {a.fault for a in pull.refusals()} & {"job_missing", "incarnation_changed"}
    assert len(pull.logs) == 2


def test_redis_hung_for_a_few_seconds(healthy, reference, table):
    def hang(pull: Pull) -> None:
        pull.cluster.redis.pause()
        pull.later(8.0, pull.cluster.redis.resume)

    run_fault("Redis hung (SIGSTOP 8 s)", healthy, reference, table, {FAULT_AT: hang})


def test_the_token_cache_corrupted(healthy, reference, table):
    """The decompressed cache a server reads tokens from is damaged in place; it stays damaged."""
    def damage(pull: Pull) -> None:
        assert corrupt(token_caches(pull.cluster.sources_dir)), "no token cache file found to corrupt"

    run_fault("token cache corrupted (1 bit / 64 bytes)", healthy, reference, table, {FAULT_AT: damage})


def test_a_shard_corrupted_then_put_back(healthy, reference, table):
    """The prepared shard itself is damaged (nothing to rebuild from) for 3 s, then restored. Bytes already
    verified into the cache stay servable; readiness fails, naming the file, so a balancer drains it."""
    def damage(pull: Pull) -> None:
        originals = corrupt(shards(pull.cluster.sources_dir))
        assert originals, "no shard found to corrupt"
        for i in range(2):
            ready = httpx.get(f"{pull.cluster.url(i)}/v1/ready", timeout=10)
            assert ready.status_code == 503 and "tokens-00000.zst" in ready.text, ready.text
        pull.later(3.0, lambda: put_back(originals))

    run_fault("shard corrupted for 3 s, then put back", healthy, reference, table, {FAULT_AT: damage})


def test_deploy_runs_redis_with_the_persistence_this_suite_proves():
    """The promise above is measured with AOF fsynced before every reply; compose and Kubernetes keep it."""
    import yaml

    deploy = Path(__file__).resolve().parents[2] / "deploy"
    compose = yaml.safe_load((deploy / "docker-compose.yml").read_text())["services"]["redis"]["command"]
    k8s = next(doc for doc in yaml.safe_load_all((deploy / "k8s" / "redis.yaml").read_text())
               if doc["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    for command in (compose, k8s):
        flags = dict(zip(command[1::2], command[2::2], strict=False))
        assert flags["--appendonly"] == "yes" and flags["--appendfsync"] == "always", command


# --- issue 17: history is append-only, everything that decides bytes is in the chain, no field can 500 ---


def _get(url: str, path: str, **kw) -> httpx.Response:
    """One request, retried while Redis restarts (store_unavailable) so tests see the steady answer."""
    deadline = time.monotonic() + 20
    while True:
        r = httpx.get(f"{url}{path}", timeout=20, **kw)
        if r.status_code != 503 or r.json().get("fault") != "store_unavailable":
            return r
        if time.monotonic() > deadline:
            return r
        time.sleep(0.1)


def _pull(url: str, job: str, steps: range) -> dict[int, bytes]:
    out = {}
    for step in steps:
        r = _get(url, f"/v1/jobs/{job}/batches/{step}")
        assert r.status_code == 200, r.text
        out[step] = r.content
    return out


def _same_or_refused(answer: httpx.Response, before: bytes) -> str:
    """'same' for the bytes served before, else the fault of a 503 problem+json; anything else fails."""
    if answer.status_code == 200:
        assert batch_difference(answer.content, before) == 0, "a served step came back with other bytes"
        return "same"
    assert answer.status_code == 503 and answer.headers["content-type"] == "application/problem+json", \
        f"{answer.status_code}: {answer.text[:300]}"
    assert answer.headers.get("retry-after"), answer.headers
    return answer.json()["fault"]


def _change_now(url: str, job: str, weight: float) -> httpx.Response:
    read = _get(url, f"/v1/jobs/{job}/schedule")
    assert read.status_code == 200, read.text
    body = {"schedule": {"phases": [{"start_step": 0, "weights": {"abc": weight, "sotu": 1 - weight}}]},
            "requested_step": 0, "author": "ops", "reason": "anneal"}
    return httpx.put(f"{url}/v1/jobs/{job}/schedule", json=body, headers={"If-Match": read.headers["etag"]},
                     timeout=20)


def _served_then_restored(cluster: Cluster, tmp_path: Path, stop_a: bool = False
                          ) -> tuple[str, dict[int, bytes], dict]:
    """Steps 0-59 served by replica A (a loader took 0-44); A stopped (SIGSTOP) if asked; the store then
    restored to a copy taken at step 29. Returns the job, the bytes A served and the loader's checkpoint."""
    a = cluster.url(0)
    job = new_job(a)
    served = _pull(a, job, range(30))
    cluster.redis.snapshot(tmp_path)
    served |= _pull(a, job, range(30, 60))
    with MixerLoader(a, job, end_step=60, world=1, rank=0, prefetch=1) as loader:
        for _ in range(45):
            next(loader)
        state = loader.state_dict()
    if stop_a:  # nothing of A's may run before the change: no request, no high-water watch
        cluster.replicas[0].proc.send_signal(signal.SIGSTOP)
    cluster.redis.restore(tmp_path)
    return job, served, state


def test_a_change_accepted_by_a_restored_store_never_rewrites_served_steps(healthy, tmp_path):
    """Item 1: a change through B at step 30 lands on the restored store before A (which served 30-59, and
    is stopped) can put its high water back. A loader resuming through B stops loudly at the first step B
    computes under the new log; A refuses `history_conflict`, puts its record back, and then B refuses too."""
    a, b = healthy.url(0), healthy.url(1)
    replica_a = healthy.replicas[0].proc
    try:
        job, served, state = _served_then_restored(healthy, tmp_path, stop_a=True)
        put = _change_now(b, job, 0.5)
        assert put.status_code == 200 and put.json()["effective_step"] == 30, put.text
        for rewind, match in ((False, "took effect at step 30, but step 30 was received"),
                              (True, "step 30 was received before")):
            with MixerLoader(b, job, end_step=60, world=1, rank=0, prefetch=1) as resumed:
                resumed.load_state_dict(state | {"next_step": 30} if rewind else state)
                with pytest.raises(HistoryRewritten, match=match):
                    next(resumed)
    finally:
        replica_a.send_signal(signal.SIGCONT)

    def answers(url: str) -> Counter:
        return Counter(_same_or_refused(_get(url, f"/v1/jobs/{job}/batches/{s}"), served[s])
                       for s in range(30, 60))

    assert answers(a) == {"history_conflict": 30}
    assert answers(b) == {"history_conflict": 30}, "B, once A has put its record back"
    detail = _get(a, f"/v1/jobs/{job}/batches/40").json()["detail"]
    assert "version 2" in detail and "version 1" in detail, detail
    assert 'fault="history_conflict"' in httpx.get(f"{a}/metrics").text


def test_a_restored_store_gets_the_served_high_water_back_before_any_change(healthy, tmp_path):
    """Item 1, prevention: A serves nothing after the restore, yet its high-water watch puts the steps it
    served back into the store within seconds, so a later change through B lands after them."""
    job, served, _ = _served_then_restored(healthy, tmp_path)
    deadline = time.monotonic() + 30  # the watch runs every 10 s by default
    with healthy.redis.client() as r:
        while int(r.get(f"mixer:{{{job}}}:hw") or -1) < 59:
            assert time.monotonic() < deadline, "the watch did not put the high water back"
            time.sleep(0.1)
    put = _change_now(healthy.url(1), job, 0.5)
    assert put.status_code == 200 and put.json()["effective_step"] == 60, put.text
    for url in (healthy.url(0), healthy.url(1)):
        assert Counter(_same_or_refused(_get(url, f"/v1/jobs/{job}/batches/{s}"), served[s])
                       for s in range(30, 60)) == {"same": 30}


def test_an_edited_config_or_a_hand_appended_version_is_refused_by_every_replica(healthy):
    """Item 2: the config is committed by version 1; a version appended by hand (chain recomputed) that takes
    effect at a served step is refused by a cached and a freshly started replica."""
    a = healthy.url(0)
    job = new_job(a)
    served = _pull(a, job, range(40))
    key = f"mixer:{{{job}}}"
    with healthy.redis.client() as r:
        config = json.loads(r.get(f"{key}:config"))
        r.set(f"{key}:config", json.dumps(config | {"seed": config["seed"] + 1}, sort_keys=True,
                                             separators=(",", ":")))
    healthy.restart(1)
    answers = Counter(_same_or_refused(_get(healthy.url(1), f"/v1/jobs/{job}/batches/{s}"), served[s])
                      for s in range(40))
    assert answers == {"chain_broken": 40}, answers
    assert Counter(_same_or_refused(_get(a, f"/v1/jobs/{job}/batches/{s}"), served[s])
                   for s in range(40)) == {"same": 40}, "the cached replica serves the config it verified"
    with healthy.redis.client() as r:
        r.set(f"{key}:config", json.dumps(config, sort_keys=True, separators=(",", ":")))
        first = ScheduleVersion.from_dict(json.loads(r.lindex(f"{key}:schedule", 0)))
        forged = ScheduleVersion(2, 5, {"phases": [{"start_step": 0, "weights": {"abc": 0.5, "sotu": 0.5}}]},
                                 time.time(), "mallory", "", ).sealed(first.chain)
        r.rpush(f"{key}:schedule", json.dumps(forged.to_dict(), sort_keys=True, separators=(",", ":")))
        r.set(f"{key}:chain", forged.chain)
    healthy.restart(1)
    for url in (a, healthy.url(1)):
        answers = Counter(_same_or_refused(_get(url, f"/v1/jobs/{job}/batches/{s}"), served[s])
                          for s in range(40))
        assert answers == {"history_conflict": 40}, (url, answers)


@pytest.mark.parametrize("damage", ["text", "wrong_type"])
def test_one_malformed_store_field_is_that_jobs_503_not_everyones_500(healthy, damage):
    """Item 7: a high water overwritten with text or another key type: that job answers 503 corrupt_data,
    and the listing and the metrics still answer 200 for every job."""
    a = healthy.url(0)
    good, bad = new_job(a), new_job(a)
    _pull(a, good, range(2))
    with healthy.redis.client() as r:
        if damage == "text":
            r.set(f"mixer:{{{bad}}}:hw", "abc")
        else:
            r.delete(f"mixer:{{{bad}}}:hw")
            r.rpush(f"mixer:{{{bad}}}:hw", "1")
    for url in (a, healthy.url(1)):
        batch = _get(url, f"/v1/jobs/{bad}/batches/0")
        assert batch.status_code == 503 and batch.json()["fault"] == "corrupt_data", batch.text
        jobs = _get(url, "/v1/jobs")
        assert jobs.status_code == 200, jobs.text
        listed = {j["job_id"]: j for j in jobs.json()["jobs"]}
        assert "error" in listed[bad] and "error" not in listed[good]
        assert _get(url, "/metrics").status_code == 200
        assert _get(url, f"/v1/jobs/{good}/batches/2").status_code == 200
    with healthy.redis.client() as r:
        r.delete(f"mixer:{{{bad}}}:hw")
        r.set(f"mixer:{{{bad}}}:hw", "-1")
