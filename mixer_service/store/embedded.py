"""Embedded state store: one SQLite file, for a single machine (one or several server processes).

WAL mode lets readers proceed while one writer commits; every write is a ``BEGIN IMMEDIATE`` transaction,
so the check-then-write steps of ``mark_served`` and the schedule commit are serialized across threads and
processes by SQLite's own file lock. ``synchronous=NORMAL`` in WAL mode keeps every
commit across a process crash (SIGKILL included): the served high water guards history, so it must not roll
back when a server dies. Only an OS crash or power loss may lose the last commits; deployments that need
that too use Redis with AOF ``appendfsync always``. NORMAL avoids an fsync per step on the serving path.
Writes happen only when a schedule changes or the high water actually rises (once per step, not per
request).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mixer_service.errors import CorruptData, NotFound, StoreUnavailable
from mixer_service.store.base import (
    Head,
    ScheduleVersion,
    StateStore,
    check_int,
    check_job_id,
    decode_config,
    decode_version,
    to_json,
)

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# How long a writer waits for another process's transaction before reporting the store unavailable.
BUSY_TIMEOUT_S = 10.0

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
        job_id TEXT PRIMARY KEY,
        config TEXT NOT NULL,
        version INTEGER NOT NULL,
        served_high_water INTEGER NOT NULL DEFAULT -1,
        trained_step INTEGER NOT NULL DEFAULT -1
    )""",
    """CREATE TABLE IF NOT EXISTS schedule_versions (
        job_id TEXT NOT NULL REFERENCES jobs(job_id),
        version INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (job_id, version)
    )""",
)


class EmbeddedStore(StateStore):
    """SQLite-backed store; one connection per store guarded by a lock, safe to share across threads."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are opened explicitly, so each operation is exactly one.
            self._conn = sqlite3.connect(
                self._path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"cannot open state database {self._path}: {exc}") from exc
        try:
            self._initialize()
        except BaseException:
            self._conn.close()
            raise
        logger.info("embedded store opened", extra={"path": str(self._path)})

    def _initialize(self) -> None:
        """Create or check the schema; safe when several processes open a fresh file at once."""
        with self._guard() as conn:
            # Journal mode is a property of the file and cannot change inside a transaction.
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        with self._transaction(write=True) as conn:
            schema = conn.execute("PRAGMA user_version").fetchone()[0]
            if schema not in (0, SCHEMA_VERSION):
                raise CorruptData(f"state database {self._path} has unknown schema version {schema}")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _guard(self) -> Iterator[sqlite3.Connection]:
        """Serialize use of the connection and translate SQLite failures into service errors."""
        with self._lock:
            try:
                yield self._conn
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"state database {self._path}: {exc}") from exc
            except sqlite3.DatabaseError as exc:
                raise CorruptData(f"state database {self._path}: {exc}") from exc

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[sqlite3.Connection]:
        """One operation = one transaction; IMMEDIATE takes the write lock up front so no upgrade can fail."""
        with self._guard() as conn:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _require_job(self, conn: sqlite3.Connection, job_id: str, columns: str) -> tuple[Any, ...]:
        row = conn.execute(f"SELECT {columns} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"unknown job {job_id!r}")
        return tuple(row)

    def _insert_job(self, job_id: str, config_json: str, first: ScheduleVersion) -> bool:
        with self._transaction(write=True) as conn:
            if conn.execute("SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)).fetchone():
                return False
            conn.execute("INSERT INTO jobs (job_id, config, version) VALUES (?, ?, 1)", (job_id, config_json))
            self._append_version(conn, job_id, first)
        return True

    def _append_version(self, conn: sqlite3.Connection, job_id: str, new: ScheduleVersion) -> None:
        conn.execute(
            "INSERT INTO schedule_versions (job_id, version, body) VALUES (?, ?, ?)",
            (job_id, new.version, to_json(new.to_dict(), "schedule version")),
        )

    def get_job(self, job_id: str) -> dict[str, Any]:
        check_job_id(job_id)
        with self._transaction(write=False) as conn:
            (config,) = self._require_job(conn, job_id, "config")
        return decode_config(config, f"{self._path} job {job_id!r}")

    def list_jobs(self) -> list[str]:
        with self._transaction(write=False) as conn:
            return [row[0] for row in conn.execute("SELECT job_id FROM jobs ORDER BY job_id")]

    def schedule_log(self, job_id: str) -> list[ScheduleVersion]:
        check_job_id(job_id)
        with self._transaction(write=False) as conn:
            self._require_job(conn, job_id, "1")
            rows = conn.execute(
                "SELECT body FROM schedule_versions WHERE job_id = ? ORDER BY version", (job_id,)
            ).fetchall()
        return [decode_version(body, f"{self._path} job {job_id!r}") for (body,) in rows]

    def _head(self, job_id: str) -> Head:
        check_job_id(job_id)
        with self._transaction(write=False) as conn:
            version, high_water = self._require_job(conn, job_id, "version, served_high_water")
        return Head(version, high_water)

    def _commit_version(self, job_id: str, new: ScheduleVersion, max_high_water: int) -> Head | None:
        with self._transaction(write=True) as conn:
            version, high_water = self._require_job(conn, job_id, "version, served_high_water")
            if version != new.version - 1 or high_water > max_high_water:
                return Head(version, high_water)
            self._append_version(conn, job_id, new)
            conn.execute("UPDATE jobs SET version = ? WHERE job_id = ?", (new.version, job_id))
        return None

    def mark_served(self, job_id: str, step: int) -> int:
        check_job_id(job_id)
        check_int(step, "step")
        with self._transaction(write=True) as conn:
            # The WHERE clause keeps the transaction read-only (no WAL write, no fsync) for repeated steps.
            conn.execute(
                "UPDATE jobs SET served_high_water = ? WHERE job_id = ? AND served_high_water < ?",
                (step, job_id, step),
            )
            (version,) = self._require_job(conn, job_id, "version")
        return int(version)

    def served_high_water(self, job_id: str) -> int:
        check_job_id(job_id)
        with self._transaction(write=False) as conn:
            (high_water,) = self._require_job(conn, job_id, "served_high_water")
        return int(high_water)

    def set_trained_step(self, job_id: str, step: int) -> None:
        check_job_id(job_id)
        check_int(step, "step")
        with self._transaction(write=True) as conn:
            updated = conn.execute("UPDATE jobs SET trained_step = ? WHERE job_id = ?", (step, job_id))
            if updated.rowcount == 0:
                raise NotFound(f"unknown job {job_id!r}")

    def trained_step(self, job_id: str) -> int:
        check_job_id(job_id)
        with self._transaction(write=False) as conn:
            (trained,) = self._require_job(conn, job_id, "trained_step")
        return int(trained)

    def ping(self) -> None:
        with self._guard() as conn:
            conn.execute("SELECT 1").fetchone()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
