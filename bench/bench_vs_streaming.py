"""Head-to-head with mosaicml-streaming on its own ground: same real tokens, same S3 server, same cache.

Data: GPT-2 BPE of every real corpus ``common.REAL_CORPORA`` installs (State of the Union, Brown, SpamAssassin
mail, Python and Linux docs: ~27 M tokens), repeated to ``--tokens``. Written twice from the same stream:

* ours: a prepared source (``mixer prepare``'s writer; zstd shards of ``--shard-tokens``), served by one
  ``mixer serve`` (default workers: one per core) over the S3 prefix (its ``--cache-limit``: below) and
  read by ``client.MixerLoader`` (its defaults: zstd on the wire, prefetch 4, one step in the first request
  and 8 a request after it; ``--loaders`` runs others too, in the h2h part) with the job the README shows (no
  ``order`` key: the sliding order, W=16) unless ``--order window`` or ``--order sliding`` names one;
* the peer: MDS written by streaming's own ``MDSWriter`` at its defaults (64 MiB shards, zstd), read by
  ``StreamingDataset(remote=s3://…, cache_limit=…, shuffle=True)`` (default ``shuffle_algo``, py1e) inside a
  torch ``DataLoader(num_workers=--workers)``, ranks told by ``RANK``/``WORLD_SIZE``/``LOCAL_*`` as torchrun
  would. Samples are ``--seq-len`` consecutive tokens: the same sequences the engine cuts.

Both read from one S3 server (``--s3``: moto or s3rver; its own process, loopback); the cache limit is
``--cache-fraction`` of the raw tokens on both sides. Each cell starts cold (fresh server, fresh caches) and
runs ``R`` rank processes, each with its own loader, ``--rows`` rows a step, ``--steps`` steps; they import
first, then start together.
Measured per cell: tokens/s over all ranks after their first batch, first batch (loader built -> first
batch, median over ranks; ours also server spawn -> ready), peak disk of the cache dirs (polled every
0.2 s), peak RSS (sum of every process's high-water mark: server and ranks for ours, ranks and their
DataLoader workers for the peer).

Parts (``--parts``): ``h2h`` these at ``--ranks``; ``remote`` ours local vs S3; ``stall`` a trainer
that computes ``--compute-ms`` a step behind ``MixerLoader`` with ``--latency-ms`` added to every S3
request (a proxy in front of the S3 server); ``cold`` spawn -> first batch of the README's job (abc + web,
L 2049, batch 512) at ``--cold-sizes``, local and S3, prepared and adopted (Megatron, its ``mixer adopt
--index`` record shipped beside it, as docs/scale.md tells corpus owners to).

Everything is written under data/bench/vs_streaming (the data of a --tokens size is built once, ~4 min at
1e9, and reused). A whole run at 1e9 with ranks 1 and 8 takes ~15 min and the whole machine; 64 ranks need
~120 GB of RAM (the peer ~1.9 GB a rank with its two DataLoader workers; ours ~0.6 GB a rank).

    python bench/bench_vs_streaming.py --tokens 1e9 --ranks 1 8 [--order window|sliding] [--json out.json]

The h2h table: "tok/s ours/peer" (higher is better for us), "1st ours/peer" (first batch; lower is
better), "RSS ours/peer", CPU seconds of our server and ranks over the cell, and the 1-minute load average
at the end of our cell / the peer's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

from common import (
    BENCH_DATA,
    DOMAIN,
    S3_BUCKET,
    S3_CREDENTIALS,
    S3_STORES,
    latency_proxy,
    log,
    prepared_sources,
    print_table,
    real_token_stream,
    s3_store,
    tiled_mds,
    tiled_megatron,
    tiled_prepared,
    upload_tree,
)

ROOT = Path(__file__).resolve().parent.parent
WORK = BENCH_DATA / "vs_streaming"


# -- measuring processes ------------------------------------------------------------------------------


def peak_rss_mb(pid: int | str = "self") -> float:
    """The process's high-water resident set (VmHWM), MB; 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def descendants(pid: int | str = "self") -> list[int]:
    """Every live process below ``pid`` (DataLoader workers, uvicorn workers)."""
    found, todo = [], [str(pid)]
    while todo:
        parent = todo.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            with open(task / "children") as fh:
                kids = fh.read().split()
            found += [int(k) for k in kids]
            todo += kids
    return found


def tree_rss_mb(pid: int | str = "self") -> float:
    return peak_rss_mb(pid) + sum(peak_rss_mb(k) for k in descendants(pid))


def du_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                # allocated bytes, so a sparse file counts as what it really uses
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


class DiskPeak:
    """Polls the allocated size of some directories every ``interval`` s and keeps the peak of their sum."""

    def __init__(self, paths: list[Path], interval: float = 0.2) -> None:
        self.paths, self.interval, self.peak = paths, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(du_bytes(p) for p in self.paths))
            self._stop.wait(self.interval)

    def __enter__(self) -> DiskPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, sum(du_bytes(p) for p in self.paths))


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# -- one rank (a child process) -------------------------------------------------------------------------


def consume(batches: Iterator[dict], steps: int, compute_s: float, t0: float) -> dict:
    """Take ``steps`` batches as a trainer would, sleeping ``compute_s`` after each (the model's step);
    time blocked waiting for data after the first batch is the stall."""
    tokens_per_batch = 0
    first = stall = 0.0
    for step in range(steps):
        asked = time.time()
        batch = next(batches)
        got = time.time()
        if step == 0:
            first = got
            tokens_per_batch = int(batch["input_ids"].shape[0]) * (int(batch["input_ids"].shape[1]) + 1)
        else:
            stall += got - asked
        if compute_s:
            time.sleep(compute_s)
    end = time.time()
    return {"t0": t0, "first": first, "end": end, "first_batch_s": first - t0,
            "steady_tokens": tokens_per_batch * (steps - 1), "stall_s": stall, "steady_s": end - first}


def wait_for_go(ready: Path, go: Path) -> float:
    ready.touch()
    while not go.exists():
        time.sleep(0.01)
    return time.time()


def rank_ours(a: argparse.Namespace) -> dict:
    import torch  # noqa: F401  (a trainer has it loaded; so the import is not timed)

    from client import MixerLoader

    t0 = wait_for_go(Path(a.ready), Path(a.go))
    cpu = time.process_time()  # the rank's process: its loader threads included
    options = {}  # the loader's defaults, as a user gets them, unless --loaders names others
    if a.loader:
        steps, options["compression"] = a.loader.split(":")
        options["steps_per_request"] = int(steps)
    with MixerLoader(a.url, a.job, rank=a.rank, world=a.world, end_step=a.steps, **options) as loader:
        out = consume(iter(loader), a.steps, a.compute_ms / 1000, t0)
    return out | {"rss_mb": peak_rss_mb(), "cpu_s": time.process_time() - cpu}


def rank_peer(a: argparse.Namespace) -> dict:
    from streaming import StreamingDataset
    from torch.utils.data import DataLoader

    t0 = wait_for_go(Path(a.ready), Path(a.go))
    dataset = StreamingDataset(remote=a.url, local=a.local, batch_size=a.rows, shuffle=True, shuffle_seed=7,
                               cache_limit=a.cache_limit, shuffle_block_size=a.shuffle_block or None)
    loader = DataLoader(dataset, batch_size=a.rows, num_workers=a.workers)

    def trainer_view() -> Iterator[dict]:  # what MixerLoader hands out: int64 inputs and labels
        for batch in loader:
            ids = batch["tokens"].long()
            yield {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    batches = trainer_view()
    out = consume(batches, a.steps, a.compute_ms / 1000, t0)
    rss = tree_rss_mb()  # the workers are still alive here
    batches.close()
    return out | {"rss_mb": rss}


RANK_ROLES = {"ours": rank_ours, "peer": rank_peer}


# -- a cell: R ranks started together ----------------------------------------------------------------------


def run_ranks(side: str, ranks: int, args: argparse.Namespace, url: str, job: str, extra: list[str],
              env: dict[str, str], disk: list[Path]) -> dict:
    """Start ``ranks`` rank processes, let them import, release them together; per-rank results + totals."""
    from mixer_service.service.process import free_port

    sync = WORK / "sync" / uuid.uuid4().hex[:8]
    sync.mkdir(parents=True)
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # as torchrun sets them
    procs = []
    for r in range(ranks):
        cmd = [sys.executable, __file__, "--role", side, "--url", url, "--job", job, "--rank", str(r),
               "--world", str(ranks), "--steps", str(args.steps), "--rows", str(args.rows),
               "--compute-ms", str(args.compute_ms), "--ready", str(sync / f"ready-{r}"),
               "--go", str(sync / "go")] + extra
        rank_env = os.environ | S3_CREDENTIALS | env | rendezvous | {
            "RANK": str(r), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(ranks),
            "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen(cmd, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    try:
        return _release(procs, ranks, sync, disk)
    finally:
        for proc in procs:  # a rank left running by an error or a stop of this script
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(sync, ignore_errors=True)


def _release(procs: list[subprocess.Popen], ranks: int, sync: Path, disk: list[Path]) -> dict:
    deadline = time.time() + 900
    while sum((sync / f"ready-{r}").exists() for r in range(ranks)) < ranks:
        if any(p.poll() is not None for p in procs) or time.time() > deadline:
            break
        time.sleep(0.05)
    with DiskPeak(disk) as peak:
        (sync / "go").touch()
        results, errors = [], []
        for p in procs:
            try:
                out, err = p.communicate(timeout=max(60.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
                err += "\n(timed out)"
            if p.returncode == 0:
                results.append(json.loads(out.strip().splitlines()[-1]))
            else:
                errors.append(err.strip().splitlines()[-1] if err.strip() else f"rc {p.returncode}")
    if errors:
        return {"error": f"{len(errors)}/{ranks} ranks failed: {errors[0]}", "load": load()}
    first = min(r["first"] for r in results)
    return {
        "tokens_per_s": sum(r["steady_tokens"] for r in results) / (max(r["end"] for r in results) - first),
        "first_batch_s": statistics.median(r["first_batch_s"] for r in results),
        "first_batch_max_s": max(r["first_batch_s"] for r in results),
        "stall_pct": 100 * sum(r["stall_s"] for r in results) / sum(r["steady_s"] for r in results),
        "disk_mb": peak.peak / 2**20, "ranks_rss_mb": sum(r["rss_mb"] for r in results), "load": load(),
        **({"ranks_cpu_s": sum(r["cpu_s"] for r in results)} if all("cpu_s" in r for r in results) else {})}


def ours_job(rows: int, world: int, order: str, sources: dict[str, float], seq_len: int, total_steps: int,
             global_batch: int | None = None, allow_wrap: bool = False) -> dict:
    """The README's job document: sources with roles, one schedule phase; ``order`` only when asked for."""
    roles = {DOMAIN: "repeat"}
    config: dict = {"sources": [{"name": n, "role": roles.get(n, "once")} for n in sources],
                    "seq_len": seq_len, "global_batch": global_batch or rows * world, "seed": 7,
                    "total_steps": total_steps, "allow_wrap": allow_wrap}
    if order != "default":
        config["order"] = {"kind": order}
    return {"job_id": f"bench-{uuid.uuid4().hex[:6]}", "config": config, "author": "bench",
            "reason": "bench_vs_streaming", "schedule": {"phases": [{"start_step": 0, "weights": sources}]}}


class Server:
    """One ``mixer serve`` over local sources or an S3 prefix with a fresh cache; spawn -> ready timed."""

    def __init__(self, sources_dir: Path | None, url: str | None, endpoint: str | None,
                 cache_limit: int | None, cache: Path) -> None:
        from mixer_service.service.process import ServerProcess

        shutil.rmtree(cache, ignore_errors=True)
        state = cache.with_name(cache.name + "-state")
        shutil.rmtree(state, ignore_errors=True)
        empty = WORK / "empty"
        empty.mkdir(parents=True, exist_ok=True)
        self.cache = cache
        # workers=None: mixer serve's default (one per usable core), as a user runs it
        self.proc = ServerProcess(sources_dir or empty, state, env=S3_CREDENTIALS, workers=None)
        self.proc.args += ["--cache-dir", str(cache)]
        if cache_limit is not None:
            self.proc.args += ["--cache-limit", str(cache_limit)]
        if url:
            self.proc.args += ["--sources-url", url, "--s3-endpoint", str(endpoint)]

    def __enter__(self) -> Server:
        t0 = time.perf_counter()
        self.proc.start(timeout=900)
        self.ready_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc: object) -> None:
        self.rss_mb = tree_rss_mb(self.proc.proc.pid) if self.proc.proc else 0.0
        self.proc.stop()

    def create(self, job: dict) -> str:
        from client import MixerClient

        with MixerClient(self.proc.url, timeout=600) as client:
            client.create_job(job)
        return str(job["job_id"])


def ours_cell(ranks: int, args: argparse.Namespace, data: dict, where: str, endpoint: str | None,
              profile: Path | None = None, loader: str = "default") -> dict:
    from bench_service import cpu_seconds  # here, not at the top: rank processes import this module

    url = f"s3://{S3_BUCKET}/{data['key']}/sources" if where == "s3" else None
    local = None if url else data["sources"]
    with Server(local, url, endpoint, data["cache_limit"], WORK / "cache-ours") as srv:
        job = srv.create(ours_job(args.rows, ranks, args.order, {"web": 1.0}, args.seq_len, args.steps))
        spy = start_profile(srv.proc.proc.pid, profile) if profile else None
        cpu = cpu_seconds(srv.proc)
        options = [] if loader == "default" else ["--loader", loader]
        out = run_ranks("ours", ranks, args, srv.proc.url, job, options, {}, [srv.cache])
        out["server_cpu_s"] = cpu_seconds(srv.proc) - cpu  # the whole cell: ranks' start-up included
        out["cache"] = cache_counts(srv.proc.url)
        if spy:
            stop_profile(spy)
    return out | {"server_ready_s": srv.ready_s, "server_rss_mb": srv.rss_mb,
                  "rss_mb": out.get("ranks_rss_mb", 0) + srv.rss_mb}


def cache_counts(url: str) -> dict[str, int]:
    """The shard cache's counters summed over the server's workers: a scrape answers for all of them, once
    each has published its own (within ``CACHE_STATS_INTERVAL_S``, docs/operations.md "Metrics")."""
    import httpx

    from mixer_service.service.app import CACHE_STATS_INTERVAL_S

    time.sleep(CACHE_STATS_INTERVAL_S + 0.5)
    text = httpx.get(f"{url}/metrics", timeout=30).text
    counts = {line.split('"')[1]: int(float(line.rsplit(" ", 1)[1]))
              for line in text.splitlines() if line.startswith("mixer_shard_cache{")}
    return {stat: n for stat, n in counts.items() if not stat.endswith("_bytes") or stat == "fetched_bytes"}


def peer_cell(ranks: int, args: argparse.Namespace, data: dict, endpoint: str) -> dict:
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    local = WORK / "cache-peer"
    shutil.rmtree(local, ignore_errors=True)
    extra = ["--local", str(local), "--cache-limit", str(data["cache_limit"]), "--workers", str(args.workers),
             "--shuffle-block", str(data["peer_shuffle_block"])]
    out = run_ranks("peer", ranks, args, f"s3://{S3_BUCKET}/{data['key']}/mds", "-", extra,
                    {"S3_ENDPOINT_URL": endpoint}, [local])
    clean_stale_shared_memory()
    return out | {"rss_mb": out.get("ranks_rss_mb", 0)}


def start_profile(pid: int, out: Path) -> subprocess.Popen:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--subprocesses", "--format", "raw",
                             "--rate", "100", "--nonblocking", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profile(spy: subprocess.Popen) -> None:
    spy.send_signal(signal.SIGINT)
    spy.wait(60)


# -- data --------------------------------------------------------------------------------------------------


def build(num_tokens: int, args: argparse.Namespace, formats: tuple[str, ...] = ("prepared", "mds")) -> dict:
    """The tiled real tokens at ``num_tokens`` in each format asked for, under data/bench/vs_streaming/."""
    key = f"{num_tokens:.0e}".replace("+", "")
    root = WORK / key
    sources = root / "sources"
    web = tiled_prepared(sources / "web", num_tokens, args.shard_tokens)
    from mixer_service.sources import PreparedSource

    meta = PreparedSource.open(web, cache_dir=root / ".probe-cache").meta
    shutil.rmtree(root / ".probe-cache", ignore_errors=True)
    data = {"key": key, "tokens": meta.num_tokens, "docs": meta.num_docs, "sources": sources,
            "cache_limit": int(meta.num_tokens * 2 * args.cache_fraction)}
    if "mds" in formats:
        mds = tiled_mds(root / "mds", num_tokens, args.seq_len)
        index = json.loads((mds / "index.json").read_text())["shards"]
        per_shard = max(s["samples"] for s in index)
        shard_bytes = max(s["raw_data"]["bytes"] + (s["zip_data"] or {"bytes": 0})["bytes"] for s in index)
        # streaming's default block (>= 2^18 samples) spans more shards than the cache holds and thrashes
        # (docs/peers.md); its tuning guide has the block cover what the cache can keep: that is used here
        blocks = max(1, data["cache_limit"] // (2 * shard_bytes))
        data |= {"mds": mds, "mds_shards": len(index),
                 "peer_shuffle_block": 0 if args.peer_default_block else per_shard * blocks}
    if "megatron" in formats:
        data["megatron"] = tiled_megatron(root / "megatron" / "web", num_tokens)
    return data


def uploads(data: dict) -> list[tuple[Path, str]]:
    files = upload_tree(data["sources"] / "web", f"{data['key']}/sources/web")
    if "mds" in data:
        files += upload_tree(data["mds"], f"{data['key']}/mds")
    return files


# -- the parts ---------------------------------------------------------------------------------------------


def loader_spec(text: str) -> str:
    """``default`` or ``K:none|zstd``, checked before any data is built."""
    from mixer_contract.values import STEPS

    if text != "default":
        steps, _, compression = text.partition(":")
        in_range = steps.isdigit() and STEPS.low <= int(steps) <= STEPS.high
        if not in_range or compression not in ("none", "zstd"):
            raise argparse.ArgumentTypeError(
                f"{text!r}: want 'default' or K:none|zstd with K in {STEPS.low}..{STEPS.high}, e.g. 4:none")
    return text


def part_h2h(args: argparse.Namespace, data: dict, endpoint: str, out: dict) -> None:
    for ranks in args.ranks:
        cells = {}
        for loader in args.loaders:
            log(f"h2h: {ranks} ranks, ours from S3, loader {loader} (load {load()})")
            profile = WORK / f"profile-{ranks}.txt" if ranks in args.profile_ranks else None
            cells[loader] = ours_cell(ranks, args, data, "s3", endpoint, profile=profile, loader=loader)
            log(f"  ours {json.dumps(cells[loader])}")
        log(f"h2h: {ranks} ranks, streaming from S3 (load {load()})")
        peer = peer_cell(ranks, args, data, endpoint)
        log(f"  peer {json.dumps(peer)}")
        out.setdefault("h2h", {})[str(ranks)] = {"ours": cells, "peer": peer}


def part_remote(args: argparse.Namespace, data: dict, endpoint: str, out: dict) -> None:
    for ranks in args.remote_ranks:
        cells = {}
        for where in ("local", "s3", "local", "s3"):  # paired and interleaved
            log(f"remote: {ranks} ranks, ours {where} (load {load()})")
            cells.setdefault(where, []).append(ours_cell(ranks, args, data, where, endpoint))
        out.setdefault("remote", {})[str(ranks)] = cells


def part_stall(args: argparse.Namespace, data: dict, endpoint: str, out: dict) -> None:
    trainer = argparse.Namespace(**vars(args) | {"compute_ms": args.compute_ms or 100,
                                                 "steps": args.stall_steps})
    low, high = args.latency_ms
    with latency_proxy(endpoint, low, high) as slow:
        for label, where, store in (("local", "local", None), ("S3", "s3", endpoint),
                                    (f"S3 +{low:g}-{high:g} ms a request", "s3", slow)):
            log(f"stall: {label} (load {load()})")
            ours = ours_cell(1, trainer, data, where, store)
            out.setdefault("stall", {})[label] = {"ours": ours}
            if where == "s3":
                log(f"stall: streaming, {label} (load {load()})")
                out["stall"][label]["peer"] = peer_cell(1, trainer, data, store)
    out["stall_compute_ms"] = trainer.compute_ms


def ship_index(corpus: Path) -> None:
    """``mixer adopt --index`` over an adopted corpus (once): the record every server then copies instead of
    reading the corpus, as a corpus owner ships it (docs/scale.md, "Adopting tokenized corpora in place")."""
    from mixer_service.sources.adopted import INDEX_SUBDIR

    if (corpus / INDEX_SUBDIR).is_dir():
        return
    log(f"cold: mixer adopt --index {corpus} (once; shipped with the corpus)")
    subprocess.run([sys.executable, "-m", "mixer_service.cli", "adopt", "--index", str(corpus)], check=True,
                   cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)})


def part_cold(args: argparse.Namespace, out: dict) -> None:
    """spawn -> first batch of the README's job (abc repeat + web once, L 2049, batch 512, allow_wrap),
    rank 0 of 64, at each size: local prepared, S3 prepared, local adopted Megatron, S3 adopted Megatron
    (with its shipped index)."""
    from client import MixerClient

    abc = prepared_sources() / DOMAIN
    # One cache bound for every size, at least what an adopted corpus's default window needs (18 windows of
    # 32 MiB: the server refuses less at start); this part times cold start, not the cache.
    limit = max(int(max(args.cold_sizes) * 2 * args.cache_fraction), 1 << 30)
    for size in args.cold_sizes:
        data = build(int(size), args, formats=("prepared", "megatron"))
        key = data["key"]
        ship_index(data["megatron"])  # `mixer adopt --index`, once, shipped with the corpus (not timed)
        for fmt, web, stores in (("prepared", data["sources"] / "web", ("local", "s3")),
                                 ("megatron", data["megatron"], ("local", "s3"))):
            local = WORK / key / f"cold-{fmt}"
            shutil.rmtree(local, ignore_errors=True)
            local.mkdir(parents=True)
            (local / DOMAIN).symlink_to(abc)
            (local / "web").symlink_to(web)
            files = upload_tree(abc, f"{key}/cold-{fmt}/{DOMAIN}") + upload_tree(web, f"{key}/cold-{fmt}/web")
            with s3_store(args.s3, files if "s3" in stores else []) as endpoint:
                for where in stores:
                    url = f"s3://{S3_BUCKET}/{key}/cold-{fmt}" if where == "s3" else None
                    label = f"{key} {fmt} {where}"
                    log(f"cold: {label} (load {load()})")
                    job = ours_job(8, 64, args.order, {DOMAIN: 0.05, "web": 0.95}, 2049, 1000, 512,
                                   allow_wrap=True)
                    t0 = time.perf_counter()
                    try:
                        with Server(None if url else local, url, endpoint, limit if url else None,
                                    WORK / "cache-cold") as srv:
                            srv.create(job)
                            with MixerClient(srv.proc.url, timeout=900) as client:
                                client.batch(str(job["job_id"]), 0, rank=0, world=64)
                            cell = {"ready_s": srv.ready_s, "first_batch_s": time.perf_counter() - t0}
                    except Exception as exc:  # noqa: BLE001  (a cell that cannot run is a result: say why)
                        cell = {"error": f"{type(exc).__name__}: {str(exc)[-300:]}"}
                    out.setdefault("cold", {})[label] = cell | {"load": load()}
                    log(f"  {json.dumps(out['cold'][label])}")


# -- report ------------------------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(out: dict) -> None:
    nan = float("nan")
    if "h2h" in out:
        data = out["data"]
        print(f"\nHead-to-head from S3, {data['tokens']:.3g} tokens, cache {data['cache_mb']:.0f} MB "
              f"(order: {out['order']})")
        rows = []
        for ranks, cell in out["h2h"].items():
            p = cell["peer"]
            for loader, o in cell["ours"].items():
                rows.append([ranks, loader, f"{o.get('tokens_per_s', nan) / 1e6:.2f} M",
                             f"{p.get('tokens_per_s', nan) / 1e6:.2f} M",
                             ratio(o.get("tokens_per_s"), p.get("tokens_per_s")),
                             f"{o.get('first_batch_s', nan):.2f}", f"{p.get('first_batch_s', nan):.2f}",
                             ratio(o.get("first_batch_s"), p.get("first_batch_s")),
                             f"{o.get('disk_mb', nan):.0f}", f"{p.get('disk_mb', nan):.0f}",
                             f"{o.get('server_rss_mb', nan):.0f}+{o.get('ranks_rss_mb', nan):.0f}",
                             f"{p.get('rss_mb', nan):.0f}", ratio(o.get("rss_mb"), p.get("rss_mb")),
                             f"{o.get('server_cpu_s', nan):.1f}+{o.get('ranks_cpu_s', nan):.1f}",
                             f"{o['load']} / {p['load']}",
                             "; ".join(f"{side}: {c['error']}" for side, c in (("ours", o), ("peer", p))
                                       if c.get("error"))])
        print_table(["ranks", "our loader", "ours tok/s", "peer tok/s", "tok/s ours/peer", "ours 1st s",
                     "peer 1st s", "1st ours/peer", "ours disk MB", "peer disk MB", "ours RSS MB srv+ranks",
                     "peer RSS MB", "RSS ours/peer", "ours CPU s srv+ranks", "load ours / peer", "error"],
                    rows)
    if "remote" in out:
        print("\nOurs, local vs S3 (two interleaved runs each)")
        rows = []
        for ranks, cells in out["remote"].items():
            rates = {w: [c.get("tokens_per_s", nan) for c in cs] for w, cs in cells.items()}
            rows.append([ranks, " ".join(f"{r / 1e6:.2f}" for r in rates["local"]),
                         " ".join(f"{r / 1e6:.2f}" for r in rates["s3"]),
                         ratio(max(rates["s3"]), max(rates["local"])),
                         " / ".join(c["load"] for cs in cells.values() for c in cs)])
        print_table(["ranks", "local M tok/s", "S3 M tok/s", "S3/local (best)", "load"], rows)
    if "stall" in out:
        print(f"\nData stall, 1 rank computing {out['stall_compute_ms']} ms a step")
        rows = [[label, side, f"{c.get('stall_pct', nan):.2f}%", f"{c.get('tokens_per_s', nan) / 1e6:.2f} M",
                 f"{c.get('first_batch_s', nan):.2f}", c["load"], c.get("error", "")]
                for label, sides in out["stall"].items() for side, c in sides.items()]
        print_table(["store", "side", "stall", "tok/s", "first batch s", "load", "error"], rows)
    if "cold" in out:
        print("\nCold start: spawn -> ready -> first batch of the README's job")
        rows = [[label, f"{c.get('ready_s', nan):.2f}", f"{c.get('first_batch_s', nan):.2f}", c["load"],
                 c.get("error", "")] for label, c in out["cold"].items()]
        print_table(["size format store", "ready s", "first batch s", "load", "error"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=float, default=1e9,
                   help="tokens of the h2h/remote/stall corpus (default 1e9)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 8, 64],
                   help="h2h: rank counts (default 1 8 64)")
    p.add_argument("--steps", type=int, default=30, help="steps per rank (the first is the cold one)")
    p.add_argument("--rows", type=int, default=8, help="rows per rank and step (the per-device batch)")
    p.add_argument("--seq-len", type=int, default=2049)
    p.add_argument("--workers", type=int, default=2, help="the peer's DataLoader workers per rank")
    p.add_argument("--cache-fraction", type=float, default=0.25,
                   help="both sides' cache limit, as a fraction of the raw tokens (default 0.25)")
    p.add_argument("--shard-tokens", type=int, default=1 << 23, help="our prepared shards (tokens)")
    p.add_argument("--order", choices=("default", "window", "sliding"), default="default",
                   help="default: the job has no order key (the README's; the server writes the sliding "
                   "order in); window or sliding: adds {'kind': ORDER}")
    p.add_argument("--loaders", nargs="+", default=["default"], type=loader_spec,
                   help="h2h only: run ours once per loader: 'default' (MixerLoader's defaults, i.e. 8:zstd "
                   "after a first request of one step) or K:none|zstd (K in 1..64 steps a request, that wire "
                   "compression); the other parts use the defaults")
    p.add_argument("--s3", choices=S3_STORES, default="moto",
                   help="the S3 server: moto (default; a ranged GET reads the whole object) or s3rver (npm, "
                   "installed on first use; a ranged GET reads its range, as a real store's does)")
    p.add_argument("--peer-default-block", action="store_true",
                   help="streaming's default shuffle_block_size instead of one sized to the cache")
    p.add_argument("--parts", nargs="+", default=["h2h", "remote", "stall", "cold"],
                   choices=["h2h", "remote", "stall", "cold"])
    p.add_argument("--remote-ranks", type=int, nargs="+", default=[1, 8],
                   help="remote: rank counts (default 1 8)")
    p.add_argument("--stall-steps", type=int, default=150, help="stall: steps of the trainer (default 150)")
    p.add_argument("--compute-ms", type=float, default=0.0,
                   help="model time per step in h2h and remote (default 0); the stall part: 100 unless set")
    p.add_argument("--latency-ms", type=float, nargs=2, default=[20.0, 50.0], metavar=("LOW", "HIGH"),
                   help="stall: each S3 request is held a uniform LOW..HIGH ms (default 20 50)")
    p.add_argument("--cold-sizes", type=float, nargs="+", default=[1e6, 1e9],
                   help="cold: corpus sizes in tokens (default 1e6 1e9)")
    p.add_argument("--profile-ranks", type=int, nargs="*", default=[],
                   help="record the server with py-spy in the cells of these rank counts")
    p.add_argument("--json", type=Path, default=WORK / "results.json",
                   help="where the results go (default data/bench/vs_streaming/results.json)")
    for hidden in ("role", "url", "job", "ready", "go", "local", "loader"):
        p.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    for hidden in ("rank", "world", "cache-limit", "shuffle-block"):
        p.add_argument(f"--{hidden}", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so servers, ranks and moto are stopped too
    if args.role:
        print(json.dumps(RANK_ROLES[args.role](args)))
        return
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    tokens, _, corpora = real_token_stream()
    out: dict = {"started": started, "command": " ".join(sys.argv), "order": args.order, "s3": args.s3,
                 "load_start": load(), "real_tokens": int(tokens.size), "corpora": corpora,
                 "args": {k: str(v) for k, v in vars(args).items()}}
    log(f"bench: order {args.order!r} ({'no order key' if args.order == 'default' else args.order}), "
        f"load {load()}")
    if {"h2h", "remote", "stall"} & set(args.parts):
        data = build(int(args.tokens), args)
        out["data"] = {"tokens": data["tokens"], "docs": data["docs"],
                       "cache_mb": data["cache_limit"] / 2**20, "mds_shards": data["mds_shards"],
                       "peer_shuffle_block": data["peer_shuffle_block"]}
        log(f"bench: {out['data']}; uploading to {args.s3}")
        with ExitStack() as stack:
            endpoint = stack.enter_context(s3_store(args.s3, uploads(data)))
            for name, part in (("h2h", part_h2h), ("remote", part_remote), ("stall", part_stall)):
                if name in args.parts:
                    part(args, data, endpoint, out)
                    args.json.write_text(json.dumps(out, indent=1, default=str))
    if "cold" in args.parts:
        part_cold(args, out)
    out["load_end"] = load()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1, default=str))
    report(out)
    print(f"\norder used: {args.order}; load {out['load_start']} -> {out['load_end']}; json: {args.json}")


if __name__ == "__main__":
    main()
