"""``mixer serve``: run the service with uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from mixer_service.service.auth import Tokens, check_bind


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve batches over HTTP (FastAPI + uvicorn)")
    p.add_argument("--sources-dir", type=Path, required=True, help="directory of prepared sources")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path("mixer-state"),
        help="embedded state store directory (ignored with --redis-url)",
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get("MIXER_REDIS_URL") or None,
        help="keep state in Redis so several replicas can serve one job",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="where decompressed token caches live")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--insecure-bind",
        action="store_true",
        help="allow a non-loopback bind without tokens (not for shared networks)",
    )
    p.set_defaults(func=run)


def build_app():
    """Uvicorn factory: reads its settings from the environment that ``run`` prepared."""
    from mixer_service.service.app import Settings, create_app
    from mixer_service.service.sources import SourceRegistry
    from mixer_service.store import open_store

    cache = os.environ.get("MIXER_CACHE_DIR")
    state_dir = Path(os.environ["MIXER_STATE_DIR"])
    state_dir.mkdir(parents=True, exist_ok=True)
    return create_app(
        Settings(
            store=open_store(os.environ.get("MIXER_REDIS_URL") or None, state_dir / "state.sqlite"),
            sources=SourceRegistry.load(
                Path(os.environ["MIXER_SOURCES_DIR"]), Path(cache) if cache else None
            ),
            tokens=_tokens(),
        )
    )


def _tokens() -> Tokens:
    return Tokens(
        os.environ.get("MIXER_OPERATOR_TOKEN") or None, os.environ.get("MIXER_READER_TOKEN") or None
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    check_bind(args.host, _tokens(), args.insecure_bind)
    os.environ["MIXER_SOURCES_DIR"] = str(args.sources_dir)
    os.environ["MIXER_STATE_DIR"] = str(args.state_dir)
    if args.redis_url:
        os.environ["MIXER_REDIS_URL"] = args.redis_url
    if args.cache_dir:
        os.environ["MIXER_CACHE_DIR"] = str(args.cache_dir)
    logging.getLogger(__name__).info(
        "serving",
        extra={"host": args.host, "port": args.port, "store": "redis" if args.redis_url else "embedded"},
    )
    uvicorn.run(
        "mixer_service.service.cli:build_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="info",
        access_log=False,
    )
    return 0
