"""Redis state store: several stateless replicas share each job's state through one Redis.

Key layout (the ``{job}`` hash tag puts a job's keys in one cluster slot, so every per-job script is
single-slot and the same code runs on one Redis and on a Redis Cluster, ``redis+cluster://``):

===============================  ======  ==========================================================
``mixer:jobs``                   SET     every job id (for ``list_jobs``; a slot of its own, written first)
``mixer:{job}:config``           STRING  canonical JSON of the job config
``mixer:{job}:incarnation``      STRING  random id fixed at creation (a recreated job gets a new one)
``mixer:{job}:schedule``         LIST    canonical JSON of each ScheduleVersion (length = latest version)
``mixer:{job}:chain``            STRING  chain hash of the latest version
``mixer:{job}:hw``               STRING  served high water (-1 until the first ``mark_served``)
``mixer:{job}:served``           STRING  chain of the latest version when the high water last rose
``mixer:{job}:trained``          STRING  last reported trained step (-1 until reported)
===============================  ======  ==========================================================

Every multi-key read or update of a job is one Lua script, so it is atomic across replicas and costs one
round trip. The job registry lives in another slot, so creating a job is two steps: reserve the id in the
registry (atomic with the ``max_jobs`` check), then create the job's keys; a crash between the two leaves
an id listed whose job does not exist (listed with its "unknown job" error), which a retried create fills.
Writes are made safe to retry after a lost reply: when a create or commit finds its own bytes already
stored, it reports success. Durability is Redis's: run it with AOF ``appendfsync always``
(docs/operations.md) or a lost second of writes is detected by every replica that saw it, which then
answers 503.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import EqualJitterBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

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
    to_json,
)

logger = logging.getLogger(__name__)

CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
KEY_PREFIX = "mixer"
JOBS_KEY = f"{KEY_PREFIX}:jobs"
FIELDS = ("incarnation", "schedule", "chain", "hw", "trained", "served")  # KEYS[1..6] of every per-job script

# A replica must answer its trainers quickly or fail over, never hang on a dead Redis.
SOCKET_TIMEOUT_S = 2.0
RETRY_ATTEMPTS = 2

# The head as one array; ARGV-free. Shared by the scripts below as their return value. ``hw()`` is the
# high water as a number, or nil when the field is damaged: scripts then write nothing and return the head,
# whose decoding names the damage (a Lua error would be a 500 for the caller).
_HEAD = """
local function head()
  return {redis.call('GET', KEYS[1]), redis.call('LLEN', KEYS[2]), redis.call('GET', KEYS[3]),
          redis.call('GET', KEYS[4]), redis.call('GET', KEYS[5]), redis.call('GET', KEYS[6])}
end
local function hw()
  return tonumber(redis.call('GET', KEYS[4]))
end
"""

# KEYS: the registry. ARGV: job_id, max_jobs. Returns 1 when the id is (now) listed, -2 at the job limit.
_RESERVE_JOB = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return -2 end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
"""

# KEYS: FIELDS + config. ARGV: config_json, first_json, incarnation, first_chain.
# Returns {1} when created, else {0, stored config, stored first version}.
_CREATE_JOB = """
if redis.call('EXISTS', KEYS[7]) == 1 then
  return {0, redis.call('GET', KEYS[7]), redis.call('LINDEX', KEYS[2], 0)}
end
redis.call('SET', KEYS[7], ARGV[1])
redis.call('SET', KEYS[1], ARGV[3])
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[4])
redis.call('SET', KEYS[4], '-1')
redis.call('SET', KEYS[5], '-1')
redis.call('SET', KEYS[6], ARGV[4])
return {1}
"""

# KEYS: incarnation, schedule. ARGV: after. Returns {exists, entries above ``after``}, read atomically.
_VERSIONS = """
return {redis.call('EXISTS', KEYS[1]), redis.call('LRANGE', KEYS[2], tonumber(ARGV[1]), -1)}
"""

_READ_HEAD = _HEAD + "return head()"

# ARGV: incarnation, new_version, high-water limit (max_high_water + 1), version_json, previous chain, chain.
# Appends iff the same incarnation's log ends at new_version - 1 with the previous chain and hw < limit.
# Returns {1} when committed (or this exact entry already is the last), else {0, head...}.
_COMMIT_VERSION = _HEAD + """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  local version = redis.call('LLEN', KEYS[2])
  local served = hw()
  if version == tonumber(ARGV[2]) - 1 and redis.call('GET', KEYS[3]) == ARGV[5]
     and served ~= nil and served < tonumber(ARGV[3]) then
    redis.call('RPUSH', KEYS[2], ARGV[4])
    redis.call('SET', KEYS[3], ARGV[6])
    return {1}
  end
  if redis.call('LINDEX', KEYS[2], -1) == ARGV[4] then return {1} end
end
return {0, head()}
"""

# ARGV: incarnation, step. Raises the high water of that incarnation (recording the chain it is served
# under); returns the head found before.
_MARK_SERVED = _HEAD + """
local found = head()
local served = hw()
if found[1] == ARGV[1] and found[3] and served ~= nil and tonumber(ARGV[2]) > served then
  redis.call('SET', KEYS[4], ARGV[2])
  redis.call('SET', KEYS[6], found[3])
end
return found
"""

# ARGV: incarnation, min_high_water, expected chain before the first missing entry, then (json, chain)
# pairs of the missing entries. Appends them iff the log ends on that chain; raises the high water. Either
# write records the caller's chain (the last one given) as the one the served steps belong to.
_RESTORE = _HEAD + """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if #ARGV > 3 and redis.call('GET', KEYS[3]) == ARGV[3] then
    for i = 4, #ARGV, 2 do redis.call('RPUSH', KEYS[2], ARGV[i]) end
    redis.call('SET', KEYS[3], ARGV[#ARGV])
    redis.call('SET', KEYS[6], ARGV[#ARGV])
  end
  local served = hw()
  if served ~= nil and tonumber(ARGV[2]) > served then
    redis.call('SET', KEYS[4], ARGV[2])
    redis.call('SET', KEYS[6], ARGV[#ARGV])
  end
end
return head()
"""


def redact_url(url: str) -> str:
    """The URL with its password masked, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def connect(url: str, timeout: float, retries: int) -> redis.Redis | RedisCluster:
    """A client for one Redis (``redis://``, ``rediss://``, ``unix://``) or a Redis Cluster
    (``redis+cluster://host:port[,host:port...]``: any reachable nodes; the rest are discovered)."""
    common: dict[str, Any] = {"decode_responses": True, "socket_timeout": timeout,
                              "socket_connect_timeout": timeout,
                              "retry": Retry(EqualJitterBackoff(cap=0.5, base=0.05), retries)}
    if not url.startswith(CLUSTER_SCHEMES):
        return redis.Redis.from_url(url, health_check_interval=30, **common,
                                    retry_on_error=[redis.ConnectionError, redis.TimeoutError])
    parts = urlsplit(url.replace("+cluster", "", 1))
    nodes = []
    for host in parts.netloc.rpartition("@")[2].split(","):
        name, _, port = host.rpartition(":") if ":" in host else (host, "", "6379")
        nodes.append(ClusterNode(name, int(port)))
    return RedisCluster(startup_nodes=nodes, username=parts.username, password=parts.password,
                        ssl=parts.scheme == "rediss", **common)


def _job_key(job_id: str, field: str) -> str:
    return f"{KEY_PREFIX}:{{{job_id}}}:{field}"


def _keys(job_id: str) -> list[str]:
    return [_job_key(job_id, f) for f in FIELDS]


def _to_head(job_id: str, raw: list[Any], where: str) -> JobHead:
    incarnation, version, chain, high_water, trained, _ = raw
    if not incarnation and not version and chain is None and high_water is None and trained is None:
        raise NotFound(f"unknown job {job_id!r}")
    return JobHead.decode(job_id, raw, where)


class RedisStore(StateStore):
    """Redis-backed store; thread-safe (redis-py pools connections), shareable by any number of replicas."""

    def __init__(self, url: str, socket_timeout: float = SOCKET_TIMEOUT_S,
                 limits: StoreLimits | None = None) -> None:
        self._url = redact_url(url)
        self.limits = limits or StoreLimits()
        self._client = connect(url, socket_timeout, RETRY_ATTEMPTS)
        self._raw_url = url
        self._reserve_job = self._client.register_script(_RESERVE_JOB)
        self._create_job = self._client.register_script(_CREATE_JOB)
        self._versions = self._client.register_script(_VERSIONS)
        self._read_head = self._client.register_script(_READ_HEAD)
        self._commit = self._client.register_script(_COMMIT_VERSION)
        self._mark_served = self._client.register_script(_MARK_SERVED)
        self._restore = self._client.register_script(_RESTORE)
        logger.info("redis store opened", extra={"url": self._url})

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        """Turn every way of not reaching Redis (down, slow, failed over to a replica) into one error."""
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError,
                redis.exceptions.ClusterError, redis.exceptions.RedisClusterException) as exc:
            raise StoreUnavailable(f"redis at {self._url} is unavailable: {exc}") from exc
        except redis.ResponseError as exc:
            if "WRONGTYPE" in str(exc):  # a key of the job was overwritten with another type by hand
                raise CorruptData(f"redis at {self._url}: a key has the wrong type: {exc}") from exc
            raise StoreUnavailable(f"redis at {self._url} refused the command: {exc}") from exc

    def _insert_job(self, job_id: str, config_json: str, incarnation: str, first: ScheduleVersion) -> bool:
        first_json = to_json(first.to_dict(), "schedule version")
        with self._reachable():
            if self._reserve_job(keys=[JOBS_KEY], args=[job_id, self.limits.max_jobs]) == -2:
                raise job_limit_error(self.limits)
            created, *stored = self._create_job(keys=_keys(job_id) + [_job_key(job_id, "config")],
                                                args=[config_json, first_json, incarnation, first.chain])
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

    def head(self, job_id: str) -> JobHead:
        check_job_id(job_id)
        with self._reachable():
            return _to_head(job_id, self._read_head(keys=_keys(job_id)), self._url)

    def versions(self, job_id: str, after: int = 0) -> list[ScheduleVersion]:
        check_job_id(job_id)
        with self._reachable():
            exists, entries = self._versions(keys=_keys(job_id)[:2], args=[after])
        if not exists:
            raise NotFound(f"unknown job {job_id!r}")
        return [decode_version(entry, f"{self._url} job {job_id!r}") for entry in entries]

    def _commit_version(self, job_id: str, incarnation: str, previous_chain: str, new: ScheduleVersion,
                        max_high_water: int) -> JobHead | None:
        new_json = to_json(new.to_dict(), "schedule version")
        args: list[str | int] = [incarnation, new.version, max_high_water + 1, new_json, previous_chain,
                                 new.chain]
        with self._reachable():
            outcome = self._commit(keys=_keys(job_id), args=args)
        return None if outcome[0] == 1 else _to_head(job_id, outcome[1], self._url)

    def restore(self, job_id: str, incarnation: str, previous_chain: str, missing: Sequence[ScheduleVersion],
                min_high_water: int) -> JobHead:
        check_job_id(job_id)
        args: list[str | int] = [incarnation, min_high_water, previous_chain]
        for version in missing:
            args += [to_json(version.to_dict(), "schedule version"), version.chain]
        with self._reachable():
            return _to_head(job_id, self._restore(keys=_keys(job_id), args=args), self._url)

    def mark_served(self, job_id: str, step: int, incarnation: str) -> JobHead:
        check_job_id(job_id)
        STEP.check(step)
        with self._reachable():
            raw = self._mark_served(keys=_keys(job_id), args=[incarnation, step])
        return _to_head(job_id, raw, self._url)

    def set_trained_step(self, job_id: str, step: int) -> None:
        check_job_id(job_id)
        TRAINED_STEP.check(step)
        with self._reachable():
            # XX: only overwrite the key create_job made, so an unknown job is reported, not created.
            updated = self._client.set(_job_key(job_id, "trained"), step, xx=True)
        if not updated:
            raise NotFound(f"unknown job {job_id!r}")

    def ping(self, timeout: float | None = None) -> None:
        if timeout is None:
            with self._reachable():
                self._client.ping()
            return
        # A separate short-lived connection without retries: a hung Redis must fail the probe in time.
        with self._reachable():
            probe = connect(self._raw_url, timeout, 0)  # a cluster client connects here, to learn its slots
            try:
                probe.ping()
            finally:
                probe.close()

    def close(self) -> None:
        self._client.close()
