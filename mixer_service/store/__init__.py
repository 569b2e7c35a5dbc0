"""State stores: where jobs, schedule logs and serving progress live.

``open_store`` picks the backend: the embedded SQLite file for one machine, Redis when several replicas
serve the same jobs.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from mixer_contract.errors import InvalidInput
from mixer_service.store.base import ScheduleVersion, StateStore, StoreLimits
from mixer_service.store.embedded import EmbeddedStore

__all__ = ["ScheduleVersion", "StateStore", "open_store"]

REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")


def open_store(url: str | None, path: Path, limits: StoreLimits | None = None) -> StateStore:
    """A Redis store for a Redis URL (see ``REDIS_SCHEMES``), else the SQLite file at ``path``."""
    if url is None:
        return EmbeddedStore(path, limits=limits)
    if url.startswith(REDIS_SCHEMES):
        # Imported lazily: redis-py is only a dependency of multi-replica deployments.
        from mixer_service.store.redis_store import RedisStore

        return RedisStore(url, limits=limits)
    # Only the scheme is echoed: the URL may carry a password.
    scheme = urlsplit(url).scheme
    raise InvalidInput(
        f"state store URL must start with one of {', '.join(REDIS_SCHEMES)}, got scheme {scheme!r}"
    )
