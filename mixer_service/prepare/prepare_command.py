"""``mixer prepare``: raw corpus files -> a prepared source directory (with a progress bar)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from mixer_contract.errors import InvalidInput, MixerError
from mixer_service.prepare.readers import FORMATS, iter_documents
from mixer_service.prepare.tokenizer import TextTokenizer, load_tokenizer
from mixer_service.prepare.writer import DEFAULT_SHARD_TOKENS, prepare_source
from mixer_service.sources.source_format import SourceMeta


def register(subparsers: Any) -> None:
    """Add the ``prepare`` subcommand to an ``argparse`` subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "prepare",
        help="tokenize raw corpora into a prepared source",
        description="Tokenize JSONL(.zst/.gz), Parquet, text folders or MDS datasets into a prepared source "
        "(zstd token shards + document index + fingerprint). Inputs are read in the order given; "
        "directories and globs expand in sorted order.",
    )
    p.add_argument("inputs", nargs="+", help="input files, directories or glob patterns")
    p.add_argument("--out", required=True, type=Path, help="output directory of the prepared source")
    p.add_argument("--name", help="source name (default: the output directory's name)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="input format (default: by file name)")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet or MDS column with the text")
    p.add_argument(
        "--split-regex", help="text files: start a new document at each match (multiline), e.g. '^X:'"
    )
    p.add_argument("--glob", help="files to take from directory inputs (default: all, recursively)")
    p.add_argument("--tokenizer", type=Path, help="Hugging Face tokenizer.json (default: byte-level)")
    p.add_argument(
        "--eos-token", help="EOS token of --tokenizer (default: a well-known one found in its vocab)"
    )
    p.add_argument("--vocab", type=Path, help="GPT-2 BPE vocab.json (with --merges)")
    p.add_argument("--merges", type=Path, help="GPT-2 BPE merges.txt (with --vocab)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard")
    p.add_argument("--max-docs", type=int, help="keep at most this many (non-empty) documents")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared source")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--ray", nargs="?", const="", metavar="ADDRESS",
        help="tokenize on Ray (extra 'ray'): the cluster at ADDRESS, or an embedded local one without it; "
        "same output bytes; inputs may be s3:// prefixes (MIXER_S3_ENDPOINT). Write --ray=ADDRESS or put "
        "--ray after the inputs",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``prepare``; print the new source's metadata as JSON. Errors: one line on stderr, exit 2."""
    try:
        tokenizer = load_tokenizer(args.tokenizer, args.vocab, args.merges, args.eos_token)
        if args.ray is not None:
            return _print(_run_on_ray(args, tokenizer))
        docs = iter_documents(args.inputs, args.format, args.text_field, args.split_regex, args.glob)
        meta = prepare_source(
            docs,
            args.out,
            tokenizer,
            args.name,
            shard_tokens=args.shard_tokens,
            max_docs=args.max_docs,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (MixerError, OSError) as exc:
        print(f"mixer prepare: error: {exc}", file=sys.stderr)
        return 2
    return _print(meta)


def _print(meta: SourceMeta) -> int:
    summary = {k: str(v) if isinstance(v, Path) else v for k, v in vars(meta).items()}
    print(json.dumps(summary, sort_keys=True))
    return 0


def _run_on_ray(args: argparse.Namespace, tokenizer: TextTokenizer) -> SourceMeta:
    """``--ray``: the same prepare on a Ray cluster (imported only here: Ray is an optional extra)."""
    try:
        from mixer_service.prepare.ray_prepare import prepare_source_ray
    except ImportError as exc:
        raise InvalidInput(f"--ray needs the 'ray' extra: pip install 'mixer-service[ray]' ({exc})") from exc
    return prepare_source_ray(
        args.inputs, args.out, tokenizer, args.name, address=args.ray or None, fmt=args.format,
        text_field=args.text_field, split_regex=args.split_regex, glob=args.glob,
        s3_endpoint=os.environ.get("MIXER_S3_ENDPOINT") or None, shard_tokens=args.shard_tokens,
        max_docs=args.max_docs, overwrite=args.overwrite, progress=not args.no_progress,
    )
