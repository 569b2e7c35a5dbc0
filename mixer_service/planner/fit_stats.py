"""Fit-quality and bootstrap summaries shared by both scaling laws.

A law is only worth acting on if its fit is good and its parameters are pinned down; these helpers turn
residuals and bootstrap refits into the numbers the planner reports next to every recommendation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mixer_contract.errors import InvalidInput


@dataclass(frozen=True)
class FitQuality:
    """How well a fitted curve explains the points it was fitted on."""

    n_points: int
    r2: float
    rmse: float
    max_abs_residual: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class ParamEstimate:
    """One fitted parameter with its bootstrap spread (NaN when no bootstrap was run)."""

    name: str
    value: float
    std: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


def fit_quality(observed: np.ndarray, predicted: np.ndarray) -> FitQuality:
    """R², RMSE and the worst residual of ``predicted`` against ``observed``."""
    residuals = np.asarray(observed, float) - np.asarray(predicted, float)
    ss_res = float(np.sum(residuals**2))
    ss_tot = float(np.sum((observed - np.mean(observed)) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return FitQuality(
        n_points=int(residuals.size),
        r2=r2,
        rmse=float(np.sqrt(np.mean(residuals**2))),
        max_abs_residual=float(np.max(np.abs(residuals))),
    )


def summarize_params(
    names: tuple[str, ...], values: np.ndarray, samples: np.ndarray | None
) -> list[ParamEstimate]:
    """Point estimates with bootstrap standard deviation and 95% percentile interval."""
    out = []
    for j, name in enumerate(names):
        if samples is None or len(samples) < 2:
            std = low = high = float("nan")
        else:
            col = samples[:, j]
            std = float(np.std(col, ddof=1))
            low, high = (float(v) for v in np.percentile(col, [2.5, 97.5]))
        out.append(ParamEstimate(name, float(values[j]), std, low, high))
    return out


def stratified_resample(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of a bootstrap resample drawn within each group, so every group keeps its size.

    Resampling within groups (e.g. per δ or per n) keeps the design's coverage, which a plain case
    bootstrap could lose and turn into a degenerate refit.
    """
    parts = []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        parts.append(rng.choice(idx, size=idx.size, replace=True))
    return np.concatenate(parts)


def require_finite(name: str, values: np.ndarray) -> None:
    """Reject NaN/inf with the column name and first bad row, since one NaN silently poisons a fit."""
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise InvalidInput(f"{name} has a non-finite value (NaN or inf) at row {int(bad[0])}")


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by None: JSON has no NaN, and a client
    that gets a bare ``NaN`` token cannot parse the answer at all."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, np.generic):
        return strict_json(value.item())
    return value
