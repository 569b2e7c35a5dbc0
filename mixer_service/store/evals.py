"""Held-out eval curves per job and source, beside the state store (the overfitting watch reads them).

A separate, small API so the schedule store's contract and scripts stay untouched. Each curve is bounded
(the last ``MAX_POINTS`` posts per source) and tagged with the job's incarnation, so a job deleted and
recreated under the same id starts with an empty curve. Layout:

* embedded: table ``evals`` in the same SQLite file (its own connection; one transaction per post);
* Redis: list ``mixer:{job}:evals:<source>`` (RPUSH + LTRIM in one script), set ``mixer:{job}:evals``
  of the sources posted and strings ``mixer:{job}:watch-law`` / ``mixer:{job}:watch-policy``; the
  ``{job}`` hash tag keeps them in the job's cluster slot.

Two small documents per job are kept here too, each tagged with the incarnation it was set for: the law
fitted across runs that the forecast's proposals use (table ``watch_laws``) and the watch policy (table
``watch_policies``: the web-loss bound of proposals and the opt-in auto-apply limits). They are the
watch's settings, not the job's: the job config and its hash stay what the trainer created.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixer_contract.errors import CorruptData, InvalidInput, StoreUnavailable
from mixer_contract.values import COUNT, STEP
from mixer_service.store.base import StateStore, check_job_id
from mixer_service.store.embedded import BUSY_TIMEOUT_S, EmbeddedStore

MAX_POINTS = 4096  # per job and source: a curve every 10 steps of a 40k-step run
MAX_LOSS = 1e4  # a held-out loss in nats per token; anything larger is a broken evaluator
SOURCE_NAME_MAX = 200


@dataclass(frozen=True)
class EvalPoint:
    """One held-out evaluation: mean loss per token on ``source`` after data step ``step``."""

    step: int
    loss: float
    tokens: int  # tokens trained through ``step`` (as the trainer counts them)

    @classmethod
    def checked(cls, step: Any, loss: Any, tokens: Any) -> EvalPoint:
        STEP.check(step)
        COUNT.check(tokens, "tokens")
        if isinstance(loss, bool) or not isinstance(loss, int | float) or not math.isfinite(loss) \
                or not 0 <= loss <= MAX_LOSS:
            raise InvalidInput(f"loss: must be a finite number in [0, {MAX_LOSS:g}], got {loss!r}")
        return cls(step, float(loss), tokens)


def latest_per_step(points: list[EvalPoint]) -> list[EvalPoint]:
    """One point per step (the last posted wins: a resumed run re-evaluates), ordered by step."""
    return sorted({p.step: p for p in points}.values(), key=lambda p: p.step)


class EvalStore(ABC):
    """Append and read bounded eval curves; unknown sources read as empty curves."""

    @abstractmethod
    def append(self, job_id: str, incarnation: str, source: str, point: EvalPoint) -> None:
        """Add a point to the curve, dropping the oldest beyond ``MAX_POINTS``."""

    def set_law(self, job_id: str, incarnation: str, law: dict[str, float]) -> None:
        """Attach the law fitted across runs (the watch's proposals use it) to this incarnation."""
        self._set_setting("law", job_id, incarnation, law)

    def law(self, job_id: str, incarnation: str) -> dict[str, float] | None:
        """The law attached to this incarnation of the job, if any."""
        return self._setting("law", job_id, incarnation)

    def set_policy(self, job_id: str, incarnation: str, policy: dict[str, Any]) -> None:
        """Replace the watch policy of this incarnation (``WatchPolicy.to_dict()``)."""
        self._set_setting("policy", job_id, incarnation, policy)

    def policy(self, job_id: str, incarnation: str) -> dict[str, Any] | None:
        """The watch policy set for this incarnation, if any."""
        return self._setting("policy", job_id, incarnation)

    def _set_setting(self, kind: str, job_id: str, incarnation: str, doc: dict[str, Any]) -> None:
        check_job_id(job_id)
        self._write_setting(kind, job_id, json.dumps([incarnation, doc]))

    def _setting(self, kind: str, job_id: str, incarnation: str) -> dict[str, Any] | None:
        check_job_id(job_id)
        raw = self._read_setting(kind, job_id)
        if raw is None:
            return None
        try:
            stored_incarnation, doc = json.loads(raw)
        except (ValueError, TypeError) as exc:
            raise CorruptData(f"unreadable watch {kind} of job {job_id!r}: {exc}") from exc
        return doc if stored_incarnation == incarnation and isinstance(doc, dict) else None

    @abstractmethod
    def _write_setting(self, kind: str, job_id: str, entry: str) -> None:
        """Store a setting entry (``"law"`` or ``"policy"``), replacing the job's previous one."""

    @abstractmethod
    def _read_setting(self, kind: str, job_id: str) -> str | None:
        """The stored entry of a setting, as ``_write_setting`` wrote it."""

    @abstractmethod
    def _read(self, job_id: str, source: str) -> list[tuple[str, EvalPoint]]:
        """Every stored (incarnation, point) of the curve, in posting order."""

    @abstractmethod
    def _sources(self, job_id: str) -> list[str]:
        """Sources with at least one stored point (any incarnation)."""

    def curve(self, job_id: str, incarnation: str, source: str) -> list[EvalPoint]:
        """The incarnation's points, one per step, by step."""
        check_job_id(job_id)
        return latest_per_step([p for inc, p in self._read(job_id, source) if inc == incarnation])

    def curves(self, job_id: str, incarnation: str) -> dict[str, list[EvalPoint]]:
        """Every non-empty curve of the incarnation, by source."""
        check_job_id(job_id)
        found = {s: self.curve(job_id, incarnation, s) for s in self._sources(job_id)}
        return {s: c for s, c in sorted(found.items()) if c}


_SETTING_TABLES = {"law": "watch_laws", "policy": "watch_policies"}  # fixed names, never user input


def _encode(incarnation: str, point: EvalPoint) -> str:
    return json.dumps([incarnation, point.step, point.loss, point.tokens], separators=(",", ":"))


def _decode(raw: str | bytes, where: str) -> tuple[str, EvalPoint]:
    try:
        incarnation, step, loss, tokens = json.loads(raw)
        return str(incarnation), EvalPoint.checked(step, loss, tokens)
    except (ValueError, TypeError, InvalidInput) as exc:
        raise CorruptData(f"unreadable eval point in {where}: {exc}") from exc


def _check_source(source: str) -> str:
    if not isinstance(source, str) or not 0 < len(source) <= SOURCE_NAME_MAX:
        raise InvalidInput(f"source: must be a name of 1..{SOURCE_NAME_MAX} characters")
    return source


class EmbeddedEvals(EvalStore):
    """Table ``evals`` in the embedded store's SQLite file."""

    def __init__(self, path: Path) -> None:
        self._path, self._lock = path, threading.Lock()
        try:
            self._conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS evals (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                "job_id TEXT NOT NULL, source TEXT NOT NULL, body TEXT NOT NULL)")
            self._conn.execute("CREATE INDEX IF NOT EXISTS evals_curve ON evals (job_id, source, seq)")
            for table in _SETTING_TABLES.values():
                self._conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {table} (job_id TEXT PRIMARY KEY, body TEXT NOT NULL)")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"eval table in {path}: {exc}") from exc

    def _run(self, sql: str, args: tuple[Any, ...], write: bool = False) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                if not write:
                    return self._conn.execute(sql, args).fetchall()
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.execute(sql, args)
                    self._conn.execute(
                        "DELETE FROM evals WHERE job_id = ? AND source = ? AND seq <= (SELECT seq FROM evals "
                        "WHERE job_id = ? AND source = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                        (args[0], args[1], args[0], args[1], MAX_POINTS))
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                return []
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"eval table in {self._path}: {exc}") from exc

    def append(self, job_id: str, incarnation: str, source: str, point: EvalPoint) -> None:
        check_job_id(job_id)
        self._run("INSERT INTO evals (job_id, source, body) VALUES (?, ?, ?)",
                  (job_id, _check_source(source), _encode(incarnation, point)), write=True)

    def _write_setting(self, kind: str, job_id: str, entry: str) -> None:
        with self._lock:
            try:
                table = _SETTING_TABLES[kind]
                self._conn.execute(f"INSERT OR REPLACE INTO {table} (job_id, body) VALUES (?, ?)",
                                   (job_id, entry))
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"eval table in {self._path}: {exc}") from exc

    def _read_setting(self, kind: str, job_id: str) -> str | None:
        rows = self._run(f"SELECT body FROM {_SETTING_TABLES[kind]} WHERE job_id = ?", (job_id,))
        return rows[0][0] if rows else None

    def _read(self, job_id: str, source: str) -> list[tuple[str, EvalPoint]]:
        rows = self._run("SELECT body FROM evals WHERE job_id = ? AND source = ? ORDER BY seq",
                         (job_id, source))
        return [_decode(body, f"{self._path} job {job_id!r}") for (body,) in rows]

    def _sources(self, job_id: str) -> list[str]:
        return [s for (s,) in self._run("SELECT DISTINCT source FROM evals WHERE job_id = ?", (job_id,))]


# KEYS: the curve, the job's set of sources. ARGV: entry, source, max points.
_APPEND = """
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
redis.call('SADD', KEYS[2], ARGV[2])
return 1
"""


class RedisEvals(EvalStore):
    """Lists under the job's hash tag, on the Redis (or Redis Cluster) client the state store uses."""

    def __init__(self, client: Any, where: str) -> None:
        self._client, self._where = client, where
        self._append = client.register_script(_APPEND)

    @staticmethod
    def _keys(job_id: str, source: str) -> list[str]:
        return [f"mixer:{{{job_id}}}:evals:{source}", f"mixer:{{{job_id}}}:evals"]

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import redis

        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError,
                redis.exceptions.RedisClusterException) as exc:
            raise StoreUnavailable(f"redis at {self._where} is unavailable: {exc}") from exc
        except redis.ResponseError as exc:
            raise CorruptData(f"redis at {self._where}: eval curve: {exc}") from exc

    def append(self, job_id: str, incarnation: str, source: str, point: EvalPoint) -> None:
        check_job_id(job_id)
        keys = self._keys(job_id, _check_source(source))
        self._call(self._append, keys=keys, args=[_encode(incarnation, point), source, MAX_POINTS])

    def _write_setting(self, kind: str, job_id: str, entry: str) -> None:
        self._call(self._client.set, f"mixer:{{{job_id}}}:watch-{kind}", entry)

    def _read_setting(self, kind: str, job_id: str) -> str | None:
        return self._call(self._client.get, f"mixer:{{{job_id}}}:watch-{kind}")

    def _read(self, job_id: str, source: str) -> list[tuple[str, EvalPoint]]:
        raw = self._call(self._client.lrange, self._keys(job_id, source)[0], 0, -1)
        return [_decode(entry, f"{self._where} job {job_id!r}") for entry in raw]

    def _sources(self, job_id: str) -> list[str]:
        members = self._call(self._client.smembers, self._keys(job_id, "")[1])
        return sorted(m.decode() if isinstance(m, bytes) else m for m in members)


def open_evals(store: StateStore) -> EvalStore:
    """The eval curves beside ``store`` (same SQLite file, or same Redis connection pool)."""
    if isinstance(store, EmbeddedStore):
        return EmbeddedEvals(store._path)  # noqa: SLF001 - same file, own connection
    from mixer_service.store.redis_store import RedisStore

    if isinstance(store, RedisStore):
        return RedisEvals(store._client, store._url)  # noqa: SLF001 - shares the pool and its timeouts
    raise InvalidInput(f"no eval curves for a {type(store).__name__}")
