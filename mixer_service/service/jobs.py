"""Jobs as the service sees them: config and schedule log in the state store, engines cached per version.

Replicas share nothing but the store. The serve path bumps the served high-water mark and reads the
schedule version in one atomic store operation, so a batch is always computed under the log that was in
force when it was first served, on every replica.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from mixer_service.engine import JobConfig, MixingEngine, Schedule, ScheduleLog
from mixer_service.errors import Conflict, InvalidInput
from mixer_service.service.sources import SourceRegistry
from mixer_service.store import ScheduleVersion, StateStore


@dataclass
class JobRuntime:
    job_id: str
    config: JobConfig
    engine: MixingEngine
    versions: list[ScheduleVersion]

    @property
    def version(self) -> int:
        return self.versions[-1].version


class JobManager:
    def __init__(self, store: StateStore, sources: SourceRegistry) -> None:
        self.store = store
        self.sources = sources
        self._jobs: dict[str, JobRuntime] = {}
        self._lock = threading.Lock()

    def _engine(
        self, config: JobConfig, versions: list[ScheduleVersion], base: MixingEngine | None = None
    ) -> MixingEngine:
        log = _schedule_log(config, versions)
        if base is not None:
            return base.with_log(log)
        return self._new_engine(config, log)

    def _new_engine(self, config: JobConfig, log: ScheduleLog) -> MixingEngine:
        return MixingEngine.create(config, {s.name: self.sources.get(s.name) for s in config.sources}, log)

    def _check_sources(self, config: JobConfig) -> JobConfig:
        """Pin each source's fingerprint; a mismatch means this server holds different data (409)."""
        pinned = []
        tokenizers = set()
        for spec in config.sources:
            meta = self.sources.get(spec.name).meta
            if spec.fingerprint is not None and spec.fingerprint != meta.fingerprint:
                raise Conflict(
                    f"source {spec.name!r}: job expects fingerprint {spec.fingerprint}, this server "
                    f"has {meta.fingerprint}"
                )
            tokenizers.add(meta.tokenizer_fingerprint)
            pinned.append({"name": spec.name, "role": spec.role, "fingerprint": meta.fingerprint})
        if len(tokenizers) > 1:
            raise InvalidInput("sources: all sources of a job must share one tokenizer")
        return JobConfig.parse(config.to_json() | {"sources": pinned})

    def create(self, job_id: str, config_doc: Any, schedule_doc: Any, author: str, reason: str) -> JobRuntime:
        config = self._check_sources(JobConfig.parse(config_doc))
        schedule = Schedule.parse(schedule_doc, config.source_names)
        canonical = schedule.to_json(config.source_names)
        engine = self._new_engine(config, [(0, schedule)])  # validates before anything is written
        first = self.store.create_job(job_id, config.to_json(), canonical, author, reason)
        runtime = JobRuntime(job_id, config, engine, [first])
        with self._lock:
            self._jobs[job_id] = runtime
        return runtime

    def get(self, job_id: str, min_version: int = 0) -> JobRuntime:
        """The job's runtime, reloaded from the store when it is older than ``min_version``."""
        runtime = self._jobs.get(job_id)
        if runtime is not None and runtime.version >= min_version:
            return runtime
        versions = self.store.schedule_log(job_id)
        if runtime is None:
            config = self._check_sources(JobConfig.parse(self.store.get_job(job_id)))
            runtime = JobRuntime(job_id, config, self._engine(config, versions), versions)
        else:
            runtime = JobRuntime(
                job_id, runtime.config, self._engine(runtime.config, versions, runtime.engine), versions
            )
        with self._lock:
            current = self._jobs.get(job_id)
            if current is None or current.version < runtime.version:
                self._jobs[job_id] = runtime
        return runtime

    def for_step(self, job_id: str, step: int, rank: int, world: int) -> tuple[JobRuntime, MixingEngine]:
        """Validate the request, then mark the step served and return the engine of its schedule version."""
        runtime = self.get(job_id)
        runtime.engine.check_step(step)
        runtime.engine.rank_rows(rank, world)  # validates rank/world before any state changes
        version = self.store.mark_served(job_id, step)
        runtime = self.get(job_id, min_version=version)
        engine = (
            runtime.engine
            if runtime.version == version
            else self._engine(
                runtime.config, [v for v in runtime.versions if v.version <= version], runtime.engine
            )
        )
        return runtime, engine

    def change_schedule(
        self,
        job_id: str,
        expected_version: int,
        requested_step: int,
        schedule_doc: Any,
        author: str,
        reason: str,
    ) -> tuple[ScheduleVersion, list[str]]:
        runtime = self.get(job_id, min_version=expected_version)
        names = runtime.config.source_names
        schedule = Schedule.parse(schedule_doc, names)
        if isinstance(requested_step, bool) or not isinstance(requested_step, int) or requested_step < 0:
            raise InvalidInput(f"requested_step: must be an integer >= 0, got {requested_step!r}")
        engine = runtime.engine
        earliest = engine.first_changeable_step(self.store.served_high_water(job_id))
        log = _schedule_log(runtime.config, runtime.versions)
        warnings: list[str] = []

        def validate(effective: int) -> int:
            """Check the new log, and bound the served high water under which ``effective`` stays safe."""
            if effective >= runtime.config.total_steps:
                raise InvalidInput(
                    f"requested_step: the change would take effect at step {effective}, "
                    f"at or after total_steps={runtime.config.total_steps}"
                )
            warnings[:] = engine.with_log(log + [(effective, schedule)]).warnings
            return engine.last_safe_high_water(effective)

        new = self.store.change_schedule(
            job_id, expected_version, max(requested_step, earliest), schedule.to_json(names), author, reason,
            validate,
        )
        self.get(job_id, min_version=new.version)
        return new, warnings

    def describe(self, runtime: JobRuntime) -> dict[str, Any]:
        current = runtime.versions[-1]
        high_water = self.store.served_high_water(runtime.job_id)
        served = runtime.engine.sequences_served(high_water)
        return {
            "job_id": runtime.job_id,
            "config": runtime.config.to_json(),
            "schedule_version": current.version,
            "schedule": current.schedule,
            "served_high_water": high_water,
            "tokens_through_high_water": {
                name: n * runtime.config.seq_len
                for name, n in zip(runtime.config.source_names, served, strict=True)
            },
            "trained_step": self.store.trained_step(runtime.job_id),
            "warnings": runtime.engine.warnings,
            "time": time.time(),
        }



def _schedule_log(config: JobConfig, versions: list[ScheduleVersion]) -> ScheduleLog:
    """The engine's view of stored versions: (effective step, parsed schedule)."""
    return [(v.effective_step, Schedule.parse(v.schedule, config.source_names)) for v in versions]
