"""Prepare throughput vs. the tokenizer's own ``encode_batch`` on the same real texts, in one run.

Prepare includes everything (reading files, splitting, tokenizing, EOS packing, zstd, hashing, fsync);
the baseline is HF ``Tokenizer.encode_batch`` on texts already in memory. Target: ratio <= 2.

    scripts/fetch_corpora.sh && python bench/bench_prepare.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mixer_service.prepare.readers import iter_documents
from mixer_service.prepare.tokenizer import HFTokenizer, TextTokenizer, load_tokenizer
from mixer_service.prepare.writer import DEFAULT_BATCH_CHARS, prepare_source

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Corpus:
    """Where a real corpus lies under data/raw and how it splits into documents."""

    inputs: list[Path]
    glob: str
    split_regex: str | None

    def documents(self) -> Iterator[str]:
        return iter_documents(self.inputs, glob=self.glob, split_regex=self.split_regex)


CORPORA = {
    "abc (music21, split ^X:)": Corpus([ROOT / "data/raw/abc"], "**/*.abc", "^X:"),
    "sotu (npm @stdlib)": Corpus([ROOT / "data/raw/sotu"], "*.txt", None),
}


def best_of_interleaved(repeat: int, fns: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Fastest wall time per method, running the methods round-robin so load spikes hit them all alike."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def batched(texts: list[str], batch_chars: int) -> list[list[str]]:
    """Same batching as prepare, so the baseline gets the same parallelism per call."""
    out: list[list[str]] = [[]]
    chars = 0
    for t in texts:
        out[-1].append(t)
        chars += len(t)
        if chars >= batch_chars:
            out.append([])
            chars = 0
    return [b for b in out if b]


def bench_corpus(label: str, spec: Corpus, gpt2: HFTokenizer, byte: TextTokenizer, repeat: int) -> None:
    """Print one corpus' rows: raw encode_batch baselines, then full prepare with GPT-2 and bytes."""
    texts = list(spec.documents())
    batches = batched(texts, DEFAULT_BATCH_CHARS)
    n_tok = sum(len(e.ids) for b in batches for e in gpt2.backend.encode_batch(b, add_special_tokens=False))
    n_tok_eos = n_tok + len(texts)

    def row(method: str, sec: float, tokens: int) -> None:
        print(
            f"{label:28} {method:30} {len(texts):7d} {tokens:10d} {sec:7.2f} "
            f"{len(texts) / sec:9.0f} {tokens / sec / 1e6:7.2f}"
        )

    def encode_all(fn_name: str) -> None:
        for b in batches:
            getattr(gpt2.backend, fn_name)(b, add_special_tokens=False)

    def prepare(tokenizer: TextTokenizer) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            docs = spec.documents()
            prepare_source(docs, Path(tmp) / "src", tokenizer, progress=False)

    best = best_of_interleaved(
        repeat,
        {
            "enc": lambda: encode_all("encode_batch"),
            "fast": lambda: encode_all("encode_batch_fast"),
            "prep": lambda: prepare(gpt2),
            "byte": lambda: prepare(byte),
        },
    )
    t_enc, t_fast, t_prep, t_byte = best["enc"], best["fast"], best["prep"], best["byte"]
    row("gpt2 encode_batch (in memory)", t_enc, n_tok)
    row("gpt2 encode_batch_fast (in mem)", t_fast, n_tok)
    row("gpt2 prepare (files -> shards)", t_prep, n_tok_eos)
    row("byte prepare (files -> shards)", t_byte, sum(len(t.encode()) for t in texts) + len(texts))
    print(
        f"{'':28} prepare time / encode_batch time = {t_prep / t_enc:.2f}x (target <= 2x); "
        f"/ encode_batch_fast = {t_prep / t_fast:.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    tok_dir = ROOT / "data/tokenizer"
    gpt2 = load_tokenizer(vocab=tok_dir / "gpt2_vocab.json", merges=tok_dir / "gpt2_merges.txt")
    assert isinstance(gpt2, HFTokenizer)
    byte = load_tokenizer()
    print(f"cpus={os.cpu_count()}  repeat={args.repeat} (best of)")
    header = f"{'corpus':28} {'method':30} {'docs':>7} {'tokens':>10} {'sec':>7} {'docs/s':>9} {'Mtok/s':>7}"
    print(header)
    print("-" * len(header))
    for label, spec in CORPORA.items():
        bench_corpus(label, spec, gpt2, byte, args.repeat)


if __name__ == "__main__":
    main()
