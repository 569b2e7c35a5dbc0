"""The overfitting watch: eval curves in both stores, the forecast on simulated SPT runs, and the API/CLI
against a real ``mixer serve`` (evals posted with the reader token, proposal applied through If-Match)."""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import httpx
import numpy as np
import pytest
from service_helpers import JOB, OPERATOR, OPERATOR_TOKEN, READER, READER_TOKEN, TOKENS, Server
from store_fixtures import CONFIG, SCHEDULE

from client import ClientRequestError, MixerClient, MixerLoader
from experiments.overfit_watch import (
    LAW,
    NAMES,
    PILOT_LAW,
    SEQ_LEN,
    Job,
    constant,
    domain_loss,
    plan_for,
    run_once,
    web_loss,
)
from mixer_contract.errors import InvalidInput
from mixer_service.cli import main
from mixer_service.planner.watch import (
    AUTO_AUTHOR,
    Proposal,
    RunPlan,
    WatchPolicy,
    auto_apply_refusal,
    forecast,
)
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


def _undertrained_run(web: bool = True) -> dict:
    """12 evals of a simulated δ = 5% run: no overfitting, and the law says more domain data would help."""
    job = Job(evals=25)
    plan = plan_for([(0, constant(0.05))])
    rng = np.random.default_rng(1)
    steps = np.array(job.eval_steps[:12])
    dom = np.array([domain_loss(plan, int(s)) + rng.normal(0, 0.003) for s in steps])
    web_curve = np.array([web_loss(plan, int(s)) + rng.normal(0, 0.003) for s in steps])
    run = RunPlan(plan, 0, job.chunks, SEQ_LEN, job.total_steps, int(steps[-1]) + 1)
    return {"run": run, "names": NAMES, "steps": steps, "loss": dom,
            "web": (steps, web_curve) if web else None, "law": PILOT_LAW}


def test_proposals_trade_domain_loss_against_a_set_web_loss_bound():
    """More domain data lowers the final domain loss but costs web loss: the bound decides how much."""
    loose = forecast(**_undertrained_run(), max_web_loss_increase=0.05)
    assert not loose.warning and loose.max_web_loss_increase == 0.05
    raised = loose.proposal
    assert raised is not None and raised.delta > raised.from_delta == 0.05
    assert raised.predicted_final_loss < raised.baseline_final_loss
    cost = raised.predicted_web_change
    assert cost is not None and 0 < cost <= 0.05
    tight = forecast(**_undertrained_run(), max_web_loss_increase=cost / 2)
    assert tight.proposal is not None and tight.proposal.predicted_web_change <= cost / 2
    assert raised.predicted_final_loss < tight.proposal.predicted_final_loss < raised.baseline_final_loss
    assert forecast(**_undertrained_run(), max_web_loss_increase=0.0).proposal is None  # every gain costs web
    blind = forecast(**_undertrained_run(web=False), max_web_loss_increase=0.05)
    assert blind.proposal is None and "cannot be bounded" in blind.notes[-1]  # unknown cost: no raise


def test_on_a_warning_the_law_may_not_raise_the_domain_share():
    """The run's own curve outranks the cross-run law on direction. Evals of a real CPU run (gpt-1m, ABC
    tunes at δ = 0.5, 24 domain sequences, its first warning) with a law far outside its regime: the
    law alone would raise δ to 0.75."""
    run = RunPlan(plan_for([(0, constant(0.5))], batch=8), 0, 24, 65, 120, 39)  # 8 sequences of 65 tokens
    steps = np.array([4, 9, 14, 19, 24, 29, 34])
    domain = np.array([4.86, 4.141, 3.909, 3.799, 3.782, 3.771, 3.755])
    web = np.array([4.684, 3.745, 3.224, 3.063, 2.994, 2.997, 2.973])
    law = replace(LAW, tokens_unit=LAW.tokens_unit * 120 * 8 * 65 / 2e11)
    found = forecast(run, NAMES, steps, domain, (steps, web), law, max_web_loss_increase=0.01)
    assert found.warning
    assert found.proposal is None or found.proposal.delta < found.proposal.from_delta


def test_a_gap_the_evals_cannot_fix_keeps_the_pilots_gap():
    """Evals of a real CPU run (gpt-1m, 25 ABC sequences at δ = 0.1, to its first warning): fitted on 8
    noisy points the gap's amplitude comes out negative; read as "no gap", the law found no lower δ worth
    proposing on a run that had just warned."""
    run = RunPlan(plan_for([(0, constant(0.1))], batch=8), 0, 25, 65, 500, 85)
    steps = np.arange(9, 80, 10)
    domain = np.array([4.984, 4.435, 4.291, 3.991, 3.97, 4.16, 4.176, 4.198])
    web = np.array([4.57, 3.38, 2.834, 2.691, 2.579, 2.533, 2.486, 2.458])
    law = replace(LAW, tokens_unit=LAW.tokens_unit * 500 * 8 * 65 / 2e11)
    found = forecast(run, NAMES, steps, domain, (steps, web), law, max_web_loss_increase=0.01)
    assert found.warning and found.proposal is not None and found.proposal.delta < 0.1


def test_a_law_read_outside_its_regime_proposes_nothing():
    """Evals of a real CPU run at δ = 0.3 to its first warning: the law, written for δ ≤ 10%, predicts a
    final loss of ~5e5 without a change and −333 with one; such numbers are not a proposal."""
    run = RunPlan(plan_for([(0, constant(0.3))], batch=8), 0, 25, 65, 400, 64)
    steps = np.arange(4, 60, 5)
    domain = np.array([5.102, 4.794, 4.361, 4.24, 3.969, 4.059, 3.89, 3.907, 4.043, 3.936, 3.898, 4.115])
    web = np.array([4.907, 4.474, 3.827, 3.291, 2.969, 2.828, 2.724, 2.665, 2.64, 2.603, 2.579, 2.559])
    law = replace(LAW, tokens_unit=LAW.tokens_unit * 400 * 8 * 65 / 2e11)
    found = forecast(run, NAMES, steps, domain, (steps, web), law, max_web_loss_increase=0.01)
    assert found.warning and found.proposal is None and "outside its regime" in found.notes[-1]


@functools.cache
def _quiet_forecast() -> object:
    return forecast(**_undertrained_run())


def _warned(gain: float = 0.05, delta: float = 0.04, web_change: float | None = -0.001,
            warning: bool = True) -> object:
    found = _quiet_forecast()
    proposal = Proposal("step", 100, 0.1, delta, 5.0, 2.0, 2.0 + gain, web_change)
    return replace(found, warning=warning, proposal=proposal)


@pytest.mark.parametrize("policy,found,last,since,refused", [
    (WatchPolicy(), _warned(), None, 0, "auto_apply is off"),
    (WatchPolicy(auto_apply=True), _warned(warning=False), None, 0, "no warning"),
    (WatchPolicy(auto_apply=True, min_gain=0.1), _warned(gain=0.05), None, 0, "min_gain"),
    (WatchPolicy(auto_apply=True, max_weight_change=0.05), _warned(delta=0.04), None, 0, "max_weight_change"),
    (WatchPolicy(auto_apply=True), _warned(web_change=None), None, 0, "web-loss cost"),
    (WatchPolicy(auto_apply=True, max_web_loss_increase=0.001), _warned(delta=0.15, web_change=0.002),
     None, 0, "max_web_loss_increase"),
    (WatchPolicy(auto_apply=True, cooldown_evals=3), _warned(), 50, 2, "cooldown"),
    (WatchPolicy(auto_apply=True, cooldown_evals=3), _warned(), 50, 3, None),
    (WatchPolicy(auto_apply=True, max_weight_change=0.06), _warned(delta=0.04), None, 0, None),
])
def test_auto_apply_stays_within_every_limit(policy, found, last, since, refused):
    why = auto_apply_refusal(policy, found, last, since)
    assert (why is None) if refused is None else (refused in why)


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


def _wait_for(check, what: str, deadline_s: float = 120.0):
    """Poll ``check`` until it returns something truthy (the watch acts after the eval post's response)."""
    import time

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _auto_applies(url: str, job: str, outcome: str) -> float:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {READER_TOKEN}"}).text
    line = f'mixer_forecast_auto_applies_total{{job="{job}",outcome="{outcome}"}} '
    return next((float(row[len(line):]) for row in text.splitlines() if row.startswith(line)), 0.0)


def test_policy_applies_within_limits_once_and_keeps_its_cooldown_across_a_restart(sources_dir, tmp_path):
    """Off by default; refused outside its limits; on within them, one If-Match change whose reason names
    the forecast; a restarted replica reads the cooldown from the schedule history, not from memory."""
    state = tmp_path / "state"
    srv = Server(sources_dir, state, env=TOKENS).start()
    op = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    try:
        _create(srv, "auto", 0.1)
        reader = MixerClient(srv.url, token=READER_TOKEN)
        policy_url = f"{srv.url}/v1/jobs/auto/forecast/policy"
        assert reader.get("/v1/jobs/auto/forecast/policy")["policy"] == WatchPolicy().to_dict()
        assert httpx.put(f"{srv.url}/v1/jobs/auto/forecast/law", json={"law": SCALED.to_dict()},
                         headers=op).status_code == 200
        for step in range(49, 600, 50):
            reader.post_eval("auto", step, "abc", _curve(step), tokens=step * 512)
            reader.post_eval("auto", step, "sotu", 4.0 - 0.1 * math.log1p(step), tokens=step * 512)
        reader.post_eval("auto", 649, "sotu", 4.0 - 0.1 * math.log1p(649), tokens=649 * 512)
        reader.post_eval("auto", 649, "abc", _curve(649), tokens=649 * 512)
        found = reader.get("/v1/jobs/auto/forecast")
        assert found["warning"] and found["proposal"] is not None
        assert found["auto_apply_refusal"] == "auto_apply is off" and found["policy"]["auto_apply"] is False
        versions = lambda: reader.get("/v1/jobs/auto/schedule/history")["versions"]  # noqa: E731
        assert len(versions()) == 1

        # Bad policies are refused whole, and only operators set one.
        for bad in ({"auto_apply": True, "max_weight_change": 0}, {"auto_apply": True, "surprise": 1},
                    {"max_web_loss_increase": -0.1}, {"cooldown_evals": 1.5}):
            assert httpx.put(policy_url, json=bad, headers=op).status_code == 422
        assert httpx.put(policy_url, json={"auto_apply": True},
                         headers={"Authorization": f"Bearer {READER_TOKEN}"}).status_code == 403
        assert reader.get("/v1/jobs/auto/forecast/policy")["policy"]["auto_apply"] is False

        # On, but the proposal's weight change is beyond the limit: counted and logged, nothing applied.
        change = abs(found["proposal"]["delta"] - found["proposal"]["from_delta"])
        narrow = {"auto_apply": True, "max_weight_change": change / 2, "min_gain": 0.0}
        assert httpx.put(policy_url, json=narrow, headers=op).json()["policy"]["auto_apply"] is True
        reader.post_eval("auto", 649, "abc", _curve(649), tokens=649 * 512)
        _wait_for(lambda: _auto_applies(srv.url, "auto", "outside_limits") >= 1, "a refusal")
        refused = reader.get("/v1/jobs/auto/forecast")
        assert "max_weight_change" in refused["auto_apply_refusal"] and len(versions()) == 1

        # Within the limits: one schedule change through If-Match, its reason naming the forecast.
        wide = {"auto_apply": True, "max_weight_change": 0.1, "min_gain": 0.0, "max_web_loss_increase": 0.02,
                "cooldown_evals": 3}
        httpx.put(policy_url, json=wide, headers=op).raise_for_status()
        expected = reader.get("/v1/jobs/auto/forecast")
        assert expected["max_web_loss_increase"] == 0.02 and expected["auto_apply_refusal"] is None
        reader.post_eval("auto", 649, "abc", _curve(649), tokens=649 * 512)  # same curve: same forecast
        applied = _wait_for(lambda: versions()[1:], "the automatic change")
        assert len(applied) == 1 and applied[0]["author"] == AUTO_AUTHOR
        assert applied[0]["reason"].startswith(f"forecast {expected['forecast_id']}: auto-apply")
        new_delta = eval_weight(applied[0]["schedule"]["phases"][-1]["weights"]["abc"])
        assert np.isclose(new_delta, expected["proposal"]["delta"]) and abs(new_delta - 0.1) <= 0.1 + 1e-9
        assert _auto_applies(srv.url, "auto", "applied") == 1
        effective = applied[0]["effective_step"]
        reader.close()
    finally:
        srv.stop()

    # A new replica process on the same state: the cooldown (3 evals after the change) comes from the
    # history, so two more evals still warn but change nothing.
    srv = Server(sources_dir, state, env=TOKENS).start()
    try:
        reader = MixerClient(srv.url, token=READER_TOKEN)
        for step in (effective + 1, effective + 2):
            reader.post_eval("auto", step, "abc", _curve(step), tokens=step * 512)
        _wait_for(lambda: _auto_applies(srv.url, "auto", "outside_limits") >= 1, "the cooldown refusal")
        after = reader.get("/v1/jobs/auto/forecast")
        assert after["schedule_version"] == 2 and "cooldown: 2 of 3" in after["auto_apply_refusal"]
        assert [v["version"] for v in reader.get("/v1/jobs/auto/schedule/history")["versions"]] == [1, 2]
        assert _auto_applies(srv.url, "auto", "applied") == 0
        reader.close()
    finally:
        srv.stop()
