"""Randomized compression levels: the budget is met to within one sample's bytes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixer_contract.errors import InvalidInput
from mixer_service.planner.image_budget import EncodedSizes
from mixer_service.planner.randomized import assign_randomized, levels_at, spread_positions
from mixer_service.sources.image_codec import LOSSLESS


class SyntheticSizes:
    """Bytes grow with quality at a per-sample rate; each distinct level adds a shared header."""

    def __init__(self, n: int, seed: int, header: int = 300):
        rng = np.random.default_rng(seed)
        self.base = rng.integers(20, 60, n)
        self.slope = rng.uniform(1.0, 8.0, n)
        self.header = header

    def sample_bytes(self, q: np.ndarray) -> np.ndarray:
        return self.base + np.floor(self.slope * np.minimum(q, 100)).astype(np.int64)

    def total(self, q: np.ndarray) -> int:
        return int(self.sample_bytes(q).sum() + self.header * np.unique(q).size)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 400),
    seed=st.integers(0, 10_000),
    fraction=st.floats(0.0, 1.0),
    lo=st.integers(1, 40),
    width=st.integers(0, 60),
)
def test_budget_met_within_one_samples_bytes(n, seed, fraction, lo, width):
    sizes = SyntheticSizes(n, seed)
    hi = lo + width
    smallest, largest = sizes.total(np.full(n, lo)), sizes.total(np.full(n, hi))
    budget = int(smallest + fraction * (largest - smallest))
    result = assign_randomized(sizes.total, n, budget, lo, hi, seed=seed)
    assert result.total_bytes == sizes.total(result.qualities) <= budget
    one_sample = int(sizes.sample_bytes(result.qualities).max()) + sizes.header
    assert budget - result.total_bytes <= one_sample or result.searched == "none"
    assert lo <= result.qualities.min() and result.qualities.max() <= hi


def test_levels_are_spread_uniformly_across_samples():
    pos = spread_positions(1000, seed=3)
    assert np.array_equal(np.sort(np.floor(pos * 1000)), np.arange(1000))  # one per stratum
    q = levels_at(pos, 10, 50)
    counts = np.bincount(q)[11:50]
    assert counts.min() >= 20 and counts.max() <= 30  # 1000 samples over 40 levels, ~25 each
    assert not np.array_equal(pos, spread_positions(1000, seed=4))


def test_levels_near_lossless_are_stored_lossless():
    q = levels_at(np.array([0.0, 0.5, 0.99]), 1, 100, lossless_from=95)
    assert q.tolist() == [1, 50, LOSSLESS]


def test_generous_budget_keeps_everything_at_max_and_tiny_budget_is_refused():
    sizes = SyntheticSizes(50, seed=0)
    top = assign_randomized(sizes.total, 50, 10**9, 5, 60)
    assert top.searched == "none" and set(top.qualities.tolist()) == {60}
    with pytest.raises(InvalidInput, match="infeasible"):
        assign_randomized(sizes.total, 50, 100, 5, 60)
    with pytest.raises(InvalidInput, match="min level <= max level"):
        assign_randomized(sizes.total, 50, 10_000, 60, 5)


def test_real_jpeg_assignment_meets_budget_within_one_sample():
    rng = np.random.default_rng(0)
    images = (rng.random((120, 28, 28)) * np.linspace(0, 255, 28)).astype(np.uint8)
    sizes = EncodedSizes(images)
    budget = (sizes.total_bytes(np.full(120, 10)) + sizes.total_bytes(np.full(120, 80))) // 2
    result = assign_randomized(sizes.total_bytes, 120, budget, 1, 95, seed=1)
    assert result.total_bytes == sizes.total_bytes(result.qualities) <= budget
    assert budget - result.total_bytes <= sizes.max_sample_bytes(result.qualities)
