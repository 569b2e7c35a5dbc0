"""Planner endpoints: fit the published scaling laws from posted measurements and recommend settings.

A fit is CPU work that grows with the number of points times (bootstrap refits + 1), so every request is
bounded by ``PlanLimits`` (413 naming the limit beyond it) and by a wall-clock budget, and runs in the bounded
thread pool, so a fit never blocks the event loop that serves batches. The event loop meanwhile watches the
client: when it leaves, the fit is cancelled at its next linear solve instead of running on for nobody.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from mixer_contract.errors import InvalidInput, TooLarge
from mixer_service.service.auth import require_reader
from mixer_service.service.problems import responses
from mixer_service.service.routes.models import SptRequest, StorageRequest
from mixer_service.service.settings import PlanLimits

if TYPE_CHECKING:
    from mixer_service.planner.budget import Deadline

router = APIRouter(prefix="/v1/plan", tags=["planner"], dependencies=[Depends(require_reader)])


DISCONNECT_POLL_S = 0.25  # how often a running fit's client is checked
log = logging.getLogger(__name__)




def _check(what: str, count: int, limit: int, env: str) -> None:
    if count > limit:
        raise TooLarge(f"{what}: {count} asked, this server allows at most {limit} per request ({env})")


@router.post("/spt", responses=responses(400, 413, 422))
async def plan_spt(body: SptRequest, request: Request) -> Any:
    limits: PlanLimits = request.app.state.plan_limits
    _check("runs", len(body.runs), limits.max_runs, "MIXER_PLAN_MAX_RUNS")
    _check("finetune points", len(body.finetune or []), limits.max_runs, "MIXER_PLAN_MAX_RUNS")
    _check("bootstrap refits", body.bootstrap, limits.max_bootstrap, "MIXER_PLAN_MAX_BOOTSTRAP")
    from mixer_service.planner.budget import Deadline  # the planner loads only when asked (scipy is heavy)

    seconds = min(body.max_seconds or limits.max_seconds, limits.max_seconds)
    deadline = Deadline(seconds, what="this request's planner budget (max_seconds, MIXER_PLAN_MAX_SECONDS)")
    return await _while_client_waits(request, deadline, functools.partial(_plan_spt, body, deadline))


def _plan_spt(body: SptRequest, deadline: Deadline) -> dict[str, Any]:
    from mixer_service.planner.recommend import fit_finetune_gain
    from mixer_service.planner.spt_plan import SptQuestion, plan_spt
    from mixer_service.planner.spt_runs import SptRuns

    def column(name: str) -> np.ndarray:
        return np.array([getattr(r, name) for r in body.runs], dtype=float)

    has_train = all(r.domain_train_loss is not None for r in body.runs)
    runs = SptRuns(column("tokens"), column("delta"), column("domain_loss"),
                   column("domain_train_loss") if has_train else None,
                   where=tuple(f"runs[{i}]" for i in range(len(body.runs))))
    targets = body.target_tokens if isinstance(body.target_tokens, list) else [body.target_tokens]
    sources = (body.domain_source, body.web_source) if body.domain_source and body.web_source else None
    question = SptQuestion(targets, body.domain_tokens, body.delta_range, body.bootstrap, body.seed,
                           body.tokens_unit, body.holdout_delta, tuple(body.predict_deltas), sources)
    finetune = None
    if body.finetune:
        deltas = [p.delta for p in body.finetune]
        if any(d is None for d in deltas) and not all(d is None for d in deltas):
            raise InvalidInput("finetune: give delta for every point or for none")
        finetune = fit_finetune_gain(np.array([p.tokens for p in body.finetune]),
                                     np.array([p.gain for p in body.finetune]),
                                     None if deltas[0] is None else np.array(deltas, float))
    return plan_spt(runs, question, finetune, deadline).to_dict()


async def _while_client_waits(request: Request, deadline: Deadline, work: Callable[[], Any]) -> Any:
    """Run ``work`` in the thread pool; if the client disconnects first, cancel it (it stops at its next
    check point) and answer nobody."""
    from mixer_service.planner.budget import FitCancelled

    task = asyncio.ensure_future(run_in_threadpool(work))
    while not task.done():
        await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            deadline.cancel.set()
            log.warning("planner request cancelled: the client left", extra={"path": request.url.path})
            break
    try:
        return await task
    except FitCancelled:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it


@router.post("/storage", responses=responses(400, 413, 422))
def plan_storage(body: StorageRequest, request: Request) -> dict[str, Any]:
    limits: PlanLimits = request.app.state.plan_limits
    from mixer_service.planner.fit_stats import strict_json
    from mixer_service.planner.storage_law import allocate, fit_storage_law

    _check("points", len(body.points), limits.max_points, "MIXER_PLAN_MAX_POINTS")
    _check("bootstrap refits", body.bootstrap, limits.max_bootstrap, "MIXER_PLAN_MAX_BOOTSTRAP")
    n, size, err = (
        np.array([getattr(p, f) for p in body.points]) for f in ("n", "bytes_per_sample", "error")
    )
    fit = fit_storage_law(n, size, err, variant=body.variant, n_bootstrap=body.bootstrap, seed=body.seed)
    allocations = [allocate(fit.law, s).to_dict() for s in body.budgets]
    return strict_json({"fit": fit.to_dict(), "allocations": allocations, "warnings": fit.warnings})
