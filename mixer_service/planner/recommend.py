"""Turn a fitted overfitting law into a domain fraction δ* for a token budget, and into a schedule.

δ* has no closed form (the paper picks it numerically from the fitted law), so the law is scanned on a
fine δ grid and the best cell refined with a bounded scalar minimiser. Bootstrap laws, when present, give
an interval for δ* so an operator can see how firmly the pilot runs pin it down.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal

import numpy as np
from scipy.optimize import least_squares, minimize_scalar

from mixer_contract.errors import InvalidInput
from mixer_contract.schedule import Schedule
from mixer_service.planner.fit_stats import require_finite
from mixer_service.planner.multiplier import ComputeMultiplier, compute_multiplier
from mixer_service.planner.overfitting_law import OverfittingLaw, SptFit, interval95, prediction_warnings

TOKENS_EXTRAPOLATION_FACTOR = 10.0  # a target this many times beyond the fitted tokens is "far"
GRID_POINTS = 2001
WIDE_DELTA_INTERVAL = 0.5  # a δ* interval wider than this share of the searched range is flagged


@dataclass(frozen=True)
class FinetuneGain:
    """Eq. 7: the domain-loss reduction finetuning adds after T pretraining tokens, Δℓ(T) = a·T^b + c.

    With measurements at several δ the amplitudes get a δ term, Δℓ(T, δ) = (a + a_delta·δ)·T^b + c +
    c_delta·δ, so a δ that gains more from finetuning (the paper: smaller δ, at large T) can overtake.
    """

    a: float
    b: float
    c: float
    a_delta: float = 0.0
    c_delta: float = 0.0
    tokens_range: tuple[float, float] | None = None  # the T its gains were measured at
    delta_range: tuple[float, float] | None = None  # the δ (δ-dependent fits only)

    def __call__(self, tokens: np.ndarray | float, delta: np.ndarray | float = 0.0) -> np.ndarray:
        d = np.asarray(delta, float)
        return (self.a + self.a_delta * d) * np.exp(self.b * np.log(tokens)) + self.c + self.c_delta * d

    @property
    def depends_on_delta(self) -> bool:
        return self.a_delta != 0.0 or self.c_delta != 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def extrapolation_warnings(self, tokens: float, deltas: np.ndarray) -> list[str]:
        """Say when the gain is read outside where it was measured, or comes out negative (a finetune that
        raises the loss is not what Eq. 7 was fitted to describe)."""
        out = []
        if self.tokens_range is not None and not self.tokens_range[0] <= tokens <= self.tokens_range[1]:
            out.append(f"the finetune gain (Eq. 7) is extrapolated to T={tokens:.3g}, outside the measured "
                       f"T range [{self.tokens_range[0]:.3g}, {self.tokens_range[1]:.3g}]")
        if self.depends_on_delta and self.delta_range is not None:
            beyond = deltas[(deltas < self.delta_range[0] - 1e-12) | (deltas > self.delta_range[1] + 1e-12)]
            if beyond.size:
                out.append(f"the finetune gain's δ term is extrapolated to δ={beyond.max():.3g}, outside the "
                           f"measured δ range [{self.delta_range[0]:g}, {self.delta_range[1]:g}]")
        gains = np.asarray(self(tokens, deltas), float)
        if np.any(gains < 0):
            at = float(deltas[int(np.argmin(gains))])
            out.append(f"the finetune gain (Eq. 7) is negative at T={tokens:.3g} (down to "
                       f"{float(np.min(gains)):.4g} at δ={at:.3g}): finetuning would raise the loss there, "
                       "an extrapolation of the fitted gain, not a measurement")
        return out


def fit_finetune_gain(
    tokens: np.ndarray, gain: np.ndarray, delta: np.ndarray | None = None
) -> FinetuneGain:
    """Fit Eq. 7 to measured finetuning gains (loss before FT − loss after FT) at several T (and δ).

    With ``delta`` at >= 2 distinct values the δ terms are fitted too (>= 4 token counts per δ).
    """
    tokens, gain = np.asarray(tokens, float), np.asarray(gain, float)
    d = np.zeros_like(tokens) if delta is None else np.asarray(delta, float)
    for name, values in (("tokens", tokens), ("gain", gain), ("delta", d)):
        require_finite(name, values)
    if not tokens.size == gain.size == d.size:
        raise InvalidInput(f"finetune gain: {tokens.size} token counts, {gain.size} gains, {d.size} δ values")
    if np.any(tokens <= 0):
        raise InvalidInput("finetune gain: tokens must be > 0")
    for value in np.unique(d):
        if np.unique(tokens[d == value]).size < 4:
            raise InvalidInput(
                f"finetune gain (Eq. 7) has 3 constants; give gains at >= 4 distinct token counts "
                f"(δ={value:g} has {np.unique(tokens[d == value]).size})"
            )
    with_delta = np.unique(d).size >= 2
    logt = np.log(tokens) - np.median(np.log(tokens))  # fit on T/scale, then fold the scale back into a

    def solve(b: float) -> tuple[np.ndarray, np.ndarray]:
        power = np.exp(b * logt)
        cols = [power, np.ones_like(power)] + ([power * d, d] if with_delta else [])
        design = np.column_stack(cols)
        coef = np.linalg.lstsq(design, gain, rcond=None)[0]
        return coef, design @ coef - gain

    grid = np.linspace(-2.0, 0.5, 101)
    b0 = min(grid, key=lambda b: float(np.sum(solve(b)[1] ** 2)))
    b = float(least_squares(lambda x: solve(x[0])[1], [b0], bounds=([-5.0], [2.0])).x[0])
    coef = solve(b)[0]
    fold = float(np.exp(-b * np.median(np.log(tokens))))
    return FinetuneGain(
        a=float(coef[0] * fold),
        b=b,
        c=float(coef[1]),
        a_delta=float(coef[2] * fold) if with_delta else 0.0,
        c_delta=float(coef[3]) if with_delta else 0.0,
        tokens_range=(float(tokens.min()), float(tokens.max())),
        delta_range=(float(d.min()), float(d.max())) if with_delta else None,
    )


@dataclass(frozen=True)
class Prediction:
    """Predicted domain loss at one queried (T, δ), with its bootstrap interval."""

    tokens: float
    delta: float
    loss: float
    interval: tuple[float, float] | None
    extrapolated_in_delta: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Recommendation:
    """δ* for a token budget, what the law predicts there, and how far that is from the evidence."""

    target_tokens: float
    domain_tokens: float
    delta: float
    objective: str
    predicted_loss: float
    repetitions: float
    predicted_loss_after_finetune: float | None
    delta_interval: tuple[float, float] | None
    loss_interval: tuple[float, float] | None
    predictions: list[Prediction]
    compute_multiplier: ComputeMultiplier
    candidates: np.ndarray = field(repr=False)
    candidate_losses: np.ndarray = field(repr=False)
    warnings: list[str] = field(default_factory=list)

    @property
    def finetune_objective(self) -> bool:
        return self.objective == OBJECTIVE_FINETUNE

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("candidates", "candidate_losses")}
        out["compute_multiplier"] = self.compute_multiplier.to_dict()
        out["domain_tokens_needed"] = self.target_tokens * self.delta
        return out


OBJECTIVE_PRETRAIN = "pretraining domain loss L_test(T, δ)"
OBJECTIVE_FINETUNE = "post-finetune domain loss L_test(T, δ) − Δℓ(T, δ) (Eq. 7)"


def check_arguments(
    target_tokens: Sequence[float],
    domain_tokens: float,
    delta_range: tuple[float, float] | None = None,
    query_deltas: Sequence[float] = (),
) -> None:
    """Refuse bad arguments before any fit (a fit can take minutes; a typo should not)."""
    if not target_tokens:
        raise InvalidInput("give at least one target token budget")
    for t in target_tokens:
        if not (np.isfinite(t) and t > 0):
            raise InvalidInput(f"target tokens must be a positive number, got {t}")
    if not (np.isfinite(domain_tokens) and domain_tokens > 0):
        raise InvalidInput(f"domain tokens |D| must be a positive number, got {domain_tokens}")
    if delta_range is not None:
        lo, hi = delta_range
        if not 0.0 <= lo < hi <= 1.0:
            raise InvalidInput(f"delta range must satisfy 0 <= low < high <= 1, got [{lo}, {hi}]")
    for q in query_deltas:
        if not 0.0 <= q <= 1.0:
            raise InvalidInput(f"queried δ must lie in [0, 1], got {q}")


def search_range(fit: SptFit, delta_range: tuple[float, float] | None) -> tuple[float, float]:
    """The δ searched for δ*: as given, else [0, min(1, 2 × largest pilot δ)]. It never changes the fit."""
    return delta_range if delta_range is not None else (0.0, min(1.0, 2.0 * fit.delta_max))


def recommend_delta(
    fit: SptFit,
    target_tokens: float,
    domain_tokens: float,
    delta_range: tuple[float, float] | None = None,
    finetune: FinetuneGain | None = None,
    query_deltas: tuple[float, ...] = (),
) -> Recommendation:
    """Pick δ* = argmin_δ of the predicted loss at ``target_tokens`` and report E* = T·δ*/|D| for a domain
    set of ``domain_tokens`` tokens. The loss is the post-finetune one when ``finetune`` is given.
    ``delta_range`` defaults to ``search_range``; ``query_deltas`` adds predictions at those δ. The
    compute multiplier (the paper's: T / the tokens SPT at δ* needs to match δ = 0 at T) comes with it."""
    check_arguments([target_tokens], domain_tokens, delta_range, query_deltas)
    lo, hi = search_range(fit, delta_range)
    grid = np.linspace(lo, hi, GRID_POINTS)
    delta, losses = argmin_delta(objective(fit.law, target_tokens, finetune), grid)
    predicted = float(fit.law.test_loss(target_tokens, delta))

    delta_interval: tuple[float, float] | None = None
    loss_interval: tuple[float, float] | None = None
    if len(fit.bootstrap_laws) >= 2:
        delta_interval = interval95(bootstrap_optima(fit, target_tokens, grid, finetune), delta)
        loss_interval = fit.predict(target_tokens, delta)[1]

    queried = sorted({*fit.deltas, delta, *query_deltas})
    predictions = [_prediction(fit, target_tokens, d) for d in queried]
    after_finetune = None if finetune is None else predicted - float(finetune(target_tokens, delta))
    warnings = _warnings(fit, target_tokens, delta, (lo, hi), delta_interval, predictions)
    if finetune is not None:
        warnings += finetune.extrapolation_warnings(target_tokens, grid)
    return Recommendation(
        target_tokens=float(target_tokens),
        domain_tokens=float(domain_tokens),
        delta=delta,
        objective=OBJECTIVE_PRETRAIN if finetune is None else OBJECTIVE_FINETUNE,
        predicted_loss=predicted,
        repetitions=float(target_tokens * delta / domain_tokens),
        predicted_loss_after_finetune=after_finetune,
        delta_interval=delta_interval,
        loss_interval=loss_interval,
        predictions=predictions,
        compute_multiplier=compute_multiplier(fit, target_tokens, delta, finetune),
        candidates=grid,
        candidate_losses=losses,
        warnings=warnings,
    )


def objective(law: OverfittingLaw, tokens: float,
              finetune: FinetuneGain | None) -> Callable[[np.ndarray | float], np.ndarray]:
    """δ ↦ the loss δ* minimises at ``tokens``: pretraining, or post-finetune with Eq. 7."""
    if finetune is None:
        return lambda d: law.test_loss(tokens, d)
    return lambda d: law.test_loss(tokens, d) - finetune(tokens, d)


def bootstrap_optima(fit: SptFit, tokens: float, grid: np.ndarray,
                     finetune: FinetuneGain | None = None) -> np.ndarray:
    """δ* of every bootstrap law: the spread of the answer the pilots allow."""
    return np.array([argmin_delta(objective(law, tokens, finetune), grid)[0] for law in fit.bootstrap_laws])


def _prediction(fit: SptFit, tokens: float, delta: float) -> Prediction:
    loss, interval = fit.predict(tokens, delta)
    return Prediction(float(tokens), float(delta), loss, interval, bool(delta > max(fit.deltas)))


def argmin_delta(
    loss: Callable[[np.ndarray | float], np.ndarray], grid: np.ndarray
) -> tuple[float, np.ndarray]:
    """Grid scan, then a bounded Brent refinement inside the best cell's neighbours."""
    with np.errstate(over="ignore", invalid="ignore"):
        losses = np.asarray(loss(grid), float)
    losses = np.where(np.isfinite(losses), losses, np.inf)
    i = int(np.argmin(losses))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    with np.errstate(over="ignore", invalid="ignore"):
        res = minimize_scalar(lambda d: float(loss(d)), bounds=(a, b), method="bounded")
    best = float(res.x) if res.success and res.fun <= losses[i] else float(grid[i])
    return best, losses


def _warnings(
    fit: SptFit,
    tokens: float,
    delta: float,
    search: tuple[float, float],
    delta_interval: tuple[float, float] | None,
    predictions: list[Prediction],
) -> list[str]:
    t_lo, t_hi = fit.tokens_range
    warnings = list(fit.warnings)
    if tokens > TOKENS_EXTRAPOLATION_FACTOR * t_hi or tokens < t_lo / TOKENS_EXTRAPOLATION_FACTOR:
        warnings.append(
            f"target T={tokens:.3g} is far outside the fitted token range [{t_lo:.3g}, {t_hi:.3g}]: "
            "the prediction is an extrapolation, confirm with a pilot run closer to the target"
        )
    if delta > max(fit.deltas):
        warnings.append(
            f"δ*={delta:.4g} lies above the largest fitted δ ({max(fit.deltas):g}): extrapolation in δ"
        )
    if np.isclose(delta, search[0]) or np.isclose(delta, search[1]):
        warnings.append(
            f"δ*={delta:.4g} sits on the edge of the searched range [{search[0]:g}, {search[1]:g}]"
        )
    reach = fit.law.delta_gap_exponent_one()
    if fit.delta_max < reach < search[1]:
        warnings.append(
            f"the fitted b_gap(δ) reaches 1 at δ={reach:.3g}, inside the searched range but above the pilots "
            f"(δ ≤ {fit.delta_max:g}): the paper's regime (b_gap < 1) is not known to hold there"
        )
    if delta_interval is not None and delta_interval[1] - delta_interval[0] > WIDE_DELTA_INTERVAL * (
        search[1] - search[0]
    ):
        warnings.append(
            f"the 95% interval of δ* ({delta_interval[0]:.3g}–{delta_interval[1]:.3g}) spans more than "
            f"{WIDE_DELTA_INTERVAL:.0%} of the searched range: the pilots do not pin δ* down; add pilots at "
            "larger δ or longer T"
        )
    for p in predictions:
        warnings += prediction_warnings(f"at δ={p.delta:.4g}, T={tokens:.3g}", np.array([p.loss]),
                                        [p.interval])
        wide = p.interval is not None and p.interval[1] - p.interval[0] > 0.1 * p.loss
        if p.extrapolated_in_delta and wide:
            warnings.append(
                f"predicted loss at δ={p.delta:.4g} (beyond the pilots) has a 95% interval "
                f"{p.interval[0]:.4g}–{p.interval[1]:.4g}, wider than 10% of the loss: "  # type: ignore[index]
                "not a forecast to act on"
            )
    return warnings


def schedule_for_delta(delta: float, domain_source: str, web_source: str, start_step: int = 0) -> dict:
    """A one-phase schedule that mixes ``delta`` of all tokens from the domain source from ``start_step``."""
    if not 0.0 <= delta <= 1.0:
        raise InvalidInput(f"delta must lie in [0, 1], got {delta}")
    if domain_source == web_source:
        raise InvalidInput(f"domain and web source must differ, both are {domain_source!r}")
    if start_step < 0:
        raise InvalidInput(f"start_step must be >= 0, got {start_step}")
    # Six decimals, as exact decimal strings, so the two weights sum to exactly 1 for the engine.
    domain = Decimal(f"{delta:.6f}")
    weights = {domain_source: str(domain), web_source: str(1 - domain)}
    return Schedule.constant(weights, int(start_step))
