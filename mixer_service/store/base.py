"""The state-store contract: jobs, the append-only, hash-chained schedule log and serving progress.

Both implementations (embedded SQLite, Redis) keep the same invariants, and the only schedule-change
algorithm lives here so they cannot drift apart:

* every job has an *incarnation*: a random id fixed at creation, so a job deleted and recreated under the
  same id is a different job, and every write names the incarnation it means;
* the schedule log is append-only with consecutive versions 1, 2, 3, ...; version ``v`` carries
  ``chain = sha256(chain(v - 1) + canonical JSON of v)`` with ``chain(0) = incarnation``, so a replica can
  prove that the log it holds is a prefix of the store's (or that it is not);
* version 1 carries ``config_sha256``, the hash of the canonical job config, so the chain commits to
  everything that decides a batch's bytes: an edited config fails verification like an edited version
  (logs created before this field have none and are reported as legacy, see docs/reliability.md);
* a version's ``effective_step`` is greater than the served high water at the instant it is committed;
* the head names ``served_chain``, the chain of the latest version when the high water last rose, so a
  replica that never saw the job still proves that no version after it takes effect at a served step.

Together with ``mark_served`` returning the job's head in the same atomic step as it raises the high water,
a step served under version ``v`` can never be affected by a version ``> v``: schedule changes never
rewrite history, across threads, processes and replicas.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from types import TracebackType
from typing import Any

from mixer_contract.canonical import canonical_json, config_digest
from mixer_contract.errors import Conflict, CorruptData, InvalidInput, StaleVersion
from mixer_contract.job import JOB_ID_PATTERN
from mixer_contract.values import VERSION

logger = logging.getLogger(__name__)

INCARNATION_PATTERN = re.compile(r"^[0-9a-f]{32}$")
CHAIN_PATTERN = re.compile(r"^[0-9a-f]{64}$")

# The high water moves once per training step, so a change only loses the commit race when a step is
# served between reading the head and committing; a handful of attempts is plenty even at many steps/s.
MAX_COMMIT_ATTEMPTS = 8


@dataclass(frozen=True)
class StoreLimits:
    """Caps that keep every request's work bounded (each is a clear 409 when reached)."""

    max_jobs: int = 1000
    max_versions: int = 1000


@dataclass(frozen=True)
class ScheduleVersion:
    """One entry of a job's schedule log: ``schedule`` applies from ``effective_step`` on."""

    version: int
    effective_step: int
    schedule: dict[str, Any]
    time: float
    author: str
    reason: str
    chain: str = ""  # sha256 over the previous chain and this entry (see the module docstring)
    config_sha256: str = ""  # version 1 only: the job config the log was created with

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        if not self.config_sha256:
            del body["config_sha256"]  # entries without it keep the bytes (and chains) they were sealed with
        return body

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
            chain=str(data.get("chain", "")),
            config_sha256=str(data.get("config_sha256", "")),
        )

    def link(self, previous_chain: str) -> str:
        """This entry's chain hash when it follows an entry whose chain is ``previous_chain``."""
        body = {k: v for k, v in self.to_dict().items() if k != "chain"}
        return hashlib.sha256((previous_chain + canonical_json(body)).encode()).hexdigest()

    def sealed(self, previous_chain: str) -> ScheduleVersion:
        return replace(self, chain=self.link(previous_chain))


def verify_chain(previous_chain: str, versions: Sequence[ScheduleVersion]) -> bool:
    """Whether ``versions`` link one by one onto ``previous_chain`` (the incarnation for version 1)."""
    for version in versions:
        if version.link(previous_chain) != version.chain:
            return False
        previous_chain = version.chain
    return True


@dataclass(frozen=True)
class JobHead:
    """Everything a request must know to prove its view of a job current, read in one atomic step."""

    incarnation: str
    version: int
    chain: str  # chain hash of the latest version
    served_high_water: int
    trained_step: int
    served_chain: str = ""  # chain of the latest version when the high water last rose ("" if unknown)

    @classmethod
    def decode(cls, job_id: str, fields: Sequence[Any], where: str) -> JobHead:
        """A head from the store's raw fields, each checked: a damaged field is ``CorruptData`` (a 503 for
        that job only), never an exception that turns into a 500 for every job."""
        incarnation, version, chain, high_water, trained, served_chain = fields
        problems = []
        if not isinstance(incarnation, str) or not INCARNATION_PATTERN.fullmatch(incarnation):
            problems.append(f"incarnation {incarnation!r}")
        if not isinstance(chain, str) or not CHAIN_PATTERN.fullmatch(chain):
            problems.append(f"chain {chain!r}")
        if served_chain is None:
            served_chain = ""
        if not isinstance(served_chain, str) or served_chain and not CHAIN_PATTERN.fullmatch(served_chain):
            problems.append(f"served chain {served_chain!r}")
        numbers = []
        for name, value, low in (("version", version, 1), ("served high water", high_water, -1),
                                 ("trained step", trained, -1)):
            number = _as_int(value)
            if number is None or number < low:
                problems.append(f"{name} {value!r}")
            numbers.append(number)
        if problems:
            raise CorruptData(f"job {job_id!r} in {where} has malformed fields: {', '.join(problems)}")
        return cls(incarnation, numbers[0], chain, numbers[1], numbers[2], served_chain)


def _as_int(value: Any) -> int | None:
    """An integer stored as int or decimal text, or None; bools and floats are not step numbers."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,18}", value):
        return int(value)
    return None


def new_incarnation() -> str:
    return secrets.token_hex(16)


def job_limit_error(limits: StoreLimits) -> Conflict:
    return Conflict(f"this server holds its limit of {limits.max_jobs} jobs; raise --max-jobs or remove jobs")


def to_json(value: dict[str, Any], what: str) -> str:
    """Serialize canonically so equal values give equal bytes in every backend."""
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(value).__name__}")
    try:
        return canonical_json(value)
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


@dataclass(frozen=True)
class ChangePlan:
    """Where a schedule change takes effect, and the highest served step under which that is still safe."""

    effective_step: int
    max_high_water: int


class StateStore(ABC):
    """Where jobs, schedule logs and serving progress live; shared by every replica serving a job.

    Unknown jobs raise ``NotFound``, malformed arguments ``InvalidInput``, an unreachable backend
    ``StoreUnavailable``, a reached limit ``Conflict``.
    """

    limits: StoreLimits = StoreLimits()

    @abstractmethod
    def get_job(self, job_id: str) -> dict[str, Any]:
        """The job's config as given to ``create_job``."""

    @abstractmethod
    def list_jobs(self) -> list[str]:
        """All job ids, sorted."""

    @abstractmethod
    def head(self, job_id: str) -> JobHead:
        """Incarnation, latest version and chain, served high water and trained step, read atomically."""

    @abstractmethod
    def versions(self, job_id: str, after: int = 0) -> list[ScheduleVersion]:
        """The schedule versions numbered above ``after``, oldest first (all of them for ``after=0``)."""

    @abstractmethod
    def mark_served(self, job_id: str, step: int, incarnation: str) -> JobHead:
        """Raise the served high water to at least ``step`` and return the head, atomically.

        The head is the one this call found, before it raised the high water: a replica compares that
        with what it has seen to notice a store that lost steps (the high water is now ``max(it, step)``).

        Nothing is written unless the job's incarnation is ``incarnation`` (a recreated job is another
        job). When the high water rises, the served chain becomes the latest version's chain. Because
        every later version takes effect after the high water at its commit, the returned version is final
        for ``step``: the serve path may plan the batch from the first ``v`` log entries.
        """

    @abstractmethod
    def set_trained_step(self, job_id: str, step: int) -> None:
        """Record the trainer's progress; may go down when a job resumes from an older checkpoint."""

    @abstractmethod
    def ping(self, timeout: float | None = None) -> None:
        """Raise ``StoreUnavailable`` unless the backend answers within ``timeout`` (readiness probes)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; the store must not be used afterwards."""

    @abstractmethod
    def _insert_job(self, job_id: str, config_json: str, incarnation: str, first: ScheduleVersion) -> bool:
        """Store config, incarnation and first version atomically iff the job does not exist and fewer than
        ``limits.max_jobs`` jobs do; returns whether it was created (``Conflict`` when the limit is hit)."""

    @abstractmethod
    def _commit_version(self, job_id: str, incarnation: str, previous_chain: str, new: ScheduleVersion,
                        max_high_water: int) -> JobHead | None:
        """Append ``new`` atomically iff the job is still ``incarnation``, its log ends at ``new.version - 1``
        with ``previous_chain`` (which ``new`` links onto), and the served high water is at most
        ``max_high_water``.

        Returns None when committed (or already committed by a retry of this call), else the head that was
        observed and blocked the commit.
        """

    @abstractmethod
    def restore(self, job_id: str, incarnation: str, previous_chain: str, missing: Sequence[ScheduleVersion],
                min_high_water: int) -> JobHead:
        """Put back state the store lost but a replica holds, and return the head afterwards.

        ``missing`` (possibly empty; verified by the caller to link onto ``previous_chain``) is appended iff
        the store's log ends with ``previous_chain``; the high water is raised to ``min_high_water``. Either
        write makes the served chain the caller's (``missing[-1].chain``, else ``previous_chain``): the
        replica vouches that the served steps belong to its log (a step "served" while the store was behind
        was refused by the replica that raised the high water). Both only for the same incarnation.
        Raising the high water never changes a batch; re-appending verified versions restores history.
        """

    # -- derived operations: one implementation for every backend ----------------------------------

    def schedule_log(self, job_id: str) -> list[ScheduleVersion]:
        """Every schedule version of the job, oldest first."""
        return self.versions(job_id)

    def served_high_water(self, job_id: str) -> int:
        """The highest step ever passed to ``mark_served`` (-1 if none)."""
        return self.head(job_id).served_high_water

    def trained_step(self, job_id: str) -> int:
        """The last step passed to ``set_trained_step`` (-1 if none)."""
        return self.head(job_id).trained_step

    def create_job(
        self, job_id: str, config: dict[str, Any], schedule: dict[str, Any], author: str, reason: str
    ) -> tuple[ScheduleVersion, str]:
        """Store the config and schedule version 1 (effective at step 0) under a new incarnation.

        Returns the sealed first version and the incarnation; ``Conflict`` if the id is taken.
        """
        check_job_id(job_id)
        config_json = to_json(config, "job config")
        to_json(schedule, "schedule")
        incarnation = new_incarnation()
        first = ScheduleVersion(1, 0, schedule, time.time(), author, reason,
                                config_sha256=config_digest(config_json)).sealed(incarnation)
        if not self._insert_job(job_id, config_json, incarnation, first):
            raise Conflict(f"job {job_id!r} already exists")
        logger.info("job created", extra={"job_id": job_id, "author": author, "incarnation": incarnation})
        return first, incarnation

    def change_schedule(
        self,
        job_id: str,
        incarnation: str,
        expected: ScheduleVersion,
        schedule: dict[str, Any],
        author: str,
        reason: str,
        plan: Callable[[int], ChangePlan],
    ) -> ScheduleVersion:
        """Append a schedule version after ``expected``, where ``plan(served high water)`` says.

        Optimistic concurrency: ``StaleVersion`` unless the log still ends at ``expected`` (same version and
        chain) of the same incarnation, so of N concurrent callers with the same expectation exactly one
        wins. ``plan`` owns the effective-step rule; it runs before the commit and outside any lock (it may
        be slow), and again with the fresh high water whenever serving moved past its bound; overtaken
        twice, it plans as if serving were twice as far past the last bound again (trainers that overtake
        every attempt, 8 steps a request to a store slow under load, would win all of them), so a change as
        soon as possible lands. If it raises, nothing changes. The commit is atomic with ``max_high_water``.
        """
        check_job_id(job_id)
        VERSION.check(expected.version, "expected version")
        to_json(schedule, "schedule")
        head = self.head(job_id)
        lead = 0
        for attempt in range(MAX_COMMIT_ATTEMPTS):
            _raise_if_stale(job_id, head, incarnation, expected)
            if head.version >= self.limits.max_versions:
                raise Conflict(f"job {job_id!r} has reached the limit of {self.limits.max_versions} "
                               "schedule versions")
            planned = plan(head.served_high_water + lead)
            if planned.max_high_water >= planned.effective_step:
                raise AssertionError(f"a change plan must keep its bound below its effective step: {planned}")
            new = ScheduleVersion(
                expected.version + 1, planned.effective_step, schedule, time.time(), author, reason
            ).sealed(expected.chain)
            blocked = self._commit_version(job_id, incarnation, expected.chain, new, planned.max_high_water)
            if blocked is None:
                logger.info(
                    "schedule changed",
                    extra={"job_id": job_id, "version": new.version, "effective_step": new.effective_step,
                           "author": author},
                )
                return new
            logger.debug(
                "schedule commit retried: steps were served past the bound",
                extra={"job_id": job_id, "bound": planned.max_high_water,
                       "high_water": blocked.served_high_water},
            )
            if attempt >= 1:
                lead = 2 * max(0, blocked.served_high_water - planned.max_high_water)
            head = blocked
        _raise_if_stale(job_id, head, incarnation, expected)
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


def check_job_id(job_id: str) -> str:
    """Reject ids that could collide in key layouts or paths before they reach a backend."""
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.fullmatch(job_id):
        raise InvalidInput(f"job id {job_id!r} must match {JOB_ID_PATTERN.pattern}")
    return job_id


def _raise_if_stale(job_id: str, head: JobHead, incarnation: str, expected: ScheduleVersion) -> None:
    if head.incarnation != incarnation:
        raise StaleVersion(f"job {job_id!r} was recreated (incarnation {head.incarnation}, "
                           f"not {incarnation})")
    if head.version != expected.version:
        raise StaleVersion(f"job {job_id!r} is at schedule version {head.version}, not {expected.version}")
    if head.chain != expected.chain:
        raise StaleVersion(f"job {job_id!r}: schedule version {head.version} is not the one expected")
