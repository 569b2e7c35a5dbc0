"""Planner endpoints: fit the published scaling laws from posted measurements and recommend settings."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from mixer_service.service.auth import require_reader

router = APIRouter(prefix="/v1/plan", tags=["planner"], dependencies=[Depends(require_reader)])


class SptRun(BaseModel):
    tokens: float = Field(gt=0)
    delta: float = Field(ge=0, le=1)
    domain_loss: float = Field(gt=0)
    domain_train_loss: float | None = Field(default=None, gt=0)


class SptRequest(BaseModel):
    runs: list[SptRun] = Field(min_length=1, max_length=100_000)
    target_tokens: float = Field(gt=0)
    domain_tokens: float = Field(gt=0, description="|D|: domain set size in tokens")
    delta_range: tuple[float, float] | None = None
    bootstrap: int = Field(default=50, ge=0, le=1000)
    domain_source: str | None = Field(default=None, description="with web_source: also return a schedule")
    web_source: str | None = None


class StoragePoint(BaseModel):
    n: float = Field(gt=0)
    bytes_per_sample: float = Field(gt=0)
    error: float


class StorageRequest(BaseModel):
    points: list[StoragePoint] = Field(min_length=1, max_length=100_000)
    budgets: list[float] = Field(min_length=1, max_length=100)
    variant: str = "additive"
    bootstrap: int = Field(default=50, ge=0, le=1000)


@router.post("/spt")
def plan_spt(body: SptRequest) -> dict[str, Any]:
    from mixer_service.planner.overfitting_law import fit_overfitting_law
    from mixer_service.planner.recommend import recommend_delta, schedule_for_delta
    from mixer_service.planner.spt_runs import SptRuns

    def column(name: str) -> np.ndarray:
        return np.array([getattr(r, name) for r in body.runs], dtype=float)

    has_train = all(r.domain_train_loss is not None for r in body.runs)
    runs = SptRuns(column("tokens"), column("delta"), column("domain_loss"),
                   column("domain_train_loss") if has_train else None)
    fit = fit_overfitting_law(runs, n_bootstrap=body.bootstrap)
    rec = recommend_delta(fit, body.target_tokens, body.domain_tokens, body.delta_range)
    out = {"fit": fit.to_dict(), "recommendation": rec.to_dict()}
    if body.domain_source and body.web_source:
        out["schedule"] = schedule_for_delta(rec.delta, body.domain_source, body.web_source)
    return out


@router.post("/storage")
def plan_storage(body: StorageRequest) -> dict[str, Any]:
    from mixer_service.planner.storage_law import allocate, fit_storage_law

    n, size, err = (
        np.array([getattr(p, f) for p in body.points]) for f in ("n", "bytes_per_sample", "error")
    )
    fit = fit_storage_law(n, size, err, variant=body.variant, n_bootstrap=body.bootstrap)
    return {"fit": fit.to_dict(), "allocations": [allocate(fit.law, s).to_dict() for s in body.budgets]}
