"""Storage scaling law on Fashion-MNIST with a small CNN (CPU, ~10 minutes on 2 cores).

1. Grid: n training images × JPEG quality; every cell is prepared as an image source (exact bytes), its
   decoded images train a small CNN, the error is measured on the 10k lossless test images.
2. Fit Err(n, L) = Err* + A·n^-α + B·L^-β to the grid.
3. At three storage budgets compare, by training on exactly what fits in the budget:
   lossless (PNG), a naive choice (Pillow's default JPEG quality 75), the law's choice (L* → quality via
   the measured codec curve) and randomized per-sample qualities (the law's n, levels searched to fit).

Usage: python -m experiments.storage [--quick] [--out runs/storage_experiment]
Writes results.json under --out, the figure to docs/storage_experiment.png, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from mixer_service.planner.codec import measure_codec_curve  # noqa: E402
from mixer_service.planner.fashion_mnist import load_fashion_mnist  # noqa: E402
from mixer_service.planner.images import EncodedSizes  # noqa: E402
from mixer_service.planner.plots import draw_budget_curves, draw_storage_fit  # noqa: E402
from mixer_service.planner.randomized import assign_randomized  # noqa: E402
from mixer_service.planner.storage_law import allocate, fit_storage_law  # noqa: E402
from mixer_service.sources.image_codec import LOSSLESS  # noqa: E402
from mixer_service.sources.images import ImageSource, prepare_image_source  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_GRID = (1000, 2000, 4000, 8000, 16000)
Q_GRID = (2, 5, 10, 25, 50, 90)
BUDGETS = (400_000, 1_000_000, 2_500_000)
NAIVE_QUALITY = 75  # Pillow's default: what one gets without thinking about the budget
SEEDS = (0, 1)
BATCH = 64
EPOCHS = 5


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 10),
    )


def train_steps(n: int, min_steps: int) -> int:
    """At least ``min_steps`` Adam steps and EPOCHS passes over the data, so large n is not starved."""
    return max(min_steps, EPOCHS * n // BATCH)


def train_and_test(
    x: np.ndarray, y: np.ndarray, x_test: torch.Tensor, y_test: torch.Tensor, steps: int, seed: int
) -> float:
    """Train the CNN for ``steps`` Adam steps on random batches and return the test error."""
    torch.manual_seed(seed)
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    xs = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255).unsqueeze(1)
    ys = torch.from_numpy(y.astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(xs), (BATCH,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        wrong = sum(
            int((model(x_test[i : i + 2000]).argmax(1) != y_test[i : i + 2000]).sum())
            for i in range(0, len(x_test), 2000)
        )
    return wrong / len(x_test)


class Runner:
    """Prepares image sources in a scratch directory and trains on what they decode to."""

    def __init__(
        self,
        pool_x: np.ndarray,
        pool_y: np.ndarray,
        test: tuple[torch.Tensor, torch.Tensor],
        steps: int,
        scratch: Path,
    ):
        self.pool_x, self.pool_y, self.test, self.steps, self.scratch = pool_x, pool_y, test, steps, scratch
        self.count = 0

    def run(self, n: int, qualities: int | np.ndarray, seeds: tuple[int, ...]) -> dict:
        self.count += 1
        out = self.scratch / f"src-{self.count}"
        meta = prepare_image_source(self.pool_x[:n], self.pool_y[:n], out, qualities)
        source = ImageSource.open(out)
        decoded = [source.image(i) for i in range(len(source))]
        x = np.stack([img for img, _ in decoded])
        y = np.array([label for _, label in decoded])
        errors = [train_and_test(x, y, *self.test, train_steps(n, self.steps), seed) for seed in seeds]
        return {
            "n": n,
            "total_bytes": meta.total_bytes,
            "bytes_per_sample": meta.bytes_per_sample,
            "steps": train_steps(n, self.steps),
            "errors": errors,
            "error": float(np.mean(errors)),
        }


def largest_n(sizes: EncodedSizes, quality: int, budget: int) -> int:
    """Most images (prefix of the pool) that fit ``budget`` bytes at one quality, header included."""
    q = np.full(len(sizes.images), quality)
    cumulative = np.cumsum(sizes.payload_bytes(q)) + sizes.header_bytes(q)
    return int(np.searchsorted(cumulative, budget, side="right"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1-minute smoke run, writes under --out only")
    parser.add_argument("--min-steps", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/storage_experiment")
    parser.add_argument("--figure", type=Path, help="PNG path (default: docs/, --quick: --out)")
    args = parser.parse_args()
    if args.figure is None:
        args.figure = args.out / "figure.png" if args.quick else ROOT / "docs/storage_experiment.png"
    torch.set_num_threads(1)  # one thread per process is the most CPU-efficient on a shared 2-core box
    n_grid, q_grid, budgets, seeds, steps = N_GRID, Q_GRID, BUDGETS, SEEDS, args.min_steps
    if args.quick:
        n_grid, q_grid, budgets, seeds, steps = (500, 1000, 2000), (5, 25, 90), (300_000,), (0,), 100
    started = time.time()

    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    perm = np.random.default_rng(0).permutation(len(train_x))
    pool_x, pool_y = train_x[perm], train_y[perm]
    test = (
        torch.from_numpy(test_x.copy()).float().div_(255).unsqueeze(1),
        torch.from_numpy(test_y.astype(np.int64)),
    )

    codec = measure_codec_curve(pool_x[:1000], list(range(1, 101)))
    lossless_payload = float(EncodedSizes(pool_x[:1000]).payload_bytes(np.full(1000, LOSSLESS)).mean())
    lossless_from = int(
        np.argmax(codec.mean_bytes >= lossless_payload) + 1
    )  # JPEG beyond this is bigger than PNG

    with tempfile.TemporaryDirectory() as scratch:
        runner = Runner(pool_x, pool_y, test, steps, Path(scratch))
        grid = []
        for n in n_grid:
            for q in q_grid:
                grid.append(dict(runner.run(n, q, seeds[:1]), quality=q))
                print(
                    f"grid n={n:5d} q={q:3d} L={grid[-1]['bytes_per_sample']:6.1f} "
                    f"err={grid[-1]['error']:.4f}  [{time.time() - started:.0f}s]",
                    flush=True,
                )
        n_arr, l_arr, e_arr = (
            np.array([g[k] for g in grid], float) for k in ("n", "bytes_per_sample", "error")
        )
        fit = fit_storage_law(n_arr, l_arr, e_arr, n_bootstrap=200)

        sizes = EncodedSizes(pool_x)
        comparisons = []
        for s in budgets:
            alloc = allocate(
                fit.law, s, (float(codec.bytes_at(1)), lossless_payload), max_samples=len(pool_x)
            )
            q_law = codec.quality_for(alloc.bytes_per_sample)
            n_law = largest_n(sizes, q_law, s)
            rows = {
                "lossless (PNG)": (largest_n(sizes, LOSSLESS, s), LOSSLESS),
                f"naive (JPEG q={NAIVE_QUALITY})": (largest_n(sizes, NAIVE_QUALITY, s), NAIVE_QUALITY),
                f"law (L*={alloc.bytes_per_sample:.0f} B → q={q_law})": (n_law, q_law),
            }
            sub_sizes = EncodedSizes(pool_x[:n_law])
            randomized = assign_randomized(
                sub_sizes.total_bytes, n_law, s, 1, 100, seed=0, lossless_from=lossless_from
            )
            rows["randomized (law's n, q spread)"] = (n_law, randomized.qualities)
            for method, (n, q) in rows.items():
                result = runner.run(n, q, seeds)
                fixed = not isinstance(q, np.ndarray)
                comparisons.append(
                    dict(
                        result,
                        budget=s,
                        method=method,
                        quality=int(q)
                        if fixed
                        else f"{randomized.low:.1f}–{randomized.high:.1f} (≥{lossless_from} lossless)",
                        predicted_error=float(fit.law.error(n, result["bytes_per_sample"]))
                        if fixed
                        else None,
                    )
                )
                print(
                    f"s={s} {method:40s} n={n:6d} bytes={result['total_bytes']} "
                    f"err={result['error']:.4f}  [{time.time() - started:.0f}s]",
                    flush=True,
                )

    results = {
        "setup": {
            "n_grid": n_grid,
            "q_grid": q_grid,
            "budgets": budgets,
            "seeds": seeds,
            "min_steps": steps,
            "epochs": EPOCHS,
            "batch": BATCH,
            "lossless_payload_bytes": lossless_payload,
            "lossless_from": lossless_from,
            "seconds": time.time() - started,
            "cpu_seconds": time.process_time(),
        },
        "codec": codec.to_dict(),
        "grid": grid,
        "fit": fit.to_dict(),
        "allocations": [
            allocate(fit.law, s, (float(codec.bytes_at(1)), lossless_payload), len(pool_x)).to_dict()
            for s in budgets
        ],
        "comparisons": comparisons,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=_jsonable))
    _figure(results, fit, n_arr, l_arr, e_arr, codec, lossless_payload, args.figure)
    print(_markdown(results))


def _jsonable(value: object) -> object:
    if isinstance(value, np.integer | np.floating):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(type(value))


def _figure(results: dict, fit, n_arr, l_arr, e_arr, codec, lossless_payload: float, path: Path) -> None:
    from mixer_service.planner.storage_law import Allocation

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(18, 5))
    draw_storage_fit(a, fit, n_arr, l_arr, e_arr)
    allocations = [Allocation(**x) for x in results["allocations"]]
    draw_budget_curves(b, fit.law, allocations, (30, 1000))
    markers = {"lossless": "s", "naive": "^", "law": "*", "randomized": "o"}
    for row in results["comparisons"]:
        kind = row["method"].split()[0]
        b.errorbar(
            row["bytes_per_sample"],
            row["error"],
            yerr=np.ptp(row["errors"]) / 2,
            fmt=markers[kind],
            color="black",
            mfc="none",
            ms=8,
            label=kind if row["budget"] == results["setup"]["budgets"][0] else None,
        )
    b.legend(fontsize=8)
    b.set_title("budgets: law curves (lines), measured error (black markers)")
    q = np.arange(1, 101)
    c.plot(q, codec.bytes_at(q), label="JPEG payload (fitted curve)")
    c.axhline(lossless_payload, color="gray", ls="--", label="PNG (lossless) payload")
    c.set(
        yscale="log",
        xlabel="JPEG quality",
        ylabel="mean bytes per image",
        title="codec curve (28×28 Fashion-MNIST)",
    )
    c.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(results: dict) -> str:
    lines = [
        "| budget s | method | quality | n | bytes used | bytes/sample | test error (seeds) | law says |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["comparisons"]:
        pred = "–" if r["predicted_error"] is None else f"{r['predicted_error']:.4f}"
        errs = " / ".join(f"{e:.4f}" for e in r["errors"])
        lines.append(
            f"| {r['budget']:,} | {r['method']} | {r['quality']} | {r['n']:,} | {r['total_bytes']:,} | "
            f"{r['bytes_per_sample']:.1f} | {r['error']:.4f} ({errs}) | {pred} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
