"""Randomized compression levels: every sample gets its own fixed quality, spread uniformly between a low
and a high level, with one end binary-searched so the stored bytes just fit the budget.

Following the paper's procedure: start from the full [min, max] range; if it is too big, lower the high
end (low pinned at min), otherwise raise the low end (high pinned at max). Positions are stratified
(rank plus uniform jitter, over n), so the levels are uniform across samples and, as the searched end moves,
samples change level one at a time: the search can stop with the budget met to within one sample's bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mixer_contract.errors import InvalidInput
from mixer_service.sources.image_codec import LOSSLESS, MAX_QUALITY, MIN_QUALITY

MAX_ITERATIONS = 200


@dataclass(frozen=True)
class RandomizedAssignment:
    """Per-sample quality codes meeting ``budget``; ``searched`` names the end the search moved."""

    qualities: np.ndarray
    total_bytes: int
    budget: int
    low: float
    high: float
    searched: str

    def to_dict(self) -> dict:
        values, counts = np.unique(self.qualities, return_counts=True)
        return {
            "num_samples": int(self.qualities.size),
            "total_bytes": self.total_bytes,
            "budget": self.budget,
            "low": self.low,
            "high": self.high,
            "searched": self.searched,
            "quality_counts": {int(v): int(c) for v, c in zip(values, counts, strict=True)},
        }


def spread_positions(n: int, seed: int) -> np.ndarray:
    """n positions in [0, 1), one per stratum of width 1/n, in a seeded random order across samples."""
    rng = np.random.default_rng(seed)
    return (rng.permutation(n) + rng.random(n)) / n


def levels_at(positions: np.ndarray, low: float, high: float, lossless_from: int | None = None) -> np.ndarray:
    """Integer quality per sample for the range [low, high]; levels >= ``lossless_from`` become lossless."""
    q = np.rint(low + (high - low) * positions).astype(np.int64)
    if lossless_from is not None:
        q[q >= lossless_from] = LOSSLESS
    return q


def assign_randomized(
    total_bytes: Callable[[np.ndarray], int],
    n: int,
    budget: int,
    min_level: int = MIN_QUALITY,
    max_level: int = MAX_QUALITY,
    seed: int = 0,
    lossless_from: int | None = None,
) -> RandomizedAssignment:
    """Search the randomized assignment whose ``total_bytes(qualities)`` is the largest not above ``budget``.

    ``total_bytes`` must count everything the budget covers (e.g. payloads plus shared headers).
    """
    if n < 1:
        raise InvalidInput(f"need at least one sample, got n={n}")
    if not MIN_QUALITY <= min_level <= max_level <= MAX_QUALITY:
        raise InvalidInput(
            f"need {MIN_QUALITY} <= min level <= max level <= {MAX_QUALITY}, got [{min_level}, {max_level}]"
        )
    if budget <= 0:
        raise InvalidInput(f"storage budget must be > 0 bytes, got {budget}")
    pos = spread_positions(n, seed)

    def cost(low: float, high: float) -> tuple[np.ndarray, int]:
        q = levels_at(pos, low, high, lossless_from)
        return q, int(total_bytes(q))

    if cost(min_level, max_level)[1] <= budget:
        q_top, top = cost(max_level, max_level)
        if top <= budget:
            return RandomizedAssignment(q_top, top, int(budget), float(max_level), float(max_level), "none")
        searched = "low"  # the full range fits: raise the low end
    else:
        bottom = cost(min_level, min_level)[1]
        if bottom > budget:
            raise InvalidInput(
                f"budget {budget} B is infeasible: even every sample at level {min_level} needs {bottom} B"
            )
        searched = "high"  # the full range is too big: lower the high end

    def make(x: float) -> tuple[float, float]:
        return (x, float(max_level)) if searched == "low" else (float(min_level), x)

    # invariant: make(good) fits the budget and make(bad) does not; true at the ends by the checks above
    good, bad = float(min_level), float(max_level)
    q_good, bytes_good = cost(*make(good))
    q_bad, _ = cost(*make(bad))
    for _ in range(MAX_ITERATIONS):
        if np.count_nonzero(q_good != q_bad) <= 1:
            break
        mid = (good + bad) / 2
        if mid in (good, bad):
            break
        q_mid, bytes_mid = cost(*make(mid))
        if bytes_mid <= budget:
            good, q_good, bytes_good = mid, q_mid, bytes_mid
        else:
            bad, q_bad = mid, q_mid
    low, high = make(good)
    return RandomizedAssignment(q_good, bytes_good, int(budget), low, high, searched)
