"""The end-to-end demo: real corpora -> prepared sources -> mixer service -> GPT trained over HTTP.

Domain: ABC folk tunes shipped with music21; web: State of the Union addresses (npm). The model
pretrains on a 5% domain mixture pulled from a local `mixer serve` (embedded state), then finetunes on
the domain alone with early stopping, as in specialized pretraining. Everything it starts, it stops.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from client import MixerLoader
from mixer_service.prepare.readers import iter_documents
from mixer_service.prepare.tokenizer import load_tokenizer
from mixer_service.prepare.writer import prepare_source
from trainer.evaluate import evaluate
from trainer.finetune import FinetuneConfig, epoch_batches, finetune
from trainer.model import GPTConfig
from trainer.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "data" / "raw"
HOLDOUT_EVERY = 20  # every 20th document is held out for validation


def split_docs(docs, every: int = HOLDOUT_EVERY) -> tuple[list[str], list[str]]:
    train_docs, val_docs = [], []
    for i, doc in enumerate(docs):
        (val_docs if i % every == every - 1 else train_docs).append(doc)
    return train_docs, val_docs


def to_sequences(docs: list[str], tokenizer, length: int, limit: int) -> torch.Tensor:
    """Held-out text as [n, length] token rows (each doc followed by EOS), for evaluation."""
    ids = np.concatenate([np.append(np.asarray(t, dtype=np.int64), tokenizer.eos_id)
                          for t in tokenizer.encode_batch(docs)])
    n = min(limit, len(ids) // length)
    return torch.from_numpy(ids[: n * length].reshape(n, length))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(sources: Path, state: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mixer_service.cli", "serve", "--sources-dir", str(sources),
                             "--state-dir", str(state), "--port", str(port)],
                            env={"MIXER_LOG_LEVEL": "WARNING", **__import__("os").environ})
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/v1/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("mixer serve did not become ready")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, default=ROOT / "data" / "demo")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--domain-fraction", type=float, default=0.05)
    ap.add_argument("--seq-len", type=int, default=129, help="tokens per served sequence (context + 1)")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    tok = load_tokenizer()  # byte-level: a small vocabulary keeps a CPU model meaningful in minutes
    abc_train, abc_val = split_docs(iter_documents([RAW / "abc"], fmt="text", split_regex=r"^X:", glob="**/*.abc"))
    web_train, web_val = split_docs(iter_documents([RAW / "sotu"], fmt="text", glob="*.txt"), every=10)
    sources = args.work / "sources"
    for name, docs in (("abc", abc_train), ("sotu", web_train)):
        if not (sources / name / "meta.json").is_file():
            prepare_source(docs, sources / name, tok, name=name)
    val = {"domain": to_sequences(abc_val, tok, args.seq_len, 256),
           "web": to_sequences(web_val, tok, args.seq_len, 256)}

    proc, url = start_server(sources, args.work / f"state-{int(time.time())}")
    try:
        job = f"demo-{int(time.time())}"
        d = args.domain_fraction
        body = {"job_id": job, "author": "demo", "reason": "README demo",
                "config": {"sources": [{"name": "abc", "role": "repeat"}, {"name": "sotu", "role": "once"}],
                           "seq_len": args.seq_len, "global_batch": args.batch, "seed": 0,
                           "total_steps": args.steps},
                "schedule": {"phases": [{"start_step": 0, "weights": {"abc": d, "sotu": 1 - d}}]}}
        httpx.post(f"{url}/v1/jobs", json=body, timeout=30).raise_for_status()
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
            "after_pretraining": pretrain, "after_finetuning": ft["best"], "finetune_best_epoch": ft["best_epoch"],
            "data_stall_frac": result["data_stall_frac"],
            "repetition_histogram_abc": reps["histogram"],
            "tokens_served_per_source": info["tokens_through_high_water"],
        }
        print(json.dumps(summary, indent=2))
    finally:
        proc.terminate()
        proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
