"""No planner fit can hang or crash: bounded solvers, a deadline and a cancel flag, ill-posed inputs and bad
arguments refused before any fit (naming the file and line), strict JSON."""

import csv
import json
import re
import threading
import time

import numpy as np
import pytest
from test_planner_cli import run
from test_planner_overfitting_law import PAPER, make_runs, paper_runs

from mixer_contract.errors import InvalidInput
from mixer_service.planner import spt_plan
from mixer_service.planner.budget import Deadline, FitCancelled, FitTimeout
from mixer_service.planner.overfitting_law import _project, fit_overfitting_law
from mixer_service.planner.spt_runs import SptRuns


def write_runs(path, runs: SptRuns, scale_tokens: float = 1.0, scale_loss: float = 1.0) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["tokens", "delta", "domain_loss"])
        writer.writerows(zip(runs.tokens * scale_tokens, runs.delta, runs.loss * scale_loss, strict=True))


def strict_loads(text: str):
    def refuse(token: str):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.timeout(60)
def test_bounded_nnls_answers_designs_that_stall_trf():
    # near-collinear columns over 12 decades, the shape of the joint design on noisy pilots
    rng = np.random.default_rng(0)
    for _ in range(200):
        x = np.geomspace(1e-3, 1e3, 40)
        cols = [x ** rng.uniform(-3, 1), np.ones_like(x), np.log(x + 1e-6), x ** rng.uniform(0.9, 1.0)]
        design = np.column_stack(cols + [cols[-1] * (1 + 1e-9 * rng.normal(size=x.size))])
        y = rng.normal(size=x.size) * 10 ** rng.uniform(-3, 3)
        coef = _project(design, y, (0, 3, 4))
        assert np.all(np.isfinite(coef)) and np.all(coef[[0, 3, 4]] >= 0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [3, 11])
def test_noisy_paper_pilots_fit_within_a_bounded_time(seed):
    # σ = 0.01 on the paper's regime: the noise level at which lsq_linear's trf hung in bootstrap refits
    rng = np.random.default_rng(seed)
    tokens = np.geomspace(4e9, 2e11, 11)
    t, d = (a.ravel() for a in np.meshgrid(tokens, (0.0, 0.001, 0.01, 0.02, 0.05)))
    runs = SptRuns(t, d, PAPER.test_loss(t, d) + rng.normal(0, 0.01, t.size))
    fit = fit_overfitting_law(runs, n_bootstrap=8, seed=0)
    assert len(fit.bootstrap_laws) == 8 and np.isfinite(fit.quality.rmse)


def test_the_deadline_stops_the_bootstrap_and_fails_the_point_fit():
    started = time.monotonic()
    fit = fit_overfitting_law(paper_runs(), n_bootstrap=500, deadline=Deadline(8.0))
    assert time.monotonic() - started < 16  # one solve past the deadline at most, on a busy machine
    assert 0 < len(fit.bootstrap_laws) < 500 and fit.to_dict()["n_bootstrap_requested"] == 500
    assert any("bootstrap stopped after" in w for w in fit.warnings)
    with pytest.raises(FitTimeout, match="did not finish within"):
        fit_overfitting_law(paper_runs(), deadline=Deadline(1e-3))


def test_a_cancelled_fit_stops_at_its_next_solve():
    deadline = Deadline(None)
    threading.Timer(0.5, deadline.cancel.set).start()
    started = time.monotonic()
    with pytest.raises(FitCancelled):
        fit_overfitting_law(paper_runs(), n_bootstrap=500, deadline=deadline)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    ("scale_tokens", "scale_loss", "message"),
    [
        (1e-300, 1.0, r"tokens must count at least one token .*runs.csv:2 has"),
        (1.0, 1e150, r"domain_loss must be <= 1000.*runs.csv:2 has"),
    ],
)
def test_ill_posed_pilots_are_refused_with_their_line(tmp_path, capsys, scale_tokens, scale_loss, message):
    runs = make_runs()
    path = tmp_path / "runs.csv"
    write_runs(path, runs, scale_tokens, scale_loss)
    assert run(["plan", "spt", "--runs", str(path), "--target-tokens", "1e10", "--domain-tokens", "1e8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err


def test_constant_loss_is_refused_naming_the_rows(tmp_path, capsys):
    runs = make_runs()
    path = tmp_path / "runs.csv"
    write_runs(path, SptRuns(runs.tokens, runs.delta, np.full(runs.loss.size, 2.0)))
    assert run(["plan", "spt", "--runs", str(path), "--target-tokens", "1e10", "--domain-tokens", "1e8",
                "--json"]) == 2
    err = capsys.readouterr().err
    assert "domain loss is 2 on every row" in err and "runs.csv:2 to" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--delta-range", "0.2", "0"], "delta range must satisfy 0 <= low < high"),
        (["--holdout-delta", "0.3"], "holdout δ=0.3 has no runs"),
        (["--target-tokens", "1e10", "-5"], "target tokens must be a positive number"),
        (["--predict-delta", "1.5"], "queried δ must lie in"),
    ],
)
def test_argument_errors_are_refused_before_any_fit(tmp_path, capsys, monkeypatch, extra, message):
    def no_fit(*args, **kwargs):
        raise AssertionError("fitted before refusing the arguments")

    monkeypatch.setattr(spt_plan, "fit_overfitting_law", no_fit)
    path = tmp_path / "runs.csv"
    write_runs(path, make_runs())
    argv = ["plan", "spt", "--runs", str(path), "--target-tokens", "1e10", "--domain-tokens", "1e8"]
    assert run(argv + extra) == 2
    assert message in capsys.readouterr().err


def test_json_is_strict_without_a_bootstrap(tmp_path, capsys):
    # bootstrap std is undefined with no refits: it used to print as a bare NaN
    path = tmp_path / "runs.csv"
    write_runs(path, make_runs())
    assert run(["plan", "spt", "--runs", str(path), "--target-tokens", "3e10", "--domain-tokens", "3e8",
                "--bootstrap", "0", "--tokens-unit", "1", "--json"]) == 0
    out = strict_loads(capsys.readouterr().out)
    assert out["fit"]["params"][0]["std"] is None


def test_runs_labels_must_match_rows():
    with pytest.raises(InvalidInput, match="row labels"):
        SptRuns(np.array([1e9]), np.array([0.1]), np.array([2.0]), where=("a", "b"))
