"""The storage scaling law: fits, the closed-form optimum on the published Food101 constants, errors."""

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from mixer_contract.errors import InvalidInput
from mixer_service.planner.storage_law import StorageLaw, allocate, fit_storage_law, load_points

# Published Food101 / ResNet-50 fit (authors' code); Err* is not needed for the optimum.
FOOD101 = StorageLaw("additive", A=6.7069, alpha=0.3333, B=1355.29, beta=1.0613, err_star=0.1)
N = np.array([5e3, 1e4, 2e4, 4e4, 7.5e4])
L = np.array([2e3, 4e3, 8e3, 1.6e4, 3.2e4, 6.4e4])


def grid(law: StorageLaw, noise: float, seed: int = 0):
    n, size = (a.ravel() for a in np.meshgrid(N, L))
    return n, size, law.error(n, size) + np.random.default_rng(seed).normal(0, noise, n.size)


@pytest.mark.parametrize("budget", [1e8, 1e9, 1e10, 1e11])
def test_food101_optimum_matches_closed_form_and_numeric_minimum(budget):
    a, alpha, b, beta = FOOD101.A, FOOD101.alpha, FOOD101.B, FOOD101.beta
    closed = (beta * b / (alpha * a)) ** (1 / (alpha + beta)) * budget ** (alpha / (alpha + beta))
    assert float(FOOD101.optimal_bytes_per_sample(budget)) == pytest.approx(closed, rel=1e-12)
    numeric = minimize_scalar(
        lambda log_l: float(FOOD101.error(budget / np.exp(log_l), np.exp(log_l))),
        bounds=(0.0, np.log(budget)),
        method="bounded",
        options={"xatol": 1e-10},
    )
    assert np.exp(numeric.x) == pytest.approx(closed, rel=1e-4)
    alloc = allocate(FOOD101, budget)
    assert alloc.num_samples * alloc.bytes_per_sample == pytest.approx(budget)
    assert alloc.limited_by is None


def test_food101_excess_error_scales_as_s_to_minus_alpha_beta_over_alpha_plus_beta():
    a, b = allocate(FOOD101, 1e9), allocate(FOOD101, 1e10)
    exponent = FOOD101.alpha * FOOD101.beta / (FOOD101.alpha + FOOD101.beta)
    ratio = (b.predicted_error - FOOD101.err_star) / (a.predicted_error - FOOD101.err_star)
    assert ratio == pytest.approx(10 ** (-exponent), rel=1e-9)


def test_additive_fit_recovers_food101_constants_with_uncertainty():
    fit = fit_storage_law(*grid(FOOD101, noise=0.003), n_bootstrap=20)
    law = fit.law
    assert fit.quality.r2 > 0.999
    assert law.alpha == pytest.approx(FOOD101.alpha, abs=0.04)
    assert law.beta == pytest.approx(FOOD101.beta, abs=0.04)
    assert law.B == pytest.approx(FOOD101.B, rel=0.15)
    assert law.err_star == pytest.approx(FOOD101.err_star, abs=0.03)
    alpha = next(p for p in fit.params if p.name == "alpha")
    assert 0 < alpha.std < 0.1 and alpha.ci_low < alpha.value < alpha.ci_high
    assert fit.to_dict()["law"]["variant"] == "additive"


@pytest.mark.parametrize(
    "truth",
    [
        StorageLaw("additive_no_floor", A=3.0, alpha=0.25, B=800.0, beta=0.9),
        StorageLaw("multiplicative", A=40.0, alpha=0.3, beta=0.5, err_star=0.05),
    ],
)
def test_variants_recover_their_exponents(truth):
    law = fit_storage_law(*grid(truth, noise=0.001), variant=truth.variant).law
    assert law.variant == truth.variant
    assert law.alpha == pytest.approx(truth.alpha, abs=0.03)
    assert law.beta == pytest.approx(truth.beta, abs=0.05)


def test_allocation_respects_sample_and_byte_bounds():
    unconstrained = allocate(FOOD101, 1e10)
    capped = allocate(FOOD101, 1e10, max_samples=20_000)
    assert capped.num_samples == pytest.approx(20_000) and capped.limited_by == "max_samples"
    assert capped.predicted_error > unconstrained.predicted_error
    top = allocate(FOOD101, 1e10, bytes_range=(100.0, 1000.0))
    assert top.bytes_per_sample == 1000.0 and top.limited_by == "max_bytes"
    with pytest.raises(InvalidInput, match="infeasible"):
        allocate(FOOD101, 1e6, bytes_range=(1.0, 10.0), max_samples=100)


def test_multiplicative_optimum_sits_on_a_bound():
    law = StorageLaw("multiplicative", A=40.0, alpha=0.3, beta=0.5, err_star=0.05)
    with pytest.raises(InvalidInput, match="finite bytes range"):
        allocate(law, 1e9)
    alloc = allocate(law, 1e9, bytes_range=(100.0, 5000.0))
    assert alloc.bytes_per_sample == 5000.0  # β > α: quality beats quantity all the way


@pytest.mark.parametrize(
    ("n", "size", "err", "message"),
    [
        (N[:3], L[:3], [0.3, 0.2, 0.1], "give at least 6"),
        (np.full(8, 1e4), np.geomspace(1e3, 1e5, 8), np.linspace(0.5, 0.2, 8), ">= 2 distinct n"),
        (np.geomspace(1e3, 1e5, 8), np.full(8, 1e4), np.linspace(0.5, 0.2, 8), ">= 2 distinct"),
        (
            np.geomspace(1e3, 1e5, 8),
            np.geomspace(1e3, 1e5, 8),
            [0.5, np.nan, 0.4, 0.3, 0.3, 0.2, 0.2, 0.1],
            "error has a non-finite",
        ),
        (
            np.geomspace(1e3, 1e5, 8),
            np.geomspace(1e3, 1e5, 8),
            [0.5, -0.1, 0.4, 0.3, 0.3, 0.2, 0.2, 0.1],
            "error must be >= 0",
        ),
    ],
)
def test_degenerate_or_bad_points_are_rejected(n, size, err, message):
    with pytest.raises(InvalidInput, match=message):
        fit_storage_law(np.asarray(n), np.asarray(size), np.asarray(err, float))


def test_unknown_variant_and_negative_constants_are_rejected():
    with pytest.raises(InvalidInput, match="unknown storage-law variant"):
        fit_storage_law(*grid(FOOD101, 0.0), variant="quadratic")
    with pytest.raises(InvalidInput, match="must be >= 0: alpha"):
        StorageLaw("additive", A=1.0, alpha=-0.1, beta=1.0, B=1.0)


def test_load_points_accepts_aliases_and_names_missing_columns(tmp_path):
    good = tmp_path / "grid.csv"
    good.write_text("num_samples,L,test_error\n1000,50,0.2\n2000,60,0.18\n")
    n, size, err = load_points(good)
    assert n.tolist() == [1000, 2000] and size.tolist() == [50, 60] and err.tolist() == [0.2, 0.18]
    bad = tmp_path / "bad.csv"
    bad.write_text("n,quality,error\n1000,50,0.2\n")
    with pytest.raises(InvalidInput, match="needs columns"):
        load_points(bad)
    bad.write_text("n,bytes,error\n1000,fifty,0.2\n")
    with pytest.raises(InvalidInput, match="bad.csv:2: non-numeric"):
        load_points(bad)
