"""The end-to-end demo: real corpora -> prepared sources -> mixer service -> GPT trained over HTTP.

Domain: ABC folk tunes shipped with music21; web: State of the Union addresses (npm). The model
pretrains on a 5% domain mixture pulled from a local `mixer serve` (embedded state), then finetunes on
the domain alone with early stopping, as in specialized pretraining. Everything it starts, it stops.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx
import torch

from client import MixerLoader
from mixer_service.prepare.tokenizer import load_tokenizer
from trainer.evaluate import evaluate
from trainer.finetune import FinetuneConfig, epoch_batches, finetune
from trainer.model import GPTConfig
from trainer.recipe import (
    ROOT,
    create_job,
    domain_docs,
    job_body,
    prepare_sources,
    serve,
    to_sequences,
    web_docs,
)
from trainer.train import TrainConfig, train


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, default=ROOT / "data" / "demo")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--domain-fraction", type=float, default=0.05)
    ap.add_argument("--seq-len", type=int, default=129, help="tokens per served sequence (context + 1)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--domain-docs", type=int, default=100,
                    help="size of the domain set in tunes: small, so it repeats several times as in SPT")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    tok = load_tokenizer()  # byte-level: a small vocabulary keeps a CPU model meaningful in minutes
    abc_train, abc_val = domain_docs()
    abc_train = abc_train[: args.domain_docs]
    web_train, web_val = web_docs()
    sources = args.work / f"sources-{args.domain_docs}"
    prepare_sources(sources, tok, {"abc": abc_train, "sotu": web_train})
    val = {"domain": to_sequences(abc_val, tok, args.seq_len, 256),
           "web": to_sequences(web_val, tok, args.seq_len, 256)}

    with serve(sources, args.work / f"state-{int(time.time())}") as url:
        job = f"demo-{int(time.time())}"
        d = args.domain_fraction
        create_job(url, job_body(job, {"abc": d, "sotu": 1 - d}, {"abc": "repeat", "sotu": "once"},
                                 args.seq_len, args.batch, args.steps))
        cfg = TrainConfig(model=GPTConfig.from_preset("gpt-1m", vocab_size=tok.vocab_size,
                                                      block_size=args.seq_len - 1),
                          max_steps=args.steps, warmup_steps=20, learning_rate=2e-3, min_lr=2e-4,
                          eval_interval=max(args.steps // 3, 1), out_dir=str(args.work / "run"), device="cpu")
        with MixerLoader(url, job, end_step=args.steps, prefetch=4) as loader:
            result = train(cfg, loader, evaluator=lambda m: evaluate(m, val),
                           on_step=lambda step: loader.client.report_progress(job, step))
        pretrain = evaluate(result["model"], val)
        domain_seqs = to_sequences(abc_train, tok, args.seq_len, 2048)
        ft = finetune(result["model"], epoch_batches(domain_seqs, args.batch), val,
                      FinetuneConfig(learning_rate=4e-4, max_epochs=3, patience=1))
        reps = httpx.get(f"{url}/v1/jobs/{job}/repetitions/histogram", params={"source": "abc"}).json()
        info = httpx.get(f"{url}/v1/jobs/{job}").json()
        summary = {
            "steps": args.steps, "domain_fraction": d,
            "after_pretraining": pretrain, "after_finetuning": ft["best"],
            "finetune_best_epoch": ft["best_epoch"],
            "data_stall_frac": result["data_stall_frac"],
            "repetition_histogram_abc": reps["histogram"],
            "tokens_served_per_source": info["tokens_through_high_water"],
        }
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
