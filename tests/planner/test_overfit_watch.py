"""The overfitting watch: eval curves in both stores, the forecast on simulated SPT runs, and the API/CLI
against a real ``mixer serve`` (evals posted with the reader token, proposal applied through If-Match)."""

from __future__ import annotations

import math
from dataclasses import replace

import httpx
import numpy as np
import pytest
from service_helpers import JOB, OPERATOR, OPERATOR_TOKEN, READER, READER_TOKEN, TOKENS
from store_fixtures import CONFIG, SCHEDULE

from client import ClientRequestError, MixerClient, MixerLoader
from experiments.overfit_watch import LAW, Job, run_once
from mixer_contract.errors import InvalidInput
from mixer_service.cli import main
from mixer_service.errors import InvalidInput
from mixer_service.service.process import free_port
from mixer_service.store import evals as evals_module
from mixer_service.store.evals import EvalPoint, open_evals

pytestmark = pytest.mark.server_env(TOKENS)



# --- the store --------------------------------------------------------------------------------------------


def test_eval_curves_are_bounded_per_incarnation_and_latest_wins(location, monkeypatch):
    monkeypatch.setattr(evals_module, "MAX_POINTS", 5)
    with location.open() as store:
        store.create_job("job", CONFIG, SCHEDULE, "alice", "initial")
        first = store.head("job").incarnation
        curves = open_evals(store)
        for step in range(8):
            curves.append("job", first, "domain", EvalPoint.checked(step, 3.0 - step / 10, 100 * step))
        curves.append("job", first, "domain", EvalPoint.checked(7, 1.5, 700))  # a resumed run re-evaluates
        curves.append("job", first, "web", EvalPoint.checked(3, 4.0, 300))
        curves.append("job", "0" * 32, "domain", EvalPoint.checked(9, 9.0, 1))  # another incarnation
        domain = curves.curve("job", first, "domain")
        assert [p.step for p in domain] == [5, 6, 7]  # the last 5 posts: 5 6 7 7 and another incarnation's
        assert domain[-1] == EvalPoint(7, 1.5, 700)
        assert sorted(curves.curves("job", first)) == ["domain", "web"]
        assert curves.law("job", first) is None
        curves.set_law("job", first, {"alpha1": 0.1})
        assert curves.law("job", first) == {"alpha1": 0.1} and curves.law("job", "1" * 32) is None


@pytest.mark.parametrize("step,loss,tokens", [(-1, 1.0, 0), (0, -0.1, 0), (0, math.nan, 0), (0, 1e9, 0),
                                              (0, True, 0), (0, 1.0, -5), (2**53, 1.0, 0)])
def test_eval_points_are_bounded(step, loss, tokens):
    with pytest.raises(InvalidInput):
        EvalPoint.checked(step, loss, tokens)


# --- the forecast on the simulated trainer (ground 1, small) ----------------------------------------------


def test_watch_warns_before_the_turn_up_and_its_proposal_lowers_the_final_loss():
    run = run_once(Job(evals=40), 0.10, seed=0, act=True)
    assert run["first_warning_step"] is not None and run["first_warning_step"] < run["true_turn_up_step"]
    assert run["proposal"] is not None and run["proposal"]["delta"] < 0.10
    assert run["final_domain_loss"] < run["baseline_final_domain_loss"] - 0.01
    assert run["final_web_loss"] <= run["baseline_final_web_loss"] + 0.01


def test_watch_stays_quiet_on_a_run_that_does_not_overfit():
    run = run_once(Job(evals=25), 0.05, seed=1000, act=False)
    assert run["true_turn_up_step"] is None and run["warnings"] == 0


# --- the API and the CLI against a real server ------------------------------------------------------------


# The simulation's law with T rescaled to this job's 2000 steps of 512 tokens: turns up at ~35% at δ = 10%.
SCALED = replace(LAW, tokens_unit=LAW.tokens_unit * JOB["total_steps"] * 512 / 2e11)


def _curve(step: int) -> float:
    return float(SCALED.test_loss((step + 1) * 512, 0.1))


def test_evals_forecast_gauge_and_apply(server, monkeypatch, capsys):
    op = OPERATOR
    schedule = {"phases": [{"start_step": 0, "weights": {"abc": 0.1, "sotu": 0.9}}]}
    body = {"job_id": "watch", "config": JOB, "schedule": schedule, "author": "alice", "reason": "initial"}
    assert httpx.post(f"{server.url}/v1/jobs", json=body, headers=op).status_code == 201
    reader = MixerClient(server.url, token=READER_TOKEN)
    for step in range(49, 650, 50):  # the reader token is enough, like progress reports
        reader.post_eval("watch", step, "abc", _curve(step), tokens=step * 512)
        reader.post_eval("watch", step, "sotu", 4.0 - 0.1 * math.log1p(step), tokens=step * 512)
    rd = READER
    bad = [({"step": 2000, "source": "abc", "loss": 1.0}, 422),
           ({"step": 5, "source": "no", "loss": 1.0}, 404),
           ({"step": 5, "source": "abc", "loss": -1.0}, 422),
           ({"step": 5, "source": "abc", "loss": "1"}, 422)]
    for wrong, status in bad:
        assert httpx.post(f"{server.url}/v1/jobs/watch/evals", json=wrong, headers=rd).status_code == status
    forecast = reader.get("/v1/jobs/watch/forecast")
    assert forecast["warning"] and 650 < forecast["turn_up_step"] < 2000
    assert forecast["proposal"] is None and "no law attached" in forecast["notes"][0]
    assert forecast["observed"][-1][0] == 649 and len(forecast["curve"]) > 10

    law = SCALED.to_dict()
    assert httpx.put(f"{server.url}/v1/jobs/watch/forecast/law", json={"law": law},
                     headers=rd).status_code == 403
    assert httpx.put(f"{server.url}/v1/jobs/watch/forecast/law", json={"law": law},
                     headers=op).status_code == 200
    forecast = reader.get("/v1/jobs/watch/forecast")
    proposal = forecast["proposal"]
    assert proposal is not None and proposal["predicted_final_loss"] < proposal["baseline_final_loss"]
    metrics = httpx.get(f"{server.url}/metrics", headers=rd).text
    expected = forecast["steps_to_overfit"]
    assert f'mixer_forecast_steps_to_overfit{{job="watch",source="abc"}} {float(expected)}' in metrics

    monkeypatch.setenv("MIXER_URL", server.url)
    monkeypatch.setenv("MIXER_TOKEN", OPERATOR_TOKEN)
    capsys.readouterr()
    assert main(["forecast", "watch"]) == 0
    assert "turn-up" in capsys.readouterr().out
    assert main(["forecast", "watch", "--apply"]) == 0
    assert "applied: schedule v2" in capsys.readouterr().out
    history = reader.get("/v1/jobs/watch/schedule/history")["versions"]
    assert history[-1]["reason"].startswith(f"forecast {forecast['forecast_id']}")
    assert np.isclose(float(eval_weight(history[-1]["schedule"]["phases"][-1]["weights"]["abc"])),
                      proposal["delta"])
    change = {"schedule": proposal["schedule"], "author": "bob", "reason": "stale forecast"}
    stale = httpx.put(f"{server.url}/v1/jobs/watch/schedule", json=change,
                      headers=op | {"If-Match": forecast["etag"]})
    assert stale.status_code == 412  # a forecast computed under v1 cannot be applied over v2
    reader.close()


def _create(server: Server, job: str, delta: float) -> None:
    schedule = {"phases": [{"start_step": 0, "weights": {"abc": delta, "sotu": round(1 - delta, 9)}}]}
    body = {"job_id": job, "config": JOB, "schedule": schedule, "author": "alice", "reason": "initial"}
    op = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    assert httpx.post(f"{server.url}/v1/jobs", json=body, headers=op).status_code == 201


def test_loader_reports_evals_through_its_own_replicas(server):
    """A MixerLoader user feeds the watch without a MixerClient: the loader's URLs, token and failover."""
    _create(server, "loader-evals", 0.1)
    dead = f"http://127.0.0.1:{free_port()}"  # the first replica is down: the post fails over
    with MixerLoader([dead, server.url], "loader-evals", token=READER_TOKEN, end_step=3) as loader:
        loader.report_eval(0, "abc", 3.5, tokens=512)
        assert next(loader)["step"] == 0
        loader.report_eval(1, "sotu", 4.25, tokens=1024)
        with pytest.raises(ClientRequestError) as refused:
            loader.report_eval(1, "no-such-source", 1.0)
        assert refused.value.status == 404
    with MixerClient(server.url, token=READER_TOKEN) as reader:
        curves = reader.get("/v1/jobs/loader-evals/evals")["curves"]
    assert curves == {"abc": [[0, 3.5, 512]], "sotu": [[1, 4.25, 1024]]}


def eval_weight(text: str) -> float:
    num, _, den = str(text).partition("/")
    return float(num) / float(den or 1)
