"""The SPT overfitting law (Finetuner's Fallacy §5.1) and its fit from pilot runs.

    L_test(T, δ)  = L_train(T, δ) + L_gap(T, δ)
    L_train(T, δ) = A_train · e^(λ·δ) · T^b_train(δ) + C_train(δ),   b_x(δ) = δ·b_x,s + (1 − δ)·b_x,g
    L_gap(T, δ)   = α1 · δ^α2 · exp(α3·δ) · T^b_gap(δ)      (exactly 0 at δ = 0)
    C_train(δ)    = κ0 − κ1·log(δ + κ2) − κ3·δ

δ is a fraction (0.05 = 5%). T enters the law divided by ``tokens_unit``. The paper's law (λ = 0) is not
closed under a change of that unit: T → T/k turns A_train into A_train·k^−b_train(δ), a δ-dependent
amplitude; e^(λ·δ) absorbs it exactly (as α3 does for the gap). With it the fit is done in one canonical
unit, the pilots' geometric-mean T, and reported in any unit (``OverfittingLaw.in_unit``) with identical
predictions: the answer never depends on the unit asked for. λ = 0 is the paper's law in its own unit.

The fit follows App. D.1: curves per δ (a start), a joint fit with every exponent shared across δ but the
amplitudes free per δ, the kernels fitted to those per-δ values, then the fully parametric joint fit seeded
by all of them. Constraints are enforced by the parametrisation: b_train,s < b_train,g < 0,
b_gap,g < 0 < b_gap,s and b_gap(δ) < 1 on [0, largest pilot δ] — the δ the pilots cover, where the paper
states it — so the δ range later searched never changes the fit. Every linear solve is a bounded
non-negative least squares (a fixed iteration cap) and a check point of the request's budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
from scipy.optimize import least_squares, nnls
from tqdm import tqdm

from mixer_contract.errors import InvalidInput
from mixer_service.planner import budget
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
    "lambda_train",
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
DEFAULT_TOKENS_UNIT = 1e9  # constants reported with T in billions of tokens, the scale of the paper's budgets
_EPS = 1e-4  # margin that keeps the strict inequalities strict
BOUND_TOLERANCE = 1e-3  # a parameter this close (relative to its allowed width) to a bound is flagged
MAX_NFEV = 400  # nonlinear iterations per start: every solve is bounded, whatever the data


@dataclass(frozen=True)
class OverfittingLaw:
    """Fitted constants of the law; evaluation takes T in tokens and broadcasts over arrays of T and δ."""

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
    lambda_train: float = 0.0  # A_train's δ term e^(λ·δ); 0 in the unit the paper's law is written in
    tokens_unit: float = 1.0  # T is divided by this before the law sees it

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
            (self.b_gap_g < 0 < self.b_gap_s, "need b_gap_g < 0 < b_gap_s"),
            (self.kappa2 > 0, "kappa2 must be > 0 (log(δ + κ2) at δ = 0)"),
            (self.alpha1 > 0 and self.alpha2 >= 0, "need alpha1 > 0 and alpha2 >= 0"),
            (self.tokens_unit > 0, "tokens_unit must be > 0"),
            (all(np.isfinite(v) for v in asdict(self).values()), "every constant must be finite"),
        ]
        return [msg for ok, msg in checks if not ok]

    def in_unit(self, tokens_unit: float) -> OverfittingLaw:
        """The same law with T divided by ``tokens_unit``: other constants, identical predictions."""
        ln_r = float(np.log(tokens_unit / self.tokens_unit))
        return replace(
            self,
            A_train=self.A_train * float(np.exp(self.b_train_g * ln_r)),
            lambda_train=self.lambda_train + (self.b_train_s - self.b_train_g) * ln_r,
            alpha1=self.alpha1 * float(np.exp(self.b_gap_g * ln_r)),
            alpha3=self.alpha3 + (self.b_gap_s - self.b_gap_g) * ln_r,
            tokens_unit=float(tokens_unit),
        )

    def gap_exponent(self, delta: np.ndarray | float) -> np.ndarray:
        """b_gap(δ); the paper reports it below 1 over the δ it studies."""
        d = np.asarray(delta, float)
        return d * self.b_gap_s + (1 - d) * self.b_gap_g

    def delta_gap_exponent_one(self) -> float:
        """The δ at which b_gap(δ) reaches 1 (the paper's regime is below it)."""
        return (1 - self.b_gap_g) / (self.b_gap_s - self.b_gap_g)

    def c_train(self, delta: np.ndarray | float) -> np.ndarray:
        d = np.asarray(delta, float)
        return self.kappa0 - self.kappa1 * np.log(d + self.kappa2) - self.kappa3 * d

    def a_gap(self, delta: np.ndarray | float) -> np.ndarray:
        """The Gamma kernel; 0 at δ = 0 whatever α2: no domain data, nothing to overfit (0^0 is not 1)."""
        return self.gap(self.tokens_unit, delta)

    def train_loss(self, tokens: np.ndarray | float, delta: np.ndarray | float) -> np.ndarray:
        d = np.asarray(delta, float)
        b = d * self.b_train_s + (1 - d) * self.b_train_g
        log_a = np.log(self.A_train) + self.lambda_train * d  # log space: far apart in some units
        with np.errstate(over="ignore"):
            return np.exp(log_a + b * self._log_t(tokens)) + self.c_train(d)

    def gap(self, tokens: np.ndarray | float, delta: np.ndarray | float) -> np.ndarray:
        d = np.asarray(delta, float)
        safe = np.where(d > 0, d, 1.0)
        log_gap = (np.log(self.alpha1) + self.alpha2 * np.log(safe) + self.alpha3 * d
                   + self.gap_exponent(d) * self._log_t(tokens))
        with np.errstate(over="ignore"):
            return np.where(d > 0, np.exp(log_gap), 0.0)

    def test_loss(self, tokens: np.ndarray | float, delta: np.ndarray | float) -> np.ndarray:
        """Predicted held-out domain loss after ``tokens`` pretraining tokens at domain fraction δ."""
        return self.train_loss(tokens, delta) + self.gap(tokens, delta)

    def _log_t(self, tokens: np.ndarray | float) -> np.ndarray:
        return np.log(np.asarray(tokens, float) / self.tokens_unit)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, float]) -> OverfittingLaw:
        optional = ("tokens_unit", "lambda_train")
        missing = [f.name for f in fields(cls) if f.name not in values and f.name not in optional]
        if missing:
            raise InvalidInput(f"overfitting-law constants missing: {', '.join(missing)}")
        return cls(**{f.name: float(values[f.name]) for f in fields(cls) if f.name in values})


@dataclass(frozen=True)
class PerDeltaFit:
    """The first-stage curve at one δ: loss = a·T^b + c (+ g·T^h, the gap, if δ > 0), T in the fit's unit."""

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


@dataclass(frozen=True)
class SharedFit:
    """App. D.1's joint stage: every exponent shared across δ; A_train, C_train and A_gap free per δ."""

    b_train_g: float
    b_train_s: float
    b_gap_g: float
    b_gap_s: float
    a_train: dict[float, float]
    c_train: dict[float, float]
    a_gap: dict[float, float]
    quality: FitQuality

    def to_dict(self) -> dict:
        out = asdict(self)
        for name in ("a_train", "c_train", "a_gap"):
            out[name] = [{"delta": d, "value": v} for d, v in getattr(self, name).items()]
        out["quality"] = self.quality.to_dict()
        return out


@dataclass
class SptFit:
    """The joint fit with everything needed to judge it: per-δ fits, residuals and bootstrap spread."""

    law: OverfittingLaw
    per_delta: list[PerDeltaFit]
    shared: SharedFit
    quality: FitQuality
    residuals: np.ndarray
    params: list[ParamEstimate]
    tokens_range: tuple[float, float]
    deltas: tuple[float, ...]
    fit_tokens_unit: float  # the canonical unit the fit ran in (pilots' geometric-mean T)
    bootstrap_laws: list[OverfittingLaw] = field(default_factory=list)
    bootstrap_requested: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def delta_max(self) -> float:
        """The largest pilot δ: b_gap(δ) < 1 is imposed on [0, delta_max]."""
        return max(self.deltas)

    def predict(self, tokens: float, delta: float) -> tuple[float, tuple[float, float] | None]:
        """Predicted test loss at (T, δ) and its bootstrap 95% interval (None without a bootstrap)."""
        point = float(self.law.test_loss(tokens, delta))
        if len(self.bootstrap_laws) < 2:
            return point, None
        with np.errstate(over="ignore", invalid="ignore"):
            boot = np.array([float(b.test_loss(tokens, delta)) for b in self.bootstrap_laws])
        return point, interval95(boot[np.isfinite(boot)], point)

    def to_dict(self) -> dict:
        return {
            "law": self.law.to_dict(),
            "tokens_unit": self.law.tokens_unit,
            "fit_tokens_unit": self.fit_tokens_unit,
            "delta_unit": "fraction",
            "gap_exponent_bound": {"b_gap_below": 1.0, "delta_from": 0.0, "delta_to": self.delta_max},
            "quality": self.quality.to_dict(),
            "params": [p.to_dict() for p in self.params],
            "per_delta": [p.to_dict() for p in self.per_delta],
            "shared_exponent_fit": self.shared.to_dict(),
            "tokens_range": list(self.tokens_range),
            "deltas": list(self.deltas),
            "n_bootstrap": len(self.bootstrap_laws),
            "n_bootstrap_requested": self.bootstrap_requested,
            "warnings": list(self.warnings),
        }


def interval95(values: np.ndarray, point: float) -> tuple[float, float]:
    """2.5–97.5% percentiles, widened to contain the point estimate (a skewed bootstrap can miss it)."""
    if values.size == 0:
        return point, point
    low, high = np.percentile(values, [2.5, 97.5])
    return float(min(low, point)), float(max(high, point))


def fit_overfitting_law(
    runs: SptRuns,
    n_bootstrap: int = 0,
    seed: int = 0,
    tokens_unit: float = DEFAULT_TOKENS_UNIT,
    deadline: budget.Deadline | None = None,
    bootstrap_share: float = 1.0,
) -> SptFit:
    """Fit the law to pilot runs (App. D.1), with ``n_bootstrap`` refits on resamples drawn within each δ.

    The fit runs in the pilots' geometric-mean unit of T and is reported in ``tokens_unit``; the result
    does not depend on it. ``deadline`` bounds the wall-clock time: the point fit raises ``FitTimeout``
    past it, the bootstrap stops (with a warning) once ``bootstrap_share`` of the time left is spent.
    """
    if not (np.isfinite(tokens_unit) and tokens_unit > 0):
        raise InvalidInput(f"tokens unit must be a positive number, got {tokens_unit}")
    if n_bootstrap < 0:
        raise InvalidInput(f"bootstrap refits must be >= 0, got {n_bootstrap}")
    check_design(runs)
    deadline = deadline or budget.Deadline()
    with budget.running_under(deadline):
        return _fit(runs, n_bootstrap, seed, tokens_unit, deadline, bootstrap_share)


def _fit(runs: SptRuns, n_bootstrap: int, seed: int, tokens_unit: float, deadline: budget.Deadline,
         bootstrap_share: float) -> SptFit:
    ref = float(np.exp(np.mean(np.log(runs.tokens))))
    delta_max = float(runs.deltas.max())
    scaled = SptRuns(runs.tokens / ref, runs.delta, runs.loss, runs.train_loss)
    per_delta = [_fit_one_delta(scaled, d, ref) for d in scaled.deltas]
    joint = _JointProblem(scaled, delta_max)
    shared = _SharedProblem(scaled, delta_max)
    shared_x = shared.solve(per_delta)
    starts = joint.best_starts(per_delta, shared.result(shared_x))
    starts.append(joint.start_from_shared(shared, shared_x))
    best = min((joint.solve(s) for s in starts), key=lambda r: r.cost)
    law = joint.law(best.x, ref).in_unit(tokens_unit)
    predicted = law.test_loss(runs.tokens, runs.delta)

    warnings = [] if best.success else [f"joint fit did not converge: {best.message}"]
    if len(runs.deltas) < 4:
        warnings.append(
            f"only {len(runs.deltas)} distinct δ values: C_train(δ) has 4 constants, "
            "so its δ-shape is weakly determined"
        )
    warnings += joint.bound_warnings(best.x)
    shared_fit = shared.result(shared_x)  # every solve of the point fit before the bootstrap spends the rest
    until = deadline.share(bootstrap_share)
    laws = _bootstrap(scaled, per_delta, best.x, ref, n_bootstrap, seed, until, warnings)
    laws = [b.in_unit(tokens_unit) for b in laws]
    samples = np.array([[getattr(b, n) for n in PARAM_NAMES] for b in laws]) if laws else None
    return SptFit(
        law=law,
        per_delta=per_delta,
        shared=shared_fit,
        quality=fit_quality(runs.loss, predicted),
        residuals=runs.loss - predicted,
        params=summarize_params(PARAM_NAMES, np.array([getattr(law, n) for n in PARAM_NAMES]), samples),
        tokens_range=(float(runs.tokens.min()), float(runs.tokens.max())),
        deltas=tuple(float(d) for d in runs.deltas),
        fit_tokens_unit=ref,
        bootstrap_laws=laws,
        bootstrap_requested=n_bootstrap,
        warnings=warnings,
    )


def _bootstrap(scaled: SptRuns, per_delta: list[PerDeltaFit], best: np.ndarray, ref: float, n: int,
               seed: int, until: budget.Deadline, warnings: list[str]) -> list[OverfittingLaw]:
    """Refits on resamples until ``n`` are done or ``until`` passes (a warning says how many were)."""
    laws: list[OverfittingLaw] = []
    rng = np.random.default_rng(seed)
    with budget.running_under(until):
        for _ in tqdm(range(n), desc="bootstrap refits", leave=False, disable=None if n >= 20 else True):
            try:
                laws.append(_refit(_subset(scaled, stratified_resample(scaled.delta, rng)), per_delta, best,
                                   ref))
            except budget.FitTimeout:
                warnings.append(f"bootstrap stopped after {len(laws)} of {n} refits: the wall-clock budget "
                                f"({until.seconds:g} s for the request) ran out; intervals rest on fewer "
                                "refits")
                break
    return laws


def _refit(runs: SptRuns, per_delta: list[PerDeltaFit], best: np.ndarray, ref: float) -> OverfittingLaw:
    """One bootstrap replicate: the shared stage is redone, so the refit can land in another basin of the
    law (the δ-extrapolation ambiguity pilots leave open shows up in the intervals, not hidden by a warm
    start), then the joint fit from both that start and the original optimum; the lower cost wins. The
    bound on b_gap stays on the full pilots' δ range, so every replicate fits the same family."""
    delta_max = float(runs.deltas.max())
    shared = _SharedProblem(runs, delta_max)
    joint = _JointProblem(runs, delta_max)
    fits = [joint.solve(best), joint.solve(joint.start_from_shared(shared, shared.solve(per_delta, keep=1)))]
    return joint.law(min(fits, key=lambda r: r.cost).x, ref)


def check_design(runs: SptRuns) -> None:
    """Refuse, before any fit, pilots from which the law cannot be fitted."""
    runs.refuse("tokens", runs.tokens < 1, "must count at least one token (T in tokens, not billions)")
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
    if np.ptp(runs.loss) <= 1e-9 * np.max(runs.loss):
        rows = f"{runs.label(0)} to {runs.label(runs.loss.size - 1)}"
        raise InvalidInput(f"domain loss is {runs.loss[0]:g} on every row ({rows}): a constant has no "
                           "scaling law to fit")


def _subset(runs: SptRuns, idx: np.ndarray) -> SptRuns:
    train = None if runs.train_loss is None else runs.train_loss[idx]
    where = None if runs.where is None else tuple(runs.where[i] for i in idx)
    return SptRuns(runs.tokens[idx], runs.delta[idx], runs.loss[idx], train, where)


# Every stage uses variable projection: the amplitudes (A_train, κ0, κ1, κ3, α1; per δ: a, c, g or A_δ, C_δ,
# G_δ) enter linearly, so for given exponents they are solved exactly by bounded linear least squares and
# the nonlinear search runs over the few exponents only. This removes the scale coupling that makes a plain
# 13-parameter fit stall in poor local minima.


def _project(design: np.ndarray, y: np.ndarray, nonneg: tuple[int, ...] | list[int]) -> np.ndarray:
    """Best amplitudes for a fixed design; columns listed in ``nonneg`` are kept >= 0.

    The free columns are projected out and the rest is Lawson–Hanson NNLS with its iteration cap (no
    ``lsq_linear``: its trf solver can loop forever on noisy pilots), then the free amplitudes follow by
    least squares. Each call is a check point of the request's budget.
    """
    budget.check()
    if not (np.all(np.isfinite(design)) and np.all(np.isfinite(y))):
        raise InvalidInput("the fit reached a non-finite design: the pilots' tokens or losses span a range "
                           "the law cannot be evaluated on")
    scale = np.linalg.norm(design, axis=0)
    scale[scale == 0] = 1.0
    a = design / scale
    pos = np.zeros(a.shape[1], bool)
    pos[list(nonneg)] = True
    coef = np.zeros(a.shape[1])
    if pos.any():
        a_pos, target = a[:, pos], y
        if not pos.all():
            u, s, _ = np.linalg.svd(a[:, ~pos], full_matrices=False)
            u = u[:, s > s[0] * 1e-12] if s.size and s[0] > 0 else u[:, :0]
            a_pos, target = a_pos - u @ (u.T @ a_pos), y - u @ (u.T @ y)
        try:
            coef[pos] = nnls(a_pos, target, maxiter=50 * a_pos.shape[1])[0]
        except RuntimeError:  # the iteration cap: the clipped unconstrained solution is a feasible answer
            coef[pos] = np.maximum(np.linalg.lstsq(a_pos, target, rcond=None)[0], 0.0)
    if not pos.all():
        coef[~pos] = np.linalg.lstsq(a[:, ~pos], y - a[:, pos] @ coef[pos], rcond=None)[0]
    return coef / scale


def _stack(runs: SptRuns, train_cols: np.ndarray, gap_cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Design and targets: test rows see train + gap columns; domain-train rows (if any) the train ones."""
    design = np.hstack([train_cols, gap_cols])
    if runs.train_loss is None:
        return design, runs.loss
    train_rows = np.hstack([train_cols, np.zeros_like(gap_cols)])
    return np.vstack([train_rows, design]), np.concatenate([runs.train_loss, runs.loss])


def _least_squares(fun, x0: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    return least_squares(fun, x0, bounds=(lo, hi), x_scale="jac", max_nfev=MAX_NFEV)


# ---- stage 1: one curve per δ: loss = a·T^b + c (+ g·T^h for the gap when δ > 0) ------------------------


def _fit_one_delta(runs: SptRuns, delta: float, tokens_unit: float) -> PerDeltaFit:
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
    h_grid = np.linspace(max(h_lo, -1.5), 0.98, 11 if with_gap else 1)
    grid = [np.array([b, h]) for b in np.linspace(-1.5, -0.01, 16) for h in h_grid]
    start = min(grid, key=lambda e: float(np.sum(solve(e)[1] ** 2)))
    n_exp = 2 if with_gap else 1
    res = least_squares(lambda e: solve(np.append(e, start[1:]))[1], start[:n_exp],
                        bounds=(lo[:n_exp], hi[:n_exp]), max_nfev=MAX_NFEV)
    exps = np.append(res.x, start[1:])[:2]
    coef, _, predicted_test = solve(exps)
    return PerDeltaFit(
        delta=float(delta),
        n_points=int(mask.sum()),
        tokens_min=float(sub.tokens.min() * tokens_unit),
        tokens_max=float(sub.tokens.max() * tokens_unit),
        a=float(coef[0]),
        b=float(exps[0]),
        c=float(coef[1]),
        g=float(coef[2]) if with_gap else 0.0,
        h=float(exps[1]) if with_gap else 0.0,
        quality=fit_quality(sub.loss, predicted_test),
    )


# ---- shared exponents ------------------------------------------------------------------------------------
# b_train,g = −u, b_train,s = −u − v (u, v > 0 encodes b_train,s < b_train,g < 0). b_gap,s = τ·s_max with
# s_max = (1 − (1 − δ_max)·b_gap,g)/δ_max and 0 < τ < 1: b_gap,s > 0 and b_gap(δ_max) < 1, hence
# b_gap(δ) < 1 on all of [0, δ_max] (b_gap is linear in δ); τ → 1 means b_gap(δ_max) → 1. δ_max is the
# largest pilot δ.

_U, _V, _BGG, _TAU = (_EPS, 3.0), (_EPS, 60.0), (-3.0, -_EPS), (_EPS, 1 - _EPS)


def _b_gap_s(b_gap_g: float | np.ndarray, tau: float | np.ndarray, delta_max: float) -> np.ndarray:
    return np.asarray(tau * (1 - (1 - delta_max) * b_gap_g) / delta_max)


def _tau_for(b_gap_g: float, b_gap_s: float, delta_max: float) -> float:
    return float(b_gap_s / ((1 - (1 - delta_max) * b_gap_g) / delta_max))


def _exponent_columns(
    d: np.ndarray, logt: np.ndarray, u: float, v: float, bgg: float, tau: float, delta_max: float
) -> tuple[np.ndarray, np.ndarray]:
    """log T^b_train(δ) and log T^b_gap(δ) for given shared exponents."""
    log_train = -(u + v * d) * logt
    log_gap = (d * _b_gap_s(bgg, tau, delta_max) + (1 - d) * bgg) * logt
    return log_train, log_gap


def _exp_capped(x: np.ndarray) -> np.ndarray:
    return np.exp(np.minimum(x, 300.0))


class _SharedProblem:
    """Stage 2 (App. D.1): exponents [u, v, b_gap_g, τ] shared, amplitudes A_δ, C_δ, G_δ per δ."""

    def __init__(self, runs: SptRuns, delta_max: float) -> None:
        self.runs, self.delta_max = runs, delta_max
        self.logt, self.d = np.log(runs.tokens), runs.delta
        self.deltas = runs.deltas
        self.gap_deltas = self.deltas[self.deltas > 0]
        self.lo = np.array([_U[0], _V[0], _BGG[0], _TAU[0]])
        self.hi = np.array([_U[1], _V[1], _BGG[1], _TAU[1]])

    def _solve_linear(self, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u, v, bgg, tau = e
        log_train, log_gap = _exponent_columns(self.d, self.logt, u, v, bgg, tau, self.delta_max)
        onehot = (self.d[:, None] == self.deltas[None, :]).astype(float)
        gap_onehot = (self.d[:, None] == self.gap_deltas[None, :]).astype(float)
        train_cols = np.hstack([onehot * _exp_capped(log_train)[:, None], onehot])
        design, y = _stack(self.runs, train_cols, gap_onehot * _exp_capped(log_gap)[:, None])
        n = self.deltas.size
        nonneg = list(range(n)) + list(range(train_cols.shape[1], design.shape[1]))
        coef = _project(design, y, nonneg)
        return coef, design @ coef - y

    def solve(self, per_delta: list[PerDeltaFit], keep: int = 3) -> np.ndarray:
        d = np.array([p.delta for p in per_delta])
        slope, intercept = np.polyfit(d, [p.b for p in per_delta], 1)
        u0 = float(np.clip(-intercept, 0.01, 2.0))
        v0 = float(np.clip(-slope, 0.01, 50.0))
        gd = np.array([p.delta for p in per_delta if p.delta > 0])
        h_slope, h_int = np.polyfit(gd, [p.h for p in per_delta if p.delta > 0], 1)
        bgg0 = float(np.clip(h_int, -2.0, -0.01))
        tau0 = float(np.clip(_tau_for(bgg0, max(h_int + h_slope, 0.01), self.delta_max), 0.05, 0.95))
        grid = [np.array([u, v, b, t]) for u in {u0, 0.1, 0.3} for v in {v0, 0.1, 2.0}
                for b in {bgg0, -0.05, -0.3} for t in {tau0, 0.3, 0.7}]
        cost = [float(np.sum(self._solve_linear(g)[1] ** 2)) for g in grid]
        best = None
        for i in np.argsort(cost)[:keep]:
            res = _least_squares(lambda e: self._solve_linear(e)[1], np.clip(grid[i], self.lo, self.hi),
                                 self.lo, self.hi)
            best = res if best is None or res.cost < best.cost else best
        assert best is not None
        return best.x

    def result(self, e: np.ndarray) -> SharedFit:
        coef, resid = self._solve_linear(e)
        n = self.deltas.size
        u, v, bgg, tau = (float(x) for x in e)
        n_test = self.runs.loss.size

        def per(values: np.ndarray, deltas: np.ndarray) -> dict[float, float]:
            return {float(d): float(c) for d, c in zip(deltas, values, strict=True)}

        return SharedFit(
            b_train_g=-u, b_train_s=-u - v, b_gap_g=bgg, b_gap_s=float(_b_gap_s(bgg, tau, self.delta_max)),
            a_train=per(coef[:n], self.deltas), c_train=per(coef[n:2 * n], self.deltas),
            a_gap=per(coef[2 * n:], self.gap_deltas),
            quality=fit_quality(self.runs.loss, self.runs.loss + resid[-n_test:]),
        )


def _kernel_starts(shared: SharedFit) -> tuple[float, float, float, float]:
    """λ, log κ2, α2, α3 from the per-δ values of stage 2: A_train's, C_train's and the Gamma kernel's
    δ-shapes fitted to them."""
    d = np.array(list(shared.c_train))
    c = np.array(list(shared.c_train.values()))

    def c_resid(lk2: float) -> float:
        design = np.column_stack([np.ones_like(d), -np.log(d + np.exp(lk2)), -d])
        return float(np.sum((design @ np.linalg.lstsq(design, c, rcond=None)[0] - c) ** 2))

    lk2 = min(np.linspace(np.log(1e-5), np.log(5.0), 60), key=c_resid)
    ad = np.array([k for k, a in shared.a_train.items() if a > 0])
    lam = 0.0
    if ad.size >= 2:
        lam = float(np.clip(np.polyfit(ad, np.log([shared.a_train[k] for k in ad]), 1)[0], -100.0, 100.0))
    gd = np.array([k for k, g in shared.a_gap.items() if g > 0])
    if gd.size >= 3:
        g = np.log([shared.a_gap[k] for k in gd])
        a2, a3 = np.linalg.lstsq(np.column_stack([np.ones_like(gd), np.log(gd), gd]), g, rcond=None)[0][1:]
        return lam, float(lk2), float(np.clip(a2, 0.0, 10.0)), float(np.clip(a3, -100.0, 100.0))
    return lam, float(lk2), 1.0, 0.0


# ---- the fully parametric joint fit ---------------------------------------------------------------------
# exponents e = [u, v, λ, log κ2, α2, α3, b_gap_g, τ]; amplitudes [A_train, κ0, κ1, κ3, α1], A_train, α1 >= 0.

_NAMES = ("u (−b_train,g)", "v (b_train,g − b_train,s)", "λ (fit unit)", "log κ2", "α2", "α3 (fit unit)",
          "b_gap,g", "τ")
_LO = np.array([_U[0], _V[0], -100.0, np.log(1e-6), 0.0, -100.0, _BGG[0], _TAU[0]])
_HI = np.array([_U[1], _V[1], 100.0, np.log(10.0), 10.0, 100.0, _BGG[1], _TAU[1]])
_TINY = 1e-300  # A_train, α1 at their bound 0 are stored as this, keeping the law's strict positivity


class _JointProblem:
    """The joint fit on one data set (T in the fit's unit), reduced to its eight exponents."""

    def __init__(self, runs: SptRuns, delta_max: float) -> None:
        self.runs, self.delta_max = runs, delta_max
        self.logt = np.log(runs.tokens)
        self.d = runs.delta
        self.log_d = np.log(np.where(self.d > 0, self.d, 1.0))

    def _solve_linear(self, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = self.d
        log_a, log_gap = _exponent_columns(d, self.logt, e[0], e[1], e[6], e[7], self.delta_max)
        train_cols = np.column_stack([_exp_capped(log_a + e[2] * d), np.ones_like(d),
                                      -np.log(d + np.exp(e[3])), -d])
        f_gap = np.where(d > 0, _exp_capped(log_gap + e[4] * self.log_d + e[5] * d), 0.0)
        design, y = _stack(self.runs, train_cols, f_gap[:, None])
        coef = _project(design, y, (0, 4))
        return coef, design @ coef - y

    def residuals(self, e: np.ndarray) -> np.ndarray:
        return self._solve_linear(e)[1]

    def solve(self, e0: np.ndarray):
        return _least_squares(self.residuals, np.clip(e0, _LO + 1e-9, _HI - 1e-9), _LO, _HI)

    def law(self, e: np.ndarray, tokens_unit: float) -> OverfittingLaw:
        a, k0, k1, k3, a1 = (float(c) for c in self._solve_linear(e)[0])
        u, v, lam, lk2, a2, a3, bgg, tau = (float(x) for x in e)
        return OverfittingLaw(
            A_train=max(a, _TINY),
            lambda_train=lam,
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
            b_gap_s=float(_b_gap_s(bgg, tau, self.delta_max)),
            tokens_unit=tokens_unit,
        )

    def bound_warnings(self, e: np.ndarray) -> list[str]:
        """One line per fitted quantity at (or within BOUND_TOLERANCE of) a bound the fit imposes."""
        out = []
        width = _HI - _LO
        for name, x, lo, hi, w in zip(_NAMES, e, _LO, _HI, width, strict=True):
            near = BOUND_TOLERANCE * w
            side = "lower" if x - lo <= near else "upper" if hi - x <= near else ""
            if not side:
                continue
            if name == "τ" and side == "upper":
                out.append(f"b_gap(δ={self.delta_max:g}) = 1 at the fit's bound b_gap(δ) < 1 on "
                           f"[0, {self.delta_max:g}] (the pilots' δ range, where the paper states it): the "
                           "pilots ask for faster overfitting than the law allows; predictions near that δ "
                           "are not trustworthy")
            elif name == "τ":
                out.append("b_gap,s is at its bound 0: the pilots show no growing gap")
            else:
                out.append(f"fitted {name} = {x:.4g} sits at its {side} bound "
                           f"[{lo:.4g}, {hi:.4g}]: the law cannot follow the pilots there")
        coef = self._solve_linear(e)[0]
        for j, name in ((0, "A_train"), (4, "α1")):
            if coef[j] <= 0:
                out.append(f"fitted {name} is at its bound 0: that term of the law is switched off")
        return out

    def start_from_shared(self, shared: _SharedProblem, x: np.ndarray) -> np.ndarray:
        lam, lk2, a2, a3 = _kernel_starts(shared.result(x))
        return np.array([x[0], x[1], lam, lk2, a2, a3, x[2], x[3]])

    def best_starts(self, per_delta: list[PerDeltaFit], shared: SharedFit, keep: int = 4) -> list[np.ndarray]:
        """Starting exponents seeded by the per-δ fits, widened by a small grid; the ``keep`` best by cost."""
        d = np.array([p.delta for p in per_delta])
        slope, intercept = np.polyfit(d, [p.b for p in per_delta], 1)
        u0, v0 = float(np.clip(-intercept, 0.01, 2.0)), float(np.clip(-slope, 0.01, 50.0))
        gd = np.array([p.delta for p in per_delta if p.delta > 0])
        h_slope, h_int = np.polyfit(gd, [p.h for p in per_delta if p.delta > 0], 1)
        bgg0 = float(np.clip(h_int, -2.0, -0.01))
        tau0 = float(np.clip(_tau_for(bgg0, max(h_int + h_slope, 0.01), self.delta_max), 0.02, 0.98))
        lam0 = _kernel_starts(shared)[0]
        candidates = [
            np.array([u, v, lam, lk2, a2, a3, bgg, tau])
            for u in {u0, 0.1}
            for v in {v0, 0.1}
            for lam in {lam0, 0.0}
            for lk2 in np.log([1e-3, 1e-2, 1e-1])
            for a2 in (0.5, 1.0, 2.0)
            for a3 in (-10.0, 0.0)
            for bgg in {bgg0, -0.05, -0.3}
            for tau in {tau0, 0.1, 0.5}
        ]
        costs = [float(np.sum(self.residuals(np.clip(c, _LO, _HI)) ** 2)) for c in candidates]
        return [candidates[i] for i in np.argsort(costs)[:keep]]


@dataclass(frozen=True)
class HoldoutCheck:
    """§5.3's validation: the law fitted without one δ, scored on that δ's measured curve."""

    delta: float
    n_points: int
    fitted_deltas: tuple[float, ...]
    rmse: float
    mean_error: float  # predicted − measured, averaged: the forecast's bias
    max_abs_error: float
    tokens_at_end: float
    measured_at_end: float
    predicted_at_end: float
    interval_at_end: tuple[float, float] | None
    share_in_interval: float | None  # held-out points inside the bootstrap 95% interval
    warnings: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def check_holdout(runs: SptRuns, delta: float) -> SptRuns:
    """The runs a holdout at ``delta`` is fitted on; refused before any fit if that is impossible."""
    held = np.isclose(runs.delta, delta)
    if not held.any():
        got = ", ".join(f"{d:g}" for d in runs.deltas)
        raise InvalidInput(f"holdout δ={delta:g} has no runs (runs have δ = {got})")
    kept = _subset(runs, np.flatnonzero(~held))
    try:
        check_design(kept)
    except InvalidInput as e:
        raise InvalidInput(f"holdout δ={delta:g}: without its runs, {e}") from None
    return kept


def holdout_check(
    runs: SptRuns,
    delta: float,
    n_bootstrap: int = 0,
    seed: int = 0,
    tokens_unit: float = DEFAULT_TOKENS_UNIT,
    deadline: budget.Deadline | None = None,
    bootstrap_share: float = 1.0,
) -> HoldoutCheck:
    """Fit on every δ but ``delta`` and report the forecast error on the held-out curve (paper §5.3)."""
    kept = check_holdout(runs, delta)
    held = np.isclose(runs.delta, delta)
    fit = fit_overfitting_law(kept, n_bootstrap, seed, tokens_unit, deadline, bootstrap_share)
    tokens, measured = runs.tokens[held], runs.loss[held]
    predicted = fit.law.test_loss(tokens, delta)
    errors = predicted - measured
    end = int(np.argmax(tokens))
    intervals = [fit.predict(t, delta)[1] for t in tokens]
    inside = None
    if intervals[0] is not None:
        inside = float(np.mean([lo <= m <= hi for (lo, hi), m in zip(intervals, measured, strict=True)]))  # type: ignore[misc]
    warnings = list(fit.warnings) + prediction_warnings(f"held-out δ={delta:g}", predicted, intervals)
    return HoldoutCheck(
        delta=float(delta),
        n_points=int(held.sum()),
        fitted_deltas=fit.deltas,
        rmse=float(np.sqrt(np.mean(errors**2))),
        mean_error=float(np.mean(errors)),
        max_abs_error=float(np.max(np.abs(errors))),
        tokens_at_end=float(tokens[end]),
        measured_at_end=float(measured[end]),
        predicted_at_end=float(predicted[end]),
        interval_at_end=intervals[end],
        share_in_interval=inside,
        warnings=warnings,
    )


def prediction_warnings(what: str, predicted: np.ndarray,
                        intervals: list[tuple[float, float] | None]) -> list[str]:
    """Say when predicted losses are not losses (≤ 0, non-finite) or their interval is wider than the loss:
    such a number, or a coverage share of such an interval, is not evidence."""
    out = []
    predicted = np.asarray(predicted, float)
    if not np.all(np.isfinite(predicted)):
        out.append(f"{what}: the law predicts a non-finite loss; the forecast is meaningless there")
    elif np.any(predicted <= 0):
        out.append(f"{what}: the law predicts a loss of {float(np.min(predicted)):.4g} (≤ 0, not a loss): "
                   "the fit extrapolates outside where it holds")
    bad = [iv for iv in intervals if iv is not None and (iv[0] <= 0 or not np.all(np.isfinite(iv))
                                                         or iv[1] - iv[0] > abs(float(np.median(predicted))))]
    if bad:
        lo, hi = bad[-1]
        out.append(f"{what}: the 95% interval reaches {lo:.4g}–{hi:.4g}, wider than the loss itself or below "
                   "0: the bootstrap laws disagree completely, a coverage share of it says nothing")
    return out
