"""The trainer-side client against real ``mixer serve`` processes on loopback (and a scripted stub server)."""

from __future__ import annotations

import gc
import io
import itertools
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from service_helpers import (
    JOB,
    OPERATOR_TOKEN,
    READER,
    READER_TOKEN,
    SCHEDULE,
    TOKENS,
    Server,
    local_engine,
    new_job,
)
from torch.utils.data import DataLoader

from client import (
    ChecksumError,
    ClientRequestError,
    JobReplaced,
    MixerClient,
    MixerDataset,
    MixerLoader,
    RequestError,
    ServerError,
)
from client.dataset import STEPS_PER_REQUEST, THREAD_PREFIX, data_parallel_position
from mixer_contract import wire
from mixer_service.engine import MixingEngine
from mixer_service.service.process import free_port

pytestmark = pytest.mark.server_env(TOKENS)
FAST_RETRIES = {"backoff_base": 0.01, "backoff_max": 0.1}
BATCH_ROUTE = 'route="/v1/jobs/{job_id}/batches/{step}"'


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Every test must leave no prefetch thread behind, whatever it did."""
    yield
    assert not prefetch_threads()


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def assert_engine_batches(batches: list[dict[str, Any]], engine: MixingEngine, steps: range) -> None:
    """Loader output is the engine's batch, shifted by one token into (input_ids, labels)."""
    assert [b["step"] for b in batches] == list(steps)
    for batch in batches:
        want = engine.batch(batch["step"])
        tokens = torch.from_numpy(want.tokens.astype(np.int64))
        assert batch["input_ids"].dtype == batch["labels"].dtype == batch["source_ids"].dtype == torch.int64
        assert batch["input_ids"].shape == (JOB["global_batch"], JOB["seq_len"] - 1)
        assert torch.equal(batch["input_ids"], tokens[:, :-1]) and torch.equal(batch["labels"], tokens[:, 1:])
        assert torch.equal(batch["source_ids"], torch.from_numpy(want.source_ids.astype(np.int64)))
        assert batch["sources"] == ["abc", "sotu"]


def assert_same_batches(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [b["step"] for b in got] == [b["step"] for b in want]
    for g, w in zip(got, want, strict=True):
        for key in ("input_ids", "labels", "source_ids"):
            assert torch.equal(g[key], w[key]), (g["step"], key)


def served_count(url: str, status: int) -> float:
    """mixer_requests_total for the batch route with this status: what the server really received."""
    wanted = ("mixer_requests_total{", BATCH_ROUTE, f'status="{status}"')
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if all(w in line for w in wanted))


def batches_served(url: str, job: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf'^mixer_batches_served_total{{job="{job}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_resume_from_state_dict_yields_identical_batches(server):
    job = new_job(server.url, token=OPERATOR_TOKEN)
    with MixerLoader(server.url, job, end_step=10, token=READER_TOKEN) as loader:
        first = []
        for batch in loader:
            first.append(batch)
            if batch["step"] == 4:
                state = loader.state_dict()
    assert [b["step"] for b in first] == list(range(10))
    described = httpx.get(f"{server.url}/v1/jobs/{job}", headers=READER)
    incarnation = described.json()["incarnation"]
    assert {k: state[k] for k in ("next_step", "job", "incarnation")} == \
        {"next_step": 5, "job": job, "incarnation": incarnation}
    [(first_step, last_step, _)] = state["log_chain"]  # one schedule version: one pinned range
    assert (first_step, last_step) == (0, 4)
    buf = io.BytesIO()
    torch.save({"data": [state]}, buf)  # the trainer's checkpoint loads with weights_only=True
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["data"][0]

    with MixerLoader(server.url, job, end_step=10, token=READER_TOKEN) as resumed:
        assert [next(resumed)["step"] for _ in range(2)] == [0, 1]  # steps up to 5 now prefetched in flight
        resumed.load_state_dict(state)
        assert_same_batches(list(resumed), first[5:])
        with pytest.raises(ValueError, match="job"):
            resumed.load_state_dict({"next_step": 0, "job": "another"})


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_batches_equal_the_in_process_engine(server, sources_dir, compression):
    job = new_job(server.url, token=OPERATOR_TOKEN)
    # end: total_steps
    with MixerLoader(server.url, job, token=READER_TOKEN, compression=compression) as loader:
        batches = list(itertools.islice(loader, 10))
        assert loader.end_step == JOB["total_steps"]
    assert_engine_batches(batches, local_engine(sources_dir), range(10))


def test_torch_dataloader_over_the_dataset_wrapper(server, sources_dir):
    job = new_job(server.url, token=OPERATOR_TOKEN)
    dataset = MixerDataset(server.url, job, start_step=3, end_step=6, token=READER_TOKEN)
    assert_engine_batches(list(DataLoader(dataset, batch_size=None)), local_engine(sources_dir), range(3, 6))


def test_progress_reports_reach_the_service(server):
    job = new_job(server.url, token=OPERATOR_TOKEN)
    with MixerClient(server.url, token=READER_TOKEN) as client:
        client.report_progress(job, 7)
        assert client.job(job)["trained_step"] == 7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pin_memory_pins_every_tensor(server):
    job = new_job(server.url, token=OPERATOR_TOKEN)
    with MixerLoader(server.url, job, end_step=2, pin_memory=True, token=READER_TOKEN) as loader:
        for batch in loader:
            assert all(batch[k].is_pinned() for k in ("input_ids", "labels", "source_ids"))


@pytest.fixture
def replicas(sources_dir, tmp_path, clean_redis_url) -> Iterator[list[Server]]:
    servers = [Server(sources_dir, tmp_path / f"r{i}", free_port(), redis_url=clean_redis_url).start()
               for i in range(2)]
    yield servers
    for s in servers:
        s.stop()


def test_failover_to_the_other_replica_when_one_is_killed(replicas, sources_dir):
    a, b = replicas
    job = new_job(a.url)
    client = MixerClient([a.url, b.url], **FAST_RETRIES)
    batches = []
    end, ahead = 30, 4 + STEPS_PER_REQUEST - 1  # the loader asks at most prefetch + steps - 1 steps ahead
    with client, MixerLoader(client, job, end_step=end, prefetch=4) as loader:
        for batch in loader:
            batches.append(batch)
            if batch["step"] == 3:
                a.kill()  # mid-iteration: steps up to 3 + ahead may be in flight or done, not later ones
    assert_engine_batches(batches, local_engine(sources_dir), range(end))
    assert batches_served(b.url, job) >= end - (4 + ahead)


def test_retries_carry_the_loader_through_a_server_restart(sources_dir, tmp_path):
    srv = Server(sources_dir, tmp_path, free_port()).start()
    restarted = threading.Thread(target=srv.start)
    try:
        job = new_job(srv.url)
        client = MixerClient(srv.url, max_retries=300, backoff_base=0.02, backoff_max=0.1)  # ~15 s window
        batches = []
        with client, MixerLoader(client, job, end_step=10, prefetch=2) as loader:
            for batch in loader:
                batches.append(batch)
                if batch["step"] == 2:
                    srv.kill()
                    restarted.start()  # same port, same state dir, while the loader keeps retrying
        restarted.join()
        assert srv.proc is not None and srv.proc.poll() is None
        assert_engine_batches(batches, local_engine(sources_dir), range(10))
    finally:
        if restarted.is_alive():
            restarted.join()
        srv.stop()


@pytest.mark.parametrize("token, job, step, status", [
    ("wrong-token", None, 0, 401),
    (READER_TOKEN, "no-such-job", 0, 404),
    (READER_TOKEN, None, JOB["total_steps"], 422),
])
def test_client_errors_fail_fast_with_a_single_request(server, token, job, step, status):
    job = job or new_job(server.url, token=OPERATOR_TOKEN)
    before = served_count(server.url, status)
    client = MixerClient(server.url, token=token, max_retries=5, backoff_base=60, backoff_max=60)
    with client, MixerLoader(client, job, start_step=step, end_step=step + 1) as loader:
        with pytest.raises(ClientRequestError) as info:
            next(loader)
        assert loader.state_dict()["next_step"] == step  # a failed step is not skipped
    assert info.value.status == status and info.value.attempts == 1 and info.value.detail
    assert served_count(server.url, status) - before == 1


def test_unreachable_replicas_raise_request_error_after_bounded_retries():
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]  # nothing listens there
    with MixerClient(urls, max_retries=3, **FAST_RETRIES) as client:
        with MixerLoader(client, "job", end_step=5) as loader, pytest.raises(RequestError) as info:
            next(loader)
        assert loader.state_dict()["next_step"] == 0
    assert info.value.attempts == 4 and info.value.urls == urls
    assert all(url in str(info.value) for url in urls)


class _Scripted(BaseHTTPRequestHandler):
    """Answers each request with the next (status, headers, body) of the server's script."""

    def do_GET(self) -> None:
        status, headers, body = self.server.script.pop(0) if self.server.script else self.server.default
        self.server.requests += 1
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[ThreadingHTTPServer]:
    stub = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    stub.script, stub.requests, stub.default = [], 0, None
    thread = threading.Thread(target=stub.serve_forever, daemon=True)
    thread.start()
    yield stub
    stub.shutdown()
    stub.server_close()
    thread.join()


def test_corrupt_misaddressed_and_unavailable_answers_are_retried(server, scripted):
    job = new_job(server.url, token=OPERATOR_TOKEN)
    reader = READER
    good, other_step = (httpx.get(f"{server.url}/v1/jobs/{job}/batches/{s}", headers=reader).content
                        for s in (0, 1))
    corrupt = good[:-1] + bytes([good[-1] ^ 0xFF])
    batch_type = {"Content-Type": "application/x-mixer-batch"}
    unavailable = (503, {"Content-Type": "application/problem+json", "Retry-After": "0"},
                   json.dumps({"status": 503, "detail": "state store unavailable"}).encode())
    url = f"http://127.0.0.1:{scripted.server_address[1]}"

    scripted.script = [unavailable, (200, batch_type, corrupt), (200, batch_type, other_step),
                       (200, batch_type, good)]
    with MixerClient(url, max_retries=3, **FAST_RETRIES) as client:
        assert client.batch(job, 0).header["step"] == 0 and scripted.requests == 4

        scripted.requests, scripted.default = 0, (200, batch_type, corrupt)
        with pytest.raises(ChecksumError, match="checksum") as corrupt_info:
            client.batch(job, 0)
        scripted.default = unavailable
        with pytest.raises(ServerError) as unavailable_info:
            client.batch(job, 0)
    assert corrupt_info.value.attempts == 4 and scripted.requests == 8
    assert unavailable_info.value.status == 503 and unavailable_info.value.detail == "state store unavailable"
    assert unavailable_info.value.retry_after == 0


def _ddp_rank(rank: int, world: int, port: int, url: str, job: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # rank/world from the process group
        with MixerLoader(url, job, end_step=3, token=READER_TOKEN) as loader:
            assert (loader.rank, loader.world) == (rank, world)
            torch.save([{k: b[k] for k in ("input_ids", "labels", "source_ids", "step")} for b in loader],
                       f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_pull_slices_that_tile_the_global_batch(server, tmp_path):
    job = new_job(server.url, token=OPERATOR_TOKEN)
    mp.spawn(_ddp_rank, args=(2, free_port(), server.url, job, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    with MixerLoader(server.url, job, end_step=3, world=1, token=READER_TOKEN) as loader:
        whole = list(loader)
    for step, batch in enumerate(whole):
        parts = [r[step] for r in ranks]
        assert [p["step"] for p in parts] == [step, step]
        for key in ("input_ids", "labels", "source_ids"):
            assert torch.equal(torch.cat([p[key] for p in parts]), batch[key])


def test_close_and_garbage_collection_stop_the_prefetch_threads(server):
    job = new_job(server.url, token=OPERATOR_TOKEN)
    loader = MixerLoader(server.url, job, end_step=100, prefetch=4, token=READER_TOKEN)
    next(loader)
    assert prefetch_threads()
    loader.close()
    assert not prefetch_threads()
    loader.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)

    loader = MixerLoader(server.url, job, end_step=100, prefetch=4, token=READER_TOKEN)
    next(loader)
    assert prefetch_threads()
    del loader
    gc.collect()
    assert not prefetch_threads()


def test_every_503_is_retried_and_the_problem_title_and_detail_reach_the_error(scripted):
    """Store behind, source unavailable: the service names the fault; the client says it after retries."""
    engine_like = wire.encode(np.arange(8, dtype=np.uint16).reshape(2, 4), np.zeros(2, dtype=np.int16),
                              {"job": "j", "step": 0, "rank": 0, "world": 1, "sources": ["abc"],
                               "incarnation": "i-7", "a_field_from_the_future": [1]}, "zstd")
    behind = (503, {"Content-Type": "application/problem+json", "Retry-After": "0"},
              json.dumps({"title": "Store behind", "status": 503,
                          "detail": "schedule log of job 'j' is older than this replica's"}).encode())
    url = f"http://127.0.0.1:{scripted.server_address[1]}"
    scripted.script = [behind, behind, (200, {}, engine_like)]
    with MixerClient(url, max_retries=2, **FAST_RETRIES) as client:
        batch = client.batch("j", 0)  # unknown header fields (incarnation, ...) are ignored
        assert batch.tokens.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and scripted.requests == 3
        scripted.default = behind
        with pytest.raises(ServerError) as info:
            client.job("j")
    assert info.value.attempts == 3 and info.value.title == "Store behind"
    assert "HTTP 503 Store behind: schedule log of job 'j' is older" in str(info.value)


def test_the_client_imports_without_torch():
    code = ("import sys; import client, client.operator_cli, client.export; "
            "client.MixerClient('http://127.0.0.1:1').close(); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("env, given, expected", [
    ({}, (None, None), (0, 1)),
    ({"RANK": "1", "WORLD_SIZE": "4"}, (None, None), (1, 4)),  # torchrun, before init_process_group
    ({"RANK": "1", "WORLD_SIZE": "4"}, (1, 4), (1, 4)),
    ({}, (2, 4), (2, 4)),
])
def test_rank_and_world_come_from_arguments_or_the_environment(monkeypatch, env, given, expected):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert data_parallel_position(*given) == expected


def test_contradicting_rank_or_world_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"rank: contradictory values \(argument says 0, environment"):
        MixerLoader("http://127.0.0.1:1", "job", rank=0)
    with pytest.raises(ValueError, match="world: contradictory"):
        data_parallel_position(None, 4)
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="RANK='one'"):
        data_parallel_position()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert data_parallel_position() == (0, 1)
        monkeypatch.setenv("WORLD_SIZE", "2")  # the group and the environment disagree
        with pytest.raises(ValueError, match="world: contradictory values .*process group says 1"):
            data_parallel_position()
    finally:
        dist.destroy_process_group()


def test_a_loader_under_torchrun_env_reads_only_its_rows(server, monkeypatch):
    """The trap the issue describes: loader built before the process group gets its slice from the env."""
    job = new_job(server.url, token=OPERATOR_TOKEN)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with MixerLoader(server.url, job, end_step=2, token=READER_TOKEN) as loader:
        mine = list(loader)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    with MixerLoader(server.url, job, end_step=2, token=READER_TOKEN) as loader:
        whole = list(loader)
    half = JOB["global_batch"] // 2
    for step in range(2):
        assert torch.equal(mine[step]["input_ids"], whole[step]["input_ids"][half:])


def test_a_job_recreated_under_the_same_id_stops_the_loader(sources_dir, tmp_path):
    """The store was wiped and the job recreated: its steps are another job's, so the run must not go on."""
    port = free_port()
    body = {"job_id": "spt", "config": JOB, "schedule": SCHEDULE}
    with Server(sources_dir, tmp_path / "before", port) as srv:
        assert httpx.post(f"{srv.url}/v1/jobs", json=body).status_code == 201
        loader = MixerLoader(srv.url, "spt", end_step=10, prefetch=1)
        first = [next(loader)["step"] for _ in range(3)]
        # drop the look-ahead: step 3, prefetched before the wipe, is the old job's own step and is fine
        # to hand out; this test is about the first batch fetched from the new incarnation
        loader.load_state_dict(loader.state_dict())
    with Server(sources_dir, tmp_path / "after", port) as srv:  # fresh state: a new incarnation of "spt"
        assert httpx.post(f"{srv.url}/v1/jobs", json=body).status_code == 201
        try:
            with pytest.raises(JobReplaced, match="recreated") as raised:
                next(loader)
            state = loader.state_dict()
        finally:
            loader.close()
    assert first == [0, 1, 2] and state["next_step"] == 3, "the refused step is not skipped"
    assert raised.value.expected == state["incarnation"] != raised.value.got


def test_log_pins_keep_one_range_per_history_and_catch_a_rewritten_step() -> None:
    """The loader's record of which schedule history each received step came from (issue 17)."""
    from client.errors import HistoryRewritten
    from client.history import LogPins

    pins = LogPins()
    for step in range(10):
        pins.check(step, "v1")
    for step in range(10, 20):
        pins.check(step, "v2")
    pins.check(25, "v2")
    pins.check(5, "v1")  # the same step, the same history: a retry, a replica failover, a resume
    pins.check(3, None)  # a server from before log chains: nothing to compare
    assert pins.state() == [[0, 9, "v1"], [10, 19, "v2"], [25, 25, "v2"]]
    with pytest.raises(HistoryRewritten, match="step 12 was received before") as caught:
        pins.check(12, "v3")
    assert (caught.value.step, caught.value.expected, caught.value.got) == (12, "v2", "v3")

    resumed = LogPins()
    resumed.load(pins.state())
    assert resumed.state() == pins.state()
    with pytest.raises(HistoryRewritten):
        resumed.check(0, "v9")
    for step in range(20, 25):  # filling the gap joins the two ranges
        resumed.check(step, "v2")
    assert resumed.state() == [[0, 9, "v1"], [10, 25, "v2"]]
    contradicting = LogPins()
    contradicting.check(15, "other")
    with pytest.raises(HistoryRewritten):
        contradicting.load(pins.state())

    # A run resumed past the rewritten steps: step 60 is new, but its version took effect at step 30,
    # inside steps received under another log.
    resumed_late = LogPins()
    for step in range(60):
        resumed_late.check(step, "v1", 0)
    resumed_late.check(60, "v1", 0)
    with pytest.raises(HistoryRewritten, match="took effect at step 30, but step 30 was received") as late:
        resumed_late.check(61, "v2", 30)
    assert late.value.step == 30
    resumed_late.check(70, "v2", 61)  # a version that took effect after every step received: fine
