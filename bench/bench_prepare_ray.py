"""Prepare on Ray vs the single-process prepare: tokens/s on the same real text, at 1 and 2 Ray workers.

Both sides do everything (read files, GPT-2 BPE, EOS packing, zstd, hashing, fsync); the Ray side also
ships every part through the object store and merges the parts on the driver. The Ray session is
started once per worker count, outside the timings (its start-up is printed on its own); the outputs
are checked to be byte-identical. Runs are interleaved, best of ``--repeat``.

    scripts/fetch_corpora.sh && python bench/bench_prepare_ray.py [--repeat 3] [--part-mb 1]

(``iter_documents`` needs one split regex for all inputs, and a text file without a match fails the
single-process reader in split mode, so the two corpora are measured apart, as in bench_prepare.py.)
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ray

from mixer_service.prepare.parts import (
    ReadSpec,
    group_parts,
    merge_parts,
    plan_inputs,
    read_part,
    tokenize_part,
)
from mixer_service.prepare.ray_prepare import prepare_source_ray
from mixer_service.prepare.readers import iter_documents
from mixer_service.prepare.tokenizer import TextTokenizer, load_tokenizer
from mixer_service.prepare.writer import DEFAULT_SHARD_TOKENS, prepare_source

ROOT = Path(__file__).resolve().parent.parent
# (inputs, glob, split regex): the corpora of bench/bench_prepare.py, 8 and 11 MB of real text
CORPORA = {
    "abc (tunes, split ^X:)": ([ROOT / "data/raw/abc"], "**/*.abc", r"^X:"),
    "sotu (speeches)": ([ROOT / "data/raw/sotu"], "*.txt", None),
}


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_corpus(label: str, inputs: list[Path], glob: str, split: str | None, gpt2: TextTokenizer,
                 part_bytes: int, repeat: int) -> None:
    """Print one corpus' rows: single process, Ray at 1 and 2 workers, and the merge alone."""
    parts = group_parts(plan_inputs(inputs, glob=glob), part_bytes)
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-ray-"))

    def single() -> None:
        prepare_source(iter_documents(inputs, glob=glob, split_regex=split), work / "one", gpt2, "src",
                       progress=False, overwrite=True)

    def on_ray() -> None:
        prepare_source_ray(inputs, work / "ray", gpt2, "src", glob=glob, split_regex=split, progress=False,
                           overwrite=True, part_bytes=part_bytes)

    tokens = int(prepare_source(iter_documents(inputs, glob=glob, split_regex=split), work / "ref", gpt2,
                                "src", progress=False).num_tokens)
    spec = ReadSpec(split_regex=split)
    chunks = [c for i, files in enumerate(parts) for c in tokenize_part(i, read_part(files, spec), gpt2)]

    def merge() -> None:
        merge_parts(chunks, work / "merged", gpt2, "src", shard_tokens=DEFAULT_SHARD_TOKENS, overwrite=True,
                    progress=False)

    t_merge = min(timed(merge) for _ in range(repeat))
    singles: list[float] = []
    rows = []
    for workers in (1, 2):
        start = timed(lambda n=workers: ray.init(address="local", num_cpus=n, include_dashboard=False,
                                                 logging_level="WARNING"))
        try:
            times = []
            for _ in range(repeat):  # interleaved with single runs, so load spikes hit both alike
                times.append(timed(on_ray))
                singles.append(timed(single))
        finally:
            ray.shutdown()
        names = sorted(p.name for p in (work / "ref").iterdir())
        same = filecmp.cmpfiles(work / "ref", work / "ray", names, shallow=False)[0] == names
        rows.append((workers, min(times), start, same))
    t_single = min(singles)
    print(f"{label}: {tokens} tokens, {len(parts)} parts of <= {part_bytes / 2**20:g} MiB input")

    def row(method: str, sec: float, note: str = "") -> None:
        print(f"  {method:40} {sec:7.2f} s {tokens / sec / 1e6:6.2f} Mtok/s  {note}")

    row("single process (2 tokenizer threads)", t_single)
    for workers, t_ray, start, same in rows:
        row(f"ray, {workers} worker(s) x 1 thread", t_ray,
            f"ratio {t_single / t_ray:.2f}  (session start {start:.1f} s; identical bytes: {same})")
    row("merge alone (driver: unzstd, zstd, hash)", t_merge)
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--part-mb", type=float, default=1.0, help="input MiB a part (corpora: 8, 11 MB)")
    args = ap.parse_args()
    tok_dir = ROOT / "data/tokenizer"
    gpt2 = load_tokenizer(vocab=tok_dir / "gpt2_vocab.json", merges=tok_dir / "gpt2_merges.txt")
    print(f"cpus={os.cpu_count()}  repeat={args.repeat} (best of); ratio = single-process s / Ray s")
    for label, (inputs, glob, split) in CORPORA.items():
        bench_corpus(label, inputs, glob, split, gpt2, int(args.part_mb * (1 << 20)), args.repeat)


if __name__ == "__main__":
    main()
