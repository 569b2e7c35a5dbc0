"""The operator CLI (``mixer status | jobs | schedule | repetitions``) against a real server with tokens.

Commands run in-process through ``mixer_service.cli.main`` (the same entry point as the console script);
one test also runs the real ``mixer`` process to check what a shell script sees.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from service_helpers import (
    JOB,
    OPERATOR,
    OPERATOR_TOKEN,
    READER,
    READER_TOKEN,
    SCHEDULE,
    TOKENS,
    Server,
    prepare_real_sources,
)

from client.operator_cli import exit_code_for, parse_weights, table
from mixer_service.cli import main
from mixer_service.service.process import free_port

pytestmark = pytest.mark.server_env(TOKENS)
SERVED, TRAINED = 20, 15


_jobs = iter(range(1000))


@pytest.fixture
def job(server):
    """A fresh job with steps 0..19 served and step 15 trained."""
    job_id = f"cli-{next(_jobs)}"
    headers = OPERATOR
    with httpx.Client(base_url=server.url, headers=headers) as http:
        body = {"job_id": job_id, "config": JOB, "schedule": SCHEDULE, "author": "alice",
                "reason": "initial"}
        assert http.post("/v1/jobs", json=body).status_code == 201
        for step in range(SERVED):
            assert http.get(f"/v1/jobs/{job_id}/batches/{step}").status_code == 200
        assert http.put(f"/v1/jobs/{job_id}/progress", json={"trained_step": TRAINED}).status_code == 200
    return job_id


@pytest.fixture
def mixer(server, monkeypatch, capsys):
    """Run ``mixer ARGS`` against the server as the operator; returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("MIXER_URL", server.url)
    monkeypatch.setenv("MIXER_TOKEN", OPERATOR_TOKEN)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def api(server, path):
    return httpx.get(server.url + path, headers=READER).json()


def test_status_reports_health_readiness_and_jobs(mixer, job):
    code, out, err = mixer("status")
    assert code == 0, err
    assert "ready" in out and "(2 sources)" in out and job in out
    code, out, _ = mixer("status", "--json")
    data = json.loads(out)
    assert data["health"]["status"] == "ok" and data["ready"]["status"] == "ready"
    mine = next(j for j in data["jobs"] if j["job_id"] == job)
    assert (mine["served_high_water"], mine["trained_step"]) == (SERVED - 1, TRAINED)


def test_jobs_lists_aligned_columns_and_shows_one_job(mixer, job, server):
    code, out, _ = mixer("jobs")
    assert code == 0
    lines = out.splitlines()
    header, row = lines[0], next(line for line in lines if line.startswith(job + " "))
    # numbers are right-aligned under their header
    for column, value in (("SERVED", f"{SERVED - 1}"), ("TRAINED", f"{TRAINED}")):
        end = header.index(column) + len(column)
        assert row[end - len(value): end] == value, (header, row)
    code, out, _ = mixer("jobs", "--json")
    assert job in [j["job_id"] for j in json.loads(out)["jobs"]]

    code, out, _ = mixer("jobs", job)
    tokens = api(server, f"/v1/jobs/{job}")["tokens_through_high_water"]
    assert code == 0 and "served high water" in out
    assert f"{tokens['abc']:,}" in out and f"{tokens['sotu']:,}" in out
    code, out, _ = mixer("jobs", job, "--json")
    assert json.loads(out)["tokens_through_high_water"] == tokens


def test_schedule_get_set_history(mixer, job, tmp_path):
    code, out, _ = mixer("schedule", "get", job)
    assert code == 0 and 'v1 (ETag "v1.' in out and "alice" in out
    assert json.loads(mixer("schedule", "get", job, "--json")[1])["etag"].startswith('"v1.')

    code, out, err = mixer("schedule", "set", job, "--weights", "abc=0.2,sotu=0.8", "--requested-step", "5",
                           "--author", "ops", "--reason", "more domain")
    assert code == 0, err
    assert f"v2 takes effect at step {SERVED}" in out  # never before a step already served

    change = tmp_path / "anneal.json"
    change.write_text(json.dumps({"phases": [{"start_step": 0, "weights": {"abc": "1/4", "sotu": "3/4"}},
                                             {"start_step": 100, "weights": {"abc": 1}, "ramp": False}]}))
    code, out, err = mixer("schedule", "set", job, "--file", str(change), "--reason", "anneal", "--json")
    assert code == 0, err
    new = json.loads(out)
    assert new["version"] == 3 and new["schedule"]["phases"][1]["start_step"] == 100

    code, out, _ = mixer("schedule", "history", job)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4 and lines[0].split()[:2] == ["VERSION", "EFFECTIVE"]
    assert "more domain" in lines[2] and "ops" in lines[2] and "anneal" in lines[3]
    versions = json.loads(mixer("schedule", "history", job, "--json")[1])["versions"]
    assert [v["version"] for v in versions] == [1, 2, 3] and versions[1]["author"] == "ops"


def test_a_whole_change_body_from_stdin(mixer, job, monkeypatch):
    import io

    body = {"schedule": {"phases": [{"start_step": 0, "weights": {"abc": 0.5, "sotu": 0.5}}]},
            "requested_step": 50, "author": "carol", "reason": "from a file"}
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(body)))
    code, out, err = mixer("schedule", "set", job, "--file", "-", "--json")
    assert code == 0, err
    assert json.loads(out)["effective_step"] == 50 and json.loads(out)["author"] == "carol"


def test_repetitions_summary_histogram_document_and_at_least(mixer, job, server):
    want = api(server, f"/v1/jobs/{job}/repetitions")
    code, out, _ = mixer("repetitions", job)
    assert code == 0 and f"{want['min']} / {want['max']}" in out and "abc" in out
    assert json.loads(mixer("repetitions", job, "--json")[1]) == want

    hist = api(server, f"/v1/jobs/{job}/repetitions/histogram?step=1999")
    code, out, _ = mixer("repetitions", job, "--histogram", "--step", "1999")
    assert code == 0 and out.splitlines()[1].split() == ["SEEN", "DOCUMENTS"]
    assert len(out.splitlines()) == 2 + len(hist["histogram"])
    assert json.loads(mixer("repetitions", job, "--histogram", "--step", "1999", "--json")[1]) == hist

    top = max(map(int, hist["histogram"]))
    code, out, _ = mixer("repetitions", job, "--at-least", str(top), "--step", "1999", "--limit", "3",
                         "--json")
    data = json.loads(out)
    assert code == 0 and data["total"] == hist["histogram"][str(top)] and len(data["documents"]) <= 3
    doc = data["documents"][0]
    code, out, _ = mixer("repetitions", job, "--doc", str(doc), "--step", "1999")
    assert code == 0 and f"document {doc}: seen {top} times" in out
    code, out, _ = mixer("repetitions", job, "--source", "sotu", "--json")
    assert json.loads(out)["source"] == "sotu"


@pytest.mark.parametrize("args, code, message", [
    (("jobs", "nope"), 3, "unknown job"),
    (("repetitions", "nope"), 3, "unknown job"),
    (("repetitions", "{job}", "--source", "chem"), 3, "chem"),
    (("schedule", "set", "{job}", "--weights", "abc=0.5,sotu=0.6", "--reason", "r"), 2, "must sum to 1"),
    (("schedule", "set", "{job}", "--weights", "chem=1", "--reason", "r"), 2, "unknown source"),
    (("schedule", "set", "{job}", "--weights", "abc=1", "--reason", "r", "--if-match", "v7"), 4, "412"),
    (("schedule", "set", "{job}", "--weights", "abc", "--reason", "r"), 2, "expected name=weight"),
    (("schedule", "set", "{job}", "--file", "/nonexistent.json", "--reason", "r"), 2, "No such file"),
    (("repetitions", "{job}", "--step", "999999"), 2, "step"),
])
def test_failures_are_one_line_with_their_exit_code(mixer, job, server, args, code, message):
    got, out, err = mixer(*(a.format(job=job) for a in args))
    assert got == code, err
    assert message in err and len(err.strip().splitlines()) == 1 and out == ""
    assert len(api(server, f"/v1/jobs/{job}/schedule/history")["versions"]) == 1  # nothing changed


def test_stale_if_match_after_a_concurrent_change_exits_4(mixer, job):
    assert mixer("schedule", "set", job, "--weights", "abc=0.1,sotu=0.9", "--reason", "first")[0] == 0
    code, _, err = mixer("schedule", "set", job, "--weights", "abc=0.2,sotu=0.8", "--reason", "second",
                         "--if-match", "v1")
    assert code == 4 and "HTTP 412" in err


def test_usage_errors_exit_2(mixer, job):
    assert mixer("schedule", "set", job, "--weights", "abc=1")[0] == 2  # --reason missing
    assert mixer("schedule", "set", job, "--reason", "r")[0] == 2  # neither --file nor --weights
    assert mixer("repetitions", job, "--histogram", "--doc", "1")[0] == 2  # one view at a time


def test_tokens_come_from_the_environment(mixer, job, monkeypatch):
    monkeypatch.setenv("MIXER_TOKEN", READER_TOKEN)
    assert mixer("jobs", job)[0] == 0
    code, _, err = mixer("schedule", "set", job, "--weights", "abc=1", "--reason", "r")
    assert code == 2 and "HTTP 403" in err and "operator token" in err
    monkeypatch.delenv("MIXER_TOKEN")
    code, _, err = mixer("status")
    assert code == 2 and "HTTP 401" in err


def test_unreachable_server_exits_5(mixer):
    code, out, err = mixer("status", "--url", f"http://127.0.0.1:{free_port()}")
    assert code == 5 and "cannot reach" in err and out == ""
    assert "is mixer serve running there? --url or $MIXER_URL names the server" in err  # the next step


def test_store_down_exits_5(tmp_path, redis_server, monkeypatch, capsys):
    sources = prepare_real_sources(tmp_path / "sources", domain_docs=50, web_docs=5)
    srv = Server(sources, tmp_path / "state", free_port(), redis_url=redis_server.url).start()
    try:
        monkeypatch.setenv("MIXER_URL", srv.url)
        monkeypatch.delenv("MIXER_TOKEN", raising=False)
        assert main(["status"]) == 0
        redis_server.stop()
        capsys.readouterr()
        assert main(["status"]) == 5
        assert "unavailable" in capsys.readouterr().out
        assert main(["jobs", "--timeout", "30"]) == 5
        assert "HTTP 503" in capsys.readouterr().err
    finally:
        srv.stop()


def test_the_console_script_exit_code_reaches_the_shell(server):
    env = {"MIXER_URL": server.url, "MIXER_TOKEN": READER_TOKEN, "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "mixer_service.cli", "jobs", "nope"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 3 and r.stderr.startswith("mixer jobs: HTTP 404") and r.stdout == ""


def test_helpers():
    assert parse_weights("abc=0.1, sotu=9/10") == {"abc": 0.1, "sotu": "9/10"}
    assert [exit_code_for(s) for s in (400, 401, 403, 404, 409, 412, 413, 422, 428, 500, 503)] == \
        [2, 2, 2, 3, 4, 4, 2, 2, 2, 5, 5]
    assert table(["NAME", "N"], [["a", 1], ["bb", 1000]]).splitlines() == ["NAME      N", "a         1",
                                                                         "bb    1,000"]


def test_jobs_and_status_list_a_job_this_replica_cannot_serve(tmp_path, monkeypatch, capsys):
    """A job whose source is gone is shown with why, and the others still are (it used to fail the list)."""
    sources = prepare_real_sources(tmp_path / "sources", domain_docs=100, web_docs=20)
    state = tmp_path / "state"
    with Server(sources, state) as srv:
        for job_id, config, weights in (("broken", JOB | {"allow_wrap": True}, {"abc": 0.1, "sotu": 0.9}),
                                        ("fine", JOB | {"sources": [{"name": "abc", "role": "repeat"}]},
                                         {"abc": 1})):
            body = {"job_id": job_id, "config": config,
                    "schedule": {"phases": [{"start_step": 0, "weights": weights}]}}
            assert httpx.post(f"{srv.url}/v1/jobs", json=body).status_code == 201
    (sources / "sotu" / "meta.json").unlink()
    with Server(sources, state) as srv:
        monkeypatch.setenv("MIXER_URL", srv.url)
        capsys.readouterr()
        assert main(["jobs"]) == 0
        rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
        assert "UNAVAILABLE" in rows["broken"] and "sotu" in rows["broken"] and "abc" in rows["fine"]
        main(["status", "--json"])
        listed = {j["job_id"]: j for j in json.loads(capsys.readouterr().out)["jobs"]}
        assert "sotu" in listed["broken"]["error"]["detail"] and listed["fine"]["schedule_version"] == 1


def test_if_match_takes_the_bare_version_it_shows(mixer, job, server):
    """Found: ``--if-match v1`` (the metavar's own form) was refused as a malformed ETag even when current."""
    change = ("schedule", "set", job, "--reason", "r", "--weights")
    assert mixer(*change, "abc=0.1,sotu=0.9", "--if-match", "v1")[0] == 0
    assert mixer(*change, "abc=0.2,sotu=0.8", "--if-match", "2")[0] == 0
    assert len(api(server, f"/v1/jobs/{job}/schedule/history")["versions"]) == 3
    code, _, err = mixer("schedule", "set", job, "--weights", "abc=1", "--reason", "r", "--if-match", "v-1")
    assert code == 2 and "expected vN" in err
