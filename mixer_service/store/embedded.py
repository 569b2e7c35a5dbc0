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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mixer_contract.errors import CorruptData, NotFound, StoreUnavailable
from mixer_contract.values import STEP, TRAINED_STEP
from mixer_service.store.base import (
    JobHead,
    ScheduleVersion,
    StateStore,
    StoreLimits,
    check_job_id,
    decode_config,
    decode_version,
    job_limit_error,
    new_incarnation,
    to_json,
)

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 3
# How long a writer waits for another process's transaction before reporting the store unavailable.
BUSY_TIMEOUT_S = 10.0
_HEAD = "incarnation, version, chain, served_high_water, trained_step, served_chain"

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
        job_id TEXT PRIMARY KEY,
        config TEXT NOT NULL,
        version INTEGER NOT NULL,
        served_high_water INTEGER NOT NULL DEFAULT -1,
        trained_step INTEGER NOT NULL DEFAULT -1,
        incarnation TEXT NOT NULL DEFAULT '',
        chain TEXT NOT NULL DEFAULT '',
        served_chain TEXT NOT NULL DEFAULT ''
    )""",
    """CREATE TABLE IF NOT EXISTS schedule_versions (
        job_id TEXT NOT NULL REFERENCES jobs(job_id),
        version INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (job_id, version)
    )""",
)


class _Guard:
    """The store's lock held around a use of its connection, SQLite failures as service errors. One instance
    per store, entered per operation (a class, not a generator: the hot path enters it on every request)."""

    def __init__(self, lock: threading.Lock, conn: sqlite3.Connection, path: Path) -> None:
        self._lock, self._conn, self._path = lock, conn, path

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        return self._conn

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self._lock.release()
        if isinstance(exc, sqlite3.OperationalError):
            raise StoreUnavailable(f"state database {self._path}: {exc}") from exc
        if isinstance(exc, sqlite3.DatabaseError):
            raise CorruptData(f"state database {self._path}: {exc}") from exc


class EmbeddedStore(StateStore):
    """SQLite-backed store; one connection per store guarded by a lock, safe to share across threads."""

    def __init__(self, path: Path, limits: StoreLimits | None = None) -> None:
        self._path = Path(path)
        self.limits = limits or StoreLimits()
        self._lock = threading.Lock()
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are opened explicitly, so each operation is exactly one.
            self._conn = sqlite3.connect(
                self._path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"cannot open state database {self._path}: {exc}") from exc
        self._guarded = _Guard(self._lock, self._conn, self._path)
        self._last_heads: dict[str, tuple[tuple[Any, ...], JobHead]] = {}  # job -> (row, its decoding)
        try:
            self._initialize()
        except BaseException:
            self._conn.close()
            raise
        logger.info("embedded store opened", extra={"path": str(self._path)})

    def _initialize(self) -> None:
        """Create, migrate or check the schema; safe when several processes open a fresh file at once."""
        with self._guard() as conn:
            # Journal mode is a property of the file and cannot change inside a transaction.
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        with self._transaction(write=True) as conn:
            schema = conn.execute("PRAGMA user_version").fetchone()[0]
            if schema not in (0, 1, 2, SCHEMA_VERSION):
                raise CorruptData(f"state database {self._path} has unknown schema version {schema}")
            if schema == 1:
                self._migrate_from_v1(conn)
            if schema in (1, 2):
                # Jobs from before the served chain: '' means "unknown", and the check it enables is skipped.
                conn.execute("ALTER TABLE jobs ADD COLUMN served_chain TEXT NOT NULL DEFAULT ''")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _migrate_from_v1(self, conn: sqlite3.Connection) -> None:
        """Version 1 had no incarnations or chains: give each job one and seal its log in place."""
        conn.execute("ALTER TABLE jobs ADD COLUMN incarnation TEXT NOT NULL DEFAULT ''")
        conn.execute("ALTER TABLE jobs ADD COLUMN chain TEXT NOT NULL DEFAULT ''")
        for (job_id,) in conn.execute("SELECT job_id FROM jobs").fetchall():
            chain = incarnation = new_incarnation()
            rows = conn.execute(
                "SELECT version, body FROM schedule_versions WHERE job_id = ? ORDER BY version", (job_id,)
            ).fetchall()
            for version, body in rows:
                sealed = decode_version(body, f"{self._path} job {job_id!r}").sealed(chain)
                chain = sealed.chain
                conn.execute(
                    "UPDATE schedule_versions SET body = ? WHERE job_id = ? AND version = ?",
                    (to_json(sealed.to_dict(), "schedule version"), job_id, version),
                )
            conn.execute(
                "UPDATE jobs SET incarnation = ?, chain = ? WHERE job_id = ?", (incarnation, chain, job_id)
            )
        logger.warning("state database migrated to schema 2 (incarnations, chained logs)",
                       extra={"path": str(self._path)})

    def _guard(self) -> _Guard:
        """Serialize use of the connection and translate SQLite failures into service errors."""
        return self._guarded

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

    def _read_head(self, conn: sqlite3.Connection, job_id: str) -> JobHead:
        """The job's head; a row equal to the last one read for the job reuses its checked decoding (the
        hot path reads the same row for every rank of a step)."""
        row = self._require_job(conn, job_id, _HEAD)
        last = self._last_heads.get(job_id)
        if last is not None and last[0] == row:
            return last[1]
        head = JobHead.decode(job_id, row, str(self._path))
        self._last_heads[job_id] = (row, head)
        return head

    def _insert_job(self, job_id: str, config_json: str, incarnation: str, first: ScheduleVersion) -> bool:
        with self._transaction(write=True) as conn:
            if conn.execute("SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)).fetchone():
                return False
            (count,) = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()
            if count >= self.limits.max_jobs:
                raise job_limit_error(self.limits)
            conn.execute(
                "INSERT INTO jobs (job_id, config, version, incarnation, chain, served_chain) "
                "VALUES (?, ?, 1, ?, ?, ?)",
                (job_id, config_json, incarnation, first.chain, first.chain),
            )
            self._append_version(conn, job_id, first)
        return True

    def _append_version(self, conn: sqlite3.Connection, job_id: str, new: ScheduleVersion) -> None:
        conn.execute(
            "INSERT INTO schedule_versions (job_id, version, body) VALUES (?, ?, ?)",
            (job_id, new.version, to_json(new.to_dict(), "schedule version")),
        )
        conn.execute(
            "UPDATE jobs SET version = ?, chain = ? WHERE job_id = ?", (new.version, new.chain, job_id)
        )

    def get_job(self, job_id: str) -> dict[str, Any]:
        check_job_id(job_id)
        with self._transaction(write=False) as conn:
            (config,) = self._require_job(conn, job_id, "config")
        return decode_config(config, f"{self._path} job {job_id!r}")

    def list_jobs(self) -> list[str]:
        with self._transaction(write=False) as conn:
            return [row[0] for row in conn.execute("SELECT job_id FROM jobs ORDER BY job_id")]

    def head(self, job_id: str) -> JobHead:
        check_job_id(job_id)
        # One SELECT is atomic on its own: no explicit transaction, the hot read costs one statement.
        with self._guard() as conn:
            return self._read_head(conn, job_id)

    def versions(self, job_id: str, after: int = 0) -> list[ScheduleVersion]:
        check_job_id(job_id)
        with self._transaction(write=False) as conn:
            self._require_job(conn, job_id, "1")
            rows = conn.execute(
                "SELECT body FROM schedule_versions WHERE job_id = ? AND version > ? ORDER BY version",
                (job_id, after),
            ).fetchall()
        return [decode_version(body, f"{self._path} job {job_id!r}") for (body,) in rows]

    def _commit_version(self, job_id: str, incarnation: str, previous_chain: str, new: ScheduleVersion,
                        max_high_water: int) -> JobHead | None:
        with self._transaction(write=True) as conn:
            head = self._read_head(conn, job_id)
            if (head.incarnation != incarnation or head.version != new.version - 1
                    or head.chain != previous_chain or head.served_high_water > max_high_water):
                return head
            self._append_version(conn, job_id, new)
        return None

    def restore(self, job_id: str, incarnation: str, previous_chain: str, missing: Sequence[ScheduleVersion],
                min_high_water: int) -> JobHead:
        check_job_id(job_id)
        with self._transaction(write=True) as conn:
            head = self._read_head(conn, job_id)
            if head.incarnation != incarnation:
                return head
            served_chain = missing[-1].chain if missing else previous_chain
            if missing and head.chain == previous_chain:
                for version in missing:
                    self._append_version(conn, job_id, version)
                conn.execute("UPDATE jobs SET served_chain = ? WHERE job_id = ?", (served_chain, job_id))
            conn.execute(
                "UPDATE jobs SET served_high_water = ?, served_chain = ? "
                "WHERE job_id = ? AND served_high_water < ?",
                (min_high_water, served_chain, job_id, min_high_water),
            )
            return self._read_head(conn, job_id)

    def mark_served(self, job_id: str, step: int, incarnation: str) -> JobHead:
        check_job_id(job_id)
        STEP.check(step)
        # A step at or below the high water (every rank but the first to ask for a step) changes nothing:
        # one SELECT, atomic on its own, answers it with one statement instead of four (a write transaction
        # that would update nothing). docs/benchmarks.md: no measurable gain beyond run-to-run noise.
        with self._guard() as conn:
            head = self._read_head(conn, job_id)
        if head.served_high_water >= step or head.incarnation != incarnation:
            return head
        with self._transaction(write=True) as conn:
            head = self._read_head(conn, job_id)
            # The WHERE clause keeps the transaction read-only (no WAL write, no fsync) for repeated steps.
            conn.execute(
                "UPDATE jobs SET served_high_water = ?, served_chain = chain "
                "WHERE job_id = ? AND incarnation = ? AND served_high_water < ?",
                (step, job_id, incarnation, step),
            )
        return head

    def set_trained_step(self, job_id: str, step: int) -> None:
        check_job_id(job_id)
        TRAINED_STEP.check(step)
        with self._transaction(write=True) as conn:
            updated = conn.execute("UPDATE jobs SET trained_step = ? WHERE job_id = ?", (step, job_id))
            if updated.rowcount == 0:
                raise NotFound(f"unknown job {job_id!r}")

    def ping(self, timeout: float | None = None) -> None:
        # Waits for this process's connection at most ``timeout``: a writer stuck on another process's
        # lock must not make the readiness probe hang with it.
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise StoreUnavailable(f"state database {self._path}: busy for more than {timeout:g} s")
        try:
            self._conn.execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"state database {self._path}: {exc}") from exc
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
