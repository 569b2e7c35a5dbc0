"""Ground (1) for the overfitting watch: a simulated trainer whose domain loss follows the SPT law.

The trainer's held-out domain loss is the paper's law (``OverfittingLaw``, constants below, T in billions
of tokens) plus Gaussian noise. A run whose δ changes is evaluated at its *average* domain fraction so
far, δ̄ = domain tokens / tokens: exact for a constant δ and continuous across a change. The watch's
forecast (its own L(E) fit) does not know this law; its proposal reads the law the same way (δ̄), given a
pilot law with deliberate errors, so the proposal is checked for consistency, not against real runs. The
repetitions come from the job's real ``MixturePlan`` (the engine's exact per-source counts).

For each seed: an overfitting run (δ = 10%, turns up at ~69B of 200B tokens) where the first warning is
acted on (its proposal applied as a new schedule version), and a run that does not overfit (δ = 5%) where
any warning is a false alarm. ``python -m experiments.overfit_watch --seeds 20`` prints the table of
docs/spt_experiment.md.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mixer_contract.schedule import Schedule
from mixer_service.engine.mixture import MixturePlan
from mixer_service.engine.schedule import schedule_pieces
from mixer_service.planner.overfitting_law import OverfittingLaw
from mixer_service.planner.watch import Forecast, RunPlan, forecast

LAW = OverfittingLaw(A_train=1.0, b_train_g=-0.12, b_train_s=-1.0, kappa0=1.6, kappa1=0.12, kappa2=0.01,
                     kappa3=0.5, alpha1=0.08, alpha2=1.0, alpha3=0.0, b_gap_g=-0.6, b_gap_s=12.0,
                     tokens_unit=1e9)
# What the watch is given as "the law fitted across runs": the truth with the errors of a pilot fit
# (gap amplitude 30% high, floor 0.05 low); the run's own evals calibrate both away (``Calibrated``).
PILOT_LAW = replace(LAW, alpha1=LAW.alpha1 * 1.3, kappa0=LAW.kappa0 - 0.05)
NAMES = ["domain", "web"]
SEQ_LEN, BATCH = 2048, 512  # 2^20 tokens a step


@dataclass(frozen=True)
class Job:
    """A simulated job: ``total_steps`` steps, a domain set of ``domain_tokens``, evals every ``every``."""

    total_steps: int = 190_735  # 2e11 tokens
    domain_tokens: int = 10**9
    evals: int = 100
    noise: float = 0.003

    @property
    def chunks(self) -> int:
        return self.domain_tokens // SEQ_LEN

    @property
    def eval_steps(self) -> list[int]:
        every = self.total_steps // self.evals
        return [every * (i + 1) - 1 for i in range(self.evals)]


def plan_for(log: list[tuple[int, dict[str, Any]]], batch: int = BATCH) -> MixturePlan:
    parsed = [(eff, Schedule.parse(doc, NAMES)) for eff, doc in log]
    return MixturePlan(schedule_pieces(parsed), len(NAMES), batch)


def constant(delta: float) -> dict[str, Any]:
    return {"phases": [{"start_step": 0, "weights": {"domain": delta, "web": round(1 - delta, 9)}}]}


def domain_loss(plan: MixturePlan, step: int) -> float:
    """The law at the run's tokens and average domain fraction through ``step`` (noiseless)."""
    seqs = BATCH * (step + 1)
    delta_bar = plan.realized_one(step + 1, 0) / seqs
    return float(LAW.test_loss(seqs * SEQ_LEN, delta_bar))


def web_loss(plan: MixturePlan, step: int) -> float:
    """A web held-out loss that falls with web tokens (what a proposal must not make much worse)."""
    web = BATCH * (step + 1) - plan.realized_one(step + 1, 0)
    return 2.6 + 1.4 * (web * SEQ_LEN / 1e9) ** -0.15


def run_once(job: Job, delta: float, seed: int, act: bool) -> dict[str, Any]:
    """One simulated run; with ``act`` the first warning's proposal is applied (and the watch stops)."""
    rng = np.random.default_rng(seed)
    log: list[tuple[int, dict[str, Any]]] = [(0, constant(delta))]
    plan = plan_for(log)
    baseline = plan
    steps: list[int] = []
    dom: list[float] = []
    web: list[float] = []
    warnings: list[Forecast] = []
    applied = None
    for step in job.eval_steps:
        steps.append(step)
        dom.append(domain_loss(plan, step) + rng.normal(0, job.noise))
        web.append(web_loss(plan, step) + rng.normal(0, job.noise))
        if applied is not None:
            continue
        run = RunPlan(plan, 0, job.chunks, SEQ_LEN, job.total_steps, step + 1)
        f = forecast(run, NAMES, np.array(steps), np.array(dom), (np.array(steps), np.array(web)),
                     PILOT_LAW, stamp=f"sim-{seed}", seed=seed)
        if not f.warning:
            continue
        warnings.append(f)
        if act and f.proposal is not None:
            applied = f.proposal
            log.append((max(f.proposal.start_step, step + 1), f.proposal.schedule))
            plan = plan_for(log)
    end = job.total_steps - 1
    truth = _turn_up_step(baseline, job)
    return {
        "seed": seed, "delta": delta, "true_turn_up_step": truth,
        "first_warning_step": warnings[0].last_step if warnings else None,
        "forecast_turn_up_step": warnings[0].turn_up_step if warnings else None,
        "forecast_interval": list(warnings[0].interval) if warnings else None,
        "warnings": len(warnings),
        "proposal": None if applied is None else {"kind": applied.kind, "start_step": applied.start_step,
                                                  "delta": applied.delta},
        "final_domain_loss": domain_loss(plan, end), "baseline_final_domain_loss": domain_loss(baseline, end),
        "final_web_loss": web_loss(plan, end), "baseline_final_web_loss": web_loss(baseline, end),
    }


def _turn_up_step(plan: MixturePlan, job: Job) -> int | None:
    """The step of the noiseless curve's minimum (None: still falling at the end)."""
    grid = np.linspace(0, job.total_steps - 1, 2001).astype(int)
    losses = [domain_loss(plan, int(s)) for s in grid]
    i = int(np.argmin(losses))
    return None if i == len(grid) - 1 else int(grid[i])


def experiment(seeds: int, job: Job = Job(), overfit: float = 0.10, safe: float = 0.05) -> dict[str, Any]:
    acted = [run_once(job, overfit, s, act=True) for s in range(seeds)]
    control = [run_once(job, safe, 1000 + s, act=False) for s in range(seeds)]
    early = [r for r in acted if r["first_warning_step"] is not None and r["true_turn_up_step"] is not None
             and r["first_warning_step"] < r["true_turn_up_step"]]
    better = [r for r in acted if r["final_domain_loss"] < r["baseline_final_domain_loss"]]
    gain = [r["baseline_final_domain_loss"] - r["final_domain_loss"] for r in acted]
    lead = [r["true_turn_up_step"] - r["first_warning_step"] for r in early]
    return {
        "seeds": seeds, "overfit_delta": overfit, "safe_delta": safe, "noise": job.noise,
        "warned_before_turn_up": len(early), "proposal_lowered_final_domain_loss": len(better),
        "median_domain_loss_gain": float(np.median(gain)) if gain else math.nan,
        "median_lead_steps": float(np.median(lead)) if lead else None,
        "false_alarms": sum(1 for r in control if r["warnings"]),
        "acted": acted, "control": control,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--noise", type=float, default=0.003)
    p.add_argument("--json", action="store_true", help="every run, not only the summary")
    args = p.parse_args(argv)
    result = experiment(args.seeds, Job(noise=args.noise))
    if not args.json:
        result = {k: v for k, v in result.items() if k not in ("acted", "control")}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
