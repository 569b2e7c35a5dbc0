"""Ground (2) for the overfitting watch: a real CPU run that overfits its domain set, watched by the service.

A GPT trains on a constant mixture served by a local ``mixer serve``: a small sample of ABC tunes (the
domain, ``repeat``) at a δ high enough to repeat it many times, and State of the Union addresses (web).
Every ``--eval-every`` steps the trainer evaluates held-out tunes and addresses and posts both losses with
``MixerLoader.report_eval``, then reads ``GET /v1/jobs/{id}/forecast``. Two arms, paired:

* **watched**: the run as configured, to the end; every forecast is recorded, none is acted on;
* **acted**: the same run (same job seed, schedule, model init and batches) forked at the first warning
  that comes with a proposal: a second job gets the watched run's evals up to there and the proposal as a
  normal If-Match schedule change (reason ``forecast <id>``), and training resumes from the watched run's
  checkpoint at that warning.

Measured: the step of the watched run's domain held-out minimum (the turn-up) against the first warning,
and both arms' domain and web held-out losses at the last step. The law whose δ-dependence the proposal
reads is ``--law`` (a ``mixer plan spt --json`` output) or, by default, the simulation's paper-regime law
(experiments/overfit_watch.py) with T mapped onto this run's budget: no pilots of these corpora were
fitted, and the warning itself does not use the law.

    python -m experiments.overfit_watch_real --threads 1 --out runs/overfit_watch_real
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client import MixerClient, MixerLoader
from experiments.overfit_watch import LAW
from experiments.spt import sample_domain
from mixer_demo.recipe import (
    ROOT,
    create_job,
    domain_docs,
    job_body,
    prepare_sources,
    serve,
    to_sequences,
    web_docs,
)
from mixer_service.planner.overfitting_law import OverfittingLaw
from mixer_service.prepare.tokenizer import load_tokenizer
from trainer.evaluate import evaluate
from trainer.model import GPTConfig
from trainer.train import TrainConfig, train

DOMAIN, WEB = "abc", "sotu"  # source names in the service
SIMULATED_TOKENS = 2e11  # the budget the simulation's law is written for


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delta", type=float, default=0.1, help="domain fraction of every batch")
    ap.add_argument("--domain-tokens", type=int, default=1500, help="size of the domain set (seeded sample)")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=65, help="tokens per served sequence (context + 1)")
    ap.add_argument("--preset", default="gpt-1m")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak lr")
    ap.add_argument("--min-lr", type=float, default=None,
                    help="floor of the cosine at the last step (default: lr / 10; lr: constant after warmup)")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--val-seqs", type=int, default=64, help="held-out sequences per split")
    ap.add_argument("--seed", type=int, default=0, help="job seed, model init and domain sample")
    ap.add_argument("--law", type=Path, default=None, help="`mixer plan spt --json` output to attach")
    ap.add_argument("--max-web-loss-increase", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--work", type=Path, default=ROOT / "data" / "overfit_watch", help="prepared sources")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "overfit_watch_real")
    ap.add_argument("--report", action="store_true", help="only re-summarize --out/results.json")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        kept = json.loads((args.out / "results.json").read_text())
        report = summarize(args, kept["watched"], kept["acted"]) | {"machine": kept["machine"]}
        print(json.dumps(report, indent=2))
        return 0
    torch.set_num_threads(args.threads)
    started, load_before = time.time(), os.getloadavg()
    tok = load_tokenizer()
    abc_train, abc_val = domain_docs()
    web_train, web_val = web_docs()
    domain = sample_domain(abc_train, tok, args.domain_tokens, args.seed)
    sources = args.work / f"sources-{args.domain_tokens}-s{args.seed}"
    prepare_sources(sources, tok, {DOMAIN: domain, WEB: web_train})
    val = {DOMAIN: to_sequences(abc_val, tok, args.seq_len, args.val_seqs),
           WEB: to_sequences(web_val, tok, args.seq_len, args.val_seqs)}
    args.out.mkdir(parents=True, exist_ok=True)
    with serve(sources, args.out / f"state-{int(started)}") as url, MixerClient(url) as client:
        law = _law(args)
        watched = run_arm(args, url, client, "watched", law, val, tok.vocab_size)
        acted = None
        if watched["acted_warning"] is not None:
            acted = run_arm(args, url, client, "acted", law, val, tok.vocab_size, fork=watched)
    result = summarize(args, watched, acted)
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "torch_threads": args.threads,
                         "load_before": load_before, "load_after": os.getloadavg(),
                         "wall_s": time.time() - started,  # both arms, with the forecasts
                         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))}
    everything = result | {"watched": watched, "acted": acted}
    (args.out / "results.json").write_text(json.dumps(everything, indent=1))
    print(json.dumps(result, indent=2))
    return 0


def _law(args: argparse.Namespace) -> OverfittingLaw:
    if args.law is not None:
        doc = json.loads(args.law.read_text())
        return OverfittingLaw.from_dict(doc.get("law", doc))
    budget = args.steps * args.batch * args.seq_len  # tokens as the service counts them
    return replace(LAW, tokens_unit=LAW.tokens_unit * budget / SIMULATED_TOKENS)


def run_arm(args: argparse.Namespace, url: str, client: MixerClient, name: str, law: OverfittingLaw,
            val: dict[str, torch.Tensor], vocab_size: int,
            fork: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one arm, posting every eval and reading the forecast after it; the watched arm keeps a
    checkpoint of the first warning, the acted arm starts from it with the warning's proposal applied."""
    job = f"overfit-{name}-{int(time.time())}"
    create_job(url, job_body(job, {DOMAIN: args.delta, WEB: round(1 - args.delta, 9)},
                             {DOMAIN: "repeat", WEB: "once"}, args.seq_len, args.batch, args.steps,
                             seed=args.seed, author="overfit_watch_real", reason=f"ground 2, {name}"))
    client.request("PUT", f"/v1/jobs/{job}/forecast/law", json={"law": law.to_dict()})
    client.request("PUT", f"/v1/jobs/{job}/forecast/policy",
                   json={"max_web_loss_increase": args.max_web_loss_increase})
    out_dir = args.out / name
    cfg = TrainConfig(model=GPTConfig.from_preset(args.preset, vocab_size=vocab_size,
                                                  block_size=args.seq_len - 1),
                      max_steps=args.steps, warmup_steps=max(1, args.steps // 15), learning_rate=args.lr,
                      min_lr=args.lr / 10 if args.min_lr is None else args.min_lr,
                      eval_interval=args.eval_every, checkpoint_interval=args.eval_every,
                      out_dir=str(out_dir), device="cpu", seed=1337 + args.seed)
    evals: list[dict[str, Any]] = []
    # first_warning: the first forecast that warned; acted_warning: the first that warned with a proposal
    # (the acted arm forks there)
    state: dict[str, Any] = {"first_warning": None, "acted_warning": None, "keep_checkpoint": False,
                             "applied": None}
    start_step = 0
    if fork is not None:
        start_step = _fork(client, job, fork, cfg, out_dir, evals, state)

    with MixerLoader(client, job, start_step=start_step, end_step=args.steps, prefetch=4) as loader:
        def on_eval(step: int, tokens: int, losses: dict[str, float]) -> None:
            loader.report_eval(step, DOMAIN, losses[DOMAIN], tokens)
            loader.report_eval(step, WEB, losses[WEB], tokens)
            found = client.get(f"/v1/jobs/{job}/forecast")
            evals.append({"step": step, "domain": losses[DOMAIN], "web": losses[WEB],
                          "warning": found["warning"], "turn_up_step": found["turn_up_step"],
                          "interval": found["interval"], "forecast_id": found["forecast_id"]})
            if not found["warning"] or fork is not None:
                return
            kept = {k: found[k] for k in ("forecast_id", "last_step", "turn_up_step", "interval",
                                          "share_turning_up", "proposal", "etag", "notes")}
            state["first_warning"] = state["first_warning"] or kept
            if state["acted_warning"] is None and found["proposal"] is not None:
                state["acted_warning"], state["keep_checkpoint"] = kept, True

        def on_step(step: int) -> None:
            client.report_progress(job, step)
            if state["keep_checkpoint"]:  # train() checkpoints right after the eval, before this call
                (out_dir / "ckpt.pt").replace(out_dir / "warning.pt")
                state["keep_checkpoint"] = False

        t0 = time.perf_counter()
        result = train(cfg, loader, evaluator=lambda m: evaluate(m, val), on_step=on_step, on_eval=on_eval)
    print(f"[overfit_watch_real] {name}: {result['step']} steps in {time.perf_counter() - t0:.0f}s",
          file=sys.stderr, flush=True)
    return {"job": job, "evals": evals, "train_s": time.perf_counter() - t0, "checkpoint_dir": str(out_dir),
            **state,
            "versions": client.get(f"/v1/jobs/{job}/schedule/history")["versions"]}


def _fork(client: MixerClient, job: str, watched: dict[str, Any], cfg: TrainConfig, out_dir: Path,
          evals: list[dict[str, Any]], state: dict[str, Any]) -> int:
    """Make ``job`` the watched run up to its first warning, with the warning's proposal applied: the
    evals so far, the proposal as an If-Match change, and train() resuming from the warning's checkpoint."""
    first = watched["acted_warning"]
    proposal = first["proposal"]
    for point in watched["evals"]:
        if point["step"] <= first["last_step"]:
            client.post_eval(job, point["step"], DOMAIN, point["domain"])
            client.post_eval(job, point["step"], WEB, point["web"])
            evals.append(point)
    etag = client.request("GET", f"/v1/jobs/{job}/schedule").headers["etag"]
    change = {"schedule": proposal["schedule"], "requested_step": proposal["start_step"],
              "author": "overfit_watch_real",
              "reason": f"forecast {first['forecast_id']}: {DOMAIN} {proposal['from_delta']:g} -> "
                        f"{proposal['delta']:g} ({proposal['kind']}) from step {proposal['start_step']}"}
    state["applied"] = client.request("PUT", f"/v1/jobs/{job}/schedule", json=change,
                                      headers={"If-Match": etag}).json()
    ckpt = torch.load(Path(watched["checkpoint_dir"]) / "warning.pt", map_location="cpu", weights_only=True)
    ckpt["data"] = [{"next_step": d["next_step"], "job": job, "incarnation": None, "log_chain": []}
                    for d in ckpt["data"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out_dir / "resume.pt")
    cfg.resume_from = str(out_dir / "resume.pt")
    return int(ckpt["data"][0]["next_step"])


def summarize(args: argparse.Namespace, watched: dict[str, Any],
              acted: dict[str, Any] | None) -> dict[str, Any]:
    """The turn-up of the watched run's domain curve, the first warning, and both arms at the end."""
    steps = np.array([e["step"] for e in watched["evals"]])
    dom = np.array([e["domain"] for e in watched["evals"]])
    smooth = np.convolve(dom, np.ones(3) / 3, mode="same")[1:-1]  # 3-eval mean, ends dropped
    raw_min, smooth_min = int(steps[np.argmin(dom)]), int(steps[1:-1][np.argmin(smooth)])
    first, acted_at = watched["first_warning"], watched["acted_warning"]
    out: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "turn_up_step": {"raw_minimum": raw_min, "three_eval_mean_minimum": smooth_min},
        "minimum_domain_loss": float(dom.min()),
        "first_warning_step": None if first is None else first["last_step"],
        "warnings": sum(e["warning"] for e in watched["evals"]),
        "warned_before_turn_up": first is not None and first["last_step"] < smooth_min,
        "forecast_at_first_warning": None if first is None else {
            k: first[k] for k in ("turn_up_step", "interval", "share_turning_up", "proposal")},
        "acted_at_step": None if acted_at is None else acted_at["last_step"],
        "watched_final": {k: watched["evals"][-1][k] for k in ("step", "domain", "web")},
    }
    out["domain_window_means"] = _windows(steps, dom)
    if acted is not None:
        effective = int(acted["applied"]["effective_step"])
        out["after_change"] = _paired(watched["evals"], acted["evals"], effective)
        out["acted_final"] = {k: acted["evals"][-1][k] for k in ("step", "domain", "web")}
        out["applied"] = acted["applied"]
        out["final_domain_gain"] = watched["evals"][-1]["domain"] - acted["evals"][-1]["domain"]
        out["final_web_change"] = acted["evals"][-1]["web"] - watched["evals"][-1]["web"]
    return out


def _windows(steps: np.ndarray, loss: np.ndarray, parts: int = 8) -> list[list[float]]:
    """[first step, last step, mean, standard error] of the curve in ``parts`` runs of evals: a turn-up
    has to show above the eval noise, which one point does not."""
    out = []
    for idx in np.array_split(np.arange(len(steps)), parts):
        if len(idx) > 1:
            part = loss[idx]
            out.append([int(steps[idx[0]]), int(steps[idx[-1]]), float(part.mean()),
                        float(part.std(ddof=1) / np.sqrt(len(part)))])
    return out


def _paired(watched: list[dict[str, Any]], acted: list[dict[str, Any]], effective: int) -> dict[str, Any]:
    """Acted minus watched, eval by eval, from the change's effective step on: mean and standard error."""
    by_step = {e["step"]: e for e in watched}
    pairs = [(e, by_step[e["step"]]) for e in acted if e["step"] >= effective and e["step"] in by_step]
    out: dict[str, Any] = {"evals": len(pairs), "from_step": effective}
    for key in ("domain", "web"):
        diff = np.array([a[key] - w[key] for a, w in pairs])
        out[f"{key}_acted_minus_watched"] = float(diff.mean()) if len(diff) else None
        out[f"{key}_se"] = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else None
    return out


if __name__ == "__main__":
    sys.exit(main())
