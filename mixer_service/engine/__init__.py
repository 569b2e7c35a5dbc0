"""The deterministic mixing engine: a pure library, no HTTP."""

from mixer_service.engine.config import JobConfig, SourceSpec
from mixer_service.engine.engine import Batch, MixingEngine, ScheduleLog, SequenceProvenance
from mixer_service.engine.layout import SourceLayout, Span, TokenSource
from mixer_service.engine.schedule import Phase, Schedule

__all__ = ["Batch", "JobConfig", "MixingEngine", "Phase", "Schedule", "ScheduleLog", "SequenceProvenance",
           "SourceLayout", "SourceSpec", "Span", "TokenSource"]
