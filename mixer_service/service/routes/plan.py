"""Planner endpoints: fit the published scaling laws from posted measurements and recommend settings.

A fit is CPU work that grows with the number of points times (bootstrap refits + 1), so every request is
bounded by ``PlanLimits`` (413 naming the limit beyond it), and the handlers are plain ``def``: FastAPI runs
them in its bounded thread pool, so a fit never blocks the event loop that serves batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field, model_validator

from mixer_service.errors import InvalidInput, TooLarge
from mixer_service.service.auth import require_reader
from mixer_service.service.problems import responses

router = APIRouter(prefix="/v1/plan", tags=["planner"], dependencies=[Depends(require_reader)])

HARD_MAX_ITEMS = 100_000  # schema bound; the configured PlanLimits are far below it


@dataclass(frozen=True)
class PlanLimits:
    """Per-request bounds of the planner; set with MIXER_PLAN_MAX_RUNS / _MAX_POINTS / _MAX_BOOTSTRAP."""

    max_runs: int = 1000
    max_points: int = 1000
    max_bootstrap: int = 200

    @classmethod
    def from_env(cls) -> PlanLimits:
        values = {}
        for name in ("max_runs", "max_points", "max_bootstrap"):
            raw = os.environ.get(f"MIXER_PLAN_{name.upper()}")
            if raw is not None:
                if not raw.isdigit() or int(raw) < 1:
                    raise InvalidInput(f"MIXER_PLAN_{name.upper()} must be an integer >= 1, got {raw!r}")
                values[name] = int(raw)
        return cls(**values)


LIMITS = PlanLimits.from_env()


def _check(what: str, count: int, limit: int, env: str) -> None:
    if count > limit:
        raise TooLarge(f"{what}: {count} asked, this server allows at most {limit} per request ({env})")


class SptRun(BaseModel):
    tokens: float = Field(gt=0, description="pretraining tokens T at the measurement")
    delta: float = Field(ge=0, le=1, description="domain fraction δ (a fraction: 0.05 = 5%)")
    domain_loss: float = Field(gt=0, description="held-out domain loss")
    domain_train_loss: float | None = Field(default=None, gt=0, description="domain training-set loss")


class FinetunePoint(BaseModel):
    tokens: float = Field(gt=0)
    gain: float = Field(description="domain loss before finetuning − after")
    delta: float | None = Field(default=None, ge=0, le=1, description="δ of the run (all or none)")


class SptRequest(BaseModel):
    runs: list[SptRun] = Field(min_length=1, max_length=HARD_MAX_ITEMS)
    target_tokens: float = Field(gt=0)
    domain_tokens: float = Field(gt=0, description="|D|: domain set size in tokens")
    delta_range: tuple[float, float] | None = Field(default=None, description="δ search range [low, high]")
    bootstrap: int = Field(default=50, ge=0)
    seed: int = 0
    tokens_unit: float = Field(default=1e9, gt=0, description="T is divided by this inside the law")
    holdout_delta: float | None = Field(default=None, ge=0, le=1, description="§5.3 holdout check at this δ")
    predict_deltas: list[float] = Field(default_factory=list, max_length=100)
    finetune: list[FinetunePoint] | None = Field(
        default=None, max_length=HARD_MAX_ITEMS, description="Eq. 7 gains; with δ the post-finetune δ*"
    )
    domain_source: str | None = Field(default=None, description="with web_source: also return a schedule")
    web_source: str | None = None

    @model_validator(mode="after")
    def _both_sources_or_none(self) -> SptRequest:
        if (self.domain_source is None) != (self.web_source is None):
            raise ValueError("give both domain_source and web_source, or neither")
        return self


class StoragePoint(BaseModel):
    n: float = Field(gt=0)
    bytes_per_sample: float = Field(gt=0)
    error: float


class StorageRequest(BaseModel):
    points: list[StoragePoint] = Field(min_length=1, max_length=HARD_MAX_ITEMS)
    budgets: list[float] = Field(min_length=1, max_length=100)
    variant: Literal["additive", "additive_no_floor", "multiplicative"] = "additive"
    bootstrap: int = Field(default=50, ge=0)
    seed: int = 0


@router.post("/spt", responses=responses(400, 413, 422))
def plan_spt(body: SptRequest) -> dict[str, Any]:
    from mixer_service.planner.overfitting_law import fit_overfitting_law, holdout_check
    from mixer_service.planner.recommend import fit_finetune_gain, recommend_delta, schedule_for_delta
    from mixer_service.planner.spt_runs import SptRuns

    _check("runs", len(body.runs), LIMITS.max_runs, "MIXER_PLAN_MAX_RUNS")
    _check("finetune points", len(body.finetune or []), LIMITS.max_runs, "MIXER_PLAN_MAX_RUNS")
    _check("bootstrap refits", body.bootstrap, LIMITS.max_bootstrap, "MIXER_PLAN_MAX_BOOTSTRAP")

    def column(name: str) -> np.ndarray:
        return np.array([getattr(r, name) for r in body.runs], dtype=float)

    has_train = all(r.domain_train_loss is not None for r in body.runs)
    runs = SptRuns(column("tokens"), column("delta"), column("domain_loss"),
                   column("domain_train_loss") if has_train else None)
    delta_max = body.delta_range[1] if body.delta_range else None
    fit = fit_overfitting_law(runs, body.bootstrap, body.seed, body.tokens_unit, delta_max)
    finetune = None
    if body.finetune:
        deltas = [p.delta for p in body.finetune]
        if any(d is None for d in deltas) and not all(d is None for d in deltas):
            raise InvalidInput("finetune: give delta for every point or for none")
        finetune = fit_finetune_gain(np.array([p.tokens for p in body.finetune]),
                                     np.array([p.gain for p in body.finetune]),
                                     None if deltas[0] is None else np.array(deltas, float))
    rec = recommend_delta(fit, body.target_tokens, body.domain_tokens, body.delta_range, finetune,
                          tuple(body.predict_deltas))
    out: dict[str, Any] = {"fit": fit.to_dict(), "recommendation": rec.to_dict(),
                           "warnings": rec.warnings}
    if finetune is not None:
        out["finetune_gain"] = finetune.to_dict()
    if body.holdout_delta is not None:
        check = holdout_check(runs, body.holdout_delta, body.bootstrap, body.seed, body.tokens_unit)
        out["holdout"] = check.to_dict()
    if body.domain_source and body.web_source:
        out["schedule"] = schedule_for_delta(rec.delta, body.domain_source, body.web_source)
    return out


@router.post("/storage", responses=responses(400, 413, 422))
def plan_storage(body: StorageRequest) -> dict[str, Any]:
    from mixer_service.planner.storage_law import allocate, fit_storage_law

    _check("points", len(body.points), LIMITS.max_points, "MIXER_PLAN_MAX_POINTS")
    _check("bootstrap refits", body.bootstrap, LIMITS.max_bootstrap, "MIXER_PLAN_MAX_BOOTSTRAP")
    n, size, err = (
        np.array([getattr(p, f) for p in body.points]) for f in ("n", "bytes_per_sample", "error")
    )
    fit = fit_storage_law(n, size, err, variant=body.variant, n_bootstrap=body.bootstrap, seed=body.seed)
    return {"fit": fit.to_dict(), "allocations": [allocate(fit.law, s).to_dict() for s in body.budgets]}
