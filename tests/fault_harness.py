"""Fault injection against real processes: a Redis with AOF, two ``mixer serve`` replicas, a pulling client.

The promise under test (docs/reliability.md): a batch is a pure function of (config, sources, schedule log),
so every 200 a replica answers must equal, byte for byte, what a fresh embedded server replaying the store's
final log of that job incarnation serves; anything a replica cannot prove current is a 503 problem+json.

``Cluster`` owns the processes (``DurableRedis`` and the replicas) and can break them; ``Pull`` is one
trainer-like client run against it — it pulls steps through alternating replicas, fails over on a 503 or a
refused connection, and sends schedule changes through the other replica — and records every answer;
``check_against_replay`` replays the store's final log on a reference server and counts mismatched bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import redis
from service_helpers import JOB, SCHEDULE, RedisServer, Server, start_redis_server
from service_helpers import new_job as create_job

from mixer_contract import wire
from mixer_service.service.process import CLUSTER_NODE, CLUSTER_PORT_MAX
from mixer_service.store.redis_store import connect

PROBLEM = "application/problem+json"
STEP_DEADLINE_S = 40.0  # a step (or change) nobody answers with 200 for this long fails the run
RETRY_PAUSE_S = 0.05  # client back-off between attempts (shorter than Retry-After, to keep the suite fast)
REQUEST_TIMEOUT_S = 20.0
FAULT_AT = 150  # the step before which each test injects its fault
# Schedule changes the pulling client makes, in turn (floats: every version of the service parses them).
CHANGES = [{"phases": [{"start_step": 0, "weights": {"abc": w, "sotu": round(1 - w, 6)}}]}
           for w in (0.3, 0.1, 0.5, 0.2, 0.4)]


def aof(fsync: str) -> tuple[str, ...]:
    """redis-server arguments for append-only-file persistence with the given ``appendfsync`` policy."""
    return ("--save", "", "--appendonly", "yes", "--appendfsync", fsync)


class DurableRedis:
    """A redis-server with AOF that a test can SIGKILL, hang (SIGSTOP), restore from an older copy of its
    files, and restart on the same port and directory, as an operator or a crash would."""

    def __init__(self, directory: Path, fsync: str = "always", extra: tuple[str, ...] = (),
                 highest_port: int = 65535) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.persistence = aof(fsync) + extra
        self.server: RedisServer = start_redis_server(directory, persistence=self.persistence,
                                                      highest_port=highest_port)

    @property
    def url(self) -> str:
        return self.server.url

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)

    def kill(self) -> None:
        self.server.process.send_signal(signal.SIGCONT)
        self.server.process.kill()
        self.server.process.wait()

    def restart(self) -> None:
        """Start again on the same port and ``--dir``: it loads what its AOF holds."""
        self.server = start_redis_server(self.directory, self.server.port, self.persistence)

    def pause(self) -> None:
        self.server.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.server.process.send_signal(signal.SIGCONT)

    def snapshot(self, dest: Path) -> Path:
        """Copy the persistence files as they are now (each write is fsynced before its reply)."""
        shutil.copytree(self.directory / "appendonlydir", dest / "appendonlydir")
        return dest

    def restore(self, snapshot: Path) -> None:
        """Kill the server, put the older files back, restart: the store goes back in time."""
        self.kill()
        shutil.rmtree(self.directory / "appendonlydir")
        shutil.copytree(snapshot / "appendonlydir", self.directory / "appendonlydir")
        self.restart()

    def ensure_running(self) -> None:
        self.resume()
        if self.server.process.poll() is not None:
            self.restart()

    def stop(self) -> None:
        self.server.stop()


class DurableRedisCluster:
    """Three ``DurableRedis`` masters joined into a Redis Cluster; each fault hits every node at once (a
    whole-cluster crash, hang or restore), and a restarted node rejoins from its ``nodes.conf``."""

    def __init__(self, directory: Path, masters: int = 3) -> None:
        self.nodes: list[DurableRedis] = []
        try:  # a node that fails to start must not leave the others running after the test
            for i in range(masters):
                self.nodes.append(DurableRedis(directory / f"node{i}", extra=CLUSTER_NODE,
                                               highest_port=CLUSTER_PORT_MAX))
            created = subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.server.port}"
                                      for n in self.nodes), "--cluster-replicas", "0", "--cluster-yes"],
                                     capture_output=True, text=True, timeout=60)
            assert created.returncode == 0, created.stdout + created.stderr
            self.wait_ok()
        except BaseException:
            for node in self.nodes:
                node.stop()
            raise

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.server.port}" for n in self.nodes)

    def client(self) -> redis.RedisCluster:
        return connect(self.url, 5.0, 3)

    def wait_ok(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            infos = [subprocess.run(["redis-cli", "-p", str(n.server.port), "cluster", "info"],
                                    capture_output=True, text=True).stdout for n in self.nodes]
            if all("cluster_state:ok" in i for i in infos):
                return
            assert time.monotonic() < deadline, "the Redis Cluster did not reach cluster_state:ok"
            time.sleep(0.1)

    def _each(self, action: Callable[[DurableRedis], object]) -> None:
        for node in self.nodes:
            action(node)

    def kill(self) -> None:
        self._each(DurableRedis.kill)

    def restart(self) -> None:
        self._each(DurableRedis.restart)
        self.wait_ok()

    def pause(self) -> None:
        self._each(DurableRedis.pause)

    def resume(self) -> None:
        self._each(DurableRedis.resume)

    def snapshot(self, dest: Path) -> Path:
        for i, node in enumerate(self.nodes):
            node.snapshot(dest / f"node{i}")
        return dest

    def restore(self, snapshot: Path) -> None:
        self.kill()
        for i, node in enumerate(self.nodes):
            shutil.rmtree(node.directory / "appendonlydir")
            shutil.copytree(snapshot / f"node{i}" / "appendonlydir", node.directory / "appendonlydir")
        self.restart()

    def ensure_running(self) -> None:
        self._each(DurableRedis.ensure_running)
        self.wait_ok()

    def stop(self) -> None:
        self._each(DurableRedis.stop)


class Cluster:
    """Two replicas of ``mixer serve`` on one ``DurableRedis``, each restartable on its own port."""

    def __init__(self, sources_dir: Path, workdir: Path, redis_server: DurableRedis | DurableRedisCluster
                 ) -> None:
        self.sources_dir = sources_dir
        self.redis = redis_server
        self.replicas = [Server(sources_dir, workdir / f"replica{i}", redis_url=redis_server.url)
                         for i in range(2)]
        self.generation = [0, 0]  # bumped by each restart: metrics restart from zero with the process

    def start(self) -> Cluster:
        _in_parallel([r.start for r in self.replicas])
        return self

    def url(self, i: int) -> str:
        return self.replicas[i].url

    def alive(self, i: int) -> bool:
        proc = self.replicas[i].proc
        return proc is not None and proc.poll() is None

    def kill(self, i: int) -> None:
        self.replicas[i].kill()

    def restart(self, i: int) -> None:
        self.replicas[i].stop()
        self.replicas[i].start()
        self.generation[i] += 1

    def ensure_running(self) -> None:
        """Undo whatever a failed test left behind, so the next one starts from two healthy replicas."""
        self.redis.ensure_running()
        for i in range(2):
            if not self.alive(i):
                self.restart(i)

    def stop(self) -> None:
        for r in self.replicas:
            r.stop()
        self.redis.stop()


def _in_parallel(calls: list[Callable[[], object]]) -> None:
    threads = [threading.Thread(target=c) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@dataclass
class Answer:
    """One HTTP exchange the client made (``status`` None: no HTTP answer, e.g. connection refused)."""

    kind: str  # "batch" or "change"
    step: int
    replica: int
    generation: int
    status: int | None
    body: bytes
    content_type: str
    sent: float
    at: float
    epoch: int  # which incarnation of the job the client believed current when it asked
    etag: str | None = None
    retry_after: str | None = None

    @property
    def fault(self) -> str | None:
        if self.content_type != PROBLEM:
            return None
        return json.loads(self.body).get("fault")


@dataclass
class Pull:
    """One trainer-like client run: ``steps`` steps through alternating replicas, and schedule changes (as
    soon as possible) through the other replica at ``change_steps``, one of them right after the fault; an
    operator makes them, so they run beside the pulling, not between its requests. ``run(actions)`` calls
    ``actions[step](self)`` just before that step (the fault, and e.g. a snapshot)."""

    cluster: Cluster
    job: str
    config: dict
    steps: int = 300
    change_steps: tuple[int, ...] = (25, 75, 125, FAULT_AT, 200, 250, 290)
    answers: list[Answer] = field(default_factory=list)
    epoch: int = 0
    configs: dict[int, dict] = field(default_factory=dict)  # epoch -> config it was created with
    logs: dict[int, list[dict]] = field(default_factory=dict)  # epoch -> final log of that incarnation
    healers: list[threading.Thread] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    restarted_to_recover: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.configs[0] = self.config
        self._http = httpx.Client(timeout=REQUEST_TIMEOUT_S)

    # -- driving ----------------------------------------------------------------------------------------

    def run(self, actions: dict[int, Callable[[Pull], object]]) -> Pull:
        changes = iter(CHANGES * 2)
        step = 0
        try:
            while (step < self.steps or self._healing()) and not self.errors:
                if step >= self.steps:  # keep serving while a fault heals, at a trainer's pace
                    time.sleep(RETRY_PAUSE_S)
                if step in actions:
                    actions[step](self)
                if step in self.change_steps:
                    self.background(self.change, 1 - step % 2, next(changes))
                self.fetch(step)
                step += 1
            for t in self.healers:
                t.join()
            if self.errors:
                raise self.errors[0]
            self._restart_replicas_that_never_recovered()
            for extra in range(step, step + 4):  # both replicas serve again after the fault
                self.fetch(extra, only_first=True)
            self.logs[self.epoch] = self.store_log()
        finally:
            self._http.close()
        return self

    def later(self, seconds: float, action: Callable[[], object]) -> None:
        """Run ``action`` in the background after ``seconds`` (healing while the client keeps pulling)."""
        def delayed() -> None:
            time.sleep(seconds)
            action()

        self.background(delayed)

    def background(self, action: Callable[..., object], *args: object) -> None:
        """Run ``action(*args)`` beside the pulling, after the previous background action has finished."""
        previous = self.healers[-1] if self.healers else None

        def run() -> None:
            if previous is not None:
                previous.join()
            try:
                action(*args)
            except BaseException as exc:  # reported by run() in the test's thread
                self.errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.healers.append(thread)

    def _healing(self) -> bool:
        return any(t.is_alive() for t in self.healers)

    def _request(self, kind: str, step: int, replica: int, method: str, path: str, **kw) -> Answer:
        sent = time.monotonic()
        try:
            r = self._http.request(method, f"{self.cluster.url(replica)}{path}", **kw)
            status, body, ctype = r.status_code, r.content, r.headers.get("content-type", "")
            etag, retry_after = r.headers.get("etag"), r.headers.get("retry-after")
        except httpx.TransportError as exc:
            status, body, ctype, etag, retry_after = None, repr(exc).encode(), "", None, None
        answer = Answer(kind, step, replica, self.cluster.generation[replica], status, body, ctype, sent,
                        time.monotonic(), self.epoch, etag, retry_after)
        self.answers.append(answer)
        return answer

    def fetch(self, step: int, only_first: bool = False) -> Answer:
        """Ask replica ``step % 2`` first; on anything but a 200, the other one, until one serves."""
        deadline = time.monotonic() + STEP_DEADLINE_S
        replica = step % 2
        while True:
            answer = self._request("batch", step, replica, "GET", f"/v1/jobs/{self.job}/batches/{step}")
            if answer.status == 200:
                return answer
            if time.monotonic() > deadline:
                raise AssertionError(f"step {step}: no replica served it in {STEP_DEADLINE_S:g} s; last "
                                     f"answer {answer.status}: {answer.body[:300]!r}")
            if not only_first:
                replica = 1 - replica
            time.sleep(RETRY_PAUSE_S)

    def change(self, replica: int, schedule: dict) -> Answer:
        """GET the ETag and PUT ``schedule`` (as soon as possible: requested_step 0) through ``replica``.

        A PUT whose answer was lost may have committed: a 412 on the retry is then checked by reading back
        the current schedule, as an operator would.
        """
        deadline = time.monotonic() + STEP_DEADLINE_S
        attempted = False
        put = None
        while time.monotonic() < deadline:
            read = self._request("change", -1, replica, "GET", f"/v1/jobs/{self.job}/schedule")
            if read.status == 200:
                if attempted and _same_schedule(json.loads(read.body)["schedule"], schedule):
                    return read
                body = {"schedule": schedule, "requested_step": 0, "author": "faults", "reason": "test"}
                put = self._request("change", -1, replica, "PUT", f"/v1/jobs/{self.job}/schedule",
                                    json=body, headers={"If-Match": read.etag or ""})
                if put.status == 200:
                    return put
                attempted = attempted or put.status != 412
            replica = 1 - replica
            time.sleep(RETRY_PAUSE_S)
        last = put or read
        raise AssertionError(f"schedule change not committed within {STEP_DEADLINE_S:g} s; last answer "
                             f"{last.status}: {last.body[:300]!r}")

    def recreate(self, config: dict, via: int = 0) -> None:
        """Delete the job directly in Redis (an operator's mistake or a wiped store) and create it again with
        the same id through the API; later answers belong to the new incarnation."""
        self.logs[self.epoch] = self.store_log()
        with self.cluster.redis.client() as r:
            keys = list(r.scan_iter(match=f"*{{{self.job}}}*"))
            r.delete(*keys)
            r.srem("mixer:jobs", self.job)
        self.epoch += 1
        self.configs[self.epoch] = config
        body = {"job_id": self.job, "config": config, "schedule": SCHEDULE, "author": "faults",
                "reason": "recreated"}
        for replica in (via, 1 - via):
            r = self._http.post(f"{self.cluster.url(replica)}/v1/jobs", json=body)
            if r.status_code == 201:
                return
        raise AssertionError(f"recreating {self.job} failed: {r.status_code} {r.text}")

    def store_log(self) -> list[dict]:
        """The job's schedule log exactly as the store holds it now (not as any replica remembers it)."""
        with self.cluster.redis.client() as r:
            return [json.loads(v) for v in r.lrange(f"mixer:{{{self.job}}}:schedule", 0, -1)]

    def _restart_replicas_that_never_recovered(self) -> None:
        """A replica whose last answer was a refusal would never serve again on its own ("until restart")."""
        for i in range(2):
            mine = [a for a in self.answers if a.kind == "batch" and a.replica == i]
            if mine and mine[-1].status != 200 and self.cluster.alive(i):
                self.restarted_to_recover.append(i)
                self.cluster.restart(i)

    # -- results ----------------------------------------------------------------------------------------

    def batches(self) -> list[Answer]:
        return [a for a in self.answers if a.kind == "batch"]

    def served(self) -> list[Answer]:
        return [a for a in self.batches() if a.status == 200]

    def refusals(self) -> list[Answer]:
        """Answers that are neither a 200 nor a missing answer."""
        return [a for a in self.answers if a.status is not None and a.status != 200]

    def unexpected(self) -> list[Answer]:
        """Anything the promise forbids: a batch answer that is not 200 or 503 problem+json (with a ``fault``
        and ``Retry-After``); a change answer that is not one of those or a 412 after an attempt whose answer
        was lost."""
        bad = []
        for a in self.refusals():
            if a.status == 503 and a.content_type == PROBLEM and a.fault and a.retry_after:
                continue
            if a.kind == "change" and a.status == 412:
                continue
            bad.append(a)
        return bad

    def recovery(self) -> str:
        """First failed answer to the 200 after the last failed one (the disturbance a client saw)."""
        failed = [k for k, a in enumerate(self.answers) if a.kind == "batch" and a.status != 200]
        if not failed:
            return "none needed"
        after = next((a for a in self.answers[failed[-1]:] if a.kind == "batch" and a.status == 200), None)
        span = f"{after.at - self.answers[failed[0]].at:.1f} s" if after else "never"
        if self.restarted_to_recover:
            return f"until restart ({span} incl. restart)"
        return span

    def longest_wait(self) -> float:
        """The longest any step waited for its 200, over all its attempts (what a trainer would stall)."""
        first: dict[tuple[int, int], float] = {}
        waits = []
        for a in self.batches():
            first.setdefault((a.epoch, a.step), a.sent)
            if a.status == 200:
                waits.append(a.at - first[a.epoch, a.step])
        return max(waits)


@dataclass
class Verdict:
    """How the served bytes compare to a fresh replay of the store's final log."""

    steps_served: int
    mismatched_steps: list[int]
    mismatched_bytes: int


def check_against_replay(pull: Pull, reference_url: str) -> Verdict:
    """Replay each incarnation's final log on a fresh embedded server and compare every 200 with it.

    The replay creates the job with the same config and first schedule, then applies each later version with
    ``requested_step`` = its ``effective_step`` (nothing has been served there, so each lands exactly there).
    Headers are compared too, except the job id and incarnation, which name the replay itself.
    """
    mismatched: list[int] = []
    wrong_bytes = 0
    served_steps = set()
    with httpx.Client(base_url=reference_url, timeout=REQUEST_TIMEOUT_S) as ref:
        for epoch, versions in pull.logs.items():
            ref_job = replay(ref, pull.configs[epoch], versions)
            for answer in (a for a in pull.served() if a.epoch == epoch):
                served_steps.add((epoch, answer.step))
                want = ref.get(f"/v1/jobs/{ref_job}/batches/{answer.step}")
                assert want.status_code == 200, want.text
                diff = batch_difference(answer.body, want.content)
                if diff:
                    mismatched.append(answer.step)
                    wrong_bytes += diff
    return Verdict(len(served_steps), sorted(set(mismatched)), wrong_bytes)


def replay(ref: httpx.Client, config: dict, versions: list[dict]) -> str:
    job = f"replay-{uuid.uuid4().hex[:8]}"
    body = {"job_id": job, "config": config, "schedule": versions[0]["schedule"], "author": "replay",
            "reason": "reference"}
    created = ref.post("/v1/jobs", json=body)
    assert created.status_code == 201, created.text
    for v in versions[1:]:
        etag = ref.get(f"/v1/jobs/{job}/schedule").headers["etag"]
        change = {"schedule": v["schedule"], "requested_step": v["effective_step"], "author": "replay",
                  "reason": "reference"}
        put = ref.put(f"/v1/jobs/{job}/schedule", json=change, headers={"If-Match": etag})
        assert put.status_code == 200 and put.json()["effective_step"] == v["effective_step"], put.text
    return job


IDENTITY = ("job", "incarnation", "log_chain")  # name the log of one incarnation, not the bytes


def batch_difference(got: bytes, want: bytes) -> int:
    """Bytes by which two batch responses differ in what they mean: header (less job id, incarnation and
    log chain), tokens and per-row sources. 0 means the same batch."""
    a, b = wire.decode(got), wire.decode(want)
    head_a = {k: v for k, v in a.header.items() if k not in IDENTITY}
    head_b = {k: v for k, v in b.header.items() if k not in IDENTITY}
    diff = 0 if head_a == head_b else 1
    for x, y in ((a.tokens, b.tokens), (a.source_ids, b.source_ids)):
        xb, yb = np.frombuffer(x.tobytes(), np.uint8), np.frombuffer(y.tobytes(), np.uint8)
        if len(xb) != len(yb):
            diff += max(len(xb), len(yb))
        else:
            diff += int(np.count_nonzero(xb != yb))
    return diff


def new_job(url: str, config: dict | None = None) -> str:
    """A job for a fault run (ids ``faults-*``), created within the harness's request timeout."""
    return create_job(url, config=config or JOB, prefix="faults", author="faults", timeout=REQUEST_TIMEOUT_S)


def token_caches(sources_root: Path) -> list[Path]:
    """The decompressed token files a server reads from (``*.bin`` under a ``.cache``)."""
    return sorted(p for p in sources_root.rglob("*.bin") if ".cache" in p.parts and p.is_file())


def shards(sources_root: Path) -> list[Path]:
    """The prepared, compressed token shards themselves (what a cache is rebuilt from)."""
    return sorted(p for p in sources_root.rglob("tokens-*.zst") if ".cache" not in p.parts)


def corrupt(files: list[Path], stride: int = 64) -> dict[Path, bytes]:
    """Flip the lowest bit of one byte in every ``stride`` bytes of each file, in place (same inode), as a
    bad disk or a stray write would. Returns the original contents, for ``put_back``."""
    originals = {}
    for path in files:
        originals[path] = path.read_bytes()
        data = bytearray(originals[path])
        np.frombuffer(data, np.uint8)[::stride] ^= 1
        _write_in_place(path, bytes(data))
    return originals


def put_back(originals: dict[Path, bytes]) -> None:
    for path, data in originals.items():
        _write_in_place(path, data)


def _write_in_place(path: Path, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _same_schedule(stored: dict, wanted: dict) -> bool:
    """Whether a stored schedule document is ``wanted`` (the service may write weights canonically)."""
    def weights(doc: dict) -> list[dict[str, float]]:
        return [{k: float(_fraction(v)) for k, v in p["weights"].items()} for p in doc["phases"]]

    return weights(stored) == weights(wanted)


def _fraction(value: object) -> float:
    if isinstance(value, str) and "/" in value:
        num, den = value.split("/")
        return int(num) / int(den)
    return float(value)  # type: ignore[arg-type]


@dataclass
class TableRow:
    fault: str
    steps: int
    mismatched_bytes: int
    mismatched_steps: int
    refused_503: int
    no_answer: int
    faults: str
    recovery: str
    longest_wait_s: float

    HEADERS = ("fault", "steps served", "bytes mismatched", "steps mismatched", "503 answers",
               "no answer (conn.)", "503 `fault` values", "recovery", "longest wait for a step")

    def cells(self) -> list[str]:
        return [self.fault, str(self.steps), str(self.mismatched_bytes), str(self.mismatched_steps),
                str(self.refused_503), str(self.no_answer), self.faults or "-", self.recovery,
                f"{self.longest_wait_s:.2f} s"]


def row(name: str, pull: Pull, verdict: Verdict) -> TableRow:
    refusals = [a for a in pull.answers if a.status == 503]
    faults = sorted({a.fault for a in refusals if a.fault})
    return TableRow(name, verdict.steps_served, verdict.mismatched_bytes, len(verdict.mismatched_steps),
                    len(refusals), sum(a.status is None for a in pull.answers), ", ".join(faults),
                    pull.recovery(), pull.longest_wait())


def markdown_table(rows: list[TableRow]) -> str:
    lines = ["| " + " | ".join(TableRow.HEADERS) + " |", "|" + " --- |" * len(TableRow.HEADERS)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)
