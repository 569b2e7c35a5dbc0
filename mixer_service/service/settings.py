"""``mixer serve``'s settings: one typed value, built once from flags and the environment, passed down.

Every setting has its default here and nowhere else: the flags of ``mixer serve`` take theirs from these
dataclasses. Uvicorn's worker processes are spawned by uvicorn and built by a factory without arguments, so
the one value travels to them as JSON in a single variable (``SETTINGS_ENV``), not as one variable per flag.
Secrets (the API tokens) stay in their own variables and never enter this value.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mixer_contract.errors import InvalidInput
from mixer_service.sources.cache import DEFAULT_MEMORY_BYTES
from mixer_service.store.base import StoreLimits

SETTINGS_ENV = "MIXER_SERVE_SETTINGS"
# prometheus-client's multiprocess switch, read when it is imported (the lower-case name is deprecated and
# still honoured): ``mixer serve`` owns it (metrics.py).
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
MULTIPROCESS_DIR_ENVS = (MULTIPROCESS_DIR_ENV, "prometheus_multiproc_dir")
VERIFY_MODES = ("off", "fast", "full")


@dataclass(frozen=True)
class ServiceLimits:
    """Per-request bounds of the HTTP layer (the store's own caps live in ``StoreLimits``)."""

    max_body_bytes: int = 1 << 20
    max_request_tokens: int = 1 << 24  # rows x seq_len of one batch response (64 MiB of uint32)
    threads: int = 32  # handlers that block (store I/O) run in this many threads
    batch_threads: int = 2  # batches made at once per worker: more convoy on the GIL (docs/benchmarks.md)
    max_in_flight: int = 256  # requests at once before a problem+json 503 (probes exempt)
    high_water_watch_s: float = 10.0  # re-check served jobs against the store this often (0: never)
    max_connections: int = 0  # open connections; 0: 4x max_in_flight, at least 1024
    timeout_keep_alive: float = 30.0  # seconds an idle keep-alive connection stays open

    @property
    def connections(self) -> int:
        return self.max_connections or max(1024, 4 * self.max_in_flight)


@dataclass(frozen=True)
class PlanLimits:
    """Per-request bounds of the planner endpoints (413 naming the limit beyond them); ``max_seconds`` is the
    wall-clock budget of one fit: its bootstrap stops there, a point fit past it is 413."""

    max_runs: int = 1000
    max_points: int = 1000
    max_bootstrap: int = 200
    max_seconds: int = 120


CGROUP = Path("/sys/fs/cgroup")  # cgroup v2: a container's limits


def usable_memory(cgroup: Path = CGROUP) -> int:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit when lower (a container)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def usable_cores(cgroup: Path = CGROUP) -> int:
    """Cores this process may run on, and no more than its cgroup's CPU quota (a container's CPU limit is a
    quota, not a CPU set: a pod limited to 2 CPUs on a 32-core node sees 32 in its affinity)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return cores
    if not (quota.isdigit() and period.isdigit()):
        return cores  # "max": no quota
    return max(1, min(cores, -(-int(quota) // int(period))))


def process_gone(pid: int) -> bool:
    """Whether no process has id ``pid`` (one of another user's is not gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


@dataclass(frozen=True)
class ServeSettings:
    sources_dir: Path | None = None
    sources_urls: tuple[str, ...] = ()
    s3_endpoint: str | None = None
    verify: str = "fast"
    cache_limit: int | None = None  # bytes of decompressed shards kept locally; None: unbounded
    memory_cache: int | None = None  # bytes of proven shards each worker keeps in memory; 0: none; None: see
    # ``memory_cache_bytes``
    cache_dir: Path | None = None
    state_dir: Path = Path("mixer-state")
    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 0  # 0: one per core this process may run on
    insecure_bind: bool = False
    store: StoreLimits = field(default_factory=StoreLimits)
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    plan: PlanLimits = field(default_factory=PlanLimits)

    def __post_init__(self) -> None:
        """Refuse a setting no server can run with, naming its flag, before anything starts."""
        if self.sources_dir is None and not self.sources_urls:
            raise InvalidInput("give --sources-dir, --sources-url, or both")
        if self.memory_cache is not None and self.memory_cache < 0:
            raise InvalidInput(f"--memory-cache: must be >= 0 bytes, got {self.memory_cache}")
        if self.verify not in VERIFY_MODES:
            raise InvalidInput(f"--verify: must be one of {list(VERIFY_MODES)}, got {self.verify!r}")
        at_least_one = {"workers": self.workers or 1, **asdict(self.store),
                        **{k: v for k, v in asdict(self.limits).items()
                           if k not in ("high_water_watch_s", "max_connections", "timeout_keep_alive")}}
        for name, value in at_least_one.items():
            if value < 1:
                raise InvalidInput(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
        if self.limits.connections <= self.limits.max_in_flight:
            raise InvalidInput(f"--max-connections ({self.limits.connections}) must be above --max-in-flight "
                               f"({self.limits.max_in_flight}): requests past that are refused with "
                               "problem+json")
        if self.limits.high_water_watch_s < 0:
            raise InvalidInput("--high-water-watch: must be >= 0 seconds, got "
                               f"{self.limits.high_water_watch_s}")
        for name, value in asdict(self.plan).items():
            if value < 1:
                raise InvalidInput(f"--plan-{name.replace('_', '-')[4:]}: must be >= 1, got {value}")

    @property
    def worker_count(self) -> int:
        """One event loop (and one GIL) per core this process may use unless set: a batch is CPU work."""
        return self.workers or usable_cores()

    @property
    def memory_cache_bytes(self) -> int:
        """``--memory-cache``, or by default 1 GiB a worker but at most a quarter of the memory this
        process may use shared by the workers: the default is one per core, and 64 workers of 1 GiB each
        would take 64 GiB of a 64-core node."""
        if self.memory_cache is not None:
            return self.memory_cache
        return min(DEFAULT_MEMORY_BYTES, usable_memory() // 4 // self.worker_count)

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> ServeSettings:
        raw = json.loads(text)
        paths = {k: Path(raw[k]) if raw[k] is not None else None
                 for k in ("sources_dir", "cache_dir", "state_dir")}
        return cls(**(raw | paths | {"sources_urls": tuple(raw["sources_urls"]),
                                     "store": StoreLimits(**raw["store"]),
                                     "limits": ServiceLimits(**raw["limits"]),
                                     "plan": PlanLimits(**raw["plan"])}))

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> ServeSettings:
        """From flat ``name -> value`` (parsed flags): each name is a field of this class or of one of its
        limit groups; a ``None`` value keeps the default."""
        groups: dict[str, dict[str, Any]] = {"store": {}, "limits": {}, "plan": {}}
        flags = {f.name: ("store", f.name) for f in fields(StoreLimits)}
        flags |= {f.name: ("limits", f.name) for f in fields(ServiceLimits)}
        flags |= {f"plan_{f.name}": ("plan", f.name) for f in fields(PlanLimits)}  # --plan-max-runs, ...
        top: dict[str, Any] = {}
        for name, value in values.items():
            if value is None:
                continue
            if name in flags:
                group, field_name = flags[name]
                groups[group][field_name] = value
            else:
                top[name] = value
        return cls(**top, store=StoreLimits(**groups["store"]), limits=ServiceLimits(**groups["limits"]),
                   plan=PlanLimits(**groups["plan"]))


def plan_limits_from_env(environ: Mapping[str, str]) -> dict[str, int]:
    """``MIXER_PLAN_MAX_*`` as flag defaults (a bad value is refused naming the variable)."""
    values = {}
    for name in (f.name for f in fields(PlanLimits)):
        raw = environ.get(f"MIXER_PLAN_{name.upper()}")
        if raw is not None:
            if not raw.isdigit() or int(raw) < 1:
                raise InvalidInput(f"MIXER_PLAN_{name.upper()} must be an integer >= 1, got {raw!r}")
            values[f"plan_{name}"] = int(raw)
    return values
