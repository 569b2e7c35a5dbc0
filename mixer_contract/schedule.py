"""The schedule document: phases of per-source weights, constant or linearly ramped.

Weights are held as exact fractions so that the cumulative targets of the exact-mixture contract are the
same on every machine and never drift with floating-point error. How a log of versions becomes per-step
weights is the engine's business (``mixer_service.engine.schedule``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from mixer_contract.errors import InvalidInput
from mixer_contract.values import STEP, WEIGHT_DIGITS, check_weight_size

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

    @staticmethod
    def constant(weights: Mapping[str, float | str | Fraction], start_step: int = 0) -> dict[str, Any]:
        """The document of one constant phase from ``start_step`` (what most jobs start with), to post.

        A builder, not a check: ``parse`` (on the server) validates it; a ``Fraction`` is written exactly.
        """
        return {"phases": [{"start_step": start_step, "weights": {
            name: f"{w.numerator}/{w.denominator}" if isinstance(w, Fraction) else w
            for name, w in weights.items()}}]}

    def to_json(self, source_names: list[str]) -> dict[str, Any]:
        return {"phases": [
            {"start_step": p.start_step,
             "weights": {n: weight_to_json(w) for n, w in zip(source_names, p.weights, strict=True)},
             "ramp": p.ramp}
            for p in self.phases]}
