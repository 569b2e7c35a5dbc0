"""``mixer serve``: flags -> one ``ServeSettings`` value -> uvicorn; each worker builds its app from it."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from mixer_contract.errors import InvalidInput
from mixer_service.logs import configure_from_env
from mixer_service.service.settings import (
    DEFAULT_MEMORY_BYTES,
    MULTIPROCESS_DIR_ENV,
    MULTIPROCESS_DIR_ENVS,
    SETTINGS_ENV,
    VERIFY_MODES,
    PlanLimits,
    ServeSettings,
    ServiceLimits,
    plan_limits_from_env,
    process_gone,
)
from mixer_service.store.base import StoreLimits

if TYPE_CHECKING:  # the server's modules load only when `mixer serve` runs, so every other command
    from mixer_service.service.auth import Tokens  # works without the server extra

_SERVE = ServeSettings.__dataclass_fields__


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve batches over HTTP (FastAPI + uvicorn)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sources-dir", type=Path, default=None,
                   help="directory of sources: prepared, or adopted in place through a manifest")
    p.add_argument("--sources-url", action="append", default=[], metavar="S3_URL", dest="sources_urls",
                   help="s3://bucket/prefix of prepared sources (repeatable); shards are fetched on demand")
    p.add_argument("--s3-endpoint", default=os.environ.get("MIXER_S3_ENDPOINT") or None,
                   help="S3-compatible endpoint URL (MinIO, GCS interop, ...); default AWS")
    p.add_argument("--verify", choices=VERIFY_MODES, default=_SERVE["verify"].default,
                   help="fast: each shard and document-index block is hashed before its first use; full: "
                   "every one before ready; off: trust files of the right size (benchmarks only)")
    p.add_argument("--cache-limit", type=_byte_count, default=None,
                   help="a hard bound on the bytes under --cache-dir (shards, index blocks, records), e.g. "
                   "20G; least recently used evicted; below one window of every source (18 shards of the "
                   "default order): refused at start (None: unbounded)")
    p.add_argument("--memory-cache", type=_byte_count, default=None, metavar="BYTES",
                   help="bytes of proven shards each worker process keeps in memory and serves with no disk "
                   "read (filled only by a fetch or a verification of a whole shard; least recently read "
                   "evicted), e.g. 4G; 0: every read is a checked disk read (default: MIXER_MEMORY_CACHE, "
                   f"else {DEFAULT_MEMORY_BYTES} bytes a worker but at most a quarter of this machine's (or "
                   "container's) memory shared by the workers)")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=_SERVE["state_dir"].default,
        help="embedded state store directory (ignored with --redis-url)",
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get("MIXER_REDIS_URL") or None,
        help="keep state in Redis so several replicas can serve one job",
    )
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where verified shards and index blocks are kept (None: <sources-dir>/.cache)")
    p.add_argument("--host", default=_SERVE["host"].default)
    p.add_argument("--port", type=int, default=_SERVE["port"].default)
    p.add_argument("--workers", type=int, default=_SERVE["workers"].default,
                   help="uvicorn worker processes (default 0: one per core this process may run on; "
                   "each checks the store on every request, so they never serve a stale view; the embedded "
                   "store is shared by processes). Limits are per worker")
    limits = p.add_argument_group("limits (every request's work is bounded; over a limit: a clear 4xx)")
    limits.add_argument("--max-jobs", type=int, default=StoreLimits.max_jobs,
                        help="jobs this store may hold (409 beyond)")
    limits.add_argument("--max-versions", type=int, default=StoreLimits.max_versions,
                        help="schedule versions per job (409 beyond)")
    limits.add_argument("--max-request-tokens", type=int,
                        default=ServiceLimits.max_request_tokens,
                        help="steps x rows x seq_len of one batch response (413 beyond: use a larger world "
                        "or fewer steps a request)")
    limits.add_argument("--max-body-bytes", type=int,
                        default=ServiceLimits.max_body_bytes, help="request body size (413 beyond)")
    limits.add_argument("--threads", type=int, default=ServiceLimits.threads,
                        help="threads for handlers that do store I/O or assemble batches")
    limits.add_argument("--batch-threads", type=int,
                        default=ServiceLimits.batch_threads,
                        help="batches made at once per process (more only contend for the GIL)")
    limits.add_argument("--max-in-flight", type=int,
                        default=ServiceLimits.max_in_flight,
                        help="requests at once (/metrics included) before a problem+json 503 with "
                        "Retry-After (probes exempt)")
    limits.add_argument("--max-connections", type=int,
                        default=ServiceLimits.max_connections,
                        help="open connections; past it a new one closes the longest-idle one (keep-alive "
                        "connections reconnect). Above --max-in-flight (default 0: 4x it, at least 1024); "
                        "uvicorn's own cap is 2x this")
    limits.add_argument("--plan-max-runs", type=int, default=None,  # None: MIXER_PLAN_MAX_RUNS or PlanLimits
                        help="pilot runs (and finetune points) per /v1/plan/spt request (413 beyond; "
                        f"default {PlanLimits.max_runs}, or MIXER_PLAN_MAX_RUNS)")
    limits.add_argument("--plan-max-points", type=int, default=None,
                        help="grid points per /v1/plan/storage request (default 1000, or "
                        "MIXER_PLAN_MAX_POINTS)")
    limits.add_argument("--plan-max-bootstrap", type=int, default=None,
                        help="bootstrap refits per plan request (default 200, or MIXER_PLAN_MAX_BOOTSTRAP)")
    limits.add_argument("--high-water-watch", type=float, default=ServiceLimits.high_water_watch_s,
                        metavar="SECONDS",
                        dest="high_water_watch_s",
                        help="re-check the jobs this replica served against the store this often, so a "
                        "store restored from a backup gets their high water back without a request "
                        "(0: only on requests)")
    limits.add_argument("--timeout-keep-alive", type=float,
                        default=ServiceLimits.timeout_keep_alive,
                        help="seconds an idle keep-alive connection is kept open")
    p.add_argument(
        "--insecure-bind",
        action="store_true",
        help="allow a non-loopback bind without tokens (not for shared networks)",
    )
    p.set_defaults(func=run)


def build_app():
    """Uvicorn factory: the app of the ``ServeSettings`` that ``run`` passed in ``SETTINGS_ENV``."""
    settings = ServeSettings.from_json(os.environ[SETTINGS_ENV])
    if settings.worker_count > 1:
        _start_worker()  # before prometheus-client is imported (below): it may drop its multiprocess mode

    from mixer_service.service.app import Settings, create_app
    from mixer_service.service.connections import CappedConnections
    from mixer_service.store import open_store

    settings.state_dir.mkdir(parents=True, exist_ok=True)
    CappedConnections.max_connections = settings.limits.connections
    return create_app(
        Settings(
            store=open_store(settings.redis_url, settings.state_dir / "state.sqlite", settings.store),
            # ``run`` checked the limit before uvicorn started; a worker that refused now (when what the
            # cache holds was measured a little differently) would only take itself out of a running
            # server, in a restart loop.
            sources=_sources(settings, check_limit=False),
            tokens=_tokens(),
            limits=settings.limits,
            plan=settings.plan,
        )
    )


def _start_worker() -> None:
    """A worker uvicorn spawned starts with Python's default logging (bare WARNING lines, nothing below): it
    logs as ``mixer serve`` does. And it ends with its parent: uvicorn does not watch for a parent that was
    SIGKILLed, whose workers kept serving on the port (a restart then failed, "address already in use")."""
    configure_from_env("INFO")
    _reserve_metric_files()
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # SIGTERM: uvicorn's graceful shutdown
    if os.getppid() != parent.pid:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# The files prometheus-client's multiprocess mode makes for the kinds of metrics.py's metrics, and what of
# each is reserved on disk (its own start is 64 KiB, sparse).
METRIC_FILES = ("counter", "histogram", "gauge_mostrecent", "gauge_livesum")
METRIC_FILE_BYTES = 256 << 10


def _reserve_metric_files() -> None:
    """Allocate this worker's metric files before prometheus-client maps them: it makes them sparse, and the
    first write to a page a full ``$TMPDIR`` cannot back killed the worker (SIGBUS), which uvicorn restarted,
    forever. Without the room, this worker's metrics stay in its memory (a scrape it answers shows its own
    counts only), and it says so."""
    directory = os.environ.get(MULTIPROCESS_DIR_ENV)
    if not directory:
        return
    try:
        for kind in METRIC_FILES:
            fd = os.open(os.path.join(directory, f"{kind}_{os.getpid()}.db"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.posix_fallocate(fd, 0, METRIC_FILE_BYTES)
            finally:
                os.close(fd)
    except OSError as exc:
        for kind in METRIC_FILES:
            Path(directory, f"{kind}_{os.getpid()}.db").unlink(missing_ok=True)
        del os.environ[MULTIPROCESS_DIR_ENV]
        logging.getLogger(__name__).warning(
            "metrics of this worker are its own: no room for them in the shared metrics directory", extra={
                "event": "metrics.per_worker", "directory": directory, "error": exc.strerror or str(exc)})


def _sources(settings: ServeSettings, check_limit: bool = True):
    """The sources ``settings`` name, opened (a cache limit too small for them is refused here, unless not
    ``check_limit``)."""
    from mixer_service.service.source_registry import SourceRegistry

    return SourceRegistry.load(settings.sources_dir, settings.cache_dir, verify=settings.verify,
                               cache_limit=settings.cache_limit, remote_urls=list(settings.sources_urls),
                               s3_endpoint=settings.s3_endpoint, memory_bytes=settings.memory_cache_bytes,
                               check_limit=check_limit)


def _byte_count(text: str) -> int:
    """``20G``, ``512M``, ``1.5T`` or a plain number of bytes (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    scale = units.get(text[-1:].upper(), 1)
    try:
        number = float(text[:-1] if scale > 1 else text) * scale
        value = int(number)
    except (ValueError, OverflowError):  # OverflowError: inf
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (e.g. 20G)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    if number > 0 and value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is less than one byte")
    return value


def _memory_cache_from_env(environ) -> dict[str, int]:
    """``MIXER_MEMORY_CACHE`` (same syntax as ``--memory-cache``) as the flag's default."""
    raw = environ.get("MIXER_MEMORY_CACHE")
    if raw is None or raw == "":
        return {}
    try:
        return {"memory_cache": _byte_count(raw)}
    except argparse.ArgumentTypeError as exc:
        raise InvalidInput(f"MIXER_MEMORY_CACHE: {exc}") from None


def _tokens() -> Tokens:
    from mixer_service.service.auth import Tokens

    return Tokens(
        os.environ.get("MIXER_OPERATOR_TOKEN") or None, os.environ.get("MIXER_READER_TOKEN") or None
    )


def settings_of(args: argparse.Namespace) -> ServeSettings:
    """The one settings value of parsed flags (``MIXER_PLAN_MAX_*`` fill the plan limits not given,
    ``MIXER_MEMORY_CACHE`` the memory cache)."""
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command") and v is not None}
    values = plan_limits_from_env(os.environ) | _memory_cache_from_env(os.environ) | given
    values["sources_urls"] = tuple(values["sources_urls"])
    return ServeSettings.from_values(values)


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port another process listens on before anything is written or logged as serving (uvicorn
    would log "serving", then die with a bare ``[Errno 98]``)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is fine
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise InvalidInput(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                               "another process holds it (another mixer serve?): stop it or give another "
                               "--port") from exc


def run(args: argparse.Namespace) -> int:
    import uvicorn

    settings = settings_of(args)
    if settings.sources_dir is not None and not settings.sources_dir.is_dir():  # before anything is written
        raise InvalidInput(f"--sources-dir {settings.sources_dir}: not a directory")
    from mixer_service.service.auth import check_bind

    check_bind(settings.host, _tokens(), settings.insecure_bind)
    _check_port_free(settings.host, settings.port)
    os.environ[SETTINGS_ENV] = settings.to_json()
    if settings.cache_limit is not None:
        _sources(settings).close()  # refuse a too small limit here, once: the workers do not check it
    logging.getLogger(__name__).info("serving", extra={
        "host": settings.host, "port": settings.port, "store": "redis" if settings.redis_url else "embedded"})
    with _metrics_directory(settings.worker_count):
        _run_uvicorn(uvicorn, settings)
    return 0


@contextlib.contextmanager
def _metrics_directory(workers: int) -> Iterator[None]:
    """Several workers write their metric values into one fresh directory, which any of them reads for a
    scrape (``metrics.py``); one worker keeps them in memory. Fresh at every start: values a killed server
    left would be counted again."""
    # An operator's would put one worker in multiprocess mode with no directory (it did not start).
    for name in MULTIPROCESS_DIR_ENVS:
        os.environ.pop(name, None)
    if workers == 1:
        yield
        return
    _remove_orphaned_metrics()
    directory = tempfile.mkdtemp(prefix=f"{_METRICS_PREFIX}{os.getpid()}-")
    os.environ[MULTIPROCESS_DIR_ENV] = directory
    try:
        yield
    finally:
        os.environ.pop(MULTIPROCESS_DIR_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)


_METRICS_PREFIX = "mixer-metrics-"


def _remove_orphaned_metrics() -> None:
    """The directories of servers that were SIGKILLed (named after their process id) go at the next start."""
    for path in Path(tempfile.gettempdir()).glob(f"{_METRICS_PREFIX}*-*"):
        owner = path.name[len(_METRICS_PREFIX):].split("-", 1)[0]
        if owner.isdigit() and process_gone(int(owner)):
            shutil.rmtree(path, ignore_errors=True)


def _run_uvicorn(uvicorn, settings: ServeSettings) -> None:
    uvicorn.run(
        "mixer_service.service.serve_command:build_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.worker_count,
        log_level="info",
        access_log=False,
        # Ours refuse first, with problem+json: --max-in-flight requests, --max-connections connections
        # (CappedConnections closes idle ones), so uvicorn's bare text/plain 503 is a backstop only.
        http="mixer_service.service.connections:CappedConnections",
        limit_concurrency=2 * settings.limits.connections,
        timeout_keep_alive=settings.limits.timeout_keep_alive,  # type: ignore[arg-type]  # a float timer
        h11_max_incomplete_event_size=64 * 1024,  # request line + headers
    )
