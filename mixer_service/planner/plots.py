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
from mixer_service.planner.recommend import Recommendation  # noqa: E402
from mixer_service.planner.spt_runs import SptRuns  # noqa: E402
from mixer_service.planner.storage_law import Allocation, StorageFit, StorageLaw  # noqa: E402


def plot_spt(fit: SptFit, runs: SptRuns, recommendation: Recommendation | None, path: str | Path) -> None:
    """Left: domain loss vs tokens per δ with the joint fit; right: predicted loss vs δ at the target."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    t_hi = max(fit.tokens_range[1], recommendation.target_tokens if recommendation else 0.0)
    t_grid = np.geomspace(fit.tokens_range[0], t_hi, 200)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(fit.deltas)))
    for color, d in zip(colors, fit.deltas, strict=True):
        mask = runs.delta == d
        left.scatter(runs.tokens[mask], runs.loss[mask], s=12, color=color)
        left.plot(t_grid, fit.law.test_loss(t_grid, d), color=color, label=f"δ={d:g}")
    left.set(
        xscale="log",
        xlabel="pretraining tokens T",
        ylabel="domain test loss",
        title=f"joint fit, R²={fit.quality.r2:.4f}",
    )
    if recommendation is not None:
        left.axvline(recommendation.target_tokens, color="gray", ls="--", lw=1)
        left.plot(
            t_grid,
            fit.law.test_loss(t_grid, recommendation.delta),
            color="red",
            ls=":",
            label=f"δ*={recommendation.delta:.3g}",
        )
        best = float(np.min(recommendation.candidate_losses))  # the objective's value at δ*
        right.plot(recommendation.candidates, recommendation.candidate_losses, color="black")
        right.scatter([recommendation.delta], [best], color="red", zorder=3, label="δ*")
        bars = [(p.delta, p.loss, p.interval) for p in recommendation.predictions if p.interval is not None]
        if bars and not recommendation.finetune_objective:  # intervals are of the pretraining loss
            right.errorbar(
                [d for d, _, _ in bars],
                [loss for _, loss, _ in bars],
                yerr=np.array([[loss - iv[0], iv[1] - loss] for _, loss, iv in bars]).T,
                fmt="none", ecolor="tab:blue", capsize=3, label="95% bootstrap (queried δ)",
            )
        if recommendation.delta_interval is not None:
            right.axvspan(*recommendation.delta_interval, color="red", alpha=0.15, label="δ* 95% bootstrap")
        for d in fit.deltas:
            right.axvline(d, color="gray", lw=0.5, alpha=0.5)
        # the gap term explodes at large δ; frame the region between the optimum and the δ = low end
        edge = float(recommendation.candidate_losses[0])
        span = max(edge - best, 0.05 * abs(best))
        right.set_ylim(best - 0.2 * span, edge + span)
        right.set(
            xlabel="domain fraction δ",
            ylabel=f"predicted {'post-finetune ' * recommendation.finetune_objective}domain loss",
            title=f"at T={recommendation.target_tokens:.3g} tokens",
        )
        right.legend()
    left.legend(fontsize=8)
    _save(fig, path)


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
