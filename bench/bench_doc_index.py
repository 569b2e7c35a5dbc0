"""Document index at web scale: open, first lookup, steady lookups and row boundaries, verified block by
block (``sources.DocIndex``) vs the index hashed whole at open (what every start cost before) vs an
unverified memory map (what Megatron-LM's ``MMapIndexedDataset`` and most readers do), and a remote index
read by ranged GETs vs copied whole, from moto's S3 server on loopback.

    .venv/bin/python bench/bench_doc_index.py --docs 1e8

Synthetic index: document lengths drawn uniformly from 100..1900 tokens (mean 1000), so 10^8 documents
are a 10^11-token corpus and 800 MB of index. Files live under ``data/bench/doc_index/`` (rebuilt when
missing). Page cache is warm for the local rows (the build just wrote the file): the numbers are CPU cost.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import time
from pathlib import Path

import numpy as np
from common import BENCH_DATA, S3_BUCKET, moto_s3, print_table

from mixer_contract.job import JobConfig
from mixer_contract.schedule import Schedule
from mixer_service.engine import MixingEngine
from mixer_service.sources.doc_index import DocIndex, npy_header, sparse_index_file
from mixer_service.sources.prepared import open_index
from mixer_service.sources.source_format import IndexBlocks, SourceMeta
from mixer_service.sources.verify import VerifyMode

L, ROWS = 2048, 512
MEMORY_FOR_COPIES = 12 << 30


def build(path: Path, docs: int) -> None:
    """Write int64[docs + 1] cumulative offsets in 8 M-entry pieces (never the whole index in memory)."""
    rng = np.random.default_rng(0)
    out = np.lib.format.open_memmap(path.with_suffix(".tmp.npy"), mode="w+", dtype="<i8", shape=(docs + 1,))
    out[0], base, piece = 0, 0, 1 << 23
    for a in range(0, docs, piece):
        ends = base + np.cumsum(rng.integers(100, 1900, size=min(piece, docs - a)))
        out[a + 1 : a + 1 + ends.size] = ends
        base = int(ends[-1])
    out.flush()
    del out
    os.replace(path.with_suffix(".tmp.npy"), path)


def timed(fn, rounds: int = 5) -> tuple[float, object]:
    """Best wall time of ``rounds`` calls (ms) and the last result."""
    best, result = float("inf"), None
    for _ in range(rounds):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3, result


class _IndexOnly:
    """A source reduced to its index: row boundaries read nothing else."""

    def __init__(self, doc_offsets) -> None:
        self.doc_offsets = doc_offsets
        self.tokens = np.empty(0, dtype=np.uint16)
        self.shard_offsets = np.array([0, int(doc_offsets[-1])], dtype=np.int64)


def boundaries_by_copying(engine: MixingEngine, step: int) -> list[list[int]]:
    """``row_boundaries`` as it was before: the whole index copied (twice) for every request."""
    lay = engine.layouts[0]
    doc_ends = np.asarray(lay.source.doc_offsets[1:], dtype=np.int64)
    doc_ends = np.concatenate([doc_ends, doc_ends + lay.num_tokens])
    starts = engine._assignment(step)[2]  # the step's sequences' starts, in row order
    first = np.searchsorted(doc_ends, starts, side="right")
    last = np.searchsorted(doc_ends, starts + L, side="left")
    return [[0, *(doc_ends[a:b] - s).tolist()] for s, a, b in zip(starts.tolist(), first.tolist(),
                                                                 last.tolist(), strict=True)]


def engine_over(doc_offsets) -> MixingEngine:
    config = JobConfig.parse({"sources": [{"name": "web", "role": "once"}], "seq_len": L,
                              "global_batch": ROWS, "seed": 1, "total_steps": 1000})
    schedule = [(0, Schedule.parse({"phases": [{"start_step": 0, "weights": {"web": 1.0}}]}, ["web"]))]
    return MixingEngine.create(config, {"web": _IndexOnly(doc_offsets)}, schedule)


@contextlib.contextmanager
def s3_with(path: Path):
    from mixer_service.sources.origins import S3Origin, s3_client

    with moto_s3([(path, f"web/{path.name}")]) as endpoint:
        yield S3Origin(s3_client(endpoint), S3_BUCKET, "web")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=float, default=5e7, help="documents in the synthetic index (default 5e7)")
    ap.add_argument("--lookups", type=int, default=20_000, help="scalar lookups in the steady measurement")
    ap.add_argument("--skip-s3", action="store_true", help="leave out the remote rows (no moto server)")
    args = ap.parse_args()
    docs = int(args.docs)
    work = BENCH_DATA / "doc_index"
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"offsets-{docs}.npy"
    if not path.exists():
        print(f"building a {docs:.0e}-document index ({8 * (docs + 1) / 1e6:.0f} MB) ...", flush=True)
        build(path, docs)
    t0 = time.perf_counter()
    blocks = IndexBlocks.of_file(path)
    describe_s = time.perf_counter() - t0
    total = int(np.load(path, mmap_mode="r")[-1])
    whole_sha = hashlib.sha256(np.load(path, mmap_mode="r").data).hexdigest()  # page cache warm for all rows
    probe = total // 3

    def whole_hash():
        offsets = np.load(path, mmap_mode="r")
        assert hashlib.sha256(offsets.data).hexdigest() == whole_sha
        return offsets.searchsorted(probe, side="right")

    meta = SourceMeta("web", "", "", 65536, 0, "uint16", docs, total, path.parent)

    def lazy():  # what opening a prepared source does with its index
        return open_index(path, meta, blocks, whole_sha, VerifyMode.FAST).searchsorted(probe, side="right")

    def unverified():
        return np.load(path, mmap_mode="r").searchsorted(probe, side="right")

    rows = [["block hashes, once when the index is written", f"{describe_s * 1e3:.0f}", "", ""]]
    peer_ms, peer_at = timed(unverified)
    for name, fn in (("hashed whole at open (before)", whole_hash), ("verified blocks, lazily (now)", lazy),
                     ("unverified memmap (Megatron-style peer)", unverified)):
        ms, at = timed(fn, 3 if fn is whole_hash else 5)
        assert at == peer_at
        rows.append([f"open + first lookup: {name}", f"{ms:.2f}", f"{ms / peer_ms:.1f}x", ""])

    index = DocIndex(path, docs, total, blocks, VerifyMode.FAST)
    plain = np.load(path, mmap_mode="r")
    values = np.random.default_rng(1).integers(0, total, size=args.lookups)
    index.verify_all()  # steady state: every block already checked once in this process
    ms_ours, _ = timed(lambda: [index.searchsorted(int(v), side="right") for v in values])
    ms_plain, _ = timed(lambda: [plain.searchsorted(int(v), side="right") for v in values])
    rows.append(["steady scalar lookup (us each): verified blocks vs memmap",
                 f"{ms_ours / len(values) * 1e3:.2f}", f"{ms_ours / ms_plain:.2f}x",
                 f"memmap {ms_plain / len(values) * 1e3:.2f}"])
    batch = np.sort(values[:ROWS])
    ms_ours, _ = timed(lambda: index.searchsorted(batch, side="right"), 50)
    ms_plain, _ = timed(lambda: plain.searchsorted(batch, side="right"), 50)
    rows.append([f"steady {ROWS}-value search (ms)", f"{ms_ours:.3f}", f"{ms_ours / ms_plain:.2f}x",
                 f"memmap {ms_plain:.3f}"])

    fresh = DocIndex(path, docs, total, blocks, VerifyMode.FAST)
    new, old = engine_over(fresh), engine_over(plain)
    step = 400
    ms_new, b_new = timed(lambda: new.row_boundaries(step))
    if 3 * path.stat().st_size < MEMORY_FOR_COPIES:
        ms_old, b_old = timed(lambda: boundaries_by_copying(old, step), 3)
        assert b_new == b_old
        ratio, before = f"{ms_new / ms_old:.4f}x", f"before {ms_old:.0f}"
    else:  # the old way holds three copies of the index in memory: it cannot run at this size here
        ratio, before = "", "before: not run (3 copies of the index do not fit in memory)"
    rows.append([f"row boundaries, {ROWS} rows (ms): search + slices (now) vs index copied (before)",
                 f"{ms_new:.2f}", ratio,
                 f"{before}; blocks read {fresh.verified_blocks}/{len(blocks.firsts)}"])

    if not args.skip_s3:
        with s3_with(path) as origin:
            local = work / "remote-index" / path.name
            local.parent.mkdir(exist_ok=True)

            def copy_whole():
                data = origin.read(path.name)
                assert hashlib.sha256(memoryview(data)[blocks.data_offset:]).hexdigest() == whole_sha

            def ranged():
                local.unlink(missing_ok=True)
                sparse_index_file(local, npy_header(docs + 1), docs + 1)
                index = DocIndex(local, docs, total, blocks, VerifyMode.FAST,
                                 lambda a, b: origin.read_range(path.name, a, b))
                return index.searchsorted(probe, side="right")

            def one_block():
                start = blocks.data_offset
                return origin.read_range(path.name, start, start + 8 * blocks.entries)

            ms_block, _ = timed(one_block, 3)
            ms_copy, _ = timed(copy_whole, 1)
            ms_ranged, at = timed(ranged, 3)
            assert at == peer_at
            rows.append(["S3: open + first lookup, ranged GETs (now) vs copy + hash whole (before)",
                         f"{ms_ranged:.1f}", f"{ms_ranged / ms_copy:.4f}x",
                         f"before {ms_copy:.0f}; local disk {local.stat().st_blocks * 512 / 1e6:.1f} MB"])
            rows.append(["S3: one 8 MiB ranged GET alone (the object store's share of the row above)",
                         f"{ms_block:.1f}", "", ""])
    print(f"\n{docs:.0e} documents, {total:.2e} tokens, index {path.stat().st_size / 1e6:.0f} MB, "
          f"{len(blocks.firsts)} blocks of {blocks.entries} entries")
    print_table(["measurement", "ms", "ratio", "note"], rows)


if __name__ == "__main__":
    main()
