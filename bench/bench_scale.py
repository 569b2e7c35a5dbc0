"""Web-scale sources: cold start, steady throughput and cache behaviour, local and from S3, vs streaming.

For each corpus size (synthetic byte-level text: words drawn from a fixed vocabulary, ~2 KB documents,
so zstd compresses it ~3x like real text) the same tokens are written twice: as a prepared source with
``--shard-divisor`` shards, and as MDS (``tokens: ndarray:uint16:L`` samples = the engine's epoch-0 chunks,
zstd, twice as many shards: streaming needs ``cache_limit`` >= 4 shards raw + zipped) for
mosaicml-streaming. Both are uploaded to one moto S3 server on loopback.

Measured, each in its own process so RSS is its own:

* ``mixer serve`` local and remote (``--cache-limit`` = ``--cache-fraction`` of the raw tokens, the
  shard-local ``--order``, sliding by default as for new jobs): seconds from spawn to ready, to the first
  batch (job created in between), steady tokens/s over HTTP (one client, ``--steps`` steps), peak RSS,
  local disk used.
* The data layer in process (engine + sources, no HTTP): local, and remote with ``prefetch_ahead``
  (what a serving path does between requests): steady tokens/s, shard fetches per step, cache hit ratio.
* The peer: ``StreamingDataset(remote=s3://..., cache_limit=same bytes, shuffle=True)`` with
  ``S3_ENDPOINT_URL`` at the same server: seconds to first sample, steady tokens/s, fetches, disk, RSS.

    .venv/bin/python bench/bench_scale.py --sizes 1e7 1e8 [--order window|sliding] [--work /tmp/bench-scale]
                                          [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import S3_BUCKET, S3_CREDENTIALS, moto_s3

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEQ_LEN, BATCH = 1024, 32
WINDOW_SHARDS = 2
DOC_WORDS = 330  # ~2 KB documents


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peak_rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def du_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20 if path.exists() else 0.0


# -- data ------------------------------------------------------------------------------------------


def synthetic_docs(num_tokens: int, seed: int = 0):
    """Byte-level text documents totalling ~num_tokens tokens (EOS included)."""
    rng = np.random.default_rng(seed)
    vocab = ["".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(2, 10))) for _ in range(5000)]
    weights = 1.0 / np.arange(1, len(vocab) + 1)  # Zipf, like words in text
    weights /= weights.sum()
    made = 0
    while made < num_tokens:
        words = rng.choice(len(vocab), DOC_WORDS, p=weights)
        doc = " ".join(vocab[w] for w in words)
        made += len(doc) + 1
        yield doc


def build(work: Path, num_tokens: int, shard_divisor: int) -> dict:
    """Prepared source + MDS copy of the same tokens under ``work`` (reused when present)."""
    from mixer_service.prepare.tokenizer import ByteTokenizer
    from mixer_service.prepare.writer import prepare_source
    from mixer_service.sources import PreparedSource

    src_dir = work / "sources" / "web"
    if not (src_dir / "meta.json").is_file():
        shard_tokens = 1 << max(10, int(np.log2(num_tokens / shard_divisor)))
        log(f"bench: preparing {num_tokens:.0e} synthetic tokens ({shard_tokens} tokens a shard)")
        prepare_source(synthetic_docs(num_tokens), src_dir, ByteTokenizer(), name="web",
                       shard_tokens=shard_tokens, progress=False)
    src = PreparedSource.open(src_dir, cache_dir=work / "build-cache")
    mds_dir = work / "mds"
    if not (mds_dir / "index.json").is_file():
        from streaming import MDSWriter

        log(f"bench: writing the MDS copy ({src.meta.num_tokens // SEQ_LEN} samples of {SEQ_LEN})")
        raw_bytes = src.meta.num_tokens * 2
        tmp = work / "mds.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with MDSWriter(out=str(tmp), columns={"tokens": f"ndarray:uint16:{SEQ_LEN}"}, compression="zstd",
                       hashes=None, size_limit=max(1 << 15, raw_bytes // (2 * len(src.shards)))) as writer:
            for k in range(len(src.shards)):
                shard = np.asarray(src.tokens.shard(k))
                base = int(src.shard_offsets[k])
                first = -(-base // SEQ_LEN) * SEQ_LEN - base
                for start in range(first, shard.size - SEQ_LEN + 1, SEQ_LEN):
                    writer.write({"tokens": shard[start : start + SEQ_LEN]})
        os.replace(tmp, mds_dir)
    shutil.rmtree(work / "build-cache", ignore_errors=True)
    return {"tokens": src.meta.num_tokens, "docs": src.meta.num_docs, "shards": len(src.shards),
            "raw_mb": src.meta.num_tokens * 2 / 2**20, "zst_mb": du_mb(src_dir) - du_mb(src_dir / ".cache"),
            "mds_mb": du_mb(mds_dir)}


def s3_server(work: Path):
    """moto's S3 server on a loopback port with both copies uploaded."""
    return moto_s3((path, f"{prefix}/{path.name}")
                   for local, prefix in ((work / "sources" / "web", "sources/web"), (work / "mds", "mds"))
                   for path in sorted(local.iterdir()) if path.is_file())


# -- our service over HTTP -------------------------------------------------------------------------


def job(order: str) -> dict:
    from mixer_contract.schedule import Schedule

    config = {"sources": [{"name": "web", "role": "repeat"}], "seq_len": SEQ_LEN, "global_batch": BATCH,
              "seed": 7, "total_steps": 10**6}
    if order != "global":
        config["order"] = {"kind": order, "window_shards": WINDOW_SHARDS}
    return {"job_id": "bench", "config": config, "author": "bench", "reason": "bench",
            "schedule": Schedule.constant({"web": 1})}


def serve_run(work: Path, steps: int, endpoint: str | None, cache_limit: int | None, order: str) -> dict:
    import httpx

    from mixer_service.service.process import ServerProcess

    cache = work / "serve-cache"
    shutil.rmtree(cache, ignore_errors=True)
    state = work / "serve-state"
    shutil.rmtree(state, ignore_errors=True)
    empty = work / "empty"
    empty.mkdir(exist_ok=True)
    srv = ServerProcess(empty if endpoint else work / "sources", state, env=S3_CREDENTIALS)
    srv.args += ["--cache-dir", str(cache)]
    if endpoint:
        srv.args += ["--sources-url", f"s3://{S3_BUCKET}/sources", "--s3-endpoint", endpoint,
                     "--cache-limit", str(cache_limit)]
    t0 = time.perf_counter()
    srv.start(timeout=300)
    ready = time.perf_counter() - t0
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as client:
            r = client.post("/v1/jobs", json=job(order))
            r.raise_for_status()
            r = client.get("/v1/jobs/bench/batches/0")
            r.raise_for_status()
            first = time.perf_counter() - t0
            t1 = time.perf_counter()
            for step in range(1, steps + 1):
                client.get(f"/v1/jobs/bench/batches/{step}").raise_for_status()
            steady = steps * BATCH * SEQ_LEN / (time.perf_counter() - t1)
        rss = peak_rss_mb(srv.proc.pid)
    finally:
        srv.stop()
    return {"ready_s": ready, "first_batch_s": first, "tokens_per_s": steady, "rss_mb": rss,
            "disk_mb": du_mb(cache)}


# -- the data layer in process, and the peer (run as child processes of this script) -----------------


def inproc_run(work: Path, steps: int, endpoint: str | None, cache_limit: int | None, order: str) -> dict:
    from mixer_contract.job import JobConfig
    from mixer_contract.schedule import Schedule
    from mixer_service.engine import MixingEngine
    from mixer_service.sources import PreparedSource, ShardCache
    from mixer_service.sources.origins import S3Origin, s3_client
    from mixer_service.sources.prefetch import prefetch_ahead

    cache_dir = work / "inproc-cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    t0 = time.perf_counter()
    cache = ShardCache(cache_dir, cache_limit)
    if endpoint:
        src = PreparedSource.open_remote(S3Origin(s3_client(endpoint), S3_BUCKET, "sources/web"),
                                         work / "inproc-index", cache)
    else:
        src = PreparedSource.open(work / "sources" / "web", cache=cache)
    spec = job(order)
    config = JobConfig.parse(spec["config"])
    engine = MixingEngine.create(config, {"web": src}, [(0, Schedule.parse(spec["schedule"], ["web"]))])
    engine.batch(0)
    first = time.perf_counter() - t0
    fetches0, hits0, misses0 = cache.stats.fetches, cache.stats.hits, cache.stats.misses
    t1 = time.perf_counter()
    for step in range(1, steps + 1):
        prefetch_ahead(engine, step, lookahead=2)
        engine.batch(step)
    seconds = time.perf_counter() - t1
    s = cache.stats
    gets = (s.hits - hits0) + (s.misses - misses0)
    cache.close()
    return {"first_batch_s": first, "tokens_per_s": steps * BATCH * SEQ_LEN / seconds,
            "fetches_per_step": (s.fetches - fetches0) / steps, "hit_ratio": (s.hits - hits0) / max(gets, 1),
            "rss_mb": peak_rss_mb(), "disk_mb": du_mb(cache_dir)}


def peer_run(work: Path, steps: int, endpoint: str, cache_limit: int, order: str) -> dict:
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    os.environ["S3_ENDPOINT_URL"] = endpoint
    local = work / "peer-cache"
    shutil.rmtree(local, ignore_errors=True)
    t0 = time.perf_counter()
    dataset = StreamingDataset(remote=f"s3://{S3_BUCKET}/mds", local=str(local), batch_size=BATCH,
                               shuffle=True, shuffle_seed=7, cache_limit=cache_limit)
    it = iter(dataset)
    next(it)
    first = time.perf_counter() - t0
    buf = np.empty((BATCH, SEQ_LEN), np.uint16)
    t1 = time.perf_counter()
    n = 0
    for sample in it:
        buf[n % BATCH] = sample["tokens"]
        n += 1
        if n >= steps * BATCH:
            break
    seconds = time.perf_counter() - t1
    fetched = sum(1 for _ in local.rglob("*.mds.zstd")) if local.exists() else 0
    return {"first_batch_s": first, "tokens_per_s": n * SEQ_LEN / seconds, "rss_mb": peak_rss_mb(),
            "disk_mb": du_mb(local), "shards_on_disk_at_end": fetched}


ROLES = {"inproc": inproc_run, "peer": peer_run}


def child(role: str, work: Path, steps: int, endpoint: str | None, cache_limit: int | None,
          order: str = "global") -> dict:
    args = [sys.executable, __file__, "--role", role, "--work", str(work), "--steps", str(steps),
            "--order", order]
    if endpoint:
        args += ["--endpoint", endpoint]
    if cache_limit is not None:
        args += ["--cache-limit", str(cache_limit)]
    done = subprocess.run(args, capture_output=True, text=True, env=os.environ | S3_CREDENTIALS, timeout=3600)
    if done.returncode:
        raise RuntimeError(f"{role} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_size(num_tokens: int, args: argparse.Namespace) -> dict:
    work = args.work / f"{num_tokens:.0e}"
    work.mkdir(parents=True, exist_ok=True)
    data = build(work, num_tokens, args.shard_divisor)
    limit = int(data["tokens"] * 2 * args.cache_fraction)
    out: dict = {"data": data, "cache_limit_mb": limit / 2**20, "order": args.order}
    log(f"bench {num_tokens:.0e}: {data}")
    out["serve_local"] = serve_run(work, args.steps, None, None, "global")
    out["serve_local_window"] = serve_run(work, args.steps, None, None, args.order)
    out["inproc_local"] = child("inproc", work, args.steps, None, None)
    out["inproc_local_window"] = child("inproc", work, args.steps, None, None, args.order)
    with s3_server(work) as endpoint:
        out["serve_s3"] = serve_run(work, args.steps, endpoint, limit, args.order)
        out["inproc_s3"] = child("inproc", work, args.steps, endpoint, limit, args.order)
        if not args.skip_peer:
            out["peer_s3"] = child("peer", work, args.steps, endpoint, limit)
    for key, value in out.items():
        if isinstance(value, dict) and key != "data":
            log(f"  {key:19} {json.dumps({k: round(v, 4) for k, v in value.items()})}")
    return out


def table(results: dict) -> str:
    rows = ["| tokens | path | ready (s) | first batch (s) | steady tok/s | fetches/step | hit ratio "
            "| RSS MB | disk MB |", "|---|---|---|---|---|---|---|---|---|"]
    for size, r in results.items():
        order = r["order"]
        names = {"serve_local": "mixer serve, local, global order",
                 "serve_local_window": f"mixer serve, local, {order} order",
                 "serve_s3": f"mixer serve, S3 (10% cache, {order}), route prefetches",
                 "inproc_local": "engine in process, local, global + prefetch",
                 "inproc_local_window": f"engine in process, local, {order} + prefetch",
                 "inproc_s3": f"engine in process, S3 (10% cache, {order}) + prefetch",
                 "peer_s3": "streaming StreamingDataset, S3 (10% cache)"}
        for key, label in names.items():
            if key not in r:
                continue
            m = r[key]
            nan = float("nan")
            rows.append(f"| {size} | {label} | {m.get('ready_s', nan):.2f} | {m['first_batch_s']:.2f} | "
                        f"{m['tokens_per_s'] / 1e6:.2f} M | {m.get('fetches_per_step', nan):.2f} | "
                        f"{m.get('hit_ratio', nan):.3f} | {m['rss_mb']:.0f} | {m['disk_mb']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=float, default=[1e7, 1e8])
    p.add_argument("--work", type=Path, default=ROOT / "data" / "bench" / "scale")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--cache-fraction", type=float, default=0.10)
    p.add_argument("--shard-divisor", type=int, default=256,
                   help="about this many shards per source (the 10%% cache must hold the default order's 18)")
    p.add_argument("--json", type=Path)
    p.add_argument("--skip-peer", action="store_true", help="ours only (the peer is the slow part)")
    p.add_argument("--order", choices=("global", "window", "sliding"), default="sliding",
                   help="the shard-local order of the non-global rows (new jobs get sliding)")
    p.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    p.add_argument("--cache-limit", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:
        role = ROLES[args.role]
        print(json.dumps(role(args.work, args.steps, args.endpoint, args.cache_limit, args.order)))
        return
    results = {f"{size:.0e}": run_size(int(size), args) for size in args.sizes}
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
