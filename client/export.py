"""``mixer export JOB --steps A:B --out DIR``: the exact served mixture as an MDS dataset.

A team that wants to replay a mixture offline (Composer, ``StreamingDataset``, no service running) gets
the very bytes the service serves: one MDS sample per row, in step order and row order, written by
mosaicml-streaming's own ``MDSWriter``:

======================  ==========================================================================
column                  content
======================  ==========================================================================
``tokens``              ``ndarray:<dtype>:<seq_len>``, the served row (dtype as on the wire)
``source``              ``str``, the source the row came from
``step``, ``row``       ``int``, its place in the global batch
``boundaries``          ``ndarray:int32``, start offset of each document piece (``--boundaries``)
======================  ==========================================================================

Fetching a step marks it served, exactly as a trainer's request does (docs/protocol.md). The dataset is
written to a temporary directory next to ``DIR`` and renamed at the end, so a partial export never
looks complete.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from client import MixerClient
from client.operator_cli import EXIT_OK, EXIT_USAGE, CommandFailed, common_options, emit, runner
from mixer_contract import wire

_IN_FLIGHT = 4  # steps fetched concurrently: hides request latency behind writing


def parse_steps(text: str) -> range:
    """``A:B`` → ``range(A, B)`` of data steps, with ``0 <= A < B``."""
    first, sep, last = text.partition(":")
    try:
        steps = range(int(first), int(last))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A:B (data steps A..B-1), got {text!r}") from None
    if not sep or steps.start < 0 or not steps:
        raise argparse.ArgumentTypeError(f"expected A:B with 0 <= A < B, got {text!r}")
    return steps


def export(client: MixerClient, job: str, steps: range, out: Path, boundaries: bool = False,
           compression: str | None = None, progress: bool = True) -> int:
    """Write ``steps`` of ``job`` (whole global batches) to ``out`` as MDS; returns the rows written."""
    try:
        from streaming import MDSWriter  # imports torch: only here, so the operator CLI stays light
    except ImportError:
        raise CommandFailed(EXIT_USAGE, "needs mosaicml-streaming: pip install 'mixer-service[streaming]'"
                            ) from None
    if out.exists() and any(out.iterdir()):
        raise CommandFailed(EXIT_USAGE, f"--out {out}: exists and is not empty")
    seq_len = int(client.job(job)["config"]["seq_len"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    rows = 0
    try:
        with ThreadPoolExecutor(_IN_FLIGHT) as pool, \
                tqdm(total=len(steps), unit="step", desc=f"export {job}", disable=not progress) as bar:
            batches = pool.map(lambda s: client.batch(job, s, boundaries=boundaries), steps)
            writer: Any = None
            for batch in batches:
                if writer is None:
                    writer = MDSWriter(out=str(tmp), columns=_columns(batch, seq_len, boundaries),
                                       compression=compression)
                for sample in _samples(batch):
                    writer.write(sample)
                rows += len(batch.tokens)
                bar.update(1)
                bar.set_postfix(rows=rows, tokens=rows * seq_len)
            writer.finish()
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _columns(batch: wire.WireBatch, seq_len: int, boundaries: bool) -> dict[str, str]:
    columns = {"tokens": f"ndarray:{batch.tokens.dtype.name}:{seq_len}", "source": "str", "step": "int",
               "row": "int"}
    if boundaries:
        columns["boundaries"] = "ndarray:int32"
    return columns


def _samples(batch: wire.WireBatch) -> list[dict[str, Any]]:
    names = batch.header["sources"]
    samples: list[dict[str, Any]] = [
        {"tokens": tokens, "source": names[source], "step": batch.header["step"], "row": row}
        for row, (tokens, source) in enumerate(zip(batch.tokens, batch.source_ids.tolist(), strict=True))
    ]
    if batch.boundaries is not None:
        for sample, starts in zip(samples, batch.boundaries, strict=True):
            sample["boundaries"] = starts.astype(np.int32)
    return samples


def cmd_export(client: MixerClient, args: argparse.Namespace) -> int:
    steps = args.steps
    rows = export(client, args.job, steps, args.out, args.boundaries, args.compression,
                  progress=not args.json)
    data = {"job": args.job, "steps": [steps.start, steps.stop], "rows": rows, "out": str(args.out)}
    emit(args, data, lambda: f"{args.out}: {rows:,} rows of {args.job} steps {steps.start}..{steps.stop - 1}")
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", parents=[common_options()], help="write served steps of a job as an MDS dataset",
        description="Fetch steps A..B-1 of JOB (marking them served, as a trainer would) and write every "
                    "row, in order, with mosaicml-streaming's MDSWriter.")
    p.add_argument("job", help="the job to export")
    p.add_argument("--steps", type=parse_steps, required=True, metavar="A:B",
                   help="data steps A..B-1 (whole global batches)")
    p.add_argument("--out", type=Path, required=True, help="new or empty directory for the MDS shards")
    p.add_argument("--boundaries", action="store_true",
                   help="add a boundaries column: each row's document piece starts")
    p.add_argument("--compression", default=None, help="MDS shard compression, e.g. zstd (default none)")
    p.set_defaults(func=runner(cmd_export, "export"))
