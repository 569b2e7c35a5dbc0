"""Storage scaling law on Fashion-MNIST with a small CNN (CPU, ~20 minutes on 2 shared cores).

1. Grid: n training images × JPEG quality; every cell is prepared as an image source (exact bytes: shards,
   headers and the per-sample index), its decoded images train a small CNN, the error is measured on a
   validation split (5,000 training images never trained on).
2. Fit Err(n, L) = Err* + A·n^-α + B·L^-β to the validation errors.
3. Along each of three storage budget lines n·L = s, train on exactly what fits at several fixed JPEG
   qualities, losslessly (PNG), at the law's choice (L* → quality via the measured codec curve) and with
   randomized per-sample qualities (the law's n, levels searched to fit), and measure the error on the
   10k test images, which the fit never saw: measured error against L, with the law's L* beside it.

Usage: python -m experiments.storage [--quick] [--out runs/storage_experiment]
Writes results.json under --out, the figure to docs/storage_experiment.png, and prints markdown tables.
"""

from __future__ import annotations

import argparse
import io
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
from mixer_service.planner.image_budget import EncodedSizes
from mixer_service.planner.plots import draw_storage_fit  # noqa: E402
from mixer_service.planner.randomized import assign_randomized  # noqa: E402
from mixer_service.planner.storage_law import allocate, fit_storage_law  # noqa: E402
from mixer_service.sources.image_codec import LOSSLESS  # noqa: E402
from mixer_service.sources.image_source import INDEX_DTYPE, ImageSource, prepare_image_source

ROOT = Path(__file__).resolve().parents[1]
N_GRID = (1000, 2000, 4000, 8000, 16000)
Q_GRID = (2, 5, 10, 25, 90)
BUDGETS = (400_000, 1_000_000, 2_500_000)
NAIVE_QUALITY = 75  # Pillow's default: what one gets without thinking about the budget
LINE_QUALITIES = (2, 10, 25, NAIVE_QUALITY)  # fixed levels measured along every budget line (+ lossless)
INDEX_BYTES = INDEX_DTYPE.itemsize  # per-sample index entry: the budget pays for it too


def _npy_header_bytes() -> int:
    buf = io.BytesIO()
    np.save(buf, np.zeros(1, INDEX_DTYPE))
    return buf.tell() - INDEX_BYTES


INDEX_FILE_BYTES = _npy_header_bytes()  # index.npy's own header, once per source
VAL_SIZE = 5000  # training images held out: the law is fitted on their error, judged on the test set
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


def train_and_eval(
    x: np.ndarray, y: np.ndarray, evals: dict[str, tuple[torch.Tensor, torch.Tensor]], steps: int, seed: int
) -> dict[str, float]:
    """Train the CNN for ``steps`` Adam steps on random batches; the error on each evaluation split."""
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
    out = {}
    with torch.no_grad():
        for name, (ex, ey) in evals.items():
            wrong = sum(int((model(ex[i : i + 2000]).argmax(1) != ey[i : i + 2000]).sum())
                        for i in range(0, len(ex), 2000))
            out[name] = wrong / len(ex)
    return out


class Runner:
    """Prepares image sources in a scratch directory and trains on what they decode to."""

    def __init__(
        self,
        pool_x: np.ndarray,
        pool_y: np.ndarray,
        evals: dict[str, tuple[torch.Tensor, torch.Tensor]],
        steps: int,
        scratch: Path,
    ):
        self.pool_x, self.pool_y, self.evals, self.steps, self.scratch = pool_x, pool_y, evals, steps, scratch
        self.count = 0

    def run(self, n: int, qualities: int | np.ndarray, seeds: tuple[int, ...]) -> dict:
        self.count += 1
        out = self.scratch / f"src-{self.count}"
        meta = prepare_image_source(self.pool_x[:n], self.pool_y[:n], out, qualities)
        stored = meta.total_bytes + (out / "index.npy").stat().st_size  # shards + headers + index, exactly
        source = ImageSource.open(out)
        decoded = [source.image(i) for i in range(len(source))]
        x = np.stack([img for img, _ in decoded])
        y = np.array([label for _, label in decoded])
        steps = train_steps(n, self.steps)
        errors = [train_and_eval(x, y, self.evals, steps, seed) for seed in seeds]
        result = {"n": n, "total_bytes": stored, "bytes_per_sample": stored / n, "steps": steps}
        for split in self.evals:
            result[f"{split}_errors"] = [e[split] for e in errors]
            result[f"{split}_error"] = float(np.mean(result[f"{split}_errors"]))
        return result


def largest_n(sizes: EncodedSizes, quality: int, budget: int) -> int:
    """Most images (prefix of the pool) that fit ``budget`` bytes at one quality: payloads, the shared
    header, one index entry per image and the index file's header."""
    q = np.full(len(sizes.images), quality)
    cumulative = np.cumsum(sizes.payload_bytes(q) + INDEX_BYTES) + sizes.header_bytes(q) + INDEX_FILE_BYTES
    return int(np.searchsorted(cumulative, budget, side="right"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1-minute smoke run, writes under --out only")
    parser.add_argument("--min-steps", type=int, default=600)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/storage_experiment")
    parser.add_argument("--figure", type=Path, help="PNG path (default: docs/, --quick: --out)")
    args = parser.parse_args()
    if args.figure is None:
        args.figure = args.out / "figure.png" if args.quick else ROOT / "docs/storage_experiment.png"
    torch.set_num_threads(1)  # one thread per process is the most CPU-efficient on a shared 2-core box
    n_grid, q_grid, budgets, seeds, steps = N_GRID, Q_GRID, BUDGETS, SEEDS, args.min_steps
    line_qualities, val_size = LINE_QUALITIES, VAL_SIZE
    if args.quick:
        n_grid, q_grid, budgets, seeds, steps = (300, 600, 1200), (5, 25, 90), (150_000,), (0,), 60
        line_qualities, val_size = (5, 25), 1000
    started = time.time()

    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    perm = np.random.default_rng(0).permutation(len(train_x))
    pool_x, pool_y = train_x[perm[:-val_size]], train_y[perm[:-val_size]]

    def tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(x.copy()).float().div_(255).unsqueeze(1), torch.from_numpy(y.astype(np.int64))

    evals = {"val": tensors(train_x[perm[-val_size:]], train_y[perm[-val_size:]]),
             "test": tensors(test_x, test_y)}

    codec = measure_codec_curve(pool_x[:1000], list(range(1, 101)))
    lossless_payload = float(EncodedSizes(pool_x[:1000]).payload_bytes(np.full(1000, LOSSLESS)).mean())
    lossless_from = int(
        np.argmax(codec.mean_bytes >= lossless_payload) + 1
    )  # JPEG beyond this is bigger than PNG
    # L counts the index entry; the codec curve maps payload bytes to quality
    bytes_range = (float(codec.bytes_at(1)) + INDEX_BYTES, lossless_payload + INDEX_BYTES)

    with tempfile.TemporaryDirectory() as scratch:
        runner = Runner(pool_x, pool_y, evals, steps, Path(scratch))
        grid = []
        for n in n_grid:
            for q in q_grid:
                grid.append(dict(runner.run(n, q, seeds[:1]), quality=q))
                print(
                    f"grid n={n:5d} q={q:3d} L={grid[-1]['bytes_per_sample']:6.1f} "
                    f"val err={grid[-1]['val_error']:.4f}  [{time.time() - started:.0f}s]",
                    flush=True,
                )
        n_arr, l_arr, e_arr = (
            np.array([g[k] for g in grid], float) for k in ("n", "bytes_per_sample", "val_error")
        )
        fit = fit_storage_law(n_arr, l_arr, e_arr, n_bootstrap=200)

        sizes = EncodedSizes(pool_x)
        comparisons = []
        allocations = [allocate(fit.law, s, bytes_range, max_samples=len(pool_x)) for s in budgets]
        for s, alloc in zip(budgets, allocations, strict=True):
            q_law = codec.quality_for(alloc.bytes_per_sample - INDEX_BYTES)
            n_law = largest_n(sizes, q_law, s)
            rows: dict[str, tuple[int, int | np.ndarray]] = {
                f"fixed q={q}" + (" (naive: Pillow's default)" if q == NAIVE_QUALITY else ""):
                    (largest_n(sizes, q, s), q)
                for q in line_qualities
            }
            rows["lossless (PNG)"] = (largest_n(sizes, LOSSLESS, s), LOSSLESS)
            rows[f"law (L*={alloc.bytes_per_sample:.0f} B → q={q_law})"] = (n_law, q_law)
            sub_sizes = EncodedSizes(pool_x[:n_law])
            randomized = assign_randomized(
                lambda q, sub=sub_sizes, n=n_law: sub.total_bytes(q) + INDEX_BYTES * n + INDEX_FILE_BYTES,
                n_law, s, 1, 100, seed=0, lossless_from=lossless_from,
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
                    f"test err={result['test_error']:.4f}  [{time.time() - started:.0f}s]",
                    flush=True,
                )

    results = {
        "setup": {
            "n_grid": n_grid,
            "q_grid": q_grid,
            "budgets": budgets,
            "line_qualities": line_qualities,
            "seeds": seeds,
            "min_steps": steps,
            "epochs": EPOCHS,
            "batch": BATCH,
            "val_size": val_size,
            "index_bytes_per_sample": INDEX_BYTES,
            "lossless_payload_bytes": lossless_payload,
            "lossless_from": lossless_from,
            "seconds": time.time() - started,
            "cpu_seconds": time.process_time(),
        },
        "codec": codec.to_dict(),
        "grid": grid,
        "fit": fit.to_dict(),
        "allocations": [a.to_dict() for a in allocations],
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
    a.set_title("grid: validation error (points), fitted law (lines)")
    allocations = [Allocation(**x) for x in results["allocations"]]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = {"fixed": "o", "lossless": "s", "law": "*", "randomized": "D"}
    for i, alloc in enumerate(allocations):
        color = colors[i % len(colors)]
        rows = [r for r in results["comparisons"] if r["budget"] == alloc.budget]
        line = sorted((r for r in rows if r["method"].split()[0] in ("fixed", "lossless", "law")),
                      key=lambda r: r["bytes_per_sample"])
        b.plot([r["bytes_per_sample"] for r in line], [r["test_error"] for r in line], "-", color=color, lw=1,
               label=f"s={alloc.budget:,} B: measured test error")
        for r in rows:
            kind = r["method"].split()[0]
            b.errorbar(r["bytes_per_sample"], r["test_error"], yerr=np.ptp(r["test_errors"]) / 2,
                       fmt=markers[kind], color=color, ms=11 if kind == "law" else 6,
                       mfc=color if kind in ("law", "randomized") else "none")
        b.axvline(alloc.bytes_per_sample, color=color, ls="--", lw=1)
        spread = [r["bytes_per_sample"] for r in rows]
        l_grid = np.geomspace(min(spread), max(spread))
        b.plot(l_grid, fit.law.error(alloc.budget / l_grid, l_grid), ":", color=color, lw=1)
    b.plot([], [], "k--", lw=1, label="law's L*(s) (fitted on validation error)")
    b.plot([], [], "k:", lw=1, label="law's predicted (validation) error along the line")
    b.plot([], [], "ko", mfc="none", label="fixed quality / ■ lossless")
    b.plot([], [], "k*", ms=11, label="law's choice")
    b.plot([], [], "kD", label="randomized qualities")
    b.set(xscale="log", xlabel="stored bytes per image L (payload + header share + index)",
          ylabel="test error (mean of seeds; bars: seed range)",
          title="along each budget line n·L = s: measured error vs L")
    b.legend(fontsize=7)
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
        "| budget s | method | quality | n | bytes used | bytes/sample | test error (seeds) | val error "
        "| law says (val) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["comparisons"]:
        pred = "–" if r["predicted_error"] is None else f"{r['predicted_error']:.4f}"
        errs = " / ".join(f"{e:.4f}" for e in r["test_errors"])
        lines.append(
            f"| {r['budget']:,} | {r['method']} | {r['quality']} | {r['n']:,} | {r['total_bytes']:,} | "
            f"{r['bytes_per_sample']:.1f} | {r['test_error']:.4f} ({errs}) | {r['val_error']:.4f} | {pred} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
