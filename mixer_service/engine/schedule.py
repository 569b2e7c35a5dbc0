"""Mixing schedules: phases of per-source weights, constant or linearly ramped, and their change log.

Weights are held as exact fractions so that the cumulative targets of the exact-mixture contract are the
same on every machine and never drift with floating-point error.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from mixer_service.errors import InvalidInput
from mixer_service.values import STEP, WEIGHT_DIGITS, check_weight_size

_SUM_TOLERANCE = Fraction(1, 10**9)
MAX_PHASES = 64  # a schedule is a handful of phases; the cap bounds the work one request can cause


# Decimal or "p/q" weights with bounded digits: Fraction("1e-10000000") would cost seconds of CPU.
_DIGITS = rf"\d{{1,{WEIGHT_DIGITS}}}"
_WEIGHT_TEXT = re.compile(rf"^(?:{_DIGITS}(?:\.{_DIGITS})?|{_DIGITS}/{_DIGITS})$")
WEIGHT_PATTERN = _WEIGHT_TEXT.pattern


def parse_weight(value: Any, field: str) -> Fraction:
    """Accept a finite JSON number or a decimal / ``"p/q"`` string of at most ``WEIGHT_DIGITS`` digits a
    part, whose exact value is a fraction of that size too (so 1e-40 and 31 decimals are refused).

    Floats go through their shortest decimal repr, so 0.1 means exactly 1/10.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidInput(f"{field}: weight must be a number or 'p/q' string, got {value!r}")
    if isinstance(value, str) and not _WEIGHT_TEXT.fullmatch(value):
        raise InvalidInput(f"{field}: weight strings must be decimals or 'p/q' with at most {WEIGHT_DIGITS} "
                           f"digits a part, got {value[:40]!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInput(f"{field}: weight must be finite, got {value!r}")
    try:
        weight = Fraction(repr(value) if isinstance(value, float) else value)
    except (ValueError, ZeroDivisionError) as exc:
        raise InvalidInput(f"{field}: cannot parse weight {value!r}") from exc
    if weight < 0:
        raise InvalidInput(f"{field}: weight must be >= 0, got {value!r}")
    return check_weight_size(weight, field)


def weight_to_json(weight: Fraction) -> float | str:
    """A float when it round-trips exactly through ``parse_weight``, else the exact ``"p/q"``."""
    as_float = float(weight)
    return as_float if Fraction(repr(as_float)) == weight else f"{weight.numerator}/{weight.denominator}"


@dataclass(frozen=True)
class Phase:
    start_step: int
    weights: tuple[Fraction, ...]  # in the job's source order, summing to exactly 1
    ramp: bool = False  # ramp linearly towards the next phase's weights, reached at its start step


@dataclass(frozen=True)
class Schedule:
    phases: tuple[Phase, ...]

    @classmethod
    def parse(cls, data: Any, source_names: list[str]) -> Schedule:
        """Validate a schedule document; every error names the offending field."""
        if not isinstance(data, dict) or not isinstance(data.get("phases"), list) or not data["phases"]:
            raise InvalidInput("schedule.phases: must be a non-empty list")
        if len(data["phases"]) > MAX_PHASES:
            raise InvalidInput(f"schedule.phases: at most {MAX_PHASES} phases, got {len(data['phases'])}")
        phases: list[Phase] = []
        for i, raw in enumerate(data["phases"]):
            where = f"schedule.phases[{i}]"
            if not isinstance(raw, dict):
                raise InvalidInput(f"{where}: must be an object")
            unknown_keys = set(raw) - {"start_step", "weights", "ramp"}
            if unknown_keys:
                raise InvalidInput(f"{where}: unknown field(s) {sorted(unknown_keys)}")
            start = STEP.check(raw.get("start_step"), f"{where}.start_step")
            if i == 0 and start != 0:
                raise InvalidInput(f"{where}.start_step: the first phase must start at step 0")
            if phases and start <= phases[-1].start_step:
                raise InvalidInput(f"{where}.start_step: steps must increase ({start} after "
                                   f"{phases[-1].start_step})")
            weights = raw.get("weights")
            if not isinstance(weights, dict) or not weights:
                raise InvalidInput(f"{where}.weights: must be a non-empty object source -> weight")
            unknown = sorted(set(weights) - set(source_names))
            if unknown:
                raise InvalidInput(f"{where}.weights: unknown source(s) {unknown}; job sources are "
                                   f"{source_names}")
            parsed = [parse_weight(weights.get(name, 0), f"{where}.weights.{name}") for name in source_names]
            total = sum(parsed, Fraction(0))
            if abs(total - 1) > _SUM_TOLERANCE:
                raise InvalidInput(f"{where}.weights: must sum to 1, got {float(total):.9g}")
            ramp = raw.get("ramp", False)
            if not isinstance(ramp, bool):
                raise InvalidInput(f"{where}.ramp: must be true or false")
            normal = tuple(check_weight_size(w / total, f"{where}.weights.{name} (normalised to sum 1: give "
                                             "weights that sum to exactly 1)")
                           for name, w in zip(source_names, parsed, strict=True))
            phases.append(Phase(start, normal, ramp))
        if phases[-1].ramp:
            raise InvalidInput(f"schedule.phases[{len(phases) - 1}].ramp: the last phase has nothing to "
                               "ramp towards")
        return cls(tuple(phases))

    def to_json(self, source_names: list[str]) -> dict[str, Any]:
        return {"phases": [
            {"start_step": p.start_step,
             "weights": {n: weight_to_json(w) for n, w in zip(source_names, p.weights, strict=True)},
             "ramp": p.ramp}
            for p in self.phases]}


@dataclass(frozen=True)
class Piece:
    """A run of steps ``[start, end)`` where per-step weights are ``w0 + slope * (step - start)``."""

    start: int
    end: int | None  # None: runs forever
    w0: tuple[Fraction, ...]
    slope: tuple[Fraction, ...]


def active_versions(log: list[tuple[int, Schedule]]) -> list[tuple[int, Schedule, int]]:
    """The versions that govern some steps, as (effective_step, schedule, 1-based version number).

    A later version supersedes pending versions that would start at or after its own effective step.
    """
    active: list[tuple[int, Schedule, int]] = []
    for number, (eff, sched) in enumerate(log, start=1):
        while active and active[-1][0] >= eff:
            active.pop()
        active.append((eff, sched, number))
    return active


def schedule_pieces(log: list[tuple[int, Schedule]]) -> list[Piece]:
    """Flatten a schedule log ``[(effective_step, schedule), ...]`` into pieces covering ``[0, inf)``.

    A version governs steps from its effective step until the next version that takes effect later; a
    version set to start earlier than a still-pending one replaces it. History before a change is never
    rewritten because a later version only owns steps from its own effective step on.
    """
    if not log or log[0][0] != 0:
        raise InvalidInput("schedule log: the first version must take effect at step 0")
    active = [(eff, sched) for eff, sched, _ in active_versions(log)]
    pieces: list[Piece] = []
    for v, (eff, sched) in enumerate(active):
        v_end = active[v + 1][0] if v + 1 < len(active) else None
        for i, phase in enumerate(sched.phases):
            nxt = sched.phases[i + 1] if i + 1 < len(sched.phases) else None
            p_end = nxt.start_step if nxt else None
            lo = max(eff, phase.start_step)
            hi = p_end if v_end is None else (v_end if p_end is None else min(v_end, p_end))
            if hi is not None and hi <= lo:
                continue
            if phase.ramp and nxt is not None:
                span = nxt.start_step - phase.start_step
                slope = tuple((b - a) / span for a, b in zip(phase.weights, nxt.weights, strict=True))
            else:
                slope = tuple(Fraction(0) for _ in phase.weights)
            w0 = tuple(a + s * (lo - phase.start_step) for a, s in zip(phase.weights, slope, strict=True))
            pieces.append(Piece(lo, hi, w0, slope))
    return pieces
