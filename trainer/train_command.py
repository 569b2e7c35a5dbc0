"""`python -m trainer` / `torchrun --nproc_per_node=N -m trainer`: pretrain a GPT on a job the service mixes.

    torchrun --nproc_per_node=8 -m trainer --url http://mixer-a:8000,http://mixer-b:8000 --job spt \\
        --preset gpt-124m --out runs/spt

Every rank reads its own rows of each global batch (rank and world from torchrun's environment),
checkpoints hold the model, optimizer, RNG and every rank's data position (`--resume` continues bit for
bit), rank 0 evaluates per source on held-out steps, reports the trained step to the service and prints
a progress line every few seconds. `--finetune-job` adds the SPT second phase: finetune on a domain-only
job with early stopping. Options come from flags or `--config FILE` (JSON or TOML; keys are the flag
names, `-` or `_`); flags given on the command line win.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client import MixerClient, MixerClientError, MixerLoader
from client.dataset import STEPS_PER_REQUEST
from client.export import parse_steps
from trainer.evaluate import evaluate
from trainer.finetune import FinetuneConfig, epoch_batches, finetune
from trainer.model import PRESETS, GPTConfig
from trainer.progress import ProgressLine, domain_repetition
from trainer.train import TrainConfig, train

log = logging.getLogger(__name__)
DEFAULT_EVAL_STEPS = range(0, 2)  # global batches of --eval-job that form the validation set


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="JSON or TOML file of options (flag names as keys)")
    g = p.add_argument_group("service")
    g.add_argument("--url", help="service URL, or several replicas comma-separated (failover)")
    g.add_argument("--job", help="the job to train on (its config fixes seq_len and the global batch)")
    g.add_argument("--prefetch", type=int, default=4, help="batches fetched ahead per rank (default 4)")
    g.add_argument("--steps-per-request", type=int, default=STEPS_PER_REQUEST,
                   help=f"steps one batch request asks for after the first (default {STEPS_PER_REQUEST}; "
                   "fewer when they would hold over 2^20 tokens). A request marks its last step served, so a "
                   "schedule change lands up to prefetch + this - 1 steps after the step being trained")
    g.add_argument("--report-interval", type=int, default=10,
                   help="rank 0 reports the trained step to the service every N steps (default 10)")
    g.add_argument("--data-log", action="store_true",
                   help="write OUT/data-rank{R}.jsonl: per step, a SHA-256 of every row each rank trained on")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="gpt-1m", choices=sorted(PRESETS),
                   help="model size (default gpt-1m); block size follows the job's seq_len - 1")
    g.add_argument("--vocab-size", type=int,
                   help="default: the sources' vocab_size from the service, rounded up to a multiple of 64")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout probability (default 0)")
    g.add_argument("--doc-causal-mask", action="store_true",
                   help="attend only within documents (asks the service for boundaries; positions restart "
                        "at each document)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--out", type=Path, help="run directory: metrics.jsonl, ckpt.pt, summary.json")
    g.add_argument("--max-steps", type=int,
                   help="optimizer steps (default: the job's total_steps minus the held-out eval steps)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    g.add_argument("--lr", type=float, default=6e-4, help="peak learning rate (default 6e-4)")
    g.add_argument("--min-lr", type=float, default=6e-5, help="final learning rate (default 6e-5)")
    g.add_argument("--warmup-steps", type=int, default=100, help="linear warmup steps (default 100)")
    g.add_argument("--lr-decay-steps", type=int, help="cosine decay ends here (default: --max-steps)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm, 0: off (default 1)")
    g.add_argument("--seed", type=int, default=1337, help="model init and dropout seed (default 1337)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if any")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    g = p.add_argument_group("checkpoints and evaluation")
    g.add_argument("--checkpoint-interval", type=int, default=100,
                   help="steps between checkpoints (default 100; one is always written at the end)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt when it exists")
    g.add_argument("--eval-interval", type=int, default=250, help="steps between evaluations, 0: at the end")
    g.add_argument("--eval-job",
                   help="a job over held-out sources whose rows, split per source, are the validation set")
    g.add_argument("--eval-steps", type=parse_steps,
                   help="A:B data steps of --eval-job (default 0:2); without --eval-job, steps of --job "
                        "after training (held out for once-sources only; fetching marks them served, so "
                        "schedule changes before B are then refused). Neither: no evaluation")
    g.add_argument("--progress-interval", type=float, default=5.0,
                   help="seconds between progress lines (default 5)")
    g = p.add_argument_group("finetune (optional second phase, rank 0)")
    g.add_argument("--finetune-job", help="a domain job: finetune on its rows after pretraining")
    g.add_argument("--finetune-steps", type=parse_steps, default=range(0, 8),
                   help="A:B data steps of the finetune job forming the finetune set (default 0:8)")
    g.add_argument("--finetune-lr", type=float, default=4e-5, help="constant finetune lr (default 4e-5)")
    g.add_argument("--finetune-epochs", type=int, default=10, help="max finetune epochs (default 10)")
    g.add_argument("--finetune-patience", type=int, default=1,
                   help="epochs without a better domain loss before stopping (default 1)")
    g.add_argument("--finetune-split", help="eval split that decides early stopping (default: the "
                                            "finetune job's first source)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags over ``--config`` over defaults; --url, --job and --out are required from one of them."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        args = parser.parse_args(argv, namespace=_file_defaults(parser, args.config))
    missing = [f"--{name}" for name in ("url", "job", "out") if getattr(args, name) is None]
    if missing:
        parser.error(f"required (as a flag or in --config): {', '.join(missing)}")
    return args


def _file_defaults(parser: argparse.ArgumentParser, path: Path) -> argparse.Namespace:
    """The config file's options as a namespace argparse then overrides with the flags given."""
    try:
        text = path.read_text()
        options = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as exc:
        parser.error(f"--config {path}: {exc}")
    known = {a.dest: a for a in parser._actions}
    namespace = argparse.Namespace()
    for key, value in options.items():
        dest = key.replace("-", "_")
        if dest not in known or dest in ("config", "help"):
            parser.error(f"--config {path}: unknown option {key!r}")
        action = known[dest]
        if callable(action.type) and isinstance(value, str):
            value = action.type(value)  # e.g. "0:8" → range, "runs/x" → Path
        setattr(namespace, dest, value)
    return namespace


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rank = int(os.environ.get("RANK", 0))
    client = MixerClient(args.url.split(","), token=os.environ.get("MIXER_TOKEN") or None)
    try:
        return _run(args, client, rank)
    except MixerClientError as exc:
        print(f"trainer: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()


def _run(args: argparse.Namespace, client: MixerClient, rank: int) -> int:
    job = client.job(args.job)
    config = job["config"]
    eval_job = args.eval_job or args.job
    eval_steps = args.eval_steps or (DEFAULT_EVAL_STEPS if args.eval_job else None)
    own_steps = eval_steps is not None and eval_job == args.job
    max_steps = args.max_steps
    if max_steps is None:
        max_steps = eval_steps.start if own_steps and eval_steps else config["total_steps"]
    if own_steps and eval_steps and eval_steps.start < max_steps:
        raise SystemExit(f"trainer: --eval-steps {eval_steps.start}:{eval_steps.stop} overlaps the "
                         f"{max_steps} training steps of {args.job}; evaluate on later steps or an "
                         "--eval-job")
    names = [s["name"] for s in config["sources"]]
    cfg = TrainConfig(
        model=GPTConfig.from_preset(args.preset, vocab_size=args.vocab_size or _vocab_size(client, names),
                                    block_size=config["seq_len"] - 1, dropout=args.dropout),
        max_steps=max_steps, grad_accum_steps=args.grad_accum, learning_rate=args.lr, min_lr=args.min_lr,
        warmup_steps=args.warmup_steps, lr_decay_steps=args.lr_decay_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, out_dir=str(args.out), eval_interval=args.eval_interval,
        checkpoint_interval=args.checkpoint_interval, device=args.device, compile=args.compile,
        seed=args.seed, doc_causal_mask=args.doc_causal_mask,
    )
    ckpt = args.out / "ckpt.pt"
    if args.resume and ckpt.is_file():
        cfg.resume_from = str(ckpt)
    val = _splits(client, eval_job, eval_steps) if rank == 0 and eval_steps else {}
    repeated = [s["name"] for s in config["sources"] if s["role"] == "repeat"]
    # Built before train() initialises the process group: rank and world come from torchrun's RANK and
    # WORLD_SIZE, so every rank reads only its own rows.
    with MixerLoader(client, args.job, end_step=config["total_steps"], prefetch=args.prefetch,
                     boundaries=args.doc_causal_mask, steps_per_request=args.steps_per_request) as loader:
        batches = _DataLog(loader, args.out / f"data-rank{loader.rank}.jsonl") if args.data_log else loader
        progress = ProgressLine(max_steps, args.progress_interval,
                                domain_repetition(client, args.job, repeated))
        result = train(cfg, batches, evaluator=(lambda m: evaluate(m, val)) if val else None,
                       on_step=_reporter(client, args.job, args.report_interval) if rank == 0 else None,
                       progress=progress, on_eval=_eval_poster(client, args.job, config["sources"]))
    if rank != 0:
        return 0
    if result["step"]:
        _report(client, args.job, result["step"] - 1)  # one batch per step, data steps from 0
    summary: dict[str, Any] = {"job": args.job, "steps": result["step"], "tokens": result["tokens"],
                               "eval": result["eval"], "data_stall_frac": result["data_stall_frac"]}
    if args.finetune_job:
        summary["finetune"] = _finetune(args, client, result["model"], val)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


def _vocab_size(client: MixerClient, names: list[str]) -> int:
    """The largest vocabulary among the job's sources, padded to a multiple of 64 for faster matmuls."""
    vocab = max(s["vocab_size"] for s in client.sources() if s["name"] in names)
    return -(-vocab // 64) * 64


def _splits(client: MixerClient, job: str, steps: range) -> dict[str, torch.Tensor]:
    """Validation rows of ``steps`` (whole global batches) grouped by source: {source: LongTensor[n, L]}."""
    rows: dict[str, list[np.ndarray]] = {}
    for step in steps:
        batch = client.batch(job, step)
        names = batch.header["sources"]
        for row, source in zip(batch.tokens, batch.source_ids.tolist(), strict=True):
            rows.setdefault(names[source], []).append(row.astype(np.int64))
    return {name: torch.from_numpy(np.stack(seqs)) for name, seqs in sorted(rows.items())}


def _reporter(client: MixerClient, job: str, interval: int) -> Any:
    def on_step(data_step: int) -> None:
        if interval and (data_step + 1) % interval == 0:
            _report(client, job, data_step)

    return on_step


def _eval_poster(client: MixerClient, job: str, sources: list[dict[str, Any]]) -> Any:
    """Post each evaluation to the job's overfitting watch; a failure is logged, never fatal to the run.

    Only splits named after the job's sources are posted (they are what the watch joins with its counts),
    and nothing before the first trained step."""
    names = {s["name"] for s in sources}

    def on_eval(data_step: int, tokens: int, results: dict[str, float]) -> None:
        for source, loss in results.items():
            if data_step < 0 or source not in names:
                continue
            try:
                client.post_eval(job, data_step, source, loss, tokens)
            except MixerClientError as exc:
                log.warning("eval post failed", extra={"job": job, "source": source, "error": str(exc)})

    return on_eval


def _report(client: MixerClient, job: str, data_step: int) -> None:
    """Tell the service how far training got; a failure is logged, never fatal to the run."""
    try:
        client.report_progress(job, data_step)
    except MixerClientError as exc:
        log.warning("progress report failed", extra={"job": job, "step": data_step, "error": str(exc)})


def _finetune(args: argparse.Namespace, client: MixerClient, model: Any,
              val: dict[str, torch.Tensor]) -> dict[str, Any]:
    """SPT phase two: finetune on the finetune job's rows, early-stopped on a domain split."""
    config = client.job(args.finetune_job)["config"]
    split = args.finetune_split or config["sources"][0]["name"]
    if split not in val:
        raise SystemExit(f"trainer: --finetune-split {split!r} has no eval rows (splits: {sorted(val)})")
    seqs = torch.cat(list(_splits(client, args.finetune_job, args.finetune_steps).values()))
    out = finetune(model, epoch_batches(seqs, config["global_batch"]), val,
                   FinetuneConfig(learning_rate=args.finetune_lr, max_epochs=args.finetune_epochs,
                                  patience=args.finetune_patience, domain_split=split),
                   on_epoch=lambda h: print(f"finetune epoch {h['epoch']}: " + "  ".join(
                       f"{k} {v:.3f}" for k, v in h.items() if k != "epoch"), file=sys.stderr, flush=True))
    torch.save(model.state_dict(), args.out / "finetuned.pt")
    return out


class _DataLog:
    """The loader, plus one line per step with a SHA-256 of every row: an audit of what each rank read."""

    def __init__(self, loader: MixerLoader, path: Path) -> None:
        self.loader, self.path = loader, path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __iter__(self) -> _DataLog:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self.loader)
        tokens = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1).numpy()
        rows = [hashlib.sha256(row.astype("<i8").tobytes()).hexdigest() for row in tokens]
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": batch["step"], "rank": self.loader.rank, "rows": rows}) + "\n")
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
