"""The overfitting watch over REST: trainers post held-out evals, operators read the forecast.

Every eval post refreshes the job's forecast after the response is sent (so trainers never wait on a fit)
and the ``mixer_forecast_steps_to_overfit`` gauge with it; a forecast is cached per job until a new eval
or schedule version arrives.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
from fastapi import APIRouter, BackgroundTasks, Depends, Query, Request

from mixer_contract.errors import InvalidInput, MixerError
from mixer_contract.values import check_step
from mixer_service.service.auth import require_operator, require_reader
from mixer_service.service.jobs import JobManager, JobView
from mixer_service.service.problems import responses
from mixer_service.service.routes.deps import jobs
from mixer_service.service.routes.models import Eval, JobId, LawBody
from mixer_service.store.evals import EvalPoint, EvalStore, open_evals

router = APIRouter(prefix="/v1/jobs/{job_id}", tags=["forecast"])
CACHED_JOBS = 1024
_lock = threading.Lock()


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
    background.add_task(_refresh_quietly, request, view)
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


@router.get("/forecast", dependencies=[Depends(require_reader)], responses=responses(400, 404))
def get_forecast(job_id: JobId, request: Request, manager: JobManager = Depends(jobs),
                 source: str | None = Query(default=None, description="default: the first repeated source"),
                 max_web_loss_increase: float = Query(default=0.01, ge=0, le=1),
                 _store: EvalStore = Depends(evals_of)) -> dict[str, Any]:
    """The current forecast: turn-up step with interval, steps to overfitting and a proposal."""
    return current(request, manager.view(job_id), source, max_web_loss_increase)


def current(request: Request, view: JobView, source: str | None = None,
            max_web_loss_increase: float = 0.01) -> dict[str, Any]:
    """The job's forecast, from the cache while neither its evals nor its schedule changed."""
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
    stamp = hashlib.sha256(json.dumps([runtime.job_id, runtime.incarnation, runtime.version, source,
                                       max_web_loss_increase, law_doc, [p.step for p in domain],
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
                      max_web_loss_increase=max_web_loss_increase)
    body = {"job": runtime.job_id, "schedule_version": runtime.version, "etag": runtime.etag(),
            "total_steps": config.total_steps} | result.to_dict()
    body["observed"] = [[p.step, p.loss, run.repetitions(p.step)] for p in domain]
    gauge = result.steps_to_overfit if result.warning else float("inf")  # the alert fires on warnings only
    request.app.state.metrics.forecast_steps.labels(runtime.job_id, source).set(gauge)
    with _lock:
        cache[key] = (stamp, body)
        cache.move_to_end(key)
        while len(cache) > CACHED_JOBS:
            cache.popitem(last=False)
    return body


def _refresh_quietly(request: Request, view: JobView) -> None:
    """After an eval post: keep the forecast (and gauge) current; a job that cannot forecast yet is fine."""
    try:
        current(request, view)
    except MixerError:
        pass
