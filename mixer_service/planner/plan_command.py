"""``mixer plan ...``: fit the scaling laws from measurements and print recommendations.

    mixer plan spt --runs runs.csv --target-tokens 100B [200B ...] --domain-tokens 300M [--plot fit.png]
        [--json] [--tokens-unit 1B] [--holdout-delta 0.1] [--predict-delta 0.1] [--ft-gain ft.csv]
        [--max-seconds 600]
    mixer plan storage --points grid.csv --budget 5M --budget 20M [--codec codec.csv] [--plot fit.png]
    mixer plan images --out data/fmnist-q50 --quality 50 | --budget 2M [--num-samples 10000]

Counts accept SI suffixes (k, M, G or B = 1e9, T). Bad input prints one line on stderr and exits 2, before
any fit; ``--json`` is strict JSON (no NaN).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mixer_contract.errors import InvalidInput, MixerError
from mixer_service.planner.fit_stats import FitQuality, ParamEstimate, strict_json

if TYPE_CHECKING:
    from mixer_service.planner.spt_plan import SptPlan
    from mixer_service.planner.storage_law import Allocation, StorageFit

# The planner's heavy dependencies (scipy, Pillow, matplotlib: the optional "planner" extra) are imported
# inside the command functions, so registering ``plan`` never breaks a ``mixer`` installed without them.
LOSSLESS_WORDS = ("lossless", "png")
DEFAULT_TOKENS_UNIT = 1e9  # = overfitting_law.DEFAULT_TOKENS_UNIT, repeated: that module needs scipy
DEFAULT_MAX_SECONDS = 600.0

_SUFFIXES = {"k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9, "T": 1e12}


def count(text: str) -> float:
    """Parse '3e11', '300M' or '1.5B' into a float (argparse type)."""
    text = text.strip()
    factor = _SUFFIXES.get(text[-1:], 1.0)
    try:
        value = float(text[:-1] if factor != 1.0 else text) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a number: {text!r} (suffixes: {', '.join(_SUFFIXES)})"
        ) from None
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _quality(text: str) -> int:
    from mixer_service.sources.image_codec import LOSSLESS

    return LOSSLESS if text.lower() in LOSSLESS_WORDS else int(count(text))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``plan`` with its ``spt``, ``storage`` and ``images`` subcommands to a CLI."""
    plan = subparsers.add_parser("plan", help="fit scaling laws and recommend δ / compression for a budget")
    sub = plan.add_subparsers(dest="plan_command", required=True)

    spt = sub.add_parser("spt", help="fit the SPT overfitting law from pilot runs and recommend δ*")
    spt.add_argument("--runs", nargs="+", required=True, help="CSV and/or trainer JSONL files")
    spt.add_argument("--target-tokens", type=count, nargs="+", required=True,
                     help="pretraining token budget(s) T: δ*(T) for each from one fit")
    spt.add_argument("--domain-tokens", type=count, required=True, help="domain set size |D| in tokens")
    spt.add_argument("--delta-range", type=float, nargs=2, metavar=("LOW", "HIGH"), help="δ search range")
    spt.add_argument(
        "--ft-gain",
        help="CSV of finetuning gains (columns tokens, gain, optional delta): fits Eq. 7; with a delta "
        "column at >= 2 values δ* minimises the post-finetune loss",
    )
    spt.add_argument(
        "--tokens-unit", type=count, default=DEFAULT_TOKENS_UNIT,
        help="the unit of T the law's constants are reported in (default 1B); the fit does not depend on it",
    )
    spt.add_argument(
        "--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
        help="wall-clock budget: the bootstrap stops when it is spent, the point fit fails (default 600)",
    )
    spt.add_argument(
        "--holdout-delta", type=float, metavar="D",
        help="§5.3 check: also fit without the runs at δ=D and report the forecast error on that curve",
    )
    spt.add_argument(
        "--predict-delta", type=float, action="append", default=[], metavar="D",
        help="also report the predicted loss (with interval) at δ=D for the target T (repeatable)",
    )
    spt.add_argument("--schedule", nargs=2, metavar=("DOMAIN", "WEB"), help="also emit the schedule for δ*")
    spt.add_argument("--tokens-key", help="column/key holding tokens (default: tokens, T, ...)")
    spt.add_argument("--delta-key", help="column/key holding δ (default: delta, domain_fraction, ...)")
    spt.add_argument("--loss-key", help="column/key holding the domain loss (default: domain_loss, ...)")
    _common(spt)
    spt.set_defaults(func=_safe(run_spt))

    storage = sub.add_parser(
        "storage", help="fit the storage law from a (n, bytes, error) grid; allocate budgets"
    )
    storage.add_argument("--points", required=True, help="CSV with columns n, bytes_per_sample, error")
    storage.add_argument(
        "--variant", default="additive", help="additive (default), additive_no_floor or multiplicative"
    )
    storage.add_argument(
        "--budget", type=count, action="append", default=[], help="storage budget in bytes (repeatable)"
    )
    storage.add_argument("--min-bytes", type=count, help="smallest feasible bytes per sample")
    storage.add_argument("--max-bytes", type=count, help="largest feasible bytes per sample")
    storage.add_argument("--max-samples", type=count, help="samples available (caps n)")
    storage.add_argument("--codec", help="CSV of (quality, bytes): maps each L* to a codec quality")
    _common(storage)
    storage.set_defaults(func=_safe(run_storage))

    images = sub.add_parser(
        "images", help="prepare Fashion-MNIST as an image source at a quality or a byte budget"
    )
    images.add_argument("--out", required=True, help="output directory (must not exist)")
    mode = images.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--quality", type=_quality, help="one JPEG quality 1..100 or 'lossless' for every sample"
    )
    mode.add_argument(
        "--budget", type=count, help="bytes: randomized per-sample qualities meeting this budget"
    )
    images.add_argument("--num-samples", type=count, help="use a seeded random subset of this many images")
    images.add_argument("--split", choices=("train", "test"), default="train")
    images.add_argument("--data-dir", help="directory with the Fashion-MNIST IDX .gz files")
    images.add_argument("--min-quality", type=int, default=1)
    images.add_argument("--max-quality", type=int, default=95)
    images.add_argument("--lossless-from", type=int, help="randomized levels >= this are stored lossless")
    images.add_argument("--seed", type=int, default=0)
    images.add_argument("--json", action="store_true", help="print JSON instead of a table")
    images.set_defaults(func=_safe(run_images))


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bootstrap", type=int, default=50, help="bootstrap refits for uncertainty (0: none)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="write a PNG of the fit and recommendation here")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _safe(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn a user error into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except MixerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except ImportError as e:
            print(
                f"error: the planner needs the 'planner' extra (pip install 'mixer-service[planner]'): {e}",
                file=sys.stderr,
            )
            return 2

    return wrapper


def run_spt(args: argparse.Namespace) -> int:
    from mixer_service.planner.budget import Deadline
    from mixer_service.planner.recommend import fit_finetune_gain
    from mixer_service.planner.spt_plan import SptQuestion, check_question, plan_spt
    from mixer_service.planner.spt_runs import load_runs

    question = SptQuestion(
        target_tokens=args.target_tokens, domain_tokens=args.domain_tokens,
        delta_range=tuple(args.delta_range) if args.delta_range else None, n_bootstrap=args.bootstrap,
        seed=args.seed, tokens_unit=args.tokens_unit, holdout_delta=args.holdout_delta,
        predict_deltas=tuple(args.predict_delta),
        schedule_sources=tuple(args.schedule) if args.schedule else None,
    )
    if args.bootstrap < 0:
        raise InvalidInput(f"--bootstrap must be >= 0, got {args.bootstrap}")
    deadline = Deadline(args.max_seconds, what="--max-seconds")
    runs = load_runs(args.runs, args.tokens_key, args.delta_key, args.loss_key)
    check_question(runs, question)
    finetune = None
    if args.ft_gain:
        columns = _read_columns(args.ft_gain, ("tokens", "gain"), optional=("delta",))
        finetune = fit_finetune_gain(columns["tokens"], columns["gain"], columns.get("delta"))
    plan = plan_spt(runs, question, finetune, deadline)
    if args.plot:
        from mixer_service.planner.plots import plot_spt

        plot_spt(plan.fit, runs, plan.recommendations, args.plot, finetune)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2, allow_nan=False))
    else:
        _print_spt(plan)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _print_spt(plan: SptPlan) -> None:
    fit, rec, holdout = plan.fit, plan.recommendations[0], plan.holdout
    print(f"T unit: {fit.law.tokens_unit:.4g} tokens for the constants (fitted in units of "
          f"{fit.fit_tokens_unit:.4g}; the answer does not depend on either); δ as a fraction; b_gap(δ) < 1 "
          f"imposed on the pilots' [0, {fit.delta_max:g}]")
    print(_quality_line("joint fit", fit.quality))
    print(_quality_line("shared-exponent fit (App. D.1, amplitudes free per δ)", fit.shared.quality))
    per_delta = [
        [f"{p.delta:g}", p.n_points, f"{p.tokens_min:.3g}–{p.tokens_max:.3g}", f"{p.b:.4f}", f"{p.h:.4f}",
         f"{p.quality.r2:.5f}", f"{p.quality.rmse:.3g}"]
        for p in fit.per_delta
    ]  # fmt: skip
    print(_table(["δ", "points", "T range", "b", "h (gap)", "R²", "RMSE"], per_delta))
    print(_param_table(fit.params))
    mult = rec.compute_multiplier
    rows: list[list[object]] = [
        ["objective", rec.objective],
        ["target tokens T", f"{rec.target_tokens:.4g}"],
        ["δ*", _with_interval(rec.delta, rec.delta_interval, ".4g")],
        ["predicted domain loss", _with_interval(rec.predicted_loss, rec.loss_interval, ".4f")],
        ["repetitions E* = T·δ*/|D|", f"{rec.repetitions:.3g}"],
        ["domain tokens needed T·δ*", f"{rec.target_tokens * rec.delta:.4g}"],
        ["compute multiplier at δ* (T / tokens to match δ=0 at T)",
         "-" if mult.multiplier is None else _with_interval(mult.multiplier, mult.interval, ".3g")],
    ]
    if rec.predicted_loss_after_finetune is not None:
        rows.append(["predicted loss after finetuning (Eq. 7)", f"{rec.predicted_loss_after_finetune:.4f}"])
    print(_table(["recommendation", "value"], rows))
    if len(plan.recommendations) > 1:
        print(_table(["T", "δ*(T)", "95% interval", "predicted loss", "E*", "compute multiplier"], [
            [f"{r.target_tokens:.4g}", f"{r.delta:.4g}", _interval(r.delta_interval, ".4g"),
             f"{r.predicted_loss:.4f}", f"{r.repetitions:.3g}",
             "-" if r.compute_multiplier.multiplier is None else f"{r.compute_multiplier.multiplier:.3g}"]
            for r in plan.recommendations
        ]))
    print(_table(
        [f"δ (at T={rec.target_tokens:.3g})", "predicted loss", "95% interval", "beyond pilots"],
        [
            [f"{p.delta:.4g}", f"{p.loss:.4f}", _interval(p.interval, ".4f"), "yes" * p.extrapolated_in_delta]
            for p in rec.predictions
        ],
    ))
    if plan.next_pilots:
        print(_table(["next pilot: δ", "checkpoints up to T", "δ* 95% width now", "expected width after"], [
            [f"{p.delta:.4g}", f"{p.tokens:.3g} ({p.checkpoints})", f"{p.width_now:.3g}",
             f"{p.expected_width:.3g}"]
            for p in plan.next_pilots
        ]))
    if holdout is not None:
        print(_table(["holdout check (§5.3)", "value"], [
            ["held-out δ", f"{holdout.delta:g} (fitted on δ = {', '.join(map(str, holdout.fitted_deltas))})"],
            ["forecast RMSE / bias / max |error|",
             f"{holdout.rmse:.4g} / {holdout.mean_error:+.4g} / {holdout.max_abs_error:.4g}"],
            [f"at T={holdout.tokens_at_end:.3g}: measured vs predicted",
             f"{holdout.measured_at_end:.4f} vs "
             + _with_interval(holdout.predicted_at_end, holdout.interval_at_end, ".4f")],
            ["held-out points inside the 95% interval",
             "-" if holdout.share_in_interval is None else f"{holdout.share_in_interval:.0%}"],
        ]))
    if plan.warnings:
        print(_table(["warning"], [[w] for w in plan.warnings]))
    if plan.schedule is not None:
        print(json.dumps(plan.schedule))


def run_storage(args: argparse.Namespace) -> int:
    from mixer_service.planner.codec import CodecCurve
    from mixer_service.planner.storage_law import allocate, fit_storage_law, load_points

    n, size, err = load_points(args.points)
    fit = fit_storage_law(n, size, err, variant=args.variant, n_bootstrap=args.bootstrap, seed=args.seed)
    codec = None
    if args.codec:
        columns = _read_columns(args.codec, ("quality", "bytes"))
        codec = CodecCurve(columns["quality"], columns["bytes"])
    bytes_range = None
    if args.min_bytes is not None or args.max_bytes is not None:
        bytes_range = (args.min_bytes or 0.0, args.max_bytes or np.inf)
    allocations = [allocate(fit.law, s, bytes_range, args.max_samples) for s in args.budget]
    qualities = [codec.quality_for(a.bytes_per_sample) if codec else None for a in allocations]
    if args.plot:
        from mixer_service.planner.plots import plot_storage

        plot_storage(fit, n, size, err, allocations, args.plot)
    if args.json:
        allocs = [dict(a.to_dict(), quality=q) for a, q in zip(allocations, qualities, strict=True)]
        out = strict_json({"fit": fit.to_dict(), "allocations": allocs})
        print(json.dumps(out, indent=2, allow_nan=False))
    else:
        _print_storage(fit, allocations, qualities)
    for warning in fit.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _print_storage(fit: StorageFit, allocations: list[Allocation], qualities: list[int | None]) -> None:
    print(_quality_line(f"{fit.law.variant} fit", fit.quality))
    print(_param_table(fit.params))
    if allocations:
        print(
            _table(
                ["budget s (B)", "L* (B/sample)", "n*", "predicted error", "quality", "limited by"],
                [
                    [
                        f"{a.budget:.4g}",
                        f"{a.bytes_per_sample:.4g}",
                        f"{a.num_samples:.4g}",
                        f"{a.predicted_error:.4f}",
                        "-" if q is None else q,
                        a.limited_by or "-",
                    ]
                    for a, q in zip(allocations, qualities, strict=True)
                ],
            )
        )


def run_images(args: argparse.Namespace) -> int:
    from mixer_service.planner.fashion_mnist import load_fashion_mnist
    from mixer_service.planner.image_budget import EncodedSizes
    from mixer_service.planner.randomized import assign_randomized
    from mixer_service.sources.image_source import prepare_image_source

    images, labels = load_fashion_mnist(args.split, args.data_dir)
    if args.num_samples is not None:
        if not 1 <= args.num_samples <= len(images):
            raise InvalidInput(f"--num-samples must be in [1, {len(images)}], got {args.num_samples:g}")
        pick = np.sort(np.random.default_rng(args.seed).permutation(len(images))[: int(args.num_samples)])
        images, labels = images[pick], labels[pick]
    summary: dict = {"num_samples": len(images)}
    if args.budget is not None:
        sizes = EncodedSizes(images)
        assignment = assign_randomized(
            sizes.total_bytes,
            len(images),
            int(args.budget),
            args.min_quality,
            args.max_quality,
            args.seed,
            args.lossless_from,
        )
        qualities = assignment.qualities
        summary["assignment"] = assignment.to_dict()
        summary["max_sample_bytes"] = sizes.max_sample_bytes(qualities)
    else:
        qualities = np.full(len(images), args.quality)
    meta = prepare_image_source(images, labels, args.out, qualities)
    summary.update(out=str(args.out), total_bytes=meta.total_bytes, bytes_per_sample=meta.bytes_per_sample)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    rows: list[list[object]] = [
        ["samples", meta.num_samples],
        ["total bytes", meta.total_bytes],
        ["bytes per sample", f"{meta.bytes_per_sample:.1f}"],
    ]
    if args.budget is not None:
        a = summary["assignment"]
        rows += [
            ["budget", a["budget"]],
            ["slack (budget − total)", a["budget"] - meta.total_bytes],
            ["largest sample", summary["max_sample_bytes"]],
            ["quality range", f"{a['low']:.3f} – {a['high']:.3f} (searched: {a['searched']})"],
        ]
    print(_table(["image source", str(args.out)], rows))
    return 0


def _read_columns(path: str, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Numeric CSV columns by name; ``optional`` ones are read when the header has them."""
    if not Path(path).is_file():
        raise InvalidInput(f"file not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in names if c not in (reader.fieldnames or [])]
        if missing:
            raise InvalidInput(f"{path}: missing column(s) {', '.join(missing)}")
        names = names + tuple(c for c in optional if c in (reader.fieldnames or []))
        try:
            rows = [[float(r[c]) for c in names] for r in reader]
        except (TypeError, ValueError):
            raise InvalidInput(f"{path}: non-numeric value in columns {', '.join(names)}") from None
    if not rows:
        raise InvalidInput(f"{path}: no data rows")
    arr = np.array(rows)
    return {c: arr[:, j] for j, c in enumerate(names)}


def _quality_line(what: str, q: FitQuality) -> str:
    worst = f"max |residual|={q.max_abs_residual:.4g}"
    return f"{what}: {q.n_points} points, R²={q.r2:.5f}, RMSE={q.rmse:.4g}, {worst}"


def _with_interval(value: float, interval: tuple[float, float] | None, fmt: str) -> str:
    text = format(value, fmt)
    return text if interval is None else f"{text}  (95%: {_interval(interval, fmt)})"


def _interval(interval: tuple[float, float] | None, fmt: str) -> str:
    return "-" if interval is None else f"{interval[0]:{fmt}}–{interval[1]:{fmt}}"


def _param_table(params: Sequence[ParamEstimate]) -> str:
    return _table(
        ["parameter", "value", "bootstrap std", "95% interval"],
        [[p.name, f"{p.value:.5g}", f"{p.std:.3g}", f"{p.ci_low:.4g} – {p.ci_high:.4g}"] for p in params],
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
