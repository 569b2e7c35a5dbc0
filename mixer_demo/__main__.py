"""The end-to-end demo: real corpora -> prepared sources -> mixer service -> GPT trained over HTTP.

Domain: ABC folk tunes shipped with music21; web: State of the Union addresses (npm). The model
pretrains on a 5% domain mixture pulled from a local `mixer serve` (embedded state), then finetunes on
the domain alone with early stopping, as in specialized pretraining. Everything it starts, it stops.
While it trains it prints a line every few seconds (step, loss, tokens/s, data stall, domain repetition).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from client import MixerClient, MixerLoader
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
from mixer_service.prepare.tokenizer import load_tokenizer
from trainer.evaluate import evaluate
from trainer.finetune import FinetuneConfig, epoch_batches, finetune
from trainer.model import GPTConfig
from trainer.progress import ProgressLine, domain_repetition
from trainer.train import TrainConfig, train


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, default=ROOT / "data" / "demo",
                    help="prepared sources, service state and the run (default data/demo)")
    ap.add_argument("--steps", type=int, default=1000, help="pretraining steps (default 1000)")
    ap.add_argument("--domain-fraction", type=float, default=0.05, help="share of domain rows (default 0.05)")
    ap.add_argument("--seq-len", type=int, default=129, help="tokens per served sequence (context + 1)")
    ap.add_argument("--batch", type=int, default=16, help="global batch in sequences (default 16)")
    ap.add_argument("--domain-docs", type=int, default=100,
                    help="size of the domain set in tunes: small, so it repeats several times as in SPT")
    ap.add_argument("--progress-interval", type=float, default=5.0, help="seconds between progress lines")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    say("preparing the corpora (ABC tunes, State of the Union) as sources")
    tok = load_tokenizer()  # byte-level: a small vocabulary keeps a CPU model meaningful in minutes
    abc_train, abc_val = domain_docs()
    abc_train = abc_train[: args.domain_docs]
    web_train, web_val = web_docs()
    sources = args.work / f"sources-{args.domain_docs}"
    prepare_sources(sources, tok, {"abc": abc_train, "sotu": web_train})
    val = {"domain": to_sequences(abc_val, tok, args.seq_len, 256),
           "web": to_sequences(web_val, tok, args.seq_len, 256)}

    say(f"serving {sources} and training gpt-1m for {args.steps} steps on CPU "
        f"({args.domain_fraction:.0%} domain)")
    with serve(sources, args.work / f"state-{int(time.time())}") as url, MixerClient(url) as client:
        job = f"demo-{int(time.time())}"
        d = args.domain_fraction
        create_job(url, job_body(job, {"abc": d, "sotu": 1 - d}, {"abc": "repeat", "sotu": "once"},
                                 args.seq_len, args.batch, args.steps))
        cfg = TrainConfig(model=GPTConfig.from_preset("gpt-1m", vocab_size=tok.vocab_size,
                                                      block_size=args.seq_len - 1),
                          max_steps=args.steps, warmup_steps=20, learning_rate=2e-3, min_lr=2e-4,
                          eval_interval=max(args.steps // 3, 1), out_dir=str(args.work / "run"), device="cpu")
        progress = ProgressLine(args.steps, args.progress_interval, domain_repetition(client, job, ["abc"]))
        with MixerLoader(client, job, end_step=args.steps, prefetch=4) as loader:
            result = train(cfg, loader, evaluator=lambda m: evaluate(m, val),
                           on_step=lambda step: client.report_progress(job, step), progress=progress)
        pretrain = evaluate(result["model"], val)
        say(f"pretrained: {_losses(pretrain)}; finetuning on the domain alone (up to 3 epochs)")
        domain_seqs = to_sequences(abc_train, tok, args.seq_len, 2048)
        ft = finetune(result["model"], epoch_batches(domain_seqs, args.batch), val,
                      FinetuneConfig(learning_rate=4e-4, max_epochs=3, patience=1),
                      on_epoch=lambda h: say(f"finetune epoch {h['epoch']}: {_losses(h)}"))
        reps = client.repetition_histogram(job, "abc")
        info = client.job(job)
        summary = {
            "steps": args.steps, "domain_fraction": d,
            "after_pretraining": pretrain, "after_finetuning": ft["best"],
            "finetune_best_epoch": ft["best_epoch"],
            "data_stall_frac": result["data_stall_frac"],
            "repetition_histogram_abc": reps,
            "tokens_served_per_source": info["tokens_through_high_water"],
        }
        print(json.dumps(summary, indent=2))
    return 0


def _losses(values: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in values.items() if k != "epoch")


def say(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
