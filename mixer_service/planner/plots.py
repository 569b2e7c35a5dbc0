"""PNG plots of fitted laws and recommendations, so a fit can be judged by eye before it is trusted."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from mixer_service.planner.overfitting_law import SptFit  # noqa: E402
from mixer_service.planner.recommend import (  # noqa: E402
    FinetuneGain,
    Recommendation,
    argmin_delta,
    bootstrap_optima,
    objective,
)
from mixer_service.planner.spt_runs import SptRuns  # noqa: E402
from mixer_service.planner.storage_law import Allocation, StorageFit, StorageLaw  # noqa: E402


def plot_spt(fit: SptFit, runs: SptRuns, recommendations: Sequence[Recommendation], path: str | Path,
             finetune: FinetuneGain | None = None) -> None:
    """Four panels: pilots with the fitted curves; predicted loss vs δ at the first budget; δ*(T) with its
    bootstrap band and the budgets asked; the train/gap split of the loss at δ*."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.6))
    first = recommendations[0] if recommendations else None
    t_hi = max([fit.tokens_range[1]] + [r.target_tokens for r in recommendations])
    t_grid = np.geomspace(fit.tokens_range[0], t_hi, 200)
    _draw_pilots(axes[0, 0], fit, runs, t_grid, recommendations)
    if first is not None:
        _draw_loss_vs_delta(axes[0, 1], fit, first)
        _draw_delta_star(axes[1, 0], fit, recommendations, finetune)
        _draw_split(axes[1, 1], fit, first.delta, t_grid)
    _save(fig, path)


def _draw_pilots(ax: Axes, fit: SptFit, runs: SptRuns, t_grid: np.ndarray,
                 recommendations: Sequence[Recommendation]) -> None:
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(fit.deltas)))
    for color, d in zip(colors, fit.deltas, strict=True):
        mask = runs.delta == d
        ax.scatter(runs.tokens[mask], runs.loss[mask], s=12, color=color)
        ax.plot(t_grid, fit.law.test_loss(t_grid, d), color=color, label=f"δ={d:g}")
    for r in recommendations:
        ax.axvline(r.target_tokens, color="gray", ls="--", lw=1)
    if recommendations:
        star = recommendations[0].delta
        ax.plot(t_grid, fit.law.test_loss(t_grid, star), color="red", ls=":", label=f"δ*={star:.3g}")
    ax.set(xscale="log", xlabel="pretraining tokens T", ylabel="domain test loss",
           title=f"pilots and the joint fit, R²={fit.quality.r2:.4f}")
    ax.legend(fontsize=8)


def _draw_loss_vs_delta(ax: Axes, fit: SptFit, rec: Recommendation) -> None:
    best = float(np.min(rec.candidate_losses))  # the objective's value at δ*
    ax.plot(rec.candidates, rec.candidate_losses, color="black")
    ax.scatter([rec.delta], [best], color="red", zorder=3, label="δ*")
    bars = [(p.delta, p.loss, p.interval) for p in rec.predictions if p.interval is not None]
    if bars and not rec.finetune_objective:  # intervals are of the pretraining loss
        ax.errorbar(
            [d for d, _, _ in bars], [loss for _, loss, _ in bars],
            yerr=np.array([[loss - iv[0], iv[1] - loss] for _, loss, iv in bars]).T,
            fmt="none", ecolor="tab:blue", capsize=3, label="95% bootstrap (queried δ)",
        )
    if rec.delta_interval is not None:
        ax.axvspan(*rec.delta_interval, color="red", alpha=0.15, label="δ* 95% bootstrap")
    for d in fit.deltas:
        ax.axvline(d, color="gray", lw=0.5, alpha=0.5)
    # the gap term explodes at large δ; frame the region between the optimum and the δ = low end
    edge = float(rec.candidate_losses[0])
    span = max(edge - best, 0.05 * abs(best))
    if np.isfinite(edge) and np.isfinite(best):
        ax.set_ylim(best - 0.2 * span, edge + span)
    what = "post-finetune " * rec.finetune_objective
    ax.set(xlabel="domain fraction δ", ylabel=f"predicted {what}domain loss",
           title=f"at T={rec.target_tokens:.3g} tokens")
    ax.legend(fontsize=8)


def _draw_delta_star(ax: Axes, fit: SptFit, recommendations: Sequence[Recommendation],
                     finetune: FinetuneGain | None) -> None:
    lo, hi = float(recommendations[0].candidates[0]), float(recommendations[0].candidates[-1])
    grid = np.linspace(lo, hi, 401)
    t_max = max(r.target_tokens for r in recommendations)
    tokens = np.geomspace(fit.tokens_range[0], max(t_max, fit.tokens_range[1]) * 2, 25)
    point = [argmin_delta(objective(fit.law, t, finetune), grid)[0] for t in tokens]
    ax.plot(tokens, point, color="black", label="δ*(T), fitted law")
    if len(fit.bootstrap_laws) >= 2:
        band = np.array([np.percentile(bootstrap_optima(fit, t, grid, finetune), [2.5, 97.5])
                         for t in tokens])
        ax.fill_between(tokens, band[:, 0], band[:, 1], color="red", alpha=0.15, label="95% bootstrap")
    for r in recommendations:
        err = None
        if r.delta_interval is not None:
            err = [[r.delta - r.delta_interval[0]], [r.delta_interval[1] - r.delta]]
        ax.errorbar([r.target_tokens], [r.delta], yerr=err, fmt="o", color="red", capsize=3)
    ax.axvspan(*fit.tokens_range, color="gray", alpha=0.1, label="pilots' T range")
    ax.set(xscale="log", xlabel="token budget T", ylabel="δ*", ylim=(lo, hi),
           title="δ*(T) from one fit (● = budgets asked)")
    ax.legend(fontsize=8)


def _draw_split(ax: Axes, fit: SptFit, delta: float, t_grid: np.ndarray) -> None:
    train = fit.law.train_loss(t_grid, delta)
    gap = fit.law.gap(t_grid, delta)
    ax.plot(t_grid, train + gap, color="black", label="L_test = L_train + L_gap")
    ax.plot(t_grid, train, color="tab:blue", label="L_train")
    ax.fill_between(t_grid, train, train + gap, color="tab:orange", alpha=0.4, label="L_gap (overfitting)")
    turn = t_grid[int(np.argmin(train + gap))]
    if turn < t_grid[-1]:
        ax.axvline(turn, color="tab:orange", ls="--", lw=1, label=f"turns up at T={turn:.3g}")
    ax.set(xscale="log", xlabel="pretraining tokens T", ylabel="domain loss",
           title=f"train/gap split at δ*={delta:.3g}")
    ax.legend(fontsize=8)


def draw_storage_fit(ax: Axes, fit: StorageFit, n: np.ndarray, size: np.ndarray, error: np.ndarray) -> None:
    """Error vs bytes per sample, one colour per n: measured points and the fitted law."""
    ns = np.unique(n)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(ns)))
    l_grid = np.geomspace(size.min(), size.max(), 100)
    for color, value in zip(colors, ns, strict=True):
        mask = n == value
        ax.scatter(size[mask], error[mask], s=14, color=color)
        ax.plot(l_grid, fit.law.error(value, l_grid), color=color, label=f"n={value:g}")
    ax.set(
        xscale="log",
        xlabel="bytes per sample L",
        ylabel="test error",
        title=f"{fit.law.variant} fit, R²={fit.quality.r2:.4f}",
    )
    ax.legend(fontsize=8)


def draw_budget_curves(
    ax: Axes, law: StorageLaw, allocations: Sequence[Allocation], l_range: tuple[float, float]
) -> None:
    """Predicted error along n·L = s for each budget, with the law's choice L* marked."""
    l_grid = np.geomspace(*l_range, 200)
    for alloc in allocations:
        line = ax.plot(l_grid, law.error(alloc.budget / l_grid, l_grid), label=f"s={alloc.budget:.3g} B")[0]
        ax.scatter(
            [alloc.bytes_per_sample],
            [alloc.predicted_error],
            color=line.get_color(),
            marker="*",
            s=120,
            zorder=3,
        )
    ax.set(
        xscale="log",
        xlabel="bytes per sample L (n = s / L)",
        ylabel="predicted test error",
        title="fixed storage budgets (★ = L*)",
    )
    ax.legend(fontsize=8)


def plot_storage(
    fit: StorageFit,
    n: np.ndarray,
    size: np.ndarray,
    error: np.ndarray,
    allocations: Sequence[Allocation],
    path: str | Path,
) -> None:
    """Left: the fit on the grid; right: error along each budget's n·L = s curve with L*."""
    fig, axes = plt.subplots(
        1, 2 if allocations else 1, figsize=(12 if allocations else 6, 4.8), squeeze=False
    )
    draw_storage_fit(axes[0, 0], fit, n, size, error)
    if allocations:
        lows = [a.bytes_per_sample for a in allocations] + [size.min()]
        highs = [a.bytes_per_sample for a in allocations] + [size.max()]
        draw_budget_curves(axes[0, 1], fit.law, allocations, (min(lows) / 2, max(highs) * 2))
    _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
