"""Jobs as the service sees them: fresh views of the store, proven current, or a loud 503.

Replicas (and ``--workers`` processes) share nothing but the store. Every request reads the job's head
(incarnation, latest version and its chain hash, served high water, trained step) in one store round trip;
the serve path gets it from the same atomic operation that raises the high water. Batch requests for one
job that are waiting at the same moment share that operation (``SharedHeadRead``): the first of them to
start makes it for the highest step of the group, so every request still gets a head read *after* it
arrived (a change committed before a request arrived is always seen by it), but a queue of N requests costs
one store round trip, not N. This process then checks the head against everything it has seen before:

* a version it has not seen: fetch only the new log entries and verify that they chain onto its own;
* the same or an older version of the same chain, read before it learned of the newer one: fine;
* anything that shows the store has *lost* state this process saw after the read started — the job gone,
  another incarnation, fewer versions, a lower served high water, or a log that does not chain — is a
  fault: the request is answered 503 naming it (``StoreBehind``), it is counted, and nothing is served
  from a log that cannot be proven current. Lost versions and a lost high water are put back from what
  this process holds (a verified prefix of history), so the next request succeeds; a recreated job stays
  refused until the replica is restarted, because only an operator can say which incarnation is right.

History is append-only, proven two ways (``history_conflict`` when either fails):

* per process: a new version may not take effect at or before a step this process already saw served
  under the log without it (a store restored from a backup can accept such a change: the replicas that
  served those steps are the only ones who remember them);
* per store: no version after the one the high water was last raised under (the head's served chain)
  may take effect at or before the high water — a hand-appended or replayed version is refused by a
  replica that never saw the job before, too.

The chain starts from the incarnation and version 1 commits to the job config (``config_sha256``), so an
edited config is a broken chain on every replica that loads it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mixer_contract.canonical import canonical_json, config_digest
from mixer_contract.errors import (
    Conflict,
    CorruptData,
    InvalidInput,
    MixerError,
    NotFound,
    SourceUnavailable,
    StaleVersion,
    StoreBehind,
    StoreUnavailable,
    TooLarge,
)
from mixer_contract.job import JobConfig
from mixer_contract.schedule import Schedule
from mixer_contract.values import STEP, RankSlice, check_step, check_trained_step
from mixer_service.engine import MixingEngine, ScheduleLog
from mixer_service.engine.mixture import UNBOUNDED_HORIZON
from mixer_service.service.source_registry import SourceRegistry
from mixer_service.store import ScheduleVersion, StateStore
from mixer_service.store.base import ChangePlan, JobHead, verify_chain

logger = logging.getLogger(__name__)

WATCH_RECENT_S = 3600.0  # jobs served this recently are re-checked by the high-water watch

LEGACY_WARNING = ("this job was created before its log committed to its config: an edit of the stored config "
                  "would go unnoticed; recreate it to get that check (docs/reliability.md)")

FAULTS = ("job_missing", "incarnation_changed", "version_rollback", "high_water_rollback", "chain_broken",
          "history_conflict")


@dataclass(frozen=True)
class JobRuntime:
    """One incarnation of a job under a verified prefix of its schedule log."""

    job_id: str
    config: JobConfig
    incarnation: str
    versions: tuple[ScheduleVersion, ...]
    schedule_log: ScheduleLog
    engine: MixingEngine
    legacy: bool = False  # created before version 1 committed to the config: config edits go unnoticed

    @property
    def version(self) -> int:
        return self.versions[-1].version

    @property
    def chain(self) -> str:
        return self.versions[-1].chain

    @property
    def current(self) -> ScheduleVersion:
        return self.versions[-1]

    def etag(self) -> str:
        return etag(self.version, self.incarnation)

    def log_pin(self, step: int) -> dict[str, Any]:
        """What a batch header says of the log that decides ``step``: ``log_chain``, the chain hash through
        the version governing it, and ``log_since``, the step that version took effect at.

        Versions appended later take effect after every served step, so for a served step neither ever
        changes, and every step from ``log_since`` on has the same chain until the next version: a client
        that sees another chain for a step it has, or for a step in ``[log_since, step)``, saw history
        rewritten (``client.history``)."""
        version = self.versions[self.engine.version_at(step) - 1]
        return {"log_chain": version.chain, "log_since": self.engine.active_since(step)}

    def extended(self, new: list[ScheduleVersion], engine: MixingEngine | None = None) -> JobRuntime:
        """This runtime with ``new`` appended; only the new entries are parsed (O(1) in history length)."""
        names = self.config.source_names
        longer = self.schedule_log + [(v.effective_step, Schedule.parse(v.schedule, names)) for v in new]
        return JobRuntime(self.job_id, self.config, self.incarnation, self.versions + tuple(new), longer,
                          engine or self.engine.with_log(longer), self.legacy)


@dataclass(frozen=True)
class JobView:
    """A job as of one store read: the runtime proven current and the head that proved it."""

    runtime: JobRuntime
    head: JobHead


@dataclass
class _Seen:
    """The most this process has learned about a job, and when (monotonic seconds) it learned it."""

    incarnation: str
    version: int
    high_water: int
    version_at: float = field(default_factory=time.monotonic)
    high_water_at: float = field(default_factory=time.monotonic)
    # version -> highest step seen served while the log ended at that version (bounded by max_versions)
    served_under: dict[int, int] = field(default_factory=dict)

    def served_before(self, version: int) -> tuple[int, int]:
        """The highest step seen served under a log without ``version``, and that log's version."""
        return max(((hw, v) for v, hw in self.served_under.items() if v < version), default=(-1, 0))


class SharedHeadRead:
    """One ``mark_served`` round trip shared by the batch requests of one job that arrived before it started.

    Requests join on arrival (``JobManager.admit``); the first member to reach ``JobManager.serve`` closes
    the group (later arrivals open a new one) and marks the highest step any member asked for, so the head
    it returns was read after every member arrived, and the high water covers every member's step. The
    others wait for it (they start after it did; the wait is at most one store round trip)."""

    __slots__ = ("runtime", "steps", "closed", "done", "view", "error")

    def __init__(self, runtime: JobRuntime, step: int) -> None:
        self.runtime = runtime  # the one held when the group opened: its incarnation is the one marked
        self.steps = [step]  # each waiting member's step; one that leaves before the read takes its step out
        self.closed = False
        self.done: threading.Event | None = None  # made when a second member joins (one request: no wait)
        self.view: JobView | None = None
        self.error: BaseException | None = None


def safe_high_water(engine: MixingEngine, effective: int) -> int:
    """The highest served step that a version taking effect at ``effective`` leaves unchanged: below it, and
    lower with 3+ sources, whose served steps depend on a few upcoming weights (the commit's own bound)."""
    return min(engine.last_safe_high_water(effective), effective - 1)


def etag(version: int, incarnation: str) -> str:
    """Strong ETag of a schedule version: the incarnation makes a recreated job's v1 another entity."""
    return f'"v{version}.{incarnation}"'


class JobManager:
    def __init__(self, store: StateStore, sources: SourceRegistry,
                 on_fault: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.sources = sources
        self._on_fault = on_fault or (lambda fault: None)
        self._jobs: dict[str, JobRuntime] = {}
        self._seen: dict[str, _Seen] = {}
        self._open_reads: dict[str, SharedHeadRead] = {}  # job -> the group new arrivals join
        self._lock = threading.Lock()

    # -- reading -----------------------------------------------------------------------------------

    def view(self, job_id: str) -> JobView:
        """The job as the store has it now, checked against everything this process has seen."""
        started = time.monotonic()
        try:
            head = self.store.head(job_id)
        except NotFound:
            self._missing(job_id, started)
            raise
        return JobView(self._reconcile(job_id, head, started), head)

    def admit(self, job_id: str, step: int, rank: int, world: int, max_tokens: int,
              steps: int = 1) -> SharedHeadRead | None:
        """On a batch request's arrival (for ``steps`` steps from ``step``): check it against the runtime
        held and join the job's open shared head read with its last step (None when this process holds no
        runtime yet: ``serve`` then reads alone)."""
        runtime = self._jobs.get(job_id)
        if runtime is None:
            return None
        last = self._check_request(runtime.config, step, rank, world, max_tokens, steps)[1]
        with self._lock:
            group = self._open_reads.get(job_id)
            if group is None or group.runtime.incarnation != runtime.incarnation:
                group = self._open_reads[job_id] = SharedHeadRead(runtime, last)
            else:
                group.steps.append(last)
                if group.done is None:
                    group.done = threading.Event()
        return group

    def serve(self, job_id: str, step: int, rank: int, world: int, max_tokens: int,
              group: SharedHeadRead | None = None, steps: int = 1) -> tuple[JobView, RankSlice]:
        """Validate a batch request for ``steps`` steps from ``step``, mark its last step served, and return
        the runtime that plans them all; ``group`` (from ``admit``) shares the store round trip with the
        requests that arrived with this one."""
        if group is not None:  # checked by ``admit`` against the same incarnation's config
            view = self._shared_mark(job_id, group)
            return view, RankSlice.of(rank, world, view.runtime.config.global_batch)
        runtime = self._jobs.get(job_id) or self.view(job_id).runtime
        ranks, last = self._check_request(runtime.config, step, rank, world, max_tokens, steps)
        return self._mark(job_id, last, runtime), ranks

    @staticmethod
    def _check_request(config: JobConfig, step: int, rank: int, world: int, max_tokens: int,
                       steps: int = 1) -> tuple[RankSlice, int]:
        """The rank's slice and the request's last step, or the error that refuses it."""
        check_step(step, config.total_steps)
        last = step + steps - 1
        if last >= config.total_steps:
            raise InvalidInput(f"steps: {steps} steps from step {step} run past the job's last step "
                               f"{config.total_steps - 1}")
        ranks = RankSlice.of(rank, world, config.global_batch)
        tokens = config.global_batch // ranks.world * config.seq_len * steps
        if tokens > max_tokens:
            many = f"{steps} steps of " if steps > 1 else ""
            raise TooLarge(f"rank {rank} of {world} asks for {many}{tokens // steps} tokens; this server "
                           f"answers at most {max_tokens} per request (--max-request-tokens): use a larger "
                           "world" + (" or fewer steps per request" if steps > 1 else ""))
        return ranks, last

    def leave(self, job_id: str, group: SharedHeadRead, step: int) -> None:
        """A request that will not be served after all (cancelled while it waited for a batch thread) takes
        its (last) step out of its group, so the group's read does not mark it served."""
        with self._lock:
            if group.closed:
                return
            group.steps.remove(step)
            if not group.steps and self._open_reads.get(job_id) is group:
                del self._open_reads[job_id]

    def _shared_mark(self, job_id: str, group: SharedHeadRead) -> JobView:
        with self._lock:
            lead, group.closed = not group.closed, True
            if lead and self._open_reads.get(job_id) is group:
                del self._open_reads[job_id]
        if lead:
            try:
                group.view = self._mark(job_id, max(group.steps), group.runtime)
            except BaseException as exc:
                group.error = exc
                raise
            finally:
                if group.done is not None:  # a member joined before the group closed: it may be waiting
                    group.done.set()
            return group.view
        assert group.done is not None  # joined an existing group, so ``admit`` made it
        group.done.wait()
        if group.error is not None:
            if isinstance(group.error, StoreBehind):
                self._on_fault(group.error.fault)  # counted per answer, as a read of its own would be
            raise group.error
        assert group.view is not None
        return group.view

    def _mark(self, job_id: str, step: int, held: JobRuntime) -> JobView:
        """Raise the high water to ``step`` and return the head of that same store operation, checked
        against everything seen (``held``: the runtime the request was checked against)."""
        self._require_sources(held.config)
        started = time.monotonic()
        try:
            head = self.store.mark_served(job_id, step, held.incarnation)
        except NotFound:
            self._missing(job_id, started)
            raise
        runtime = self._reconcile(job_id, head, started)
        self._remember(job_id, runtime, max(head.served_high_water, step), head.version)
        # A later version than the head's takes effect after the high water at its commit (>= step), so the
        # newest runtime plans this step exactly as the head's version does.
        return JobView(runtime, head)

    def describe(self, view: JobView) -> dict[str, Any]:
        runtime, head = view.runtime, view.head
        served = runtime.engine.sequences_served(head.served_high_water)
        return {
            "job_id": runtime.job_id,
            "incarnation": runtime.incarnation,
            "config": runtime.config.to_json(),
            "schedule_version": runtime.version,
            "schedule": runtime.current.schedule,
            "served_high_water": head.served_high_water,
            "tokens_through_high_water": {
                name: n * runtime.config.seq_len
                for name, n in zip(runtime.config.source_names, served, strict=True)
            },
            "trained_step": head.trained_step,
            "warnings": runtime.engine.warnings + ([LEGACY_WARNING] if runtime.legacy else []),
            "time": time.time(),
        }

    def describe_all(self) -> list[dict[str, Any]]:
        """Every job described; one that cannot be served here is listed with its error, not hidden."""
        out = []
        for job_id in self.store.list_jobs():
            try:
                out.append(self.describe(self.view(job_id)))
            except StoreUnavailable:
                raise
            except MixerError as exc:
                out.append({"job_id": job_id, "error": {"type": type(exc).__name__, "detail": str(exc)}})
        return out

    # -- writing -----------------------------------------------------------------------------------

    def create(self, job_id: str, config_doc: Any, schedule_doc: Any, author: str, reason: str) -> JobView:
        config = self._pin_sources(JobConfig.parse_new(config_doc))
        schedule = Schedule.parse(schedule_doc, config.source_names)
        engine = self._new_engine(config, [(0, schedule)])  # validates before anything is written
        first, incarnation = self.store.create_job(
            job_id, config.to_json(), schedule.to_json(config.source_names), author, reason
        )
        runtime = JobRuntime(job_id, config, incarnation, (first,), [(0, schedule)], engine)
        with self._lock:
            self._jobs[job_id] = runtime
            self._seen[job_id] = _Seen(incarnation, 1, -1)
        return JobView(runtime, JobHead(incarnation, 1, first.chain, -1, -1))

    def change_schedule(self, job_id: str, expected_etag: str, requested_step: Any, schedule_doc: Any,
                        author: str, reason: str) -> tuple[JobRuntime, list[str]]:
        """Append a schedule version effective at the first step the change cannot rewrite."""
        runtime = self.view(job_id).runtime
        if expected_etag != runtime.etag():
            raise StaleVersion(f"job {job_id!r} is at schedule version {runtime.version} (ETag "
                               f"{runtime.etag()}), not {expected_etag}")
        STEP.check(requested_step, "requested_step")
        names = runtime.config.source_names
        schedule = Schedule.parse(schedule_doc, names)
        engines: dict[int, MixingEngine] = {}

        def plan(high_water: int) -> ChangePlan:
            """The one effective-step rule, re-run with the fresh high water on every commit attempt."""
            earliest = runtime.engine.first_changeable_step(high_water)
            if earliest >= UNBOUNDED_HORIZON:
                raise Conflict("the served steps depend on weights no schedule has chosen yet (a group of "
                               "sources was stopped at weight 0 while ahead of its target by a fraction), so "
                               "no change can be proven not to rewrite them; see docs/architecture.md")
            effective = max(requested_step, earliest)
            if effective >= runtime.config.total_steps:
                raise InvalidInput(
                    f"requested_step: the change would take effect at step {effective}, "
                    f"at or after total_steps={runtime.config.total_steps}"
                )
            if effective not in engines:
                engines[effective] = runtime.engine.with_log(runtime.schedule_log + [(effective, schedule)])
            return ChangePlan(effective, safe_high_water(runtime.engine, effective))

        new = self.store.change_schedule(
            job_id, runtime.incarnation, runtime.current, schedule.to_json(names), author, reason, plan
        )
        engine = engines[new.effective_step]
        updated = runtime.extended([new], engine)
        self._remember(job_id, updated, None, updated.version)
        return updated, engine.warnings

    def watch_high_water(self, since_s: float = WATCH_RECENT_S) -> list[str]:
        """Re-check every job this process served in the last ``since_s`` seconds against the store.

        A store restored from a backup forgets the steps served after it; the replicas that served them
        put their high water back on their next request, so a schedule change cannot take effect at those
        steps. This runs the same check without a request (the server calls it every few seconds), so the
        window in which a restored store accepts such a change stays a few seconds long even for an idle job.
        Returns the faults found (each already logged and put right where it can be)."""
        now, found = time.monotonic(), []
        with self._lock:
            recent = [job for job, seen in self._seen.items() if now - seen.high_water_at < since_s]
        for job_id in recent:
            try:
                self.view(job_id)
            except StoreBehind as exc:
                found.append(exc.fault)
            except MixerError as exc:  # store down, job gone or damaged: the next request says so
                logger.debug("high-water watch skipped a job", extra={"job_id": job_id, "error": str(exc)})
        return found

    def report_progress(self, job_id: str, trained_step: Any) -> None:
        runtime = self.view(job_id).runtime
        check_trained_step(trained_step, runtime.config.total_steps)
        self.store.set_trained_step(job_id, trained_step)

    # -- the checks --------------------------------------------------------------------------------

    def _fault(self, job_id: str, fault: str, detail: str) -> StoreBehind:
        logger.error("state store is behind this replica", extra={"job_id": job_id, "fault": fault,
                                                                "detail": detail})
        self._on_fault(fault)
        return StoreBehind(fault, f"job {job_id!r}: {detail}; not serving from a log that cannot be "
                                  "proven current")

    def _missing(self, job_id: str, started: float) -> None:
        seen = self._seen.get(job_id)
        if seen is not None and seen.version_at < started:
            raise self._fault(job_id, "job_missing", "the state store no longer has this job, which this "
                              f"replica saw at schedule version {seen.version}")

    def _reconcile(self, job_id: str, head: JobHead, started: float) -> JobRuntime:
        seen = self._seen.get(job_id)
        cached = self._jobs.get(job_id)
        if seen is not None and head.incarnation != seen.incarnation:
            raise self._fault(job_id, "incarnation_changed", "the store holds incarnation "
                              f"{head.incarnation} "
                              f"but this replica served incarnation {seen.incarnation} (the job was deleted "
                              "and recreated); restart the replica to accept the new one")
        if cached is None or cached.incarnation != head.incarnation:
            runtime = self._load(job_id, head)
        elif head.version > cached.version:
            new = self.store.versions(job_id, after=cached.version)[: head.version - cached.version]
            if len(new) != head.version - cached.version or not verify_chain(cached.chain, new) \
                    or new[-1].chain != head.chain:
                raise self._fault(job_id, "chain_broken", f"versions {cached.version + 1}..{head.version} in "
                                  "the store do not extend the log this replica holds")
            self._check_served_here(job_id, cached, head, new, seen)
            runtime = cached.extended(new)
        elif cached.versions[head.version - 1].chain != head.chain:
            raise self._fault(job_id, "chain_broken", f"schedule version {head.version} in the store is not "
                              "the one this replica holds")
        else:
            runtime = cached
            if head.version < cached.version and seen is not None and seen.version_at < started:
                self.store.restore(job_id, cached.incarnation, head.chain,
                                   cached.versions[head.version:], seen.high_water)
                raise self._fault(job_id, "version_rollback", f"the store is at schedule version "
                                  f"{head.version}, this replica saw {cached.version}; put the missing "
                                  "versions back")
        if seen is not None and head.served_high_water < seen.high_water and seen.high_water_at < started:
            self.store.restore(job_id, runtime.incarnation, runtime.chain, [], seen.high_water)
            raise self._fault(job_id, "high_water_rollback", f"the store's served high water is "
                              f"{head.served_high_water}, this replica saw {seen.high_water}; raised it back")
        self._check_served_in_store(job_id, runtime, head)
        self._remember(job_id, runtime, head.served_high_water, head.version)
        return runtime

    def _check_served_here(self, job_id: str, cached: JobRuntime, head: JobHead, new: list[ScheduleVersion],
                           seen: _Seen | None) -> None:
        """No new version may take effect at a step this process saw served under the log without it."""
        if seen is None:
            return
        before = cached
        for version in new:
            served, under = seen.served_before(version.version)
            if served > safe_high_water(before.engine, version.effective_step):
                if head.served_high_water < seen.high_water:  # the store forgot them: put the record back
                    self.store.restore(job_id, cached.incarnation, cached.chain, [], seen.high_water)
                raise self._fault(job_id, "history_conflict", f"schedule version {version.version} takes "
                                  f"effect at step {version.effective_step}, but this replica served steps "
                                  f"through {served} under version {under} (was the store restored from a "
                                  "backup?); serving them again under the new log would rewrite history")
            before = before.extended([version])

    def _check_served_in_store(self, job_id: str, runtime: JobRuntime, head: JobHead) -> None:
        """Versions after the one the high water last rose under must take effect after the high water.

        Walks back from the newest version to the served chain: usually zero or one step (a version is
        after it only between its commit and the next step served)."""
        if not head.served_chain:
            if runtime.legacy:
                return  # a job from before the served chain was recorded
            raise self._fault(job_id, "history_conflict", "the store has no record of the log its served "
                              "steps were served under (its served chain is missing)")
        for i in range(head.version - 1, -1, -1):
            version = runtime.versions[i]
            if version.chain == head.served_chain:
                return
            try:
                prefix = runtime.engine.with_log(runtime.schedule_log[:i])
                bound = safe_high_water(prefix, version.effective_step)
            except InvalidInput:  # a prefix later versions made servable: the plain rule still holds
                bound = version.effective_step - 1
            if head.served_high_water > bound:
                raise self._fault(job_id, "history_conflict", f"schedule version {version.version} takes "
                                  f"effect at step {version.effective_step}, at or before the served high "
                                  f"water {head.served_high_water}, but those steps were served under an "
                                  "earlier version")
        raise self._fault(job_id, "history_conflict", f"steps through {head.served_high_water} were served "
                          "under a log that is not a prefix of the store's")

    def _remember(self, job_id: str, runtime: JobRuntime, high_water: int | None, version: int) -> None:
        """Keep the newest runtime and raise what this process has seen (never lower it); ``high_water`` was
        seen served while the log ended at ``version``."""
        now = time.monotonic()
        with self._lock:
            current = self._jobs.get(job_id)
            if current is None or current.incarnation != runtime.incarnation or \
                    current.version < runtime.version:
                self._jobs[job_id] = runtime
            seen = self._seen.get(job_id)
            if seen is None or seen.incarnation != runtime.incarnation:
                seen = self._seen[job_id] = _Seen(runtime.incarnation, 0, -1)
            if runtime.version > seen.version:
                seen.version, seen.version_at = runtime.version, now
            if high_water is not None and high_water > seen.high_water:
                seen.high_water, seen.high_water_at = high_water, now
            if high_water is not None and high_water > seen.served_under.get(version, -1):
                seen.served_under[version] = high_water

    def _load(self, job_id: str, head: JobHead) -> JobRuntime:
        """A job this process has not held yet: its whole log, verified from the incarnation on, and the
        config version 1 committed to."""
        config_doc = self.store.get_job(job_id)
        versions = self.store.versions(job_id)[: head.version]
        if len(versions) != head.version or not verify_chain(head.incarnation, versions) \
                or versions[-1].chain != head.chain:
            raise self._fault(job_id, "chain_broken", "the schedule log in the store does not verify against "
                              "its own chain hashes")
        committed = versions[0].config_sha256
        if committed and committed != config_digest(canonical_json(config_doc)):
            raise self._fault(job_id, "chain_broken", "the job config in the store is not the one schedule "
                              "version 1 committed to (edited in place?)")
        if not committed:
            logger.warning("job log does not commit to its config", extra={"job_id": job_id})
        try:
            config = JobConfig.parse(config_doc)
        except InvalidInput as exc:
            raise CorruptData(f"job {job_id!r}: the stored config is invalid: {exc}") from exc
        config = self._attach_sources(job_id, config)
        schedule_log = [(v.effective_step, Schedule.parse(v.schedule, config.source_names)) for v in versions]
        return JobRuntime(job_id, config, head.incarnation, tuple(versions), schedule_log,
                          self._new_engine(config, schedule_log), legacy=not committed)

    # -- sources -----------------------------------------------------------------------------------

    def _new_engine(self, config: JobConfig, schedule_log: ScheduleLog) -> MixingEngine:
        sources = {s.name: self.sources.get(s.name) for s in config.sources}
        return MixingEngine.create(config, sources, schedule_log)

    def _pin_sources(self, config: JobConfig) -> JobConfig:
        """Pin each source's fingerprint and root (the hashes its bytes are checked against); a mismatch
        means this server holds different data (409). A job from before roots pins none in its stored
        config and keeps working, checked by fingerprint only."""
        pinned = []
        tokenizers = set()
        for spec in config.sources:
            meta = self.sources.get(spec.name).meta
            if spec.fingerprint is not None and spec.fingerprint != meta.fingerprint:
                raise Conflict(
                    f"source {spec.name!r}: job expects fingerprint {spec.fingerprint}, this server "
                    f"has {meta.fingerprint}"
                )
            if spec.root is not None and spec.root != meta.root:
                raise Conflict(f"source {spec.name!r}: job expects root {spec.root}, this server has "
                               f"{meta.root} (its meta.json was edited or replaced)")
            tokenizers.add(meta.tokenizer_fingerprint)
            pinned.append({**spec.__dict__, "fingerprint": meta.fingerprint, "root": spec.root or meta.root})
        if len(tokenizers) > 1:
            raise InvalidInput("sources: all sources of a job must share one tokenizer")
        return JobConfig.parse(config.to_json() | {"sources": [
            {k: v for k, v in p.items() if v is not None} for p in pinned]})

    def _attach_sources(self, job_id: str, config: JobConfig) -> JobConfig:
        """An existing job's sources must be here, unchanged: otherwise this replica cannot serve it (503)."""
        try:
            return self._pin_sources(config)
        except (NotFound, Conflict) as exc:
            raise SourceUnavailable(f"job {job_id!r} cannot be served by this replica: {exc}") from exc

    def _require_sources(self, config: JobConfig) -> None:
        for spec in config.sources:
            try:
                source = self.sources.get(spec.name)
            except NotFound as exc:
                raise SourceUnavailable(str(exc)) from exc
            if source.meta.fingerprint != spec.fingerprint:
                raise SourceUnavailable(f"source {spec.name!r} changed under this server: the job pinned "
                                        f"{spec.fingerprint}, the server now has {source.meta.fingerprint}")
            if spec.root is not None and source.meta.root != spec.root:
                raise SourceUnavailable(f"source {spec.name!r} changed under this server: the job pinned "
                                        f"root {spec.root}, the server now has {source.meta.root}")
