"""Redis state store: several stateless replicas share each job's state through one Redis.

Key layout (the ``{job}`` hash tag puts a job's keys in one cluster slot, so per-job scripts and
transactions are single-slot):

==========================  ======  ===============================================================
``mixer:jobs``              SET     every job id (for ``list_jobs``)
``mixer:{job}:config``      STRING  canonical JSON of the job config
``mixer:{job}:schedule``    LIST    canonical JSON of each ScheduleVersion; its length is the latest version
``mixer:{job}:hw``          STRING  served high water (-1 until the first ``mark_served``)
``mixer:{job}:trained``     STRING  last reported trained step (-1 until reported)
==========================  ======  ===============================================================

Every multi-key update is one Lua script, so it is atomic across replicas. Writes are made safe to retry
after a lost reply: when a create or commit finds its own bytes already stored, it reports success.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

from mixer_service.errors import NotFound, StoreUnavailable
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

KEY_PREFIX = "mixer"
JOBS_KEY = f"{KEY_PREFIX}:jobs"

# A replica must answer its trainers quickly or fail over, never hang on a dead Redis.
SOCKET_TIMEOUT_S = 2.0
RETRY_ATTEMPTS = 2

# KEYS: config, schedule, hw, trained, jobs. ARGV: job_id, config_json, first_version_json.
# Returns {1} when created, else {0, stored config, stored first version} so a retry can recognize itself.
_CREATE_JOB = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('GET', KEYS[1]), redis.call('LINDEX', KEYS[2], 0)}
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('SET', KEYS[3], '-1')
redis.call('SET', KEYS[4], '-1')
redis.call('SADD', KEYS[5], ARGV[1])
return {1}
"""

# KEYS: schedule, hw. ARGV: new_version, high-water limit (max_high_water + 1), version_json.
# Appends iff the log ends at new_version - 1 and the high water is below the limit.
# Returns {1} when committed, {-1} for an unknown job, else {0, version, hw, last entry}.
_COMMIT_VERSION = """
local version = redis.call('LLEN', KEYS[1])
if version == 0 then return {-1} end
local hw = tonumber(redis.call('GET', KEYS[2]))
if version == tonumber(ARGV[1]) - 1 and hw < tonumber(ARGV[2]) then
  redis.call('RPUSH', KEYS[1], ARGV[3])
  return {1}
end
return {0, version, hw, redis.call('LINDEX', KEYS[1], -1)}
"""

# KEYS: schedule, hw. ARGV: step. Raises the high water and returns the latest version (0: unknown job).
_MARK_SERVED = """
local version = redis.call('LLEN', KEYS[1])
if version == 0 then return 0 end
if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[2])) then
  redis.call('SET', KEYS[2], ARGV[1])
end
return version
"""


def redact_url(url: str) -> str:
    """The URL with its password masked, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _job_key(job_id: str, field: str) -> str:
    return f"{KEY_PREFIX}:{{{job_id}}}:{field}"


class RedisStore(StateStore):
    """Redis-backed store; thread-safe (redis-py pools connections), shareable by any number of replicas."""

    def __init__(self, url: str, socket_timeout: float = SOCKET_TIMEOUT_S) -> None:
        self._url = redact_url(url)
        retryable: list[type[Exception]] = [redis.ConnectionError, redis.TimeoutError]
        self._client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            health_check_interval=30,
            retry=Retry(EqualJitterBackoff(cap=0.5, base=0.05), RETRY_ATTEMPTS),
            retry_on_error=retryable,
        )
        self._create_job = self._client.register_script(_CREATE_JOB)
        self._commit = self._client.register_script(_COMMIT_VERSION)
        self._mark_served = self._client.register_script(_MARK_SERVED)
        logger.info("redis store opened", extra={"url": self._url})

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        """Turn every way of not reaching Redis (down, slow, failed over to a replica) into one error."""
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError) as exc:
            raise StoreUnavailable(f"redis at {self._url} is unavailable: {exc}") from exc

    def _insert_job(self, job_id: str, config_json: str, first: ScheduleVersion) -> bool:
        first_json = to_json(first.to_dict(), "schedule version")
        keys = [_job_key(job_id, f) for f in ("config", "schedule", "hw", "trained")] + [JOBS_KEY]
        with self._reachable():
            created, *stored = self._create_job(keys=keys, args=[job_id, config_json, first_json])
        return bool(created) or stored == [config_json, first_json]

    def get_job(self, job_id: str) -> dict[str, Any]:
        check_job_id(job_id)
        with self._reachable():
            raw = self._client.get(_job_key(job_id, "config"))
        if raw is None:
            raise NotFound(f"unknown job {job_id!r}")
        return decode_config(raw, f"{self._url} job {job_id!r}")

    def list_jobs(self) -> list[str]:
        with self._reachable():
            return sorted(cast(set[str], self._client.smembers(JOBS_KEY)))

    def schedule_log(self, job_id: str) -> list[ScheduleVersion]:
        check_job_id(job_id)
        with self._reachable():
            entries = self._client.lrange(_job_key(job_id, "schedule"), 0, -1)
        if not entries:
            raise NotFound(f"unknown job {job_id!r}")
        return [decode_version(entry, f"{self._url} job {job_id!r}") for entry in entries]

    def _head(self, job_id: str) -> Head:
        check_job_id(job_id)
        with self._reachable():
            pipe = self._client.pipeline(transaction=True)
            pipe.llen(_job_key(job_id, "schedule"))
            pipe.get(_job_key(job_id, "hw"))
            version, high_water = pipe.execute()
        if version == 0 or high_water is None:
            raise NotFound(f"unknown job {job_id!r}")
        return Head(int(version), int(high_water))

    def _commit_version(self, job_id: str, new: ScheduleVersion, max_high_water: int) -> Head | None:
        new_json = to_json(new.to_dict(), "schedule version")
        keys = [_job_key(job_id, "schedule"), _job_key(job_id, "hw")]
        with self._reachable():
            outcome = self._commit(keys=keys, args=[new.version, max_high_water + 1, new_json])
        if outcome[0] == -1:
            raise NotFound(f"unknown job {job_id!r}")
        if outcome[0] == 1 or outcome[3] == new_json:
            return None
        return Head(int(outcome[1]), int(outcome[2]))

    def mark_served(self, job_id: str, step: int) -> int:
        check_job_id(job_id)
        check_int(step, "step")
        keys = [_job_key(job_id, "schedule"), _job_key(job_id, "hw")]
        with self._reachable():
            version = int(self._mark_served(keys=keys, args=[step]))
        if version == 0:
            raise NotFound(f"unknown job {job_id!r}")
        return version

    def _read_counter(self, job_id: str, field: str) -> int:
        check_job_id(job_id)
        with self._reachable():
            raw = self._client.get(_job_key(job_id, field))
        if raw is None:
            raise NotFound(f"unknown job {job_id!r}")
        return int(raw)

    def served_high_water(self, job_id: str) -> int:
        return self._read_counter(job_id, "hw")

    def trained_step(self, job_id: str) -> int:
        return self._read_counter(job_id, "trained")

    def set_trained_step(self, job_id: str, step: int) -> None:
        check_job_id(job_id)
        check_int(step, "step")
        with self._reachable():
            # XX: only overwrite the key create_job made, so an unknown job is reported, not created.
            updated = self._client.set(_job_key(job_id, "trained"), step, xx=True)
        if not updated:
            raise NotFound(f"unknown job {job_id!r}")

    def ping(self) -> None:
        with self._reachable():
            self._client.ping()

    def close(self) -> None:
        self._client.close()
