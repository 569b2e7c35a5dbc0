"""``mixer adopt --index DIR|URL``: read an adopted corpus once (block hashes on other cores while one reads
in order) and write its adoption record (fingerprint, block hashes, document index) into an index directory
that ships with the corpus.

A server that opens the corpus finds ``mixer-index/`` beside ``mixer-source.json`` (locally or under the
same ``s3://`` prefix) and copies it instead of reading every token, so opening is O(1) in the corpus on
every replica. The corpus itself is only read; the index goes to ``--out`` (default ``DIR/mixer-index``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from mixer_contract.errors import InvalidInput, MixerError
from mixer_service.sources.adopted import INDEX_SUBDIR, SCAN_WORKERS, adopt
from mixer_service.sources.origins import LocalOrigin, Origin, S3Origin, parse_s3_url, s3_client


def register(subparsers: Any) -> None:
    """Add the ``adopt`` subcommand to an ``argparse`` subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "adopt",
        help="index a tokenized corpus adopted in place, once, to ship with it",
        description="Read every token of the corpus registered by DIR/mixer-source.json (Megatron, flat, MDS "
        "or datatrove; a local directory or an s3:// prefix) once and write its adoption record into an "
        f"index directory. Put that directory beside the manifest as {INDEX_SUBDIR}/ and every server opens "
        "the corpus without reading its tokens. The corpus is never written.",
    )
    p.add_argument("--index", required=True, metavar="DIR|URL",
                   help="the corpus: a directory or s3://bucket/prefix holding mixer-source.json")
    p.add_argument("--out", type=Path,
                   help=f"where to write the index (default: DIR/{INDEX_SUBDIR}; required for an s3:// URL, "
                   f"then upload it to URL/{INDEX_SUBDIR}/)")
    p.add_argument("--workers", type=int, default=SCAN_WORKERS,
                   help="threads hashing blocks while one reads the corpus in order and hashes the stream, "
                   f"which bounds the pass, so few are enough (default: {SCAN_WORKERS})")
    p.add_argument("--s3-endpoint", default=os.environ.get("MIXER_S3_ENDPOINT"),
                   help="S3-compatible endpoint URL (default: $MIXER_S3_ENDPOINT, else AWS)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the index; print where, the fingerprint and the cost as JSON. Errors: one line, exit 2."""
    try:
        origin, out = _where(args)
        started = time.perf_counter()
        record = adopt(origin, out, force=True, workers=args.workers)
    except (MixerError, OSError) as exc:
        print(f"mixer adopt: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"index": str(out), "corpus": origin.describe(""), "fingerprint": record["fingerprint"],
                      "docs": record["num_docs"], "tokens": record["num_tokens"],
                      "seconds": round(time.perf_counter() - started, 2)}))
    return 0


def _where(args: argparse.Namespace) -> tuple[Origin, Path]:
    """The corpus's origin and the index directory to write."""
    if args.workers < 1:
        raise InvalidInput(f"--workers: must be >= 1, got {args.workers}")
    if args.index.startswith("s3://"):
        if args.out is None:
            raise InvalidInput(f"--out is required for {args.index} (the index is written locally; upload it "
                               f"to {args.index.rstrip('/')}/{INDEX_SUBDIR}/)")
        bucket, prefix = parse_s3_url(args.index)
        return S3Origin(s3_client(args.s3_endpoint), bucket, prefix), args.out
    directory = Path(args.index)
    if not directory.is_dir():
        raise InvalidInput(f"--index {directory}: not a directory")
    return LocalOrigin(directory), args.out if args.out is not None else directory / INDEX_SUBDIR
