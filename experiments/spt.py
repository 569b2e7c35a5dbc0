"""Specialized pretraining (SPT) vs standard pretraining, end to end through the mixer service.

For each domain fraction δ (default 0, 1%, 5%, 10%) at one fixed token budget, a GPT pretrains on a
constant mixture served by one local `mixer serve` (one job per δ; δ=0 is web only), then finetunes on
the domain data alone, for several epochs with early stopping on domain validation loss, once per
learning rate of a small grid; the best rate is kept. Reported, as in "The Finetuner's Fallacy":

* domain validation loss after finetuning, and the relative gain against δ=0
  R = 100·(L_NPT→FT − L_SPT→FT) / L_NPT→FT;
* forgetting: web validation loss after finetuning minus before;
* the compute multiplier, as the paper defines it: budget / the pretraining tokens an SPT run needs to
  match (after finetuning) the δ=0 model's domain loss at the budget — checkpoints of each SPT run below
  the budget are finetuned the same way (``compute_multiplier`` in the results);
* its inverse, reported separately and not the paper's number: the δ=0 run continues past the budget (lr
  held at its floor after the budget, so its model at the budget *is* the δ=0 baseline), its checkpoints
  are finetuned, and inverse multiplier = pretraining tokens δ=0 needs to reach an SPT run's post-finetune
  domain loss / the SPT run's tokens ("not reached" if no checkpoint gets there; ``inverse_multiplier``);
* the data stall share of every pretraining run (train()'s data_stall_frac).

Outputs in --out (default runs/spt/): results.json, results.md (the table), spt.png (the plot), and one
JSON per δ in runs/ (--resume reuses those whose configuration matches, so a long GPU run can be split
over several invocations with --deltas). --docs also writes docs/spt_experiment.png and the table into
docs/spt_experiment.md between its result markers.

CPU (minutes):  python -m experiments.spt --threads 1 --docs
GPU (H100):     python -m experiments.spt --device cuda --preset gpt-124m --seq-len 1025 \
                    --batch 32 --steps 1000 --out runs/spt-gpu
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client import MixerClient, MixerLoader
from mixer_demo.recipe import (
    RAW,
    ROOT,
    create_job,
    domain_docs,
    job_body,
    prepare_sources,
    serve,
    to_sequences,
    web_docs,
)
from mixer_service.prepare.tokenizer import TextTokenizer, load_tokenizer
from trainer.evaluate import evaluate
from trainer.finetune import FinetuneConfig, epoch_batches, finetune
from trainer.model import GPT, PRESETS, GPTConfig
from trainer.train import TrainConfig, train

# Peak pretraining learning rate per preset (cosine decay to a tenth of it).
PRESET_LR = {"gpt-tiny": 2e-3, "gpt-1m": 2e-3, "gpt-12m": 1e-3, "gpt-124m": 6e-4, "gpt-350m": 3e-4}
# Finetuning grid as fractions of the peak pretraining rate. The paper's grid {1e-5, 4e-5, 1e-4} has the
# same 1 : 4 : 10 shape; scaled to the tiny CPU model (peak 2e-3) it is {1e-4, 4e-4, 1e-3}.
FT_LR_FRACTIONS = (0.05, 0.2, 0.5)
DEFAULT_DELTAS = (0.0, 0.01, 0.05, 0.10)
DOMAIN, WEB = "domain", "web"  # source names in the service, and split names in evaluation
DOCS = ROOT / "docs"
DOCS_MD, DOCS_PNG = DOCS / "spt_experiment.md", DOCS / "spt_experiment.png"
BEGIN, END = "<!-- spt-results:begin -->", "<!-- spt-results:end -->"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deltas", default=",".join(str(d) for d in DEFAULT_DELTAS),
                    help="comma-separated domain fractions; 0 (the standard-pretraining reference) is "
                         "required")
    ap.add_argument("--preset", default="gpt-1m", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps per δ: the fixed token budget")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step (and per finetuning step)")
    ap.add_argument("--seq-len", type=int, default=129, help="tokens per served sequence (context + 1)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the pretraining model (CUDA)")
    ap.add_argument("--tokenizer", default="byte", choices=["byte", "gpt2"],
                    help="byte-level (vocab 257) or GPT-2 BPE from data/tokenizer/")
    ap.add_argument("--lr", type=float, default=None, help="peak pretraining lr (default: per preset)")
    ap.add_argument("--min-lr", type=float, default=None, help="floor of the cosine (default: lr / 10)")
    ap.add_argument("--warmup", type=int, default=None, help="warmup steps (default: steps / 15)")
    ap.add_argument("--ft-lrs", default=None,
                    help="comma-separated finetuning lrs (default: 0.05, 0.2, 0.5 x the peak lr)")
    ap.add_argument("--ft-max-epochs", type=int, default=10)
    ap.add_argument("--ft-patience", type=int, default=1, help="epochs without a new best before stopping")
    ap.add_argument("--domain-tokens", type=int, default=None,
                    help="size of the domain set (a seeded sample of ABC tunes); default 2.5%% of the "
                         "budget, so δ=5%% sees it twice and δ=10%% four times")
    ap.add_argument("--val-seqs", type=int, default=128, help="validation sequences per split (domain, web)")
    ap.add_argument("--npt-extend", type=float, default=1.5,
                    help="the δ=0 run continues to this multiple of the budget for the compute multiplier")
    ap.add_argument("--curve-points", type=int, default=4, help="checkpoints per budget on the δ=0 curve")
    ap.add_argument("--curve-full-grid", action="store_true",
                    help="finetune every δ=0 checkpoint with the whole lr grid (default: the lr that was "
                         "best for δ=0 at the budget)")
    ap.add_argument("--seed", type=int, default=0, help="data seed: which domain documents are sampled")
    ap.add_argument("--seeds", default="0,1,2",
                    help="comma-separated run seeds (job seed, model init, finetune shuffles); every δ runs "
                         "once per seed and the table reports mean ± sd over seeds")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--raw", type=Path, default=RAW, help="corpora folder holding abc/ and sotu/")
    ap.add_argument("--work", type=Path, default=ROOT / "data" / "spt", help="prepared sources (a cache)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "spt")
    ap.add_argument("--docs", action="store_true", help="also write the plot and table into docs/")
    ap.add_argument("--resume", action="store_true", help="reuse finished δ runs in --out with this config")
    args = ap.parse_args(argv)
    args.deltas = sorted({float(d) for d in args.deltas.split(",")})
    args.seeds = sorted({int(s) for s in args.seeds.split(",")})
    if 0.0 not in args.deltas:
        ap.error("--deltas must include 0 (the standard-pretraining reference)")
    if not all(0.0 <= d < 1.0 for d in args.deltas):
        ap.error("--deltas must lie in [0, 1)")
    args.lr = args.lr or PRESET_LR[args.preset]
    args.min_lr = args.min_lr if args.min_lr is not None else args.lr / 10
    args.warmup = args.warmup if args.warmup is not None else max(1, args.steps // 15)
    args.ft_lrs = ([float(x) for x in args.ft_lrs.split(",")] if args.ft_lrs
                   else [round(f * args.lr, 10) for f in FT_LR_FRACTIONS])
    if args.npt_extend < 1.0:
        ap.error("--npt-extend must be >= 1")
    return args


# -- data --------------------------------------------------------------------------------------------------

def get_tokenizer(name: str) -> TextTokenizer:
    if name == "gpt2":
        tok_dir = ROOT / "data" / "tokenizer"
        return load_tokenizer(vocab=tok_dir / "gpt2_vocab.json", merges=tok_dir / "gpt2_merges.txt")
    return load_tokenizer()


def sample_domain(docs: list[str], tok: TextTokenizer, n_tokens: int, seed: int) -> list[str]:
    """A seeded sample of whole documents holding at least n_tokens tokens (EOS included)."""
    lengths = [len(t) + 1 for t in tok.encode_batch(docs)]
    picked, total = [], 0
    for i in np.random.default_rng(seed).permutation(len(docs)):
        if total >= n_tokens:
            break
        picked.append(docs[i])
        total += lengths[i]
    return picked


class _Counted:
    """A BatchSource that counts the batches handed out, so an evaluator knows the step it runs at."""

    def __init__(self, inner: MixerLoader) -> None:
        self.inner, self.n = inner, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self.inner)
        self.n += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def _cpu_state(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# -- one δ -------------------------------------------------------------------------------------------------

def curve_interval(steps: int, points: int) -> int:
    """Evaluation spacing: the largest divisor of steps not above steps / points, so the budget is on it."""
    interval = max(1, steps // max(points, 1))
    while steps % interval:
        interval -= 1
    return interval


def finetune_grid(model: GPT, lrs: list[float], ft_seqs: torch.Tensor, val: dict[str, torch.Tensor],
                  args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Finetune a copy of model once per lr; {"by_lr": {lr: summary}, "best_lr": lr} (lowest domain loss)."""
    by_lr = {}
    for lr in lrs:
        cfg = FinetuneConfig(learning_rate=lr, max_epochs=args.ft_max_epochs, patience=args.ft_patience)
        ft = finetune(copy.deepcopy(model), epoch_batches(ft_seqs, args.batch, seed=seed), val, cfg)
        by_lr[str(lr)] = {"best_epoch": ft["best_epoch"], "best": ft["best"], "history": ft["history"]}
    best_lr = min(by_lr, key=lambda k: by_lr[k]["best"][DOMAIN])
    return {"by_lr": by_lr, "best_lr": float(best_lr)}


def run_delta(delta: float, seed: int, url: str, tag: str, ft_seqs: torch.Tensor,
              val: dict[str, torch.Tensor], vocab_size: int, args: argparse.Namespace) -> dict[str, Any]:
    """Pretrain at domain fraction delta through the service, then finetune; every number for one (δ, seed).

    Checkpoints on the evaluation grid are finetuned too (the best lr of the budget), so both compute
    multipliers can be read off post-finetune loss against pretraining tokens."""
    t0 = time.perf_counter()
    reference = delta == 0.0
    interval = curve_interval(args.steps, args.curve_points)
    total_steps = args.steps
    if reference:  # the δ=0 run goes on past the budget, on whole intervals, for the compute multiplier
        total_steps = interval * math.ceil(args.steps * args.npt_extend / interval)
    tokens_per_step = args.batch * (args.seq_len - 1)
    job = f"spt-{tag}-d{delta:g}-s{seed}"
    if reference:
        weights, roles = {WEB: 1.0}, {WEB: "once"}
    else:
        weights, roles = {DOMAIN: delta, WEB: 1.0 - delta}, {DOMAIN: "repeat", WEB: "once"}
    create_job(url, job_body(job, weights, roles, args.seq_len, args.batch, total_steps, seed=seed,
                             author="experiment_spt", reason=f"SPT experiment, delta={delta:g}",
                             allow_wrap=True))
    cfg = TrainConfig(
        model=GPTConfig.from_preset(args.preset, vocab_size=vocab_size, block_size=args.seq_len - 1),
        max_steps=total_steps, warmup_steps=args.warmup, learning_rate=args.lr, min_lr=args.min_lr,
        lr_decay_steps=args.steps,  # cosine ends at the budget: the δ=0 model there is the baseline
        eval_interval=interval, out_dir=str(args.out / "runs" / f"d{delta:g}-s{seed}"), device=args.device,
        compile=args.compile, seed=1337 + seed,  # one init per seed for every δ: paired comparisons
    )
    shutil.rmtree(cfg.out_dir, ignore_errors=True)  # metrics.jsonl appends; start clean
    curve: list[dict[str, Any]] = []
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    with MixerLoader(url, job, end_step=total_steps, prefetch=4) as loader:
        counted = _Counted(loader)

        def evaluator(model: GPT) -> dict[str, float]:
            results = evaluate(model, val)
            curve.append({"step": counted.n, "tokens": counted.n * tokens_per_step, **results})
            snapshots[counted.n] = _cpu_state(model)
            return results

        result = train(cfg, counted, evaluator=evaluator,
                       on_step=lambda step: loader.client.report_progress(job, step))
    print(f"[spt] δ={delta:g} seed {seed}: pretrained {result['step']} steps in "
          f"{result['train_time_s']:.0f}s, "
          f"data stall {100 * result['data_stall_frac']:.2f}%", file=sys.stderr, flush=True)
    model = result["model"]
    model.load_state_dict(snapshots[args.steps])
    pre = next(c for c in curve if c["step"] == args.steps)
    grid = finetune_grid(model, args.ft_lrs, ft_seqs, val, args, seed)
    post = grid["by_lr"][str(grid["best_lr"])]["best"]
    out: dict[str, Any] = {
        "delta": delta, "seed": seed, "job": job, "steps": args.steps, "tokens": args.steps * tokens_per_step,
        "pretrain_steps_run": result["step"], "pretrain_curve": curve,
        "pre_ft": {DOMAIN: pre[DOMAIN], WEB: pre[WEB]},
        "post_ft": {DOMAIN: post[DOMAIN], WEB: post[WEB]},
        "forgetting": post[WEB] - pre[WEB],
        "finetune": grid,
        "data_stall_frac": result["data_stall_frac"], "data_wait_s": result["data_wait_s"],
        "train_time_s": result["train_time_s"],
        "service": _service_stats(url, job, reference),
    }
    out["post_ft_curve"] = _post_ft_curve(snapshots, model, grid, ft_seqs, val, tokens_per_step, args, seed)
    out["wall_s"] = time.perf_counter() - t0
    print(f"[spt] δ={delta:g} seed {seed}: done in {out['wall_s']:.0f}s; "
          f"domain {pre[DOMAIN]:.4f} -> {post[DOMAIN]:.4f}",
          file=sys.stderr, flush=True)
    return out


def _post_ft_curve(snapshots: dict[int, dict[str, torch.Tensor]], model: GPT, grid: dict[str, Any],
                   ft_seqs: torch.Tensor, val: dict[str, torch.Tensor], tokens_per_step: int,
                   args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    """Post-finetune domain loss at each checkpoint: loss against pretraining tokens."""
    points = []
    for step in sorted(snapshots):
        if step == args.steps:
            ft, lr = grid, grid["best_lr"]
        else:
            model.load_state_dict(snapshots[step])
            lrs = args.ft_lrs if args.curve_full_grid else [grid["best_lr"]]
            ft = finetune_grid(model, lrs, ft_seqs, val, args, seed)
            lr = ft["best_lr"]
        best = ft["by_lr"][str(lr)]["best"]
        points.append({"step": step, "tokens": step * tokens_per_step, "lr": lr,
                       "pre_ft_domain": ft["by_lr"][str(lr)]["history"][0][DOMAIN],
                       "post_ft_domain": best[DOMAIN], "post_ft_web": best[WEB]})
    model.load_state_dict(snapshots[args.steps])
    return points


def _service_stats(url: str, job: str, reference: bool) -> dict[str, Any]:
    """What the service says was served: tokens per source, and how often the domain set was repeated."""
    with MixerClient(url) as client:
        info = client.job(job)
        stats: dict[str, Any] = {"tokens_through_high_water": info.get("tokens_through_high_water")}
        if not reference:
            reps = client.repetitions(job, source=DOMAIN)
            fields = ("mean", "min", "max", "epoch", "epoch_progress")
            stats["domain_repetitions"] = {k: reps[k] for k in fields}
            stats["domain_repetition_histogram"] = client.repetition_histogram(job, source=DOMAIN)
    return stats


# -- metrics -----------------------------------------------------------------------------------------------

def compute_multiplier(curve: list[dict[str, Any]], target: float, tokens: int) -> dict[str, Any]:
    """Tokens the δ=0 curve needs to reach `target` post-finetune domain loss, over `tokens`.

    The first checkpoint at or below target is found and the crossing interpolated linearly in log tokens
    from the checkpoint before it. {"value": float | None, "kind": "interpolated" | "upper_bound" (already
    reached at the first checkpoint) | "not_reached", "tokens_needed": int | None}.
    """
    points = sorted((p["tokens"], p["post_ft_domain"]) for p in curve)
    for i, (t, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return {"value": t / tokens, "kind": "upper_bound", "tokens_needed": t}
            t_prev, l_prev = points[i - 1]
            frac = (l_prev - target) / (l_prev - loss) if l_prev != loss else 1.0
            needed = math.exp(math.log(t_prev) + frac * (math.log(t) - math.log(t_prev)))
            return {"value": needed / tokens, "kind": "interpolated", "tokens_needed": round(needed)}
    return {"value": None, "kind": "not_reached", "tokens_needed": None,
            "max_checked": points[-1][0] / tokens if points else None}


def paper_multiplier(curve: list[dict[str, Any]], npt_loss: float, tokens: int) -> dict[str, Any]:
    """The paper's compute multiplier: budget / the pretraining tokens SPT needs to match (after finetuning)
    the δ=0 model's post-finetune domain loss at the budget, read off the SPT run's own checkpoints.

    kind "interpolated"; "lower_bound" (SPT's first checkpoint already matches: the multiplier is at
    least budget / that checkpoint); "below_one" (SPT never matches within the budget)."""
    m = compute_multiplier(curve, npt_loss, tokens)
    if m["kind"] == "not_reached":
        return {"value": None, "kind": "below_one", "tokens_needed": None}
    kind = "lower_bound" if m["kind"] == "upper_bound" else "interpolated"
    return {"value": 1.0 / m["value"], "kind": kind, "tokens_needed": m["tokens_needed"]}


def seed_row(runs: dict[float, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per δ for one seed: the paper's metrics against that seed's δ=0 reference."""
    ref = runs[0.0]
    l_npt = ref["post_ft"][DOMAIN]
    rows = []
    for delta in sorted(runs):
        r = runs[delta]
        reps = r["service"].get("domain_repetitions")
        row = {
            "delta": delta, "seed": r["seed"],
            "domain_passes": reps["epoch"] + reps["epoch_progress"] if reps else 0.0,
            "pre_ft_domain": r["pre_ft"][DOMAIN], "post_ft_domain": r["post_ft"][DOMAIN],
            "relative_gain_pct": 100.0 * (l_npt - r["post_ft"][DOMAIN]) / l_npt,
            "best_ft_lr": r["finetune"]["best_lr"],
            "pre_ft_web": r["pre_ft"][WEB], "post_ft_web": r["post_ft"][WEB],
            "forgetting": r["forgetting"],
            "data_stall_frac": r["data_stall_frac"],
        }
        row["compute_multiplier"] = (  # the paper's: budget / SPT tokens to match NPT at the budget
            None if delta == 0.0 else paper_multiplier(r["post_ft_curve"], l_npt, r["tokens"]))
        row["inverse_multiplier"] = (  # δ=0 tokens to match SPT at the budget / budget
            None if delta == 0.0
            else compute_multiplier(ref["post_ft_curve"], r["post_ft"][DOMAIN], r["tokens"]))
        rows.append(row)
    return rows


STAT_KEYS = ("domain_passes", "pre_ft_domain", "post_ft_domain", "relative_gain_pct", "pre_ft_web",
             "post_ft_web", "forgetting", "data_stall_frac")


def summarize(by_seed: dict[int, dict[float, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per δ: mean, sd and per-seed values of every metric over the seeds."""
    per_seed = [row for seed in sorted(by_seed) for row in seed_row(by_seed[seed])]
    rows = []
    for delta in sorted({r["delta"] for r in per_seed}):
        mine = [r for r in per_seed if r["delta"] == delta]
        row: dict[str, Any] = {"delta": delta, "seeds": [r["seed"] for r in mine]}
        for key in STAT_KEYS:
            values = np.array([r[key] for r in mine], float)
            row[key] = float(values.mean())
            row[f"{key}_sd"] = float(values.std(ddof=1)) if values.size > 1 else float("nan")
            row[f"{key}_by_seed"] = values.tolist()
        for key in ("compute_multiplier", "inverse_multiplier"):
            row[f"{key}_by_seed"] = [r[key] for r in mine]
            row[key] = _multiplier_stats([r[key] for r in mine])
        rows.append(row)
    return rows


BOUND_TEXT = {"lower_bound": "≥ {:.2f}x", "upper_bound": "≤ {:.2f}x", "not_reached": "> {:.2f}x",
              "below_one": "< 1x"}


def _multiplier_stats(values: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Mean ± sd over the seeds whose multiplier was interpolated; the others as the bounds they give."""
    if values[0] is None:
        return None
    nums = np.array([v["value"] for v in values if v["kind"] == "interpolated"])
    bounds = [BOUND_TEXT[v["kind"]].format(v["value"] or v.get("max_checked") or 0)
              for v in values if v["kind"] != "interpolated"]
    return {"n_interpolated": int(nums.size), "n": len(values), "kinds": [v["kind"] for v in values],
            "bounds": bounds,
            "mean": float(nums.mean()) if nums.size else None,
            "sd": float(nums.std(ddof=1)) if nums.size > 1 else None}


def _fmt_multiplier(m: dict[str, Any] | None) -> str:
    if m is None:
        return "1 (reference)"
    parts = []
    if m["mean"] is not None:
        parts.append(f"{m['mean']:.2f}x" + (f" ± {m['sd']:.2f}" if m["sd"] is not None else "")
                     + f" ({m['n_interpolated']} seeds)")
    for bound in sorted(set(m["bounds"])):
        parts.append(f"{bound} ({m['bounds'].count(bound)} seeds)")
    return "; ".join(parts)


def _pm(row: dict[str, Any], key: str, fmt: str) -> str:
    sd = row[f"{key}_sd"]
    return format(row[key], fmt) + ("" if math.isnan(sd) else f" ± {sd:{fmt.lstrip('+')}}")


def reference_note(curve: list[dict[str, Any]]) -> str | None:
    """A warning when the δ=0 post-finetune curve does not fall with tokens (multipliers are then noise)."""
    losses = [p["post_ft_domain"] for p in sorted(curve, key=lambda p: p["tokens"])]
    if all(b <= a for a, b in zip(losses, losses[1:], strict=False)):
        return None
    return (f"The δ=0 post-finetune domain loss does not fall monotonically with pretraining tokens "
            f"(checkpoints: {', '.join(f'{v:.3f}' for v in losses)}), so compute multipliers read off it "
            f"are within noise unless the SPT loss lies clearly outside that range.")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("| δ | seeds | domain passes | domain loss pre-FT | domain loss post-FT | R (%) | forgetting "
            "| compute multiplier (paper: budget / SPT tokens to match δ=0) "
            "| inverse (δ=0 tokens to match SPT / budget) | data stall |\n"
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
    lines = [
        f"| {r['delta']:g} | {len(r['seeds'])} | {r['domain_passes']:.2f} | {_pm(r, 'pre_ft_domain', '.4f')} "
        f"| {_pm(r, 'post_ft_domain', '.4f')} | {_pm(r, 'relative_gain_pct', '+.2f')} "
        f"| {_pm(r, 'forgetting', '+.4f')} | {_fmt_multiplier(r['compute_multiplier'])} "
        f"| {_fmt_multiplier(r['inverse_multiplier'])} | {100 * r['data_stall_frac']:.2f}% |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def plot(runs: dict[float, dict[str, Any]], rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    deltas = [r["delta"] for r in rows]
    labels = [f"{d:g}" for d in deltas]
    x = np.arange(len(deltas))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))

    ax = axes[0, 0]
    for i, d in enumerate(deltas):
        c = runs[d]["pretrain_curve"]
        ax.plot([p["tokens"] for p in c], [p[DOMAIN] for p in c], "o-", color=colors[i % len(colors)],
                label=f"δ={d:g}")
    ax.axvline(runs[0.0]["tokens"], color="grey", ls=":", lw=1)
    ax.set(xlabel="pretraining tokens", ylabel="domain val loss (before finetuning)",
           title="Pretraining: domain loss")
    ax.legend()

    ax = axes[0, 1]
    w = 0.38
    ax.bar(x - w / 2, [r["pre_ft_domain"] for r in rows], w, label="before finetuning", color="#bbbbbb")
    ax.bar(x + w / 2, [r["post_ft_domain"] for r in rows], w, label="after finetuning (± sd over seeds)",
           color=colors[0], yerr=[_sd(r, "post_ft_domain") for r in rows], capsize=3)
    for xi, r in zip(x, rows, strict=True):
        ax.annotate(f"R={r['relative_gain_pct']:+.1f}%", (xi + w / 2, r["post_ft_domain"]), ha="center",
                    va="bottom", fontsize=8)
    lo = min(r["post_ft_domain"] for r in rows)
    hi = max(r["pre_ft_domain"] for r in rows)
    ax.set_ylim(lo - 0.1 * (hi - lo) - 0.02, hi + 0.3 * (hi - lo) + 0.02)
    ax.set_xticks(x, labels)
    ax.set(xlabel="domain fraction δ", ylabel="domain val loss", title="Domain loss at the fixed budget")
    ax.legend(loc="upper center", ncol=2)

    ax = axes[1, 0]
    for i, d in enumerate(deltas):
        c = runs[d]["post_ft_curve"]
        label = f"δ={d:g}"
        if d:
            label += f" (paper multiplier {_fmt_multiplier(rows[i]['compute_multiplier'])})"
        ax.plot([p["tokens"] for p in c], [p["post_ft_domain"] for p in c], "o-",
                color=colors[i % len(colors)], label=label)
    ax.axhline(runs[0.0]["post_ft"][DOMAIN], color="k", ls="--", lw=0.8, label="δ=0 at the budget")
    ax.axvline(runs[0.0]["tokens"], color="grey", ls=":", lw=1)
    ax.set(xlabel="pretraining tokens", ylabel="domain val loss after finetuning",
           title="Checkpoints finetuned (first seed): tokens to match δ=0")
    ax.legend(fontsize=7)

    ax = axes[1, 1]
    ax.bar(x, [r["forgetting"] for r in rows], color=colors[1], yerr=[_sd(r, "forgetting") for r in rows],
           capsize=3)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, labels)
    ax.set(xlabel="domain fraction δ", ylabel="web val loss: after FT − before FT",
           title="Forgetting during finetuning")

    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sd(row: dict[str, Any], key: str) -> float:
    return 0.0 if math.isnan(row[f"{key}_sd"]) else row[f"{key}_sd"]


def write_docs_table(table: str, meta: str) -> None:
    """Put the table between the result markers of docs/spt_experiment.md (creating the file if needed)."""
    block = f"{BEGIN}\n{meta}\n\n{table}{END}"
    text = DOCS_MD.read_text() if DOCS_MD.is_file() else f"# SPT experiment\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    DOCS_MD.write_text(text)


# -- main --------------------------------------------------------------------------------------------------

def config_key(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that changes a δ run's numbers (what --resume compares)."""
    keys = ("preset", "steps", "batch", "seq_len", "tokenizer", "lr", "min_lr", "warmup", "ft_lrs",
            "ft_max_epochs", "ft_patience", "domain_tokens", "val_seqs", "npt_extend", "curve_points",
            "curve_full_grid", "seed", "compile")
    out = {k: getattr(args, k) for k in keys}
    out["device"] = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) \
        else "cpu"
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = get_tokenizer(args.tokenizer)
    vocab_size = tok.vocab_size
    if args.device != "cpu":
        vocab_size = 64 * math.ceil(vocab_size / 64)  # padded for faster matmuls; extra ids never occur
    budget = args.steps * args.batch * (args.seq_len - 1)
    if args.domain_tokens is None:
        args.domain_tokens = max(int(0.025 * budget), args.batch * args.seq_len)
    abc_train, abc_val = domain_docs(args.raw)
    web_train, web_val = web_docs(args.raw)
    domain = sample_domain(abc_train, tok, args.domain_tokens, args.seed)
    key = hashlib.sha256(f"{tok.fingerprint}|{args.raw.resolve()}|{len(domain)}|{args.seed}".encode())
    sources = args.work / f"sources-{args.tokenizer}-{key.hexdigest()[:12]}"
    prepare_sources(sources, tok, {DOMAIN: domain, WEB: web_train})
    meta = {n: json.loads((sources / n / "meta.json").read_text()) for n in (DOMAIN, WEB)}
    val = {DOMAIN: to_sequences(abc_val, tok, args.seq_len, args.val_seqs),
           WEB: to_sequences(web_val, tok, args.seq_len, args.val_seqs)}
    ft_seqs = to_sequences(domain, tok, args.seq_len, 10**9)
    if len(ft_seqs) < args.batch:
        raise SystemExit(f"domain set too small: {len(ft_seqs)} sequences < batch {args.batch}")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runs").mkdir(exist_ok=True)
    cfg_key = config_key(args)
    cpu = platform.processor() or platform.machine()
    device_name = (torch.cuda.get_device_name() if cfg_key["device"] == "cuda"
                   else f"CPU ({cpu}, torch threads: {torch.get_num_threads()})")
    runs: dict[int, dict[float, dict[str, Any]]] = {seed: {} for seed in args.seeds}
    todo = []
    for seed in args.seeds:
        for delta in args.deltas:
            path = args.out / "runs" / f"d{delta:g}-s{seed}.json"
            if args.resume and path.is_file():
                saved = json.loads(path.read_text())
                if saved.get("config") == cfg_key:
                    runs[seed][delta] = saved
                    print(f"[spt] δ={delta:g} seed {seed}: reusing {path}", file=sys.stderr)
                    continue
            todo.append((seed, delta))
    if todo:
        args.work.mkdir(parents=True, exist_ok=True)
        state = Path(tempfile.mkdtemp(prefix="state-", dir=args.work))
        tag = f"{int(time.time())}"
        try:
            with serve(sources, state) as url:
                for i, (seed, delta) in enumerate(todo):
                    print(f"[spt] run {i + 1}/{len(todo)}: δ={delta:g} seed {seed} "
                          f"[{time.perf_counter() - t_start:.0f}s]", file=sys.stderr, flush=True)
                    runs[seed][delta] = {"config": cfg_key, "device": device_name,
                                         **run_delta(delta, seed, url, tag, ft_seqs, val, vocab_size, args)}
                    path = args.out / "runs" / f"d{delta:g}-s{seed}.json"
                    path.write_text(json.dumps(runs[seed][delta], indent=1))
        finally:
            shutil.rmtree(state, ignore_errors=True)

    all_runs = [r for by_delta in runs.values() for r in by_delta.values()]
    rows = summarize(runs)
    device_name = ", ".join(sorted({r["device"] for r in all_runs}))
    results = {
        "config": cfg_key, "deltas": list(args.deltas), "seeds": list(args.seeds), "budget_tokens": budget,
        "domain_set": {"documents": len(domain), "tokens": meta[DOMAIN]["num_tokens"]},
        "web_set": {"documents": meta[WEB]["num_docs"], "tokens": meta[WEB]["num_tokens"]},
        "val_tokens": {k: int(v[:, 1:].numel()) for k, v in val.items()},
        "model_params": GPT(GPTConfig.from_preset(args.preset, vocab_size=vocab_size,
                                                  block_size=args.seq_len - 1)).num_params(),
        "environment": {"device": device_name, "torch": torch.__version__,
                        "python": platform.python_version()},
        "rows": rows,
        "wall_s": time.perf_counter() - t_start,  # this invocation (runs reused by --resume not included)
        "runs_wall_s": sum(r["wall_s"] for r in all_runs),  # pretraining + finetuning, all δ and seeds
        "runs": {f"{d:g}-s{seed}": runs[seed][d] for seed in sorted(runs) for d in sorted(runs[seed])},
    }
    first = runs[args.seeds[0]]
    note = reference_note(first[0.0]["post_ft_curve"])
    results["reference_curve_note"] = note
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown_table(rows) + (f"\n{note}\n" if note else "")
    desc = (f"{args.preset} ({results['model_params'] / 1e6:.2f}M params), {args.tokenizer} tokenizer, "
            f"{args.steps} steps x {args.batch} x {args.seq_len - 1} = {budget:,} tokens per δ, "
            f"seeds {','.join(map(str, args.seeds))}, "
            f"domain set {meta[DOMAIN]['num_tokens']:,} tokens, {device_name}")
    (args.out / "results.md").write_text(f"{desc}\n\n{table}")
    plot(first, rows, args.out / "spt.png", f"SPT vs standard pretraining\n{desc}")
    if args.docs:
        shutil.copyfile(args.out / "spt.png", DOCS_PNG)
        write_docs_table(table, f"Configuration: {desc}. Training + finetuning time, all δ: "
                                f"{results['runs_wall_s'] / 60:.1f} min.")
    print(table)
    print(f"[spt] wrote {args.out}/results.json, results.md, spt.png in {results['wall_s']:.0f}s",
          file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
