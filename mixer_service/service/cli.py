"""``mixer serve``: run the service with uvicorn."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from mixer_service.errors import InvalidInput
from mixer_service.service.auth import Tokens, check_bind


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve batches over HTTP (FastAPI + uvicorn)")
    p.add_argument("--sources-dir", type=Path, default=None, help="directory of prepared sources")
    p.add_argument("--sources-url", action="append", default=[], metavar="S3_URL",
                   help="s3://bucket/prefix of prepared sources (repeatable); shards are fetched on demand")
    p.add_argument("--s3-endpoint", default=os.environ.get("MIXER_S3_ENDPOINT") or None,
                   help="S3-compatible endpoint URL (MinIO, GCS interop, ...); default AWS")
    p.add_argument("--verify", choices=("off", "fast", "full"), default="fast",
                   help="fast: each shard and document-index block is hashed before its first use; full: "
                   "every one before ready; off: trust files of the right size (benchmarks only)")
    p.add_argument("--cache-limit", type=_byte_count, default=None,
                   help="bytes of decompressed shards kept locally, e.g. 20G (least recently used evicted)")
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
    p.add_argument("--workers", type=int, default=None, help="uvicorn worker processes (default: one per "
                   "core this process may run on; each checks the store on every request, so they never "
                   "serve a stale view; the embedded store is shared by processes). Limits are per worker")
    limits = p.add_argument_group("limits (every request's work is bounded; over a limit: a clear 4xx)")
    limits.add_argument("--max-jobs", type=int, default=1000, help="jobs this store may hold (409 beyond)")
    limits.add_argument("--max-versions", type=int, default=1000,
                        help="schedule versions per job (409 beyond)")
    limits.add_argument("--max-request-tokens", type=int, default=1 << 24,
                        help="rows x seq_len of one batch response (413 beyond: use a larger world)")
    limits.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body size (413 beyond)")
    limits.add_argument("--threads", type=int, default=32,
                        help="threads for handlers that do store I/O or assemble batches")
    limits.add_argument("--batch-threads", type=int, default=4,
                        help="batches made at once per process (more only contend for the GIL)")
    limits.add_argument("--max-in-flight", type=int, default=256,
                        help="requests at once (/metrics included) before a problem+json 503 with "
                        "Retry-After (probes exempt)")
    limits.add_argument("--max-connections", type=int, default=None,
                        help="open connections; past it a new one closes the longest-idle one (keep-alive "
                        "connections reconnect). Above --max-in-flight (default: 4x it, at least 1024); "
                        "uvicorn's own cap is 2x this")
    limits.add_argument("--plan-max-runs", type=int, default=None,
                        help="pilot runs (and finetune points) per /v1/plan/spt request (413 beyond; "
                        "default 1000, or MIXER_PLAN_MAX_RUNS)")
    limits.add_argument("--plan-max-points", type=int, default=None,
                        help="grid points per /v1/plan/storage request (default 1000, or "
                        "MIXER_PLAN_MAX_POINTS)")
    limits.add_argument("--plan-max-bootstrap", type=int, default=None,
                        help="bootstrap refits per plan request (default 200, or MIXER_PLAN_MAX_BOOTSTRAP)")
    limits.add_argument("--high-water-watch", type=float, default=None, metavar="SECONDS",
                        dest="high_water_watch_s",
                        help="re-check the jobs this replica served against the store this often, so a "
                        "store restored from a backup gets their high water back without a request "
                        "(default 10; 0: only on requests)")
    limits.add_argument("--timeout-keep-alive", type=float, default=30.0,
                        help="seconds an idle keep-alive connection is kept open")
    p.add_argument(
        "--insecure-bind",
        action="store_true",
        help="allow a non-loopback bind without tokens (not for shared networks)",
    )
    p.set_defaults(func=run)


def build_app():
    """Uvicorn factory: reads its settings from the environment that ``run`` prepared."""
    from mixer_service.service.app import ServiceLimits, Settings, create_app
    from mixer_service.service.connections import CappedConnections
    from mixer_service.service.sources import SourceRegistry
    from mixer_service.store import open_store
    from mixer_service.store.base import StoreLimits

    cache = os.environ.get("MIXER_CACHE_DIR")
    state_dir = Path(os.environ["MIXER_STATE_DIR"])
    state_dir.mkdir(parents=True, exist_ok=True)
    limits = json.loads(os.environ.get("MIXER_LIMITS", "{}"))
    CappedConnections.max_connections = limits.get("max_connections", CappedConnections.max_connections)
    return create_app(
        Settings(
            store=open_store(
                os.environ.get("MIXER_REDIS_URL") or None,
                state_dir / "state.sqlite",
                StoreLimits(**{k: limits[k] for k in ("max_jobs", "max_versions") if k in limits}),
            ),
            sources=SourceRegistry.load(
                Path(os.environ["MIXER_SOURCES_DIR"]) if os.environ.get("MIXER_SOURCES_DIR") else None,
                Path(cache) if cache else None, verify=os.environ.get("MIXER_VERIFY", "fast"),
                cache_limit=_optional_int(os.environ.get("MIXER_CACHE_LIMIT")),
                remote_urls=json.loads(os.environ.get("MIXER_SOURCES_URLS", "[]")),
                s3_endpoint=os.environ.get("MIXER_S3_ENDPOINT") or None,
            ),
            tokens=_tokens(),
            limits=ServiceLimits(**{k: limits[k] for k in (
                "max_body_bytes", "max_request_tokens", "threads", "batch_threads", "max_in_flight",
                "high_water_watch_s")
                if k in limits}),
        )
    )


def _optional_int(text: str | None) -> int | None:
    return int(text) if text else None


def _byte_count(text: str) -> int:
    """``20G``, ``512M``, ``1.5T`` or a plain number of bytes (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    scale = units.get(text[-1:].upper(), 1)
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (e.g. 20G)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _tokens() -> Tokens:
    return Tokens(
        os.environ.get("MIXER_OPERATOR_TOKEN") or None, os.environ.get("MIXER_READER_TOKEN") or None
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    check_bind(args.host, _tokens(), args.insecure_bind)
    if args.max_connections is None:
        args.max_connections = max(1024, 4 * args.max_in_flight)
    if args.workers is None:  # one event loop (and one GIL) per core: a batch is CPU work
        args.workers = len(os.sched_getaffinity(0))
    for name in ("workers", "max_jobs", "max_versions", "max_request_tokens", "max_body_bytes", "threads",
                 "batch_threads", "max_in_flight", "max_connections"):
        if getattr(args, name) < 1:
            raise InvalidInput(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.max_connections <= args.max_in_flight:
        raise InvalidInput(f"--max-connections ({args.max_connections}) must be above --max-in-flight "
                           f"({args.max_in_flight}): requests past that are refused with problem+json")
    for name in ("plan_max_runs", "plan_max_points", "plan_max_bootstrap"):
        if getattr(args, name) is not None:  # the plan routes read these at import, in every worker
            os.environ[f"MIXER_{name.upper()}"] = str(getattr(args, name))
    if args.high_water_watch_s is not None and args.high_water_watch_s < 0:
        raise InvalidInput(f"--high-water-watch: must be >= 0 seconds, got {args.high_water_watch_s}")
    os.environ["MIXER_LIMITS"] = json.dumps({n: getattr(args, n) for n in (
        "max_jobs", "max_versions", "max_request_tokens", "max_body_bytes", "threads", "batch_threads",
        "max_in_flight", "max_connections", "high_water_watch_s") if getattr(args, n) is not None})
    if args.sources_dir is None and not args.sources_url:
        raise InvalidInput("give --sources-dir, --sources-url, or both")
    if args.sources_dir is not None:
        os.environ["MIXER_SOURCES_DIR"] = str(args.sources_dir)
    os.environ["MIXER_SOURCES_URLS"] = json.dumps(args.sources_url)
    os.environ["MIXER_VERIFY"] = args.verify
    if args.cache_limit is not None:
        os.environ["MIXER_CACHE_LIMIT"] = str(args.cache_limit)
    if args.s3_endpoint:
        os.environ["MIXER_S3_ENDPOINT"] = args.s3_endpoint
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
        # Ours refuse first, with problem+json: --max-in-flight requests, --max-connections connections
        # (CappedConnections closes idle ones), so uvicorn's bare text/plain 503 is a backstop only.
        http="mixer_service.service.connections:CappedConnections",
        limit_concurrency=2 * args.max_connections,
        timeout_keep_alive=args.timeout_keep_alive,
        h11_max_incomplete_event_size=64 * 1024,  # request line + headers
    )
    return 0
