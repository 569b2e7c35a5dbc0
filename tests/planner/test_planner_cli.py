"""``mixer plan ...`` through a throwaway argparse parser (the real CLI wires ``register`` the same way)."""

import argparse
import csv
import json

import numpy as np
import pytest
from test_planner_images import have_fashion_mnist
from test_planner_overfitting_law import TRUE, make_runs, true_argmin

from mixer_service.planner.plan_command import register
from mixer_service.planner.storage_law import StorageLaw


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mixer")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture()
def runs_csv(tmp_path):
    runs = make_runs()
    path = tmp_path / "runs.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["tokens", "delta", "domain_loss"])
        writer.writerows(zip(runs.tokens, runs.delta, runs.loss, strict=True))
    return path


@pytest.fixture()
def points_csv(tmp_path):
    law = StorageLaw("additive", A=6.7069, alpha=0.3333, B=1355.29, beta=1.0613, err_star=0.1)
    path = tmp_path / "grid.csv"
    n, size = (a.ravel() for a in np.meshgrid([5e3, 1e4, 2e4, 4e4], [2e3, 4e3, 8e3, 1.6e4]))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["n", "bytes_per_sample", "error"])
        writer.writerows(zip(n, size, law.error(n, size), strict=True))
    return path


def test_plan_spt_json_plot_and_schedule(runs_csv, tmp_path, capsys):
    plot = tmp_path / "spt.png"
    code = run(
        [
            "plan",
            "spt",
            "--runs",
            str(runs_csv),
            "--target-tokens",
            "30B",
            "--domain-tokens",
            "300M",
            "--bootstrap",
            "5",
            "--tokens-unit",
            "1",  # TRUE's constants take T in tokens
            "--plot",
            str(plot),
            "--json",
            "--schedule",
            "chem",
            "web",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    rec = out["recommendation"]
    assert abs(rec["delta"] - true_argmin(3e10)) < 0.01
    assert rec["repetitions"] == pytest.approx(3e10 * rec["delta"] / 3e8)
    assert float(out["schedule"]["phases"][0]["weights"]["chem"]) == pytest.approx(rec["delta"], abs=1e-6)
    assert out["fit"]["law"]["b_train_g"] == pytest.approx(TRUE.b_train_g, abs=0.01)
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_plan_spt_table_and_extrapolation_warning(runs_csv, capsys):
    assert (
        run(
            [
                "plan",
                "spt",
                "--runs",
                str(runs_csv),
                "--target-tokens",
                "10T",
                "--domain-tokens",
                "1e9",
                "--bootstrap",
                "0",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "δ*" in captured.out and "repetitions E*" in captured.out and "b_train_s" in captured.out
    assert "T unit: 1e+09 tokens" in captured.out  # the default unit is stated with the result
    assert "warning: target T=1e+13 is far outside" in captured.err
    assert "target T=1e+13 is far outside" in captured.out  # warnings are in the table too


def test_plan_spt_holdout_predictions_and_post_finetune_objective(runs_csv, tmp_path, capsys):
    ft = tmp_path / "ft.csv"
    with ft.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["tokens", "delta", "gain"])
        for d in (0.0, 0.05, 0.1):
            for t in np.logspace(9, 11, 5):
                writer.writerow([t, d, (2.0 - 8.0 * d) * (t / 1e9) ** -0.1 + 0.05 - 0.5 * d])
    argv = ["plan", "spt", "--runs", str(runs_csv), "--target-tokens", "30B", "--domain-tokens", "300M",
            "--bootstrap", "0", "--tokens-unit", "1", "--holdout-delta", "0.05", "--predict-delta", "0.15"]
    assert run(argv + ["--json", "--ft-gain", str(ft)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recommendation"]["objective"].startswith("post-finetune")
    assert out["finetune_gain"]["a_delta"] == pytest.approx(-8.0 * 1e9**0.1, rel=1e-3)
    assert out["holdout"]["delta"] == 0.05 and 0.05 not in out["holdout"]["fitted_deltas"]
    assert out["holdout"]["rmse"] < 0.05
    assert 0.15 in [p["delta"] for p in out["recommendation"]["predictions"]]
    assert out["fit"]["tokens_unit"] == 1.0
    assert run(argv) == 0
    table = capsys.readouterr().out
    assert "holdout check (§5.3)" in table and "forecast RMSE" in table and "objective" in table


def test_plan_storage_allocates_budgets_with_codec_quality(points_csv, tmp_path, capsys):
    codec = tmp_path / "codec.csv"
    codec.write_text("quality,bytes\n10,2000\n50,8000\n90,30000\n")
    plot = tmp_path / "storage.png"
    assert (
        run(
            [
                "plan",
                "storage",
                "--points",
                str(points_csv),
                "--budget",
                "1G",
                "--budget",
                "100M",
                "--codec",
                str(codec),
                "--bootstrap",
                "5",
                "--plot",
                str(plot),
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    first = out["allocations"][0]
    assert first["budget"] == 1e9
    assert first["bytes_per_sample"] == pytest.approx(14_506, rel=0.02)  # the Food101 closed form at 1 GB
    assert 10 <= first["quality"] <= 90
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "storage", "--points", "/nonexistent/grid.csv"],
        ["plan", "spt", "--runs", "/nonexistent/runs.csv", "--target-tokens", "1B", "--domain-tokens", "1M"],
    ],
)
def test_bad_input_prints_one_line_and_exits_2(argv, capsys):
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_single_delta_runs_are_a_clear_error(tmp_path, capsys):
    path = tmp_path / "one.csv"
    path.write_text(
        "tokens,delta,domain_loss\n"
        + "".join(f"{t},0.05,{3 - i / 10}\n" for i, t in enumerate([1e8, 2e8, 4e8, 8e8, 1.6e9, 3.2e9]))
    )
    assert run(["plan", "spt", "--runs", str(path), "--target-tokens", "1e10", "--domain-tokens", "1e8"]) == 2
    assert "distinct δ values, got 1" in capsys.readouterr().err


@pytest.mark.skipif(
    not have_fashion_mnist(), reason="Fashion-MNIST not fetched (scripts/fetch_fashion_mnist.sh)"
)
def test_plan_images_meets_budget_with_randomized_qualities(tmp_path, capsys):
    out = tmp_path / "fm"
    assert (
        run(["plan", "images", "--out", str(out), "--budget", "30k", "--num-samples", "200", "--json"]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["total_bytes"] <= 30_000
    assert 30_000 - summary["total_bytes"] <= summary["max_sample_bytes"]
    assert summary["num_samples"] == 200 and (out / "meta.json").is_file()
