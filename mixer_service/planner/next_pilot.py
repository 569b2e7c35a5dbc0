"""Which pilot run to add next: the (δ, T) whose measurement is expected to narrow δ*'s interval most.

The bootstrap laws stand in for what the pilots allow: each gives a δ* and a predicted curve for the
candidate run. Measuring that curve with the fit's residual noise σ narrows δ* by the ensemble Kalman
update: Var(δ* | curve) = Var(δ*) − C(δ*, y)·(C(y, y) + σ²I)⁻¹·C(y, δ*), the covariances taken across the
bootstrap laws. The expected interval width is today's width scaled by the square root of that variance
ratio. It is a linear-Gaussian estimate without a refit (cheap enough to score every candidate; weighting
the laws by likelihood instead collapses onto one law and claims width 0): a refit with the real run can
land elsewhere, which is why the run is worth making.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from mixer_service.planner.overfitting_law import SptFit
from mixer_service.planner.recommend import FinetuneGain, bootstrap_optima, search_range

MIN_LAWS = 10  # fewer bootstrap laws cannot stand in for a posterior
_GRID_POINTS = 401


@dataclass(frozen=True)
class PilotSuggestion:
    """A pilot run at ``delta`` with checkpoints up to ``tokens``, and δ*'s interval width before/after."""

    delta: float
    tokens: float
    checkpoints: int
    width_now: float
    expected_width: float

    def to_dict(self) -> dict:
        return asdict(self)


def suggest_pilots(fit: SptFit, target_tokens: float, delta_range: tuple[float, float] | None = None,
                   finetune: FinetuneGain | None = None, top: int = 3) -> list[PilotSuggestion]:
    """The ``top`` candidate runs by expected width of δ*'s 95% interval at ``target_tokens`` (then by
    fewer tokens: the cheaper run first). Empty with fewer than MIN_LAWS bootstrap laws."""
    if len(fit.bootstrap_laws) < MIN_LAWS:
        return []
    lo, hi = search_range(fit, delta_range)
    grid = np.linspace(lo, hi, _GRID_POINTS)
    optima = bootstrap_optima(fit, target_tokens, grid, finetune)
    sigma = max(fit.quality.rmse, 1e-6)
    t_min, t_max = fit.tokens_range
    checkpoints = max(4, int(np.median([p.n_points for p in fit.per_delta])))
    lengths = sorted({t_max, min(2 * t_max, max(t_max, target_tokens)), max(t_max, target_tokens)})
    deltas = np.unique(np.round(np.concatenate([np.linspace(lo, hi, 9)[1:], fit.deltas]), 6))
    deltas = deltas[(deltas > 0) & (deltas >= lo) & (deltas <= hi)]
    width_now = _width(optima)
    out = []
    for length in lengths:
        t = np.geomspace(t_min, length, checkpoints)
        for d in deltas:
            with np.errstate(over="ignore", invalid="ignore"):
                curves = np.array([np.asarray(law.test_loss(t, d), float) for law in fit.bootstrap_laws])
            if not np.all(np.isfinite(curves)):
                continue
            out.append(PilotSuggestion(float(d), float(length), checkpoints, width_now,
                                       width_now * _shrink(curves, optima, sigma)))
    out.sort(key=lambda s: (round(s.expected_width, 4), s.tokens))
    return out[:top]


def _shrink(curves: np.ndarray, optima: np.ndarray, sigma: float) -> float:
    """sqrt(Var(δ* | measured curve) / Var(δ*)) by the ensemble Kalman update (curves: [law, checkpoint]).
    ``c_yy`` is singular when the laws' curves are collinear and far larger than ``sigma`` (a bootstrap
    stopped early by its deadline leaves few, alike laws): the least-squares (pseudo-inverse) solution is
    the update then, and the same one otherwise."""
    z = optima - optima.mean()
    prior = float(z @ z) / (z.size - 1)
    if prior <= 0:
        return 1.0
    y = curves - curves.mean(axis=0)
    c_yy = y.T @ y / (z.size - 1) + sigma**2 * np.eye(y.shape[1])
    c_zy = z @ y / (z.size - 1)
    posterior = prior - float(c_zy @ np.linalg.lstsq(c_yy, c_zy, rcond=None)[0])
    return float(np.sqrt(max(posterior, 0.0) / prior))


def _width(values: np.ndarray) -> float:
    """Width of the 2.5–97.5% interval."""
    low, high = np.percentile(values, [2.5, 97.5])
    return float(high - low)
