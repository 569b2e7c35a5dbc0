"""The paper's compute multiplier, read off the fitted law.

"The Finetuner's Fallacy" reports how many pretraining tokens SPT needs to match (after finetuning) the
standard model's domain loss at the full budget, as the ratio budget / SPT tokens (1.75x for MusicPile).
From the law: the standard model is δ = 0 at the budget T; the multiplier at δ is T / T', where T' is the
fewest tokens at which δ's predicted loss reaches that baseline. With Eq. 7 both losses are post-finetune
(the paper's comparison), otherwise pretraining losses are compared and the result says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import brentq

from mixer_service.planner.overfitting_law import OverfittingLaw, SptFit, interval95

if TYPE_CHECKING:
    from mixer_service.planner.recommend import FinetuneGain

SEARCH_DECADES = 3.0  # T' is searched within 10^±3 of the budget
_GRID = 601


@dataclass(frozen=True)
class ComputeMultiplier:
    """budget / the tokens SPT at ``delta`` needs to match δ = 0 at the budget (None: not reached)."""

    delta: float
    target_tokens: float
    baseline_loss: float
    matching_tokens: float | None
    multiplier: float | None
    interval: tuple[float, float] | None
    after_finetune: bool
    note: str

    def to_dict(self) -> dict:
        return asdict(self)


def compute_multiplier(fit: SptFit, tokens: float, delta: float,
                       finetune: FinetuneGain | None = None) -> ComputeMultiplier:
    """The multiplier of δ at budget ``tokens`` on the fitted law, with a bootstrap interval."""
    baseline, matching = _multiplier(fit.law, tokens, delta, finetune)
    point = None if matching is None else tokens / matching
    interval = None
    if point is not None and len(fit.bootstrap_laws) >= 2:
        boot = [_multiplier(law, tokens, delta, finetune)[1] for law in fit.bootstrap_laws]
        reached = np.array([tokens / m for m in boot if m is not None])
        interval = interval95(reached, point) if reached.size >= 2 else None
    compared = "post-finetune (Eq. 7)" if finetune is not None else "pretraining (no finetune gains given)"
    if delta == 0.0:
        note = "δ = 0 is the baseline itself"
    elif matching is None:
        note = (f"δ={delta:.4g} does not reach the δ = 0 loss at T={tokens:.3g} within "
                f"10^{SEARCH_DECADES:g}× the budget: no multiplier")
    elif matching <= tokens * 10**-SEARCH_DECADES * (1 + 1e-9):
        note = f"reached before 10^-{SEARCH_DECADES:g}× the budget: the multiplier is at least this"
    else:
        note = f"{compared} domain losses compared; T' = {matching:.4g} tokens"
    return ComputeMultiplier(float(delta), float(tokens), baseline, matching, point, interval,
                             finetune is not None, note)


def _multiplier(law: OverfittingLaw, tokens: float, delta: float,
                finetune: FinetuneGain | None) -> tuple[float, float | None]:
    """The baseline loss and the smallest T' at which δ's loss is at or below it (None if never)."""
    def loss(t: np.ndarray | float, d: float) -> np.ndarray:
        value = law.test_loss(t, d)
        return value if finetune is None else value - finetune(t, d)

    baseline = float(loss(tokens, 0.0))
    if delta == 0.0:
        return baseline, float(tokens)
    grid = np.geomspace(tokens * 10**-SEARCH_DECADES, tokens * 10**SEARCH_DECADES, _GRID)
    with np.errstate(over="ignore", invalid="ignore"):
        excess = np.asarray(loss(grid, delta), float) - baseline
    below = np.flatnonzero(np.isfinite(excess) & (excess <= 0))
    if below.size == 0:
        return baseline, None
    i = int(below[0])
    if i == 0:
        return baseline, float(grid[0])  # reached before the searched range: a lower bound on the multiplier
    return baseline, _crossing(lambda lt: float(loss(np.exp(lt), delta)) - baseline, grid[i - 1], grid[i])


def _crossing(f: Callable[[float], float], t_above: float, t_below: float) -> float:
    lo, hi = float(np.log(t_above)), float(np.log(t_below))
    if not (np.isfinite(f(lo)) and f(lo) > 0):
        return t_below
    return float(np.exp(brentq(f, lo, hi, xtol=1e-10, maxiter=200)))
