"""The deterministic mixing engine: a pure library, no HTTP. Its inputs are the contract's documents
(``mixer_contract.job.JobConfig``, ``mixer_contract.schedule.Schedule``)."""

from mixer_service.engine.engine import Batch, MixingEngine, ScheduleLog, SequenceProvenance
from mixer_service.engine.layout import SourceLayout, Span, TokenSource

__all__ = ["Batch", "MixingEngine", "ScheduleLog", "SequenceProvenance", "SourceLayout", "Span",
           "TokenSource"]
