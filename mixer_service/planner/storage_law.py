"""The storage scaling law (Mentzer & Montanari, arXiv 2407.17954): test error vs samples n and bytes L.

    additive           Err(n, L) = Err* + A·n^(−α) + B·L^(−β)
    additive_no_floor  Err(n, L) =        A·n^(−α) + B·L^(−β)
    multiplicative     Err(n, L) = Err* + A·n^(−α)·L^(−β)

All constants are fitted non-negative. Under a byte budget s = n·L the additive forms have the interior
optimum L*(s) = (β·B / (α·A))^(1/(α+β)) · s^(α/(α+β)); the multiplicative form is monotone in L along
s = n·L, so its optimum is always at a bound of the feasible L range.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import curve_fit

from mixer_contract.errors import InvalidInput
from mixer_service.planner.fit_stats import (
    FitQuality,
    ParamEstimate,
    fit_quality,
    require_finite,
    stratified_resample,
    summarize_params,
)

VARIANTS = ("additive", "additive_no_floor", "multiplicative")
MIN_R2 = 0.5  # below it a fit's allocations come with a warning
_PARAMS = {
    "additive": ("err_star", "A", "alpha", "B", "beta"),
    "additive_no_floor": ("A", "alpha", "B", "beta"),
    "multiplicative": ("err_star", "A", "alpha", "beta"),
}
N_KEYS = ("n", "num_samples", "num_points", "samples")
L_KEYS = ("bytes_per_sample", "L", "bytes")
ERR_KEYS = ("error", "test_error", "err")


@dataclass(frozen=True)
class StorageLaw:
    """Fitted constants; ``B`` is unused (0) in the multiplicative variant, ``err_star`` 0 without floor."""

    variant: str
    A: float
    alpha: float
    beta: float
    B: float = 0.0
    err_star: float = 0.0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise InvalidInput(
                f"unknown storage-law variant {self.variant!r}; choose one of {', '.join(VARIANTS)}"
            )
        negative = [k for k in ("A", "alpha", "beta", "B", "err_star") if not getattr(self, k) >= 0]
        if negative:
            raise InvalidInput(f"storage-law constants must be >= 0: {', '.join(negative)}")

    def error(self, n: np.ndarray | float, bytes_per_sample: np.ndarray | float) -> np.ndarray:
        """Predicted test error with ``n`` samples of ``bytes_per_sample`` bytes each."""
        return _error(self.variant, asdict(self), np.log(n), np.log(bytes_per_sample))

    def optimal_bytes_per_sample(self, budget: np.ndarray | float) -> np.ndarray:
        """Unconstrained L*(s) of the additive forms (closed form above)."""
        if self.variant == "multiplicative":
            raise InvalidInput(
                "the multiplicative law has no interior optimum; use allocate() with byte bounds"
            )
        if self.alpha <= 0 or self.A <= 0:
            raise InvalidInput("L*(s) needs A > 0 and alpha > 0 (more samples must help)")
        ratio = self.beta * self.B / (self.alpha * self.A)
        return ratio ** (1 / (self.alpha + self.beta)) * np.asarray(budget, float) ** (
            self.alpha / (self.alpha + self.beta)
        )

    def params(self) -> tuple[float, ...]:
        return tuple(getattr(self, k) for k in _PARAMS[self.variant])

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Allocation:
    """How to spend a byte budget: n samples at L bytes each, and the error the law predicts for it."""

    budget: float
    bytes_per_sample: float
    num_samples: float
    predicted_error: float
    limited_by: str | None  # which bound moved the choice off the unconstrained optimum, if any

    def to_dict(self) -> dict:
        return asdict(self)


def allocate(
    law: StorageLaw,
    budget: float,
    bytes_range: tuple[float, float] | None = None,
    max_samples: float | None = None,
) -> Allocation:
    """Best (n, L) with n·L = budget, L within ``bytes_range`` and n <= ``max_samples``.

    Along n·L = s the error is a sum of exponentials in log L, hence convex, so the constrained optimum is
    the unconstrained one clipped into the feasible interval.
    """
    if not (np.isfinite(budget) and budget > 0):
        raise InvalidInput(f"storage budget must be a positive number of bytes, got {budget}")
    lo, hi = bytes_range if bytes_range is not None else (0.0, np.inf)
    if not 0 <= lo < hi:
        raise InvalidInput(f"bytes range must satisfy 0 <= low < high, got [{lo}, {hi}]")
    bounds = [(lo, "min_bytes"), (hi, "max_bytes")]
    if max_samples is not None:
        if max_samples < 1:
            raise InvalidInput(f"max samples must be >= 1, got {max_samples}")
        bounds[0] = max(bounds[0], (budget / max_samples, "max_samples"))
    (l_lo, why_lo), (l_hi, why_hi) = bounds
    if l_lo > l_hi:
        raise InvalidInput(
            f"budget {budget:.4g} B is infeasible: {max_samples} samples need >= {l_lo:.4g} B each, "
            f"above {l_hi:.4g}"
        )
    if law.variant == "multiplicative":
        unconstrained = 0.0 if law.alpha > law.beta else np.inf
    else:
        unconstrained = float(law.optimal_bytes_per_sample(budget))
    chosen, limited = unconstrained, None
    if unconstrained < l_lo:
        chosen, limited = l_lo, why_lo
    elif unconstrained > l_hi:
        chosen, limited = l_hi, why_hi
    if not (np.isfinite(chosen) and chosen > 0):
        raise InvalidInput(
            f"the {law.variant} law sends L to {chosen}; pass a finite bytes range to bound it"
        )
    n = budget / chosen
    return Allocation(float(budget), float(chosen), float(n), float(law.error(n, chosen)), limited)


@dataclass
class StorageFit:
    law: StorageLaw
    quality: FitQuality
    residuals: np.ndarray
    params: list[ParamEstimate]
    n_range: tuple[float, float]
    bytes_range: tuple[float, float]
    bootstrap_laws: list[StorageLaw] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "law": self.law.to_dict(),
            "quality": self.quality.to_dict(),
            "params": [p.to_dict() for p in self.params],
            "n_range": list(self.n_range),
            "bytes_range": list(self.bytes_range),
            "n_bootstrap": len(self.bootstrap_laws),
            "warnings": list(self.warnings),
        }


def fit_storage_law(
    n: np.ndarray,
    bytes_per_sample: np.ndarray,
    error: np.ndarray,
    variant: str = "additive",
    n_bootstrap: int = 0,
    seed: int = 0,
) -> StorageFit:
    """Non-negative least-squares fit (scipy ``curve_fit`` with bounds) from a grid of (n, L, error)."""
    if variant not in VARIANTS:
        raise InvalidInput(f"unknown storage-law variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    n, size, err = (np.asarray(a, float).ravel() for a in (n, bytes_per_sample, error))
    _check_points(n, size, err, len(_PARAMS[variant]))
    law = _fit_once(n, size, err, variant)
    laws = []
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        for _ in range(n_bootstrap):
            idx = stratified_resample(n, rng)
            if np.unique(size[idx]).size >= 2:
                laws.append(_fit_once(n[idx], size[idx], err[idx], variant, start=law.params()))
    samples = np.array([b.params() for b in laws]) if laws else None
    predicted = law.error(n, size)
    quality = fit_quality(err, predicted)
    warnings = []
    if not quality.r2 >= MIN_R2:  # NaN too
        warnings.append(f"the {variant} storage law explains the grid poorly (R² = {quality.r2:.3g} < "
                        f"{MIN_R2}): L* and n* from it are not to be acted on; check the grid or try another "
                        "variant")
    return StorageFit(
        law=law,
        quality=quality,
        residuals=err - predicted,
        params=summarize_params(_PARAMS[variant], np.array(law.params()), samples),
        n_range=(float(n.min()), float(n.max())),
        bytes_range=(float(size.min()), float(size.max())),
        bootstrap_laws=laws,
        warnings=warnings,
    )


def _check_points(n: np.ndarray, size: np.ndarray, err: np.ndarray, n_params: int) -> None:
    if not (n.size == size.size == err.size):
        raise InvalidInput(
            f"n, bytes_per_sample and error differ in length ({n.size}, {size.size}, {err.size})"
        )
    for name, arr in (("n", n), ("bytes_per_sample", size), ("error", err)):
        require_finite(name, arr)
    if np.any(n < 1) or np.any(size <= 0):
        raise InvalidInput("n must be >= 1 and bytes_per_sample > 0 for every point")
    if np.any(err < 0):
        raise InvalidInput("error must be >= 0 for every point")
    if n.size <= n_params:
        raise InvalidInput(
            f"{n.size} points cannot determine {n_params} constants; give at least {n_params + 1}"
        )
    if np.unique(n).size < 2 or np.unique(size).size < 2:
        raise InvalidInput(
            "the grid needs >= 2 distinct n and >= 2 distinct bytes_per_sample to separate the terms"
        )


def _fit_once(
    n: np.ndarray, size: np.ndarray, err: np.ndarray, variant: str, start: tuple[float, ...] | None = None
) -> StorageLaw:
    names = _PARAMS[variant]
    x = np.vstack([np.log(n), np.log(size)])

    def model(x: np.ndarray, *p: float) -> np.ndarray:
        return _error(variant, dict(zip(names, np.maximum(p, 0.0), strict=True)), x[0], x[1])

    starts = [start] if start is not None else []
    floor = float(err.min()) / 2
    for a, b in () if start is not None else ((0.3, 0.5), (0.5, 1.0), (1.0, 0.3), (0.2, 1.5)):
        a_scale = float(np.ptp(err) or err.mean()) * float(np.median(n)) ** a
        b_scale = float(np.ptp(err) or err.mean()) * float(np.median(size)) ** b
        guess = {"err_star": floor, "A": a_scale, "alpha": a, "B": b_scale, "beta": b}
        if variant == "multiplicative":
            guess["A"] = a_scale * float(np.median(size)) ** b
        starts.append(tuple(guess[k] for k in names))
    best, best_sse = None, np.inf
    for p0 in starts:
        try:
            p, _ = curve_fit(model, x, err, p0=p0, bounds=(0.0, np.inf), maxfev=20000)
        except RuntimeError:
            continue
        sse = float(np.sum((model(x, *p) - err) ** 2))
        if sse < best_sse:
            best, best_sse = p, sse
    if best is None:
        raise InvalidInput(f"the {variant} storage law could not be fitted to these points")
    return StorageLaw(variant, **dict(zip(names, (float(v) for v in best), strict=True)))


def _error(variant: str, p: dict, log_n: np.ndarray, log_l: np.ndarray) -> np.ndarray:
    floor = p.get("err_star", 0.0)
    if variant == "multiplicative":
        return floor + p["A"] * np.exp(-p["alpha"] * log_n - p["beta"] * log_l)
    return floor + p["A"] * np.exp(-p["alpha"] * log_n) + p["B"] * np.exp(-p["beta"] * log_l)


def load_points(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read (n, bytes_per_sample, error) from a CSV with a header row (aliases in ``*_KEYS``)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"points file not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        found = [next((k for k in keys if k in header), None) for keys in (N_KEYS, L_KEYS, ERR_KEYS)]
        cols = [c for c in found if c is not None]
        if len(cols) < 3:
            raise InvalidInput(
                f"{path}: needs columns n ({'/'.join(N_KEYS)}), bytes ({'/'.join(L_KEYS)}) and "
                f"error ({'/'.join(ERR_KEYS)}); found {header}"
            )
        rows = []
        for line_no, record in enumerate(reader, start=2):
            record = {k.strip(): v for k, v in record.items() if k is not None}
            try:
                rows.append([float(record[c]) for c in cols])
            except (TypeError, ValueError):
                raise InvalidInput(f"{path}:{line_no}: non-numeric value in {cols}") from None
    if not rows:
        raise InvalidInput(f"{path}: no data rows")
    arr = np.array(rows)
    return arr[:, 0], arr[:, 1], arr[:, 2]
