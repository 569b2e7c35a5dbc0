"""Shared benchmark data: the two real corpora prepared once with GPT-2, and the same tokens as MDS.

Everything is cached under ``data/bench/`` and rebuilt only when missing or stale:

    data/bench/sources/abc     prepared source "abc"  (domain: ABC folk tunes, split at ``^X:``)
    data/bench/sources/sotu    prepared source "sotu" (web: State of the Union addresses, one doc per file)
    data/bench/mds/L{L}/abc    MDS dataset of the SAME tokens, for the mosaicml-streaming peer
    data/bench/mds/L{L}/sotu

How the peer's data is made (so both sides read identical sequences):

* Each source's canonical token stream (every document followed by EOS, exactly ``PreparedSource.tokens``)
  is cut into ``M = ceil(S / L)`` samples of ``L`` tokens; the last sample wraps around to the start of
  the stream. These are exactly the engine's epoch-0 chunks for a ``once`` source (rotation 0), so the
  peer serves the same token sequences, same dtype (uint16), same sequence length.
* One MDS column, ``tokens: ndarray:uint16:L`` (fixed shape and dtype, so streaming stores no per-sample
  shape header and decodes with one ``np.frombuffer``), no compression, no hashes, default 64 MiB shards.
  That is streaming's cheapest read path; the engine's side is an uncompressed memory-mapped cache too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from mixer_contract.schedule import Schedule

ROOT = Path(__file__).resolve().parent.parent
RAW = ROOT / "data" / "raw"
TOK_DIR = ROOT / "data" / "tokenizer"
BENCH_DATA = ROOT / "data" / "bench"
SOURCES_DIR = BENCH_DATA / "sources"
MDS_ROOT = BENCH_DATA / "mds"

DOMAIN, WEB = "abc", "sotu"
CORPORA = {  # name -> (input dir, glob, split regex)
    DOMAIN: (RAW / "abc", "**/*.abc", r"^X:"),
    WEB: (RAW / "sotu", "*.txt", None),
}
ROLES = {DOMAIN: "repeat", WEB: "once"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_inputs() -> None:
    needed = (RAW / "abc", RAW / "sotu", TOK_DIR / "gpt2_vocab.json", TOK_DIR / "gpt2_merges.txt")
    missing = [p for p in needed if not p.exists()]
    if missing:
        raise SystemExit(f"missing {', '.join(map(str, missing))}: run scripts/fetch_corpora.sh first")


def prepared_sources() -> Path:
    """Prepare abc and sotu with the GPT-2 tokenizer under data/bench/sources (once) and return that dir."""
    todo = [n for n in CORPORA if not (SOURCES_DIR / n / "meta.json").is_file()]
    if todo:
        _check_inputs()
        from mixer_service.prepare import iter_documents, load_tokenizer, prepare_source

        tok = load_tokenizer(vocab=TOK_DIR / "gpt2_vocab.json", merges=TOK_DIR / "gpt2_merges.txt")
        for name in todo:
            inputs, glob, split = CORPORA[name]
            log(f"bench: preparing {name} with GPT-2 into {SOURCES_DIR / name} (once)")
            docs = iter_documents([inputs], fmt="text", glob=glob, split_regex=split)
            prepare_source(docs, SOURCES_DIR / name, tok, name=name, progress=False, overwrite=True)
    return SOURCES_DIR


def open_sources() -> dict:
    """``{name: PreparedSource}`` for both bench sources (preparing them first if needed)."""
    from mixer_service.sources.prepared import PreparedSource

    root = prepared_sources()
    return {n: PreparedSource.open(root / n) for n in CORPORA}


def chunk_starts(num_tokens: int, seq_len: int) -> np.ndarray:
    """Start offsets of the ``ceil(S / L)`` L-token samples of a stream (the last one wraps)."""
    return np.arange(math.ceil(num_tokens / seq_len), dtype=np.int64) * seq_len


def chunk(tokens: np.ndarray, start: int, seq_len: int) -> np.ndarray:
    end = start + seq_len
    if end <= len(tokens):
        return np.asarray(tokens[start:end])
    return np.concatenate([tokens[start:], tokens[: end - len(tokens)]])


def mds_datasets(seq_len: int) -> dict[str, Path]:
    """MDS copies of both sources' tokens as L-token samples (see module docstring); built once per L."""
    from streaming import MDSWriter

    sources = open_sources()
    out: dict[str, Path] = {}
    for name, src in sources.items():
        target = MDS_ROOT / f"L{seq_len}" / name
        stamp = {"fingerprint": src.meta.fingerprint, "seq_len": seq_len, "dtype": str(src.tokens.dtype),
                 "samples": len(chunk_starts(src.meta.num_tokens, seq_len))}
        stamp_file = target / "bench_stamp.json"
        if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
            out[name] = target
            continue
        log(f"bench: writing MDS copy of {name} ({stamp['samples']} samples of {seq_len}) into {target}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
        dtype = np.dtype(src.tokens.dtype).name
        with MDSWriter(out=str(tmp), columns={"tokens": f"ndarray:{dtype}:{seq_len}"},
                       compression=None, hashes=None) as writer:
            for start in chunk_starts(src.meta.num_tokens, seq_len).tolist():
                writer.write({"tokens": chunk(src.tokens, start, seq_len)})
        (tmp / "bench_stamp.json").write_text(json.dumps(stamp))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        out[name] = target
    return out


def describe_sources(sources: dict) -> list[str]:
    return [f"  {n:5} ({ROLES[n]:6}) {s.meta.num_docs:7d} docs {s.meta.num_tokens:10d} GPT-2 tokens "
            f"({s.tokens.dtype})" for n, s in sources.items()]


def job_config(seq_len: int, global_batch: int, total_steps: int, allow_wrap: bool, seed: int = 1234) -> dict:
    return {"sources": [{"name": DOMAIN, "role": ROLES[DOMAIN]}, {"name": WEB, "role": ROLES[WEB]}],
            "seq_len": seq_len, "global_batch": global_batch, "seed": seed, "total_steps": total_steps,
            "allow_wrap": allow_wrap}


def schedule(domain_weight: float) -> dict:
    weights = {DOMAIN: domain_weight, WEB: round(1 - domain_weight, 12)}
    return Schedule.constant(weights)


def fmt_rate(x: float) -> str:
    """Human rate: 1.23e9 -> '1.23 G'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.2f} "


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    def join(row: list[str]) -> str:
        cols = enumerate(zip(row, widths, strict=True))
        return "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in cols)

    line = join(headers)
    print(line)
    print("-" * len(line))
    for r in cells:
        print(join(r))
    sys.stdout.flush()


if __name__ == "__main__":
    srcs = open_sources()
    print("\n".join(describe_sources(srcs)))
    for n, p in mds_datasets(2048).items():
        print(f"  MDS {n}: {p}")


S3_BUCKET = "bench"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                  "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def moto_s3(uploads: Iterable[tuple[Path, str]]) -> Iterator[str]:
    """moto's S3 server on a loopback port with bucket ``S3_BUCKET`` holding each (local file, key); yields
    the endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    from mixer_service.service.process import free_port
    from mixer_service.sources.origins import s3_client

    os.environ.update(S3_CREDENTIALS)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's per-request access log
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = s3_client(endpoint)
    client.create_bucket(Bucket=S3_BUCKET)
    for path, key in uploads:
        client.upload_file(str(path), S3_BUCKET, key)
    try:
        yield endpoint
    finally:
        server.stop()
