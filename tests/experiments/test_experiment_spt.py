"""The SPT experiment end to end at toy scale: corpora -> `mixer serve` -> pretrain -> finetune -> report.

Runs on small synthetic corpora laid out like data/raw (abc/*.abc tunes, sotu/*.txt speeches), so it needs
no downloads and finishes in seconds on CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from experiments import spt
from experiments.spt import compute_multiplier, curve_interval, paper_multiplier

NOTES = "ABCDEFGabcdefg"
WORDS = ("the union nation congress people state law year government world peace country public "
         "great work new war made time free power right trade").split()


def write_corpora(raw: Path) -> None:
    rng = random.Random(0)
    (raw / "abc").mkdir(parents=True)
    for f in range(4):
        tunes = []
        for i in range(60):
            bars = "|".join("".join(rng.choice(NOTES) for _ in range(6)) for _ in range(8))
            tunes.append(f"X:{i + 1}\nT:Tune {f}-{i}\nM:6/8\nK:D\n|:{bars}:|\n")
        (raw / "abc" / f"book{f}.abc").write_text("\n".join(tunes))
    (raw / "sotu").mkdir()
    for d in range(30):
        text = " ".join(rng.choice(WORDS) for _ in range(600))
        (raw / "sotu" / f"{1800 + d}_speech.txt").write_text(text.capitalize() + ".\n")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("spt")
    write_corpora(root / "raw")
    out = root / "out"
    argv = ["--preset", "gpt-tiny", "--seq-len", "33", "--steps", "10", "--batch", "4", "--deltas", "0,0.1",
            "--curve-points", "2", "--ft-max-epochs", "2", "--ft-lrs", "1e-3,4e-3", "--domain-tokens", "800",
            "--val-seqs", "16", "--threads", "1", "--seeds", "0,1", "--raw", str(root / "raw"),
            "--work", str(root / "work"), "--out", str(out)]
    assert spt.main(argv) == 0
    return out, json.loads((out / "results.json").read_text())


def test_outputs_and_metrics(results: tuple[Path, dict]) -> None:
    out, res = results
    for name in ("results.json", "results.md", "spt.png", "runs/d0-s0.json", "runs/d0.1-s1.json"):
        assert (out / name).is_file(), name
    assert (out / "spt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["deltas"] == [0.0, 0.1] and res["seeds"] == [0, 1]
    rows = {r["delta"]: r for r in res["rows"]}
    for row in rows.values():
        assert row["seeds"] == [0, 1]
        for key in ("pre_ft_domain", "post_ft_domain", "relative_gain_pct", "forgetting", "data_stall_frac"):
            assert row[key] == pytest.approx(sum(row[f"{key}_by_seed"]) / 2)  # mean over seeds
            assert row[f"{key}_sd"] >= 0.0
        assert row["forgetting"] == pytest.approx(row["post_ft_web"] - row["pre_ft_web"])
        assert 0.0 <= row["data_stall_frac"] < 1.0
        assert row["post_ft_domain"] <= row["pre_ft_domain"]  # epoch 0 (no finetuning) is a candidate
    assert rows[0.0]["relative_gain_pct"] == 0.0
    assert rows[0.0]["compute_multiplier"] is None and rows[0.0]["inverse_multiplier"] is None
    assert set(rows[0.1]["compute_multiplier"]["kinds"]) <= {"interpolated", "lower_bound", "below_one"}
    assert set(rows[0.1]["inverse_multiplier"]["kinds"]) <= {"interpolated", "upper_bound", "not_reached"}
    assert rows[0.1]["domain_passes"] > 0  # the service really mixed the domain in
    ref = res["runs"]["0-s0"]
    assert ref["pretrain_steps_run"] == 15  # δ=0 continues to 1.5x the budget for the multiplier
    assert [p["step"] for p in ref["post_ft_curve"]] == [5, 10, 15]
    assert [p["step"] for p in res["runs"]["0.1-s1"]["post_ft_curve"]] == [5, 10]  # SPT: up to the budget
    assert res["runs"]["0-s0"]["seed"] == 0 and res["runs"]["0-s1"]["job"].endswith("-s1")
    assert "| 0.1 |" in (out / "results.md").read_text()


def test_compute_multiplier() -> None:
    curve = [{"tokens": t, "post_ft_domain": loss} for t, loss in ((100, 3.0), (200, 2.0), (400, 1.0))]
    mid = compute_multiplier(curve, 1.5, 200)
    assert mid["kind"] == "interpolated" and mid["value"] == pytest.approx(2 ** 0.5)  # halfway in log tokens
    assert compute_multiplier(curve, 2.0, 200)["value"] == pytest.approx(1.0)
    assert compute_multiplier(curve, 0.5, 200)["kind"] == "not_reached"
    assert compute_multiplier(curve, 3.5, 200) == {"value": 0.5, "kind": "upper_bound", "tokens_needed": 100}


def test_paper_multiplier_is_budget_over_spt_tokens_to_match_npt() -> None:
    spt_curve = [{"tokens": t, "post_ft_domain": loss} for t, loss in ((100, 3.0), (200, 2.0), (400, 1.0))]
    # SPT reaches δ=0's budget loss 2.0 at 200 tokens of a 400-token budget: 2x fewer tokens
    m = paper_multiplier(spt_curve, 2.0, 400)
    assert m["value"] == pytest.approx(2.0) and m["kind"] == "interpolated" and m["tokens_needed"] == 200
    assert paper_multiplier(spt_curve, 3.5, 400)["kind"] == "lower_bound"
    assert paper_multiplier(spt_curve, 0.5, 400)["kind"] == "below_one"


def test_curve_interval_lands_on_the_budget() -> None:
    assert curve_interval(300, 4) == 75
    assert curve_interval(30, 4) == 6
    assert curve_interval(10, 2) == 5
    assert curve_interval(3, 4) == 1
