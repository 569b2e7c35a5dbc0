"""Where a state store lives, and the small job every store test starts from (``location`` is in conftest)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from mixer_service.store import StateStore, open_store

CONFIG = {"seq_len": 8, "global_batch": 4, "sources": ["web", "domain"]}
SCHEDULE = {"phases": [{"weights": {"web": 0.9, "domain": 0.1}}]}

# Each store the contract runs against: embedded SQLite, or the URL a conftest fixture gives.
URL_FIXTURES = {"embedded": None, "redis": "clean_redis_url", "cluster": "clean_redis_cluster_url"}


class Location(NamedTuple):
    """Where a store lives; picklable, so other processes can open the same store."""

    url: str | None
    path: Path

    def open(self) -> StateStore:
        return open_store(self.url, self.path)
