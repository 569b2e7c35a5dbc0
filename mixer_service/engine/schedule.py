"""How a schedule log becomes per-step weights: the versions in force and the pieces they cover.

A schedule document (``mixer_contract.schedule``) says what an operator asked for; this module decides
which version governs which steps, so history before a change is never rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from mixer_contract.errors import InvalidInput
from mixer_contract.schedule import Schedule


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
