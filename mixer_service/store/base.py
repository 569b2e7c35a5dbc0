"""The state-store contract: jobs, the append-only schedule log and serving progress.

Both implementations (embedded SQLite, Redis) keep the same two invariants, and the only schedule-change
algorithm lives here so they cannot drift apart:

* the schedule log is append-only with consecutive versions 1, 2, 3, ...;
* a version's ``effective_step`` is greater than the served high water at the instant it is committed.

Together with ``mark_served`` returning the latest version in the same atomic step as it raises the high
water, this means a step served under version ``v`` can never be affected by a version ``> v``: schedule
changes never rewrite history, across threads, processes and replicas.
"""

from __future__ import annotations

import json
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

from mixer_service.errors import Conflict, CorruptData, InvalidInput, StaleVersion

logger = logging.getLogger(__name__)

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# The high water moves once per training step, so a change only loses the commit race when a step is
# served between reading the head and committing; a handful of attempts is plenty even at many steps/s.
MAX_COMMIT_ATTEMPTS = 8


@dataclass(frozen=True)
class ScheduleVersion:
    """One entry of a job's schedule log: ``schedule`` applies from ``effective_step`` on."""

    version: int
    effective_step: int
    schedule: dict[str, Any]
    time: float
    author: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScheduleVersion:
        """Rebuild a version from ``to_dict`` output; raises KeyError/TypeError/ValueError if malformed."""
        schedule = data["schedule"]
        if not isinstance(schedule, dict):
            raise TypeError(f"schedule must be an object, got {type(schedule).__name__}")
        return cls(
            version=int(data["version"]),
            effective_step=int(data["effective_step"]),
            schedule=schedule,
            time=float(data["time"]),
            author=str(data["author"]),
            reason=str(data["reason"]),
        )


@dataclass(frozen=True)
class Head:
    """The two numbers a schedule change depends on, read together."""

    version: int
    served_high_water: int


def check_job_id(job_id: str) -> str:
    """Reject ids that could collide in key layouts or paths before they reach a backend."""
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.fullmatch(job_id):
        raise InvalidInput(f"job id {job_id!r} must match {JOB_ID_PATTERN.pattern}")
    return job_id


def check_int(value: int, name: str, minimum: int = 0) -> int:
    """Steps and versions arrive from JSON and query strings; bools and floats are not integers here."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInput(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def to_json(value: dict[str, Any], what: str) -> str:
    """Serialize canonically (sorted keys) so equal values give equal bytes in every backend."""
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{what} is not JSON-serializable: {exc}") from exc


def decode_version(raw: str | bytes, where: str) -> ScheduleVersion:
    """Parse a stored version; anything unreadable means the store itself is damaged."""
    try:
        return ScheduleVersion.from_dict(json.loads(raw))
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptData(f"unreadable schedule version in {where}: {exc}") from exc


def decode_config(raw: str | bytes, where: str) -> dict[str, Any]:
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise CorruptData(f"unreadable job config in {where}: {exc}") from exc
    if not isinstance(config, dict):
        raise CorruptData(f"job config in {where} is not a JSON object")
    return config


def _raise_if_stale(job_id: str, head: Head, expected_version: int) -> None:
    if head.version != expected_version:
        raise StaleVersion(f"job {job_id!r} is at schedule version {head.version}, not {expected_version}")


class StateStore(ABC):
    """Where jobs, schedule logs and serving progress live; shared by every replica serving a job.

    Unknown jobs raise ``NotFound``, malformed arguments ``InvalidInput``, an unreachable backend
    ``StoreUnavailable``.
    """

    @abstractmethod
    def get_job(self, job_id: str) -> dict[str, Any]:
        """The job's config as given to ``create_job``."""

    @abstractmethod
    def list_jobs(self) -> list[str]:
        """All job ids, sorted."""

    @abstractmethod
    def schedule_log(self, job_id: str) -> list[ScheduleVersion]:
        """Every schedule version of the job, oldest first."""

    @abstractmethod
    def mark_served(self, job_id: str, step: int) -> int:
        """Raise the served high water to at least ``step`` and return the latest version, atomically.

        Because every later version takes effect after the high water at its commit, the returned version
        is final for ``step``: the serve path may plan the batch from the first ``v`` log entries.
        """

    @abstractmethod
    def served_high_water(self, job_id: str) -> int:
        """The highest step ever passed to ``mark_served`` (-1 if none)."""

    @abstractmethod
    def set_trained_step(self, job_id: str, step: int) -> None:
        """Record the trainer's progress; may go down when a job resumes from an older checkpoint."""

    @abstractmethod
    def trained_step(self, job_id: str) -> int:
        """The last step passed to ``set_trained_step`` (-1 if none)."""

    @abstractmethod
    def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the backend answers (for readiness probes)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; the store must not be used afterwards."""

    @abstractmethod
    def _insert_job(self, job_id: str, config_json: str, first: ScheduleVersion) -> bool:
        """Store config and first version atomically iff the job does not exist; returns whether it did."""

    @abstractmethod
    def _head(self, job_id: str) -> Head:
        """Read the current version and served high water consistently (``NotFound`` if unknown)."""

    @abstractmethod
    def _commit_version(self, job_id: str, new: ScheduleVersion, max_high_water: int) -> Head | None:
        """Append ``new`` atomically iff the log ends at ``new.version - 1`` and the served high water is
        at most ``max_high_water`` (itself at most ``new.effective_step - 1``).

        Returns None when committed, else the head that was observed and blocked the commit.
        """

    def create_job(
        self, job_id: str, config: dict[str, Any], schedule: dict[str, Any], author: str, reason: str
    ) -> ScheduleVersion:
        """Atomically store the config and schedule version 1 (effective at step 0); ``Conflict`` if taken."""
        check_job_id(job_id)
        config_json = to_json(config, "job config")
        to_json(schedule, "schedule")
        first = ScheduleVersion(1, 0, schedule, time.time(), author, reason)
        if not self._insert_job(job_id, config_json, first):
            raise Conflict(f"job {job_id!r} already exists")
        logger.info("job created", extra={"job_id": job_id, "author": author})
        return first

    def change_schedule(
        self,
        job_id: str,
        expected_version: int,
        requested_step: int,
        schedule: dict[str, Any],
        author: str,
        reason: str,
        validate: Callable[[int], int | None],
    ) -> ScheduleVersion:
        """Append a schedule version effective at ``max(requested_step, served high water + 1)``.

        Optimistic concurrency: ``StaleVersion`` unless the log still ends at ``expected_version``, so of N
        concurrent callers with the same expectation exactly one wins. ``validate(effective_step)`` runs
        before the commit and outside any lock (it may be slow); if it raises, nothing changes. It may return
        the highest served step under which that effective step is still safe (default: effective - 1); the
        commit is atomic with that bound. When the high water moved past it, the step is recomputed and
        validated again.
        """
        check_job_id(job_id)
        check_int(requested_step, "requested step")
        check_int(expected_version, "expected version", minimum=1)
        to_json(schedule, "schedule")
        head = self._head(job_id)
        for _ in range(MAX_COMMIT_ATTEMPTS):
            _raise_if_stale(job_id, head, expected_version)
            effective = max(requested_step, head.served_high_water + 1)
            bound = validate(effective)
            max_high_water = effective - 1 if bound is None else min(bound, effective - 1)
            new = ScheduleVersion(expected_version + 1, effective, schedule, time.time(), author, reason)
            blocked = self._commit_version(job_id, new, max_high_water)
            if blocked is None:
                logger.info(
                    "schedule changed",
                    extra={
                        "job_id": job_id,
                        "version": new.version,
                        "requested_step": requested_step,
                        "effective_step": effective,
                        "author": author,
                    },
                )
                return new
            logger.debug(
                "schedule commit retried: steps were served past the effective step",
                extra={
                    "job_id": job_id,
                    "effective_step": effective,
                    "high_water": blocked.served_high_water,
                },
            )
            head = blocked
        _raise_if_stale(job_id, head, expected_version)
        raise Conflict(
            f"job {job_id!r}: steps were served past the effective step {MAX_COMMIT_ATTEMPTS} times in a row "
            f"while committing the schedule change; retry, or request a later step"
        )

    def __enter__(self) -> StateStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
