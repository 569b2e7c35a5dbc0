"""Turn a fitted overfitting law into a domain fraction δ* for a token budget, and into a schedule.

δ* has no closed form (the paper picks it numerically from the fitted law), so the law is scanned on a
fine δ grid and the best cell refined with a bounded scalar minimiser. Bootstrap laws, when present, give
an interval for δ* so an operator can see how firmly the pilot runs pin it down.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from decimal import Decimal

import numpy as np
from scipy.optimize import curve_fit, minimize_scalar

from mixer_service.errors import InvalidInput
from mixer_service.planner.fit_stats import require_finite
from mixer_service.planner.overfitting_law import OverfittingLaw, SptFit

TOKENS_EXTRAPOLATION_FACTOR = 10.0  # a target this many times beyond the fitted tokens is "far"
GRID_POINTS = 2001


@dataclass(frozen=True)
class FinetuneGain:
    """Eq. 7: the domain-loss reduction finetuning adds after T pretraining tokens, Δℓ(T) = a·T^b + c."""

    a: float
    b: float
    c: float

    def __call__(self, tokens: np.ndarray | float) -> np.ndarray:
        return self.a * np.exp(self.b * np.log(tokens)) + self.c

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def fit_finetune_gain(tokens: np.ndarray, gain: np.ndarray) -> FinetuneGain:
    """Fit Eq. 7 to measured finetuning gains (loss before FT − loss after FT) at several T."""
    tokens, gain = np.asarray(tokens, float), np.asarray(gain, float)
    require_finite("tokens", tokens)
    require_finite("gain", gain)
    if tokens.size != gain.size:
        raise InvalidInput(f"finetune gain: {tokens.size} token counts but {gain.size} gains")
    if np.unique(tokens).size < 4:
        raise InvalidInput("finetune gain (Eq. 7) has 3 constants; give gains at >= 4 distinct token counts")
    if np.any(tokens <= 0):
        raise InvalidInput("finetune gain: tokens must be > 0")
    logt = np.log(tokens)
    scale = np.exp(np.median(logt))  # fit a·(T/scale)^b, then fold the scale back into a

    def model(lt: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
        return a * np.exp(b * (lt - np.log(scale))) + c

    p0 = (float(np.ptp(gain)) or 0.01, -0.3, float(gain.min()))
    (a, b, c), _ = curve_fit(model, logt, gain, p0=p0, maxfev=20000)
    return FinetuneGain(a=float(a * scale ** (-b)), b=float(b), c=float(c))


@dataclass(frozen=True)
class Recommendation:
    """δ* for a token budget, what the law predicts there, and how far that is from the evidence."""

    target_tokens: float
    domain_tokens: float
    delta: float
    predicted_loss: float
    repetitions: float
    predicted_loss_after_finetune: float | None
    delta_interval: tuple[float, float] | None
    loss_interval: tuple[float, float] | None
    candidates: np.ndarray = field(repr=False)
    candidate_losses: np.ndarray = field(repr=False)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("candidates", "candidate_losses")}
        out["domain_tokens_needed"] = self.target_tokens * self.delta
        return out


def recommend_delta(
    fit: SptFit,
    target_tokens: float,
    domain_tokens: float,
    delta_range: tuple[float, float] | None = None,
    finetune: FinetuneGain | None = None,
) -> Recommendation:
    """Pick δ* = argmin_δ L_test(target_tokens, δ) and report E* = T·δ*/|D| for a domain set of
    ``domain_tokens`` tokens. ``delta_range`` defaults to [0, min(1, 2 × largest fitted δ)]."""
    if not (np.isfinite(target_tokens) and target_tokens > 0):
        raise InvalidInput(f"target tokens must be a positive number, got {target_tokens}")
    if not (np.isfinite(domain_tokens) and domain_tokens > 0):
        raise InvalidInput(f"domain tokens |D| must be a positive number, got {domain_tokens}")
    lo, hi = delta_range if delta_range is not None else (0.0, min(1.0, 2.0 * max(fit.deltas)))
    if not 0.0 <= lo < hi <= 1.0:
        raise InvalidInput(f"delta range must satisfy 0 <= low < high <= 1, got [{lo}, {hi}]")

    grid = np.linspace(lo, hi, GRID_POINTS)
    delta, losses = _argmin_delta(fit.law, target_tokens, grid)
    predicted = float(fit.law.test_loss(target_tokens, delta))

    delta_interval: tuple[float, float] | None = None
    loss_interval: tuple[float, float] | None = None
    if len(fit.bootstrap_laws) >= 2:
        boot = [_argmin_delta(law, target_tokens, grid)[0] for law in fit.bootstrap_laws]
        boot_loss = [
            float(law.test_loss(target_tokens, d)) for law, d in zip(fit.bootstrap_laws, boot, strict=True)
        ]
        delta_interval, loss_interval = _interval95(boot), _interval95(boot_loss)

    after_finetune = None if finetune is None else predicted - float(finetune(target_tokens))
    return Recommendation(
        target_tokens=float(target_tokens),
        domain_tokens=float(domain_tokens),
        delta=delta,
        predicted_loss=predicted,
        repetitions=float(target_tokens * delta / domain_tokens),
        predicted_loss_after_finetune=after_finetune,
        delta_interval=delta_interval,
        loss_interval=loss_interval,
        candidates=grid,
        candidate_losses=losses,
        warnings=_extrapolation_warnings(fit, target_tokens, delta, (lo, hi)),
    )


def _interval95(values: list[float]) -> tuple[float, float]:
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def _argmin_delta(law: OverfittingLaw, tokens: float, grid: np.ndarray) -> tuple[float, np.ndarray]:
    """Grid scan, then a bounded Brent refinement inside the best cell's neighbours."""
    with np.errstate(over="ignore", invalid="ignore"):
        losses = law.test_loss(tokens, grid)
    losses = np.where(np.isfinite(losses), losses, np.inf)
    i = int(np.argmin(losses))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    res = minimize_scalar(lambda d: float(law.test_loss(tokens, d)), bounds=(a, b), method="bounded")
    best = float(res.x) if res.success and res.fun <= losses[i] else float(grid[i])
    return best, losses


def _extrapolation_warnings(
    fit: SptFit, tokens: float, delta: float, search: tuple[float, float]
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
    return {"phases": [{"start_step": int(start_step), "weights": weights}]}
