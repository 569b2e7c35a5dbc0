"""The mixing engine: the exact content of any global batch, random-access, as a pure function.

Batch ``t`` depends only on (job config, source contents, schedule log). Per step the engine does
O(B * L) copying plus O(number of schedule pieces) exact arithmetic; nothing is replayed.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from mixer_contract.errors import InvalidInput, NotFound
from mixer_contract.job import JobConfig
from mixer_contract.schedule import Schedule
from mixer_contract.values import RankSlice, check_step
from mixer_service.engine.layout import SourceLayout, Span, TokenSource
from mixer_service.engine.mixture import MixturePlan
from mixer_service.engine.permutation import Permutation, derive_key
from mixer_service.engine.schedule import active_versions, schedule_pieces

log = logging.getLogger(__name__)

ScheduleLog = list[tuple[int, Schedule]]  # [(effective_step, schedule), ...], first at step 0


@dataclass(frozen=True)
class Batch:
    step: int
    rank: int
    world: int
    tokens: np.ndarray  # [rows, seq_len]
    source_ids: np.ndarray  # [rows] index into the job's sources
    seq_ids: np.ndarray  # [rows] per-source sequence index


@dataclass(frozen=True)
class SequenceProvenance:
    source: str
    seq_id: int
    spans: list[Span]


class MixingEngine:
    """One job under one schedule log. ``with_log`` gives the engine for a changed schedule."""

    @classmethod
    def create(
        cls, config: JobConfig, sources: Mapping[str, TokenSource], schedule_log: ScheduleLog
    ) -> MixingEngine:
        missing = [s.name for s in config.sources if s.name not in sources]
        if missing:
            raise NotFound(f"sources: not available on this server: {missing}")
        layouts = [
            SourceLayout(sources[s.name], s.name, config.seq_len, config.seed, repeat=s.role == "repeat",
                         order=config.order)
            for s in config.sources
        ]
        return cls(config, layouts, schedule_log)

    def __init__(self, config: JobConfig, layouts: list[SourceLayout], schedule_log: ScheduleLog) -> None:
        self.config = config
        self.layouts = layouts
        self.schedule_log = list(schedule_log)
        active = active_versions(self.schedule_log)  # once per log: version_at runs on every batch
        self._active_starts = [eff for eff, _, _ in active]
        self._active_numbers = [number for _, _, number in active]
        self.plan = MixturePlan(schedule_pieces(self.schedule_log), len(config.sources), config.global_batch)
        self.token_dtype = np.result_type(*(lay.source.tokens.dtype for lay in self.layouts))
        self.warnings = self._check_exhaustion()
        self._assignment = lru_cache(maxsize=256)(self._compute_assignment)

    def with_log(self, schedule_log: ScheduleLog) -> MixingEngine:
        """The same job under another schedule log; raises InvalidInput if it cannot be served."""
        return MixingEngine(self.config, self.layouts, schedule_log)

    def _check_exhaustion(self) -> list[str]:
        """Refuse (or, with allow_wrap, warn about) a single-pass source that runs dry before the end."""
        warnings = []
        for k, (spec, lay) in enumerate(zip(self.config.sources, self.layouts, strict=True)):
            if spec.role != "once":
                continue
            step = self.plan.first_step_exceeding(k, lay.num_chunks, self.config.total_steps)
            if step is None:
                continue
            needed = self.plan.realized(self.config.total_steps)[k]
            msg = (
                f"schedule: source {spec.name!r} (role once) runs out at step {step}: it has "
                f"{lay.num_chunks} sequences of {self.config.seq_len} tokens but the schedule needs "
                f"{needed} by total_steps={self.config.total_steps}"
            )
            if not self.config.allow_wrap:
                raise InvalidInput(msg + "; lower its weight, add data, or create the job with allow_wrap")
            log.warning("once source wraps", extra={"source": spec.name, "step": step})
            warnings.append(msg + "; it wraps into a second pass (allow_wrap)")
        return warnings

    def first_changeable_step(self, served_high_water: int) -> int:
        """Earliest step a schedule change may take effect at without altering steps already served.

        Usually ``served_high_water + 1``; later when a tiny weight leaves a fractional sequence pending,
        because the rounding of already-served steps then depends on the weights still to come.
        """
        return max(served_high_water + 1, self.plan.horizon(served_high_water + 1) + 1)

    def last_safe_high_water(self, effective: int) -> int:
        """Highest served step under which a change taking effect at ``effective`` rewrites nothing."""
        lo, hi = -1, effective - 1  # first_changeable_step is non-decreasing in the high water
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.first_changeable_step(mid) <= effective:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def version_at(self, step: int) -> int:
        """The 1-based schedule version that governs ``step``: part of every batch's header."""
        i = bisect.bisect_right(self._active_starts, step) - 1
        return self._active_numbers[i]

    def active_since(self, step: int) -> int:
        """The first step governed by the version that governs ``step``."""
        return self._active_starts[bisect.bisect_right(self._active_starts, step) - 1]

    def check_step(self, step: int) -> None:
        check_step(step, self.config.total_steps)

    def rank_rows(self, rank: int, world: int) -> slice:
        return RankSlice.of(rank, world, self.config.global_batch).rows(self.config.global_batch)

    def _compute_assignment(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Source, per-source sequence index and token start (in its source) of every row of global batch
        ``step``. The starts are worked out once a step: the prefetch of a step's shards and every rank's
        batch of it read them.

        Rows are shuffled by a per-step permutation so that every rank slice sees the mixture, while the
        global batch stays independent of the world size.
        """
        counts = self.plan.step_counts(step)
        before = self.plan.realized(step)
        src = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        seq = np.concatenate(
            [np.arange(b, b + c, dtype=np.int64) for b, c in zip(before, counts, strict=True)]
        )
        order = Permutation(len(src), derive_key("rows", self.config.seed, step)).apply(np.arange(len(src)))
        src, seq = src[order], seq[order]
        starts = np.empty_like(seq)
        for k, lay in enumerate(self.layouts):
            sel = src == k
            if sel.any():
                starts[sel] = lay.sequence_starts(seq[sel])
        return src, seq, starts

    def batch(self, step: int, rank: int = 0, world: int = 1) -> Batch:
        self.check_step(step)
        rows = self.rank_rows(rank, world)
        src, seq, starts = (a[rows] for a in self._assignment(step))
        tokens = np.empty((len(src), self.config.seq_len), dtype=self.token_dtype)
        for k, lay in enumerate(self.layouts):
            sel = np.flatnonzero(src == k)
            if sel.size:
                lay.gather(starts[sel], tokens, sel)
        return Batch(step, rank, world, tokens, src.astype(np.int16), seq)

    def shards_for_step(self, step: int, rank: int = 0, world: int = 1) -> dict[str, list[int]]:
        """Shard ids of each source that ``batch(step, rank, world)`` reads: what to prefetch ahead.

        Computed from the schedule and the epoch order alone (no tokens are read), O(rows); sources with
        no rows in the slice are left out.
        """
        self.check_step(step)
        src, _, starts = (a[self.rank_rows(rank, world)] for a in self._assignment(step))
        out = {}
        for k, lay in enumerate(self.layouts):
            sel = src == k
            if sel.any():
                out[lay.name] = lay.shards_touched(starts[sel]).tolist()
        return out

    def provenance(self, step: int, rank: int = 0, world: int = 1) -> list[SequenceProvenance]:
        self.check_step(step)
        src, seq, _ = (a[self.rank_rows(rank, world)] for a in self._assignment(step))
        return [
            SequenceProvenance(self.layouts[k].name, int(j), self.layouts[k].spans(int(j)))
            for k, j in zip(src.tolist(), seq.tolist(), strict=True)
        ]

    def row_boundaries(self, step: int, rank: int = 0, world: int = 1) -> list[list[int]]:
        """Per row of ``batch(step, rank, world)``: the start offset of each document piece, first 0.

        The pieces are exactly ``provenance``'s spans (tests hold the two equal): a piece starts wherever
        a document ends inside the row, including across the wrap from the source's end to its start.
        Vectorised per source, so asking for boundaries costs about as much as the batch itself.
        """
        self.check_step(step)
        src, _, row_starts = (a[self.rank_rows(rank, world)] for a in self._assignment(step))
        rows: list[list[int]] = [[0] for _ in range(len(src))]
        length = self.config.seq_len
        for k, lay in enumerate(self.layouts):
            sel = np.flatnonzero(src == k)
            if not sel.size:
                continue
            # Document ends strictly inside [start, start + L): offsets[first:last], and for a row that
            # wraps past the end of the stream also offsets[1:again] shifted by the stream's length. Binary
            # searches and short slices only: the index is never copied (it can be 16 GB).
            offsets, total = lay.source.doc_offsets, lay.num_tokens
            starts = row_starts[sel]
            wraps = starts + length > total
            if hasattr(offsets, "window"):  # a checked index: read the runs these rows need at once
                offsets = offsets.window(np.concatenate([starts, np.minimum(starts + length, total),
                                                         starts[wraps] + length - total]))
            first = offsets.searchsorted(starts, side="right")
            last = np.where(wraps, len(offsets), offsets.searchsorted(np.minimum(starts + length, total),
                                                                      side="left"))
            again = np.ones_like(first)  # only wrapping rows search the start of the stream again
            if wraps.any():
                again[wraps] = offsets.searchsorted(starts[wraps] + length - total, side="left")
            for row, start, a, b, c in zip(sel.tolist(), starts.tolist(), first.tolist(), last.tolist(),
                                           again.tolist(), strict=True):
                rows[row] += (offsets[a:b] - start).tolist()
                if c > 1:
                    rows[row] += (offsets[1:c] + (total - start)).tolist()
        return rows

    def source_index(self, name: str) -> int:
        try:
            return self.config.source_names.index(name)
        except ValueError:
            raise NotFound(f"source {name!r} is not part of this job ({self.config.source_names})") from None

    def sequences_served(self, step: int) -> tuple[int, ...]:
        """Cumulative sequences per source once steps ``0..step`` have been served (-1: none)."""
        return self.plan.realized(step + 1)

    def repetition_counts(self, source: str, step: int) -> np.ndarray:
        """Times each document of ``source`` has been fully served in steps ``<= step``."""
        k = self.source_index(source)
        return self.layouts[k].repetition_counts(self.sequences_served(step)[k])

    def repetition_count(self, source: str, doc: int, step: int) -> int:
        k = self.source_index(source)
        return self.layouts[k].repetition_count(doc, self.sequences_served(step)[k])
