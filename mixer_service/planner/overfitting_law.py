"""The SPT overfitting scaling law (Finetuner's Fallacy §5.1) and its fit from pilot runs.

    L_test(T, δ)  = L_train(T, δ) + L_gap(T, δ)
    L_train(T, δ) = A_train · T^b_train(δ) + C_train(δ),   b_x(δ) = δ·b_x,s + (1 − δ)·b_x,g
    L_gap(T, δ)   = α1 · δ^α2 · exp(α3·δ) · T^b_gap(δ)
    C_train(δ)    = κ0 − κ1·log(δ + κ2) − κ3·δ

T is in tokens. The fit follows the paper (App. D.1): a curve per δ first, whose parameters seed the joint
least-squares fit; the sign constraints are enforced by the parametrisation and bounds, not checked after.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np
from scipy.optimize import least_squares, lsq_linear

from mixer_service.errors import InvalidInput
from mixer_service.planner.fit_stats import (
    FitQuality,
    ParamEstimate,
    fit_quality,
    stratified_resample,
    summarize_params,
)
from mixer_service.planner.spt_runs import SptRuns

PARAM_NAMES = (
    "A_train",
    "b_train_g",
    "b_train_s",
    "kappa0",
    "kappa1",
    "kappa2",
    "kappa3",
    "alpha1",
    "alpha2",
    "alpha3",
    "b_gap_g",
    "b_gap_s",
)
MIN_DELTAS = 3
_EPS = 1e-4  # margin that keeps the strict inequalities strict


@dataclass(frozen=True)
class OverfittingLaw:
    """Fitted constants of the law; evaluation broadcasts over arrays of T and δ."""

    A_train: float
    b_train_g: float
    b_train_s: float
    kappa0: float
    kappa1: float
    kappa2: float
    kappa3: float
    alpha1: float
    alpha2: float
    alpha3: float
    b_gap_g: float
    b_gap_s: float

    def __post_init__(self) -> None:
        problems = self.violations()
        if problems:
            raise InvalidInput("overfitting-law constants violate constraints: " + "; ".join(problems))

    def violations(self) -> list[str]:
        """The paper's sign constraints (plus positivity the formulas need) that these constants break."""
        checks = [
            (self.A_train > 0, "A_train must be > 0"),
            (
                self.b_train_s < self.b_train_g < 0,
                "need b_train_s < b_train_g < 0 (|b_train_g| < |b_train_s|)",
            ),
            (self.b_gap_g < 0 < self.b_gap_s < 1, "need b_gap_g < 0 < b_gap_s < 1"),
            (self.kappa2 > 0, "kappa2 must be > 0 (log(δ + κ2) at δ = 0)"),
            (self.alpha1 > 0 and self.alpha2 >= 0, "need alpha1 > 0 and alpha2 >= 0"),
        ]
        return [msg for ok, msg in checks if not ok]

    def c_train(self, delta: np.ndarray | float) -> np.ndarray:
        d = np.asarray(delta, float)
        return self.kappa0 - self.kappa1 * np.log(d + self.kappa2) - self.kappa3 * d

    def a_gap(self, delta: np.ndarray | float) -> np.ndarray:
        d = np.asarray(delta, float)
        return self.alpha1 * np.power(d, self.alpha2) * np.exp(self.alpha3 * d)

    def train_loss(self, tokens: np.ndarray | float, delta: np.ndarray | float) -> np.ndarray:
        d = np.asarray(delta, float)
        b = d * self.b_train_s + (1 - d) * self.b_train_g
        return self.A_train * np.exp(b * np.log(tokens)) + self.c_train(d)

    def gap(self, tokens: np.ndarray | float, delta: np.ndarray | float) -> np.ndarray:
        d = np.asarray(delta, float)
        b = d * self.b_gap_s + (1 - d) * self.b_gap_g
        return self.a_gap(d) * np.exp(b * np.log(tokens))

    def test_loss(self, tokens: np.ndarray | float, delta: np.ndarray | float) -> np.ndarray:
        """Predicted held-out domain loss after ``tokens`` pretraining tokens at domain fraction δ."""
        return self.train_loss(tokens, delta) + self.gap(tokens, delta)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, float]) -> OverfittingLaw:
        missing = [f.name for f in fields(cls) if f.name not in values]
        if missing:
            raise InvalidInput(f"overfitting-law constants missing: {', '.join(missing)}")
        return cls(**{f.name: float(values[f.name]) for f in fields(cls)})


@dataclass(frozen=True)
class PerDeltaFit:
    """The first-stage curve at one δ: loss = a·T^b + c (+ g·T^h, the gap, when δ > 0)."""

    delta: float
    n_points: int
    tokens_min: float
    tokens_max: float
    a: float
    b: float
    c: float
    g: float
    h: float
    quality: FitQuality

    def to_dict(self) -> dict:
        out = asdict(self)
        out["quality"] = self.quality.to_dict()
        return out


@dataclass
class SptFit:
    """The joint fit with everything needed to judge it: per-δ fits, residuals and bootstrap spread."""

    law: OverfittingLaw
    per_delta: list[PerDeltaFit]
    quality: FitQuality
    residuals: np.ndarray
    params: list[ParamEstimate]
    tokens_range: tuple[float, float]
    deltas: tuple[float, ...]
    bootstrap_laws: list[OverfittingLaw] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "law": self.law.to_dict(),
            "quality": self.quality.to_dict(),
            "params": [p.to_dict() for p in self.params],
            "per_delta": [p.to_dict() for p in self.per_delta],
            "tokens_range": list(self.tokens_range),
            "deltas": list(self.deltas),
            "n_bootstrap": len(self.bootstrap_laws),
            "warnings": list(self.warnings),
        }


def fit_overfitting_law(runs: SptRuns, n_bootstrap: int = 0, seed: int = 0) -> SptFit:
    """Fit the law to pilot runs: per-δ curves, then the joint constrained least-squares fit.

    ``n_bootstrap`` refits on resamples drawn within each δ to estimate parameter uncertainty.
    """
    _check_design(runs)
    per_delta = [_fit_one_delta(runs, d) for d in runs.deltas]
    joint = _JointProblem(runs)
    best = min((joint.solve(t) for t in joint.best_starts(per_delta)), key=lambda r: r.cost)
    law = joint.law(best.x)
    predicted = law.test_loss(runs.tokens, runs.delta)

    laws: list[OverfittingLaw] = []
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        for _ in range(n_bootstrap):
            resampled = _JointProblem(_subset(runs, stratified_resample(runs.delta, rng)))
            laws.append(resampled.law(resampled.solve(best.x).x))
    samples = np.array([[getattr(b, n) for n in PARAM_NAMES] for b in laws]) if laws else None
    warnings = []
    if not best.success:
        warnings.append(f"joint fit did not converge: {best.message}")
    if len(runs.deltas) < 4:
        warnings.append(
            f"only {len(runs.deltas)} distinct δ values: C_train(δ) has 4 constants, "
            "so its δ-shape is weakly determined"
        )
    return SptFit(
        law=law,
        per_delta=per_delta,
        quality=fit_quality(runs.loss, predicted),
        residuals=runs.loss - predicted,
        params=summarize_params(PARAM_NAMES, np.array([getattr(law, n) for n in PARAM_NAMES]), samples),
        tokens_range=(float(runs.tokens.min()), float(runs.tokens.max())),
        deltas=tuple(float(d) for d in runs.deltas),
        bootstrap_laws=laws,
        warnings=warnings,
    )


def _check_design(runs: SptRuns) -> None:
    deltas = runs.deltas
    if deltas.size < MIN_DELTAS:
        got = ", ".join(f"{d:g}" for d in deltas)
        raise InvalidInput(
            f"the joint law needs runs at >= {MIN_DELTAS} distinct δ values, got {deltas.size} ({got})"
        )
    for d in deltas:
        n_tokens = np.unique(runs.tokens[runs.delta == d]).size
        need = 4 if (d == 0 or runs.train_loss is not None) else 6
        if n_tokens < need:
            raise InvalidInput(
                f"δ={d:g} has {n_tokens} distinct token counts; its per-δ fit needs at least {need}"
            )


def _subset(runs: SptRuns, idx: np.ndarray) -> SptRuns:
    train = None if runs.train_loss is None else runs.train_loss[idx]
    return SptRuns(runs.tokens[idx], runs.delta[idx], runs.loss[idx], train)


# Both stages use variable projection: the amplitudes (A_train, κ0, κ1, κ3, α1; per δ: a, c, g) enter
# linearly, so for given exponents they are solved exactly by bounded linear least squares and the
# nonlinear search runs over the few exponents only. This removes the scale coupling that makes a plain
# 12-parameter fit stall in poor local minima.


def _project(design: np.ndarray, y: np.ndarray, nonneg: tuple[int, ...]) -> np.ndarray:
    """Best amplitudes for a fixed design; columns listed in ``nonneg`` are kept >= 0."""
    scale = np.linalg.norm(design, axis=0)
    scale[scale == 0] = 1.0
    lower = np.full(design.shape[1], -np.inf)
    lower[list(nonneg)] = 0.0
    coef = lsq_linear(design / scale, y, bounds=(lower, np.inf)).x
    return coef / scale


def _stack(runs: SptRuns, train_cols: np.ndarray, gap_cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Design and targets: test rows see train + gap columns; domain-train rows (if any) the train ones."""
    design = np.hstack([train_cols, gap_cols])
    if runs.train_loss is None:
        return design, runs.loss
    train_rows = np.hstack([train_cols, np.zeros_like(gap_cols)])
    return np.vstack([train_rows, design]), np.concatenate([runs.train_loss, runs.loss])


# ---- stage 1: one curve per δ: loss = a·T^b + c (+ g·T^h for the gap when δ > 0) ------------------------


def _fit_one_delta(runs: SptRuns, delta: float) -> PerDeltaFit:
    mask = runs.delta == delta
    sub = _subset(runs, np.flatnonzero(mask))
    logt = np.log(sub.tokens)
    with_gap = delta > 0

    def solve(exps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        train_cols = np.column_stack([np.exp(exps[0] * logt), np.ones_like(logt)])
        gap_cols = np.exp(exps[1] * logt)[:, None] if with_gap else np.zeros((logt.size, 0))
        design, y = _stack(sub, train_cols, gap_cols)
        coef = _project(design, y, (0, 2) if with_gap else (0,))
        return coef, design @ coef - y, np.hstack([train_cols, gap_cols]) @ coef

    # From test loss alone a decaying gap is indistinguishable from the train term, so the per-δ gap is
    # then limited to a growing one (h > 0): the onset of overfitting, the part that decides δ*.
    h_lo = -3.0 if sub.train_loss is not None else _EPS
    lo, hi = np.array([-3.0, h_lo]), np.array([-_EPS, 1 - _EPS])
    h_grid = np.linspace(max(h_lo, -1.5), 0.98, 21 if with_gap else 1)
    grid = [np.array([b, h]) for b in np.linspace(-1.5, -0.01, 25) for h in h_grid]
    start = min(grid, key=lambda e: float(np.sum(solve(e)[1] ** 2)))
    n_exp = 2 if with_gap else 1
    res = least_squares(
        lambda e: solve(np.append(e, start[1:]))[1], start[:n_exp], bounds=(lo[:n_exp], hi[:n_exp])
    )
    exps = np.append(res.x, start[1:])[:2]
    coef, _, predicted_test = solve(exps)
    return PerDeltaFit(
        delta=float(delta),
        n_points=int(mask.sum()),
        tokens_min=float(sub.tokens.min()),
        tokens_max=float(sub.tokens.max()),
        a=float(coef[0]),
        b=float(exps[0]),
        c=float(coef[1]),
        g=float(coef[2]) if with_gap else 0.0,
        h=float(exps[1]) if with_gap else 0.0,
        quality=fit_quality(sub.loss, predicted_test),
    )


# ---- stage 2: the joint fit -----------------------------------------------------------------------------
# exponents e = [u, v, log κ2, α2, α3, b_gap_g, b_gap_s] with b_train_g = -u, b_train_s = -u - v, so
# u, v > 0 encodes b_train_s < b_train_g < 0; amplitudes [A_train, κ0, κ1, κ3, α1] with A_train, α1 >= 0.

_LO = np.array([_EPS, _EPS, np.log(1e-6), 0.0, -100.0, -3.0, _EPS])
_HI = np.array([3.0, 3.0, np.log(10.0), 10.0, 100.0, -_EPS, 1 - _EPS])
_TINY = 1e-300  # A_train, α1 at their bound 0 are stored as this, keeping the law's strict positivity


class _JointProblem:
    """The joint fit on one data set, reduced to its seven exponents."""

    def __init__(self, runs: SptRuns) -> None:
        self.runs = runs
        self.logt = np.log(runs.tokens)
        self.d = runs.delta
        self.log_d = np.log(np.where(self.d > 0, self.d, 1.0))

    def _solve_linear(self, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d, logt = self.d, self.logt
        f_a = np.exp(-(e[0] + e[1] * d) * logt)
        train_cols = np.column_stack([f_a, np.ones_like(d), -np.log(d + np.exp(e[2])), -d])
        log_gap = e[3] * self.log_d + e[4] * d + (d * e[6] + (1 - d) * e[5]) * logt
        f_gap = np.where(d > 0, np.exp(np.minimum(log_gap, 300.0)), 0.0)
        design, y = _stack(self.runs, train_cols, f_gap[:, None])
        coef = _project(design, y, (0, 4))
        return coef, design @ coef - y

    def residuals(self, e: np.ndarray) -> np.ndarray:
        return self._solve_linear(e)[1]

    def solve(self, e0: np.ndarray):
        x0 = np.clip(e0, _LO + 1e-9, _HI - 1e-9)
        return least_squares(self.residuals, x0, bounds=(_LO, _HI), x_scale="jac")

    def law(self, e: np.ndarray) -> OverfittingLaw:
        a, k0, k1, k3, a1 = (float(c) for c in self._solve_linear(e)[0])
        u, v, lk2, a2, a3, bgg, bgs = (float(x) for x in e)
        return OverfittingLaw(
            A_train=max(a, _TINY),
            b_train_g=-u,
            b_train_s=-u - v,
            kappa0=k0,
            kappa1=k1,
            kappa2=float(np.exp(lk2)),
            kappa3=k3,
            alpha1=max(a1, _TINY),
            alpha2=a2,
            alpha3=a3,
            b_gap_g=bgg,
            b_gap_s=bgs,
        )

    def best_starts(self, per_delta: list[PerDeltaFit], keep: int = 4) -> list[np.ndarray]:
        """Starting exponents seeded by the per-δ fits, widened by a small grid; the ``keep`` best by cost."""
        d = np.array([p.delta for p in per_delta])
        slope, intercept = np.polyfit(d, [p.b for p in per_delta], 1)
        u0, v0 = float(np.clip(-intercept, 0.01, 2.0)), float(np.clip(-slope, 0.01, 2.0))
        gd = np.array([p.delta for p in per_delta if p.delta > 0])
        h_slope, h_int = np.polyfit(gd, [p.h for p in per_delta if p.delta > 0], 1)
        bgg0 = float(np.clip(h_int, -2.0, -0.01))
        bgs0 = float(np.clip(h_int + h_slope, 0.01, 0.99))
        candidates = [
            np.array([u, v, lk2, a2, a3, bgg, bgs])
            for u in {u0, 0.1}
            for v in {v0, 0.1}
            for lk2 in np.log([1e-3, 1e-2, 1e-1])
            for a2 in (0.5, 1.0, 2.0)
            for a3 in (-10.0, 0.0)
            for bgg in {bgg0, -0.05, -0.3}
            for bgs in {bgs0, 0.3, 0.8}
        ]
        costs = [float(np.sum(self.residuals(np.clip(c, _LO, _HI)) ** 2)) for c in candidates]
        return [candidates[i] for i in np.argsort(costs)[:keep]]
