"""The overfitting watch over REST: trainers post held-out evals, operators read the forecast.

Every eval post refreshes the job's forecast after the response is sent (so trainers never wait on a fit)
and the ``mixer_forecast_steps_to_overfit`` gauge with it; a forecast is cached per job until a new eval,
schedule version, law or policy arrives. Where the job's policy turns auto-apply on, that refresh also
applies a warned proposal within the policy's limits, through the same If-Match schedule change as an
operator's (author ``overfitting-watch``, reason ``forecast <id>: ...``): the ETag pins the schedule the
forecast was computed under, so a forecast is applied at most once whichever replica, or how many,
try; the cooldown is read from the schedule history, so a restarted replica keeps it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter, BackgroundTasks, Depends, Query, Request

from mixer_contract.errors import InvalidInput, MixerError, StaleVersion
from mixer_contract.values import check_step
from mixer_service.service.auth import require_operator, require_reader
from mixer_service.service.jobs import JobManager, JobView
from mixer_service.service.problems import responses
from mixer_service.service.routes.deps import jobs
from mixer_service.service.routes.models import Eval, JobId, LawBody, PolicyBody
from mixer_service.store.evals import EvalPoint, EvalStore, open_evals

if TYPE_CHECKING:
    from mixer_service.planner.watch import Forecast, WatchPolicy
    from mixer_service.service.jobs import JobRuntime

router = APIRouter(prefix="/v1/jobs/{job_id}", tags=["forecast"])
CACHED_JOBS = 1024
_lock = threading.Lock()
log = logging.getLogger(__name__)


def evals_of(request: Request) -> EvalStore:
    """The eval curves beside the app's state store (opened once per app)."""
    with _lock:
        if not hasattr(request.app.state, "evals"):
            request.app.state.evals = open_evals(request.app.state.jobs.store)
            request.app.state.forecasts = OrderedDict()
    return request.app.state.evals


@router.post("/evals", status_code=201, dependencies=[Depends(require_reader)],
             responses=responses(400, 404, 413))
def post_eval(job_id: JobId, body: Eval, request: Request, background: BackgroundTasks,
              manager: JobManager = Depends(jobs), store: EvalStore = Depends(evals_of)) -> dict[str, Any]:
    """Store one held-out evaluation (bounded curve per source) and refresh the forecast afterwards."""
    view = manager.view(job_id)
    runtime = view.runtime
    check_step(body.step, runtime.config.total_steps)
    runtime.engine.source_index(body.source)
    point = EvalPoint.checked(body.step, body.loss, body.tokens)
    store.append(job_id, runtime.incarnation, body.source, point)
    background.add_task(_refresh_quietly, request, manager, job_id)
    return {"job": job_id, "source": body.source, "step": body.step}


@router.get("/evals", dependencies=[Depends(require_reader)], responses=responses(404))
def get_evals(job_id: JobId, manager: JobManager = Depends(jobs),
              store: EvalStore = Depends(evals_of)) -> dict[str, Any]:
    runtime = manager.view(job_id).runtime
    curves = store.curves(job_id, runtime.incarnation)
    return {"job": job_id, "curves": {s: [[p.step, p.loss, p.tokens] for p in c] for s, c in curves.items()}}


@router.put("/forecast/law", dependencies=[Depends(require_operator)], responses=responses(400, 404, 413))
def put_law(job_id: JobId, body: LawBody, manager: JobManager = Depends(jobs),
            store: EvalStore = Depends(evals_of)) -> dict[str, Any]:
    """Attach the law fitted across runs; the forecast's proposals read δ-dependence from it."""
    from mixer_service.planner.overfitting_law import OverfittingLaw

    runtime = manager.view(job_id).runtime
    try:
        law = OverfittingLaw.from_dict(body.law)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInput(f"law: {exc}") from exc
    store.set_law(job_id, runtime.incarnation, law.to_dict())
    return {"job": job_id, "law": law.to_dict()}


@router.put("/forecast/policy", dependencies=[Depends(require_operator)], responses=responses(400, 404, 413))
def put_policy(job_id: JobId, body: PolicyBody, manager: JobManager = Depends(jobs),
               store: EvalStore = Depends(evals_of)) -> dict[str, Any]:
    """Replace the job's watch policy: the web-loss bound of its proposals and the auto-apply limits."""
    runtime = manager.view(job_id).runtime
    store.set_policy(job_id, runtime.incarnation, body.model_dump())
    log.info("watch policy set", extra={"event": "forecast.policy", "job": job_id} | body.model_dump())
    return {"job": job_id, "policy": body.model_dump()}


@router.get("/forecast/policy", dependencies=[Depends(require_reader)], responses=responses(404))
def get_policy(job_id: JobId, manager: JobManager = Depends(jobs),
               store: EvalStore = Depends(evals_of)) -> dict[str, Any]:
    runtime = manager.view(job_id).runtime
    return {"job": job_id, "policy": _policy(store, runtime.job_id, runtime.incarnation).to_dict()}


@router.get("/forecast", dependencies=[Depends(require_reader)], responses=responses(400, 404))
def get_forecast(job_id: JobId, request: Request, manager: JobManager = Depends(jobs),
                 source: str | None = Query(default=None, description="default: the first repeated source"),
                 max_web_loss_increase: float | None = Query(
                     default=None, ge=0, le=10, description="what-if: a web-loss bound other than the "
                     "policy's (such a forecast is never applied automatically)"),
                 _store: EvalStore = Depends(evals_of)) -> dict[str, Any]:
    """The current forecast: turn-up step with interval, steps to overfitting and a proposal."""
    return current(request, manager.view(job_id), source, max_web_loss_increase)


def _policy(store: EvalStore, job_id: str, incarnation: str) -> WatchPolicy:
    from mixer_service.planner.watch import WatchPolicy

    doc = store.policy(job_id, incarnation)
    return WatchPolicy() if doc is None else WatchPolicy.from_dict(doc)


def current(request: Request, view: JobView, source: str | None = None,
            max_web_loss_increase: float | None = None) -> dict[str, Any]:
    """The job's forecast, from the cache while neither its evals, schedule, law nor policy changed.

    ``max_web_loss_increase`` overrides the policy's bound (a what-if: ``auto_apply_refusal`` says so)."""
    from mixer_service.planner.overfitting_law import OverfittingLaw
    from mixer_service.planner.watch import RunPlan, forecast

    runtime, store = view.runtime, request.app.state.evals
    config = runtime.config
    repeat = [s.name for s in config.sources if s.role == "repeat"]
    source = source or (repeat[0] if repeat else None)
    if source is None:
        raise InvalidInput(f"job {runtime.job_id!r} has no repeated source: nothing can overfit")
    k = runtime.engine.source_index(source)
    curves = store.curves(runtime.job_id, runtime.incarnation)
    domain = curves.get(source, [])
    web: list[EvalPoint] = next((c for s, c in curves.items() if s != source and s not in repeat), [])
    law_doc = store.law(runtime.job_id, runtime.incarnation)
    policy = _policy(store, runtime.job_id, runtime.incarnation)
    what_if = max_web_loss_increase is not None
    bound = policy.max_web_loss_increase if max_web_loss_increase is None else max_web_loss_increase
    stamp = hashlib.sha256(json.dumps([runtime.job_id, runtime.incarnation, runtime.version, source,
                                       bound, what_if, law_doc, policy.to_dict(), [p.step for p in domain],
                                       [p.loss for p in domain], len(web), web[-1].step if web else None],
                                      sort_keys=True).encode()).hexdigest()
    cache: OrderedDict[str, tuple[str, dict[str, Any]]] = request.app.state.forecasts
    key = f"{runtime.job_id}|{source}"
    with _lock:
        hit = cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    engine = runtime.engine
    run = RunPlan(engine.plan, k, engine.layouts[k].num_chunks, config.seq_len, config.total_steps,
                  engine.first_changeable_step(view.head.served_high_water))
    web_curve = (np.array([p.step for p in web]), np.array([p.loss for p in web])) if web else None
    result = forecast(run, config.source_names, np.array([p.step for p in domain], dtype=np.int64),
                      np.array([p.loss for p in domain]), web_curve,
                      OverfittingLaw.from_dict(law_doc) if law_doc else None, stamp=stamp,
                      max_web_loss_increase=bound)
    body = {"job": runtime.job_id, "schedule_version": runtime.version, "etag": runtime.etag(),
            "total_steps": config.total_steps} | result.to_dict()
    body["observed"] = [[p.step, p.loss, run.repetitions(p.step)] for p in domain]
    body["policy"] = policy.to_dict()
    body["auto_apply_refusal"] = ("a what-if bound (max_web_loss_increase given in the request)" if what_if
                                  else _refusal(policy, result, runtime, domain))
    gauge = result.steps_to_overfit if result.warning else float("inf")  # the alert fires on warnings only
    request.app.state.metrics.forecast_steps.labels(runtime.job_id, source).set(gauge)
    with _lock:
        cache[key] = (stamp, body)
        cache.move_to_end(key)
        while len(cache) > CACHED_JOBS:
            cache.popitem(last=False)
    return body


def _refusal(policy: WatchPolicy, found: Forecast, runtime: JobRuntime,
             domain: list[EvalPoint]) -> str | None:
    """Why the policy does not apply this forecast (None: it does), with the cooldown read from the
    schedule history: the last version the watch applied, and the evals at or after its effective step."""
    from mixer_service.planner.watch import AUTO_AUTHOR, auto_apply_refusal

    last = next((v for v in reversed(runtime.versions) if v.author == AUTO_AUTHOR), None)
    since = None if last is None else last.effective_step
    evals_since = 0 if since is None else sum(p.step >= since for p in domain)
    return auto_apply_refusal(policy, found, since, evals_since)


def _refresh_quietly(request: Request, manager: JobManager, job_id: str) -> None:
    """After an eval post: keep the forecast (and gauge) current, and apply it where the policy says so;
    a job that cannot forecast yet is fine."""
    try:
        body = current(request, manager.view(job_id))
    except MixerError:
        return
    if body["policy"]["auto_apply"] and body["warning"] and body["proposal"] is not None:
        _auto_apply(request, manager, body)


def _auto_apply(request: Request, manager: JobManager, body: dict[str, Any]) -> None:
    """Apply a warned proposal through the operator's path (If-Match: the forecast's schedule), or say why
    not; every decision is logged and counted."""
    from mixer_service.planner.watch import AUTO_AUTHOR

    job, proposal, refusal = body["job"], body["proposal"], body["auto_apply_refusal"]
    fields = {"event": "forecast.auto_apply", "job": job, "forecast_id": body["forecast_id"],
              "schedule_version": body["schedule_version"], "start_step": proposal["start_step"],
              "from_delta": proposal["from_delta"], "delta": proposal["delta"],
              "predicted_gain": proposal["baseline_final_loss"] - proposal["predicted_final_loss"],
              "predicted_web_change": proposal["predicted_web_change"]}
    counter = request.app.state.metrics.forecast_auto_applies
    if refusal is not None:
        counter.labels(job, "outside_limits").inc()
        log.info("forecast not applied: outside the policy", extra=fields | {"refusal": refusal})
        return
    reason = (f"forecast {body['forecast_id']}: auto-apply: {body['source']} {proposal['from_delta']:g} -> "
              f"{proposal['delta']:g} ({proposal['kind']}) from step {proposal['start_step']}")
    try:
        runtime, _ = manager.change_schedule(job, body["etag"], proposal["start_step"], proposal["schedule"],
                                             AUTO_AUTHOR, reason)
    except StaleVersion as exc:  # another replica applied it, or an operator changed the schedule
        counter.labels(job, "conflict").inc()
        log.info("forecast not applied: the schedule changed since", extra=fields | {"error": str(exc)})
        return
    except MixerError as exc:
        counter.labels(job, "failed").inc()
        log.warning("forecast not applied", extra=fields | {"error": str(exc)})
        return
    counter.labels(job, "applied").inc()
    log.info("forecast applied", extra=fields | {"version": runtime.version,
                                                 "effective_step": runtime.versions[-1].effective_step})
