"""One SPT planning request, as the CLI and the REST route both run it: every argument checked before any
fit, then one fit for every budget asked, the holdout check, the next pilot to run, all within a deadline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mixer_contract.errors import InvalidInput
from mixer_service.planner import budget
from mixer_service.planner.fit_stats import strict_json
from mixer_service.planner.next_pilot import PilotSuggestion, suggest_pilots
from mixer_service.planner.overfitting_law import (
    HoldoutCheck,
    SptFit,
    check_design,
    check_holdout,
    fit_overfitting_law,
    holdout_check,
)
from mixer_service.planner.recommend import (
    FinetuneGain,
    Recommendation,
    check_arguments,
    recommend_delta,
    schedule_for_delta,
)
from mixer_service.planner.spt_runs import SptRuns


@dataclass(frozen=True)
class SptQuestion:
    """What a planner request asks; ``target_tokens`` may hold several budgets, answered from one fit."""

    target_tokens: Sequence[float]
    domain_tokens: float
    delta_range: tuple[float, float] | None = None
    n_bootstrap: int = 50
    seed: int = 0
    tokens_unit: float = 1e9
    holdout_delta: float | None = None
    predict_deltas: tuple[float, ...] = ()
    schedule_sources: tuple[str, str] | None = None


@dataclass
class SptPlan:
    fit: SptFit
    recommendations: list[Recommendation]
    finetune: FinetuneGain | None = None
    holdout: HoldoutCheck | None = None
    next_pilots: list[PilotSuggestion] = field(default_factory=list)
    schedule: dict | None = None

    @property
    def warnings(self) -> list[str]:
        """Every warning once, in the order they arose."""
        found = [w for r in self.recommendations for w in r.warnings]
        found += self.holdout.warnings if self.holdout else []
        return list(dict.fromkeys(found))

    def to_dict(self) -> dict:
        """Strict-JSON-ready (no NaN): ``recommendation`` is the first budget's, ``recommendations`` all."""
        out: dict = {
            "fit": self.fit.to_dict(),
            "recommendation": self.recommendations[0].to_dict(),
            "recommendations": [r.to_dict() for r in self.recommendations],
            "next_pilots": [p.to_dict() for p in self.next_pilots],
            "warnings": self.warnings,
        }
        if self.finetune is not None:
            out["finetune_gain"] = self.finetune.to_dict()
        if self.holdout is not None:
            out["holdout"] = self.holdout.to_dict()
        if self.schedule is not None:
            out["schedule"] = self.schedule
        return strict_json(out)


def check_question(runs: SptRuns, q: SptQuestion) -> None:
    """Refuse a request that cannot be answered, before spending any fit on it."""
    check_arguments(q.target_tokens, q.domain_tokens, q.delta_range, q.predict_deltas)
    if not (np.isfinite(q.tokens_unit) and q.tokens_unit > 0):
        raise InvalidInput(f"tokens unit must be a positive number, got {q.tokens_unit}")
    if q.schedule_sources is not None and q.schedule_sources[0] == q.schedule_sources[1]:
        raise InvalidInput(f"domain and web source must differ, both are {q.schedule_sources[0]!r}")
    check_design(runs)
    if q.holdout_delta is not None:
        check_holdout(runs, q.holdout_delta)


def plan_spt(runs: SptRuns, q: SptQuestion, finetune: FinetuneGain | None = None,
             deadline: budget.Deadline | None = None) -> SptPlan:
    """Fit once, then answer every budget; the bootstrap shares the deadline with the holdout's."""
    check_question(runs, q)
    deadline = deadline or budget.Deadline()
    share = 0.5 if q.holdout_delta is not None else 1.0
    fit = fit_overfitting_law(runs, q.n_bootstrap, q.seed, q.tokens_unit, deadline, share)
    recs = [recommend_delta(fit, t, q.domain_tokens, q.delta_range, finetune, q.predict_deltas)
            for t in q.target_tokens]
    holdout = None
    if q.holdout_delta is not None:
        holdout = holdout_check(runs, q.holdout_delta, q.n_bootstrap, q.seed, q.tokens_unit, deadline)
    schedule = schedule_for_delta(recs[0].delta, *q.schedule_sources) if q.schedule_sources else None
    pilots = suggest_pilots(fit, q.target_tokens[0], q.delta_range, finetune)
    return SptPlan(fit, recs, finetune, holdout, pilots, schedule)
