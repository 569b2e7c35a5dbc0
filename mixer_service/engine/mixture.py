"""The exact-mixture arithmetic: how many sequences each source contributes to every global batch.

Invariant kept here and nowhere else: for every source ``s`` and step count ``tau``, the realised
cumulative sequence count ``N_s(tau)`` is an integer, never decreases, sums over sources to ``B * tau``,
and differs from the schedule's cumulative target ``C_s(tau) = B * sum_{u<tau} w_s(u)`` by at most
``depth(s) / 2 <= ceil(log2 K) / 2`` (``error_bound``): 0 for one source, 1/2 for two, 1 for three or four,
3 for 64, 4 for 256 (``MAX_SOURCES``).

Method: a balanced split tree. Sources ``[lo, hi)`` form a node whose children are ``[lo, mid)`` and
``[mid, hi)``, ``mid = lo + (hi - lo) // 2`` (so 3 sources are ``(0, (1, 2))`` and 4 are
``((0, 1), (2, 3))``). The root's realised count is ``y = B * tau``. A node's realised count ``y`` is
translated back into "time" through the inverse of the node's own target curve (linear between steps),
``t_y = C_node^-1(y)``, and its left child receives ``round(C_left(t_y))``; the right child the rest.
Worked example: two sources at 5% / 95% and ``B = 8``: ``N_0(tau) = round(0.4 tau) = 0, 0, 1, 1, 2, 2``
for ``tau = 0..5``, so batches 0..4 hold 0, 1, 0, 1, 0 domain sequences and ``N_1 = 8 tau - N_0``.

Proof of the bound. The root is exact (``C_root(tau) = B * tau`` because weights sum to exactly 1). Let a
node have ``|y - C_node(tau)| <= e``. Its children's targets are non-decreasing and add up to the node's,
so between ``tau`` and ``t_y`` each child's target moves in the same direction as the node's and by at
most as much: ``|C_left(t_y) - C_left(tau)| <= |C_node(t_y) - C_node(tau)| = |y - C_node(tau)| <= e``, and
the same for ``C_right(t_y) = y - C_left(t_y)``. Rounding moves the left share by <= 1/2 and the right
share by the opposite amount, so both children are within ``e + 1/2``. By induction a leaf at depth ``d``
is within ``d / 2``; the balanced tree has depth ``ceil(log2 K)``. Monotonicity: ``y -> C_left(t_y)`` is
non-decreasing with slope <= 1, so the left count rises by 0 or 1 when ``y`` rises by 1 and the right
count never falls; sums are exact by construction.

History. A node that is ahead of its target (``y > C_node(tau)``) is split at the step where its target
*will* reach ``y``, so ``N(tau)`` may depend on the weights of a few steps at or after ``tau``;
``horizon(tau)`` names the last such step, and a schedule change must take effect after the horizon of
everything already served (``MixingEngine.first_changeable_step``). When a node's weights are zero for
ever (its target stops at ``V < y``) there is no such step: its left child keeps its final target
``L``, and a later change that restarts the node would give it ``L + x`` for some ``x`` in ``[0, y - V]``.
If rounding gives the same integer over that whole interval no change can alter the split; otherwise the
split depends on weights no one has chosen yet and the horizon is ``UNBOUNDED_HORIZON`` (changes must
wait until that subtree has caught up, i.e. they are refused).

Cost: per ``tau`` one pass over the ``K - 1`` internal nodes, each O(log pieces) exact arithmetic (a
bisection over the pieces plus a closed-form solve inside one), with no replay of earlier steps. Targets
are held as integers over one common denominator, so the arithmetic is exact without ``Fraction`` costs.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from mixer_contract.errors import InvalidInput
from mixer_contract.job import MAX_SOURCES
from mixer_service.engine.schedule import Piece

UNBOUNDED_HORIZON = 2**62  # "depends on weights not chosen yet": no change may take effect


def error_bound(num_sources: int) -> Fraction:
    """The documented bound on ``|N_s(tau) - C_s(tau)|`` for a job of ``num_sources`` sources."""
    return Fraction((num_sources - 1).bit_length(), 2)


def _round(x: int, scale: int) -> int:
    """``round(x / scale)``, half up: the one rounding rule of the split (it fixes every job's data order)."""
    return (2 * x + scale) // (2 * scale)


@dataclass(frozen=True)
class _Curve:
    """A node's cumulative target times ``scale`` (a common denominator, so all arithmetic is on exact
    integers), piece by piece: ``C(start_i + m) = c0_i + B (m w_i + s_i m (m-1)/2)``."""

    starts: list[int]
    c0: list[int]  # value at each piece start (non-decreasing)
    w: list[int]
    s: list[int]
    batch: int

    def at(self, tau: int) -> int:
        i = bisect.bisect_right(self.starts, tau) - 1
        return self._in_piece(i, tau - self.starts[i])

    def _in_piece(self, i: int, m: int) -> int:
        return self.c0[i] + self.batch * (m * self.w[i] + self.s[i] * (m * (m - 1) // 2))

    def crossing(self, y: int, ends: list[int | None]) -> int | None:
        """Smallest ``tau`` with ``C(tau + 1) >= y > 0``; None if the target stops below ``y``."""
        i = bisect.bisect_left(self.c0, y) - 1  # the piece whose values pass y (c0[0] = 0 < y)
        end = ends[i]
        if end is None:  # the open last piece: constant weights
            rate = self.batch * self.w[i]
            if rate == 0:
                return None
            return self.starts[i] - ((self.c0[i] - y) // rate) - 1  # start + ceil((y - c0) / rate) - 1
        return self.starts[i] + self._first_reaching(i, y, end - self.starts[i]) - 1

    def _first_reaching(self, i: int, y: int, length: int) -> int:
        """Smallest ``m`` in ``[1, length]`` with ``C(start_i + m) >= y`` (it exists)."""
        # 2 (C(start + m) - y) = a m^2 + b m + c over integers, scaled by a power of two into float range
        # (the common denominator of many phases passes 2**1024); the roots do not move.
        a2, b2, c2 = self.batch * self.s[i], 2 * self.batch * self.w[i] - self.batch * self.s[i], \
            2 * (self.c0[i] - y)
        shift = max(0, max(abs(a2), abs(b2), abs(c2)).bit_length() - 500)
        a, b, c = float(a2 >> shift), float(b2 >> shift), float(c2 >> shift)  # c < 0
        disc = b ** 2 - 4 * a * c
        # The stable root of a m^2 + b m + c = 0 (smaller positive root when a < 0); a float guess that
        # exact comparisons then correct, so the answer does not depend on floating point.
        denom = b + math.sqrt(max(disc, 0.0))
        guess = math.ceil(-2 * c / denom) if denom > 0 and math.isfinite(denom) else length
        lo, hi = 1, length
        guess = min(max(guess, lo), hi)
        reached = self._in_piece(i, guess) >= y
        step = 1
        while True:  # gallop from the guess to a bracket, then bisect
            probe = guess - step if reached else guess + step
            if probe < lo or probe > hi:
                break
            if (self._in_piece(i, probe) >= y) != reached:
                break
            step *= 2
        if reached:
            hi, lo = guess, max(lo, guess - step)
        else:
            lo, hi = guess + 1, min(hi, guess + step)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._in_piece(i, mid) >= y:
                hi = mid
            else:
                lo = mid + 1
        return lo


class MixturePlan:
    """Cumulative targets and realised per-source sequence counts for one schedule log."""

    def __init__(self, pieces: list[Piece], num_sources: int, batch_size: int) -> None:
        if not 1 <= num_sources <= MAX_SOURCES:
            raise InvalidInput(f"sources: a job mixes 1 to {MAX_SOURCES} sources (got {num_sources})")
        self.pieces = pieces
        self.num_sources = num_sources
        self.batch_size = batch_size
        self._starts = [p.start for p in pieces]
        self._ends = [p.end for p in pieces]
        cum = [Fraction(0)] * num_sources
        self._cum_at_start: list[tuple[Fraction, ...]] = []
        for p in pieces:
            self._cum_at_start.append(tuple(cum))
            if p.end is not None:
                cum = list(self._advance(p, tuple(cum), p.end - p.start))
        self._scale = math.lcm(*(v.denominator for p, c in zip(pieces, self._cum_at_start, strict=True)
                                 for v in (*c, *p.w0, *p.slope)))
        self._curves = {node: self._curve(*node) for node in self._nodes(0, num_sources)}
        self._split = lru_cache(maxsize=4096)(self._compute_split)

    def _advance(self, p: Piece, cum: tuple[Fraction, ...], m: int) -> tuple[Fraction, ...]:
        """Targets after ``m`` more steps of piece ``p`` (sum of an arithmetic series)."""
        b = self.batch_size
        tri = Fraction(m * (m - 1), 2)
        return tuple(c + b * (m * w + s * tri) for c, w, s in zip(cum, p.w0, p.slope, strict=True))

    def _nodes(self, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        """Every node of the split tree under ``[lo, hi)``, itself first."""
        yield lo, hi
        if hi - lo > 1:
            mid = lo + (hi - lo) // 2
            yield from self._nodes(lo, mid)
            yield from self._nodes(mid, hi)

    def _curve(self, lo: int, hi: int) -> _Curve:
        def total(values: tuple[Fraction, ...]) -> int:
            return (sum(values[lo:hi], Fraction(0)) * self._scale).numerator  # an integer: scale is the lcm

        pieces = self.pieces
        return _Curve(self._starts, [total(c) for c in self._cum_at_start], [total(p.w0) for p in pieces],
                      [total(p.slope) for p in pieces], self.batch_size)

    def target(self, tau: int) -> tuple[Fraction, ...]:
        """``C_s(tau)``: the schedule's cumulative sequence target per source after ``tau`` steps."""
        i = bisect.bisect_right(self._starts, tau) - 1
        p = self.pieces[i]
        return self._advance(p, self._cum_at_start[i], tau - p.start)

    def _left_count(self, lo: int, hi: int, y: int) -> tuple[int, int]:
        """``round(C_left(C_node^-1(y)))`` for node ``[lo, hi)`` and the last step whose weights it read."""
        if y <= 0:
            return 0, -1
        mid = lo + (hi - lo) // 2
        node, left, scale = self._curves[lo, hi], self._curves[lo, mid], self._scale
        y_scaled = y * scale
        tau = node.crossing(y_scaled, self._ends)
        if tau is None:  # the node's target stops below y: the left child's target has stopped too
            final, stop = left.c0[-1], node.c0[-1]
            consulted = self._starts[-1]
            if _round(final, scale) != _round(final + y_scaled - stop, scale):
                consulted = UNBOUNDED_HORIZON  # a restart of this subtree could round it either way
            return _round(final, scale), consulted
        node0, left0 = node.at(tau), left.at(tau)
        node_rate, left_rate = node.at(tau + 1) - node0, left.at(tau + 1) - left0
        # round(left0 + (y - node0) * left_rate / node_rate), all over the common scale
        return _round(left0 * node_rate + (y_scaled - node0) * left_rate, scale * node_rate), tau

    def _compute_split(self, tau: int) -> tuple[tuple[int, ...], int]:
        counts = [0] * self.num_sources
        horizon = tau - 1
        stack = [(0, self.num_sources, self.batch_size * tau)]
        while stack:
            lo, hi, y = stack.pop()
            if hi - lo == 1:
                counts[lo] = y
                continue
            left, consulted = self._left_count(lo, hi, y)
            horizon = max(horizon, consulted)
            mid = lo + (hi - lo) // 2
            stack += [(lo, mid, left), (mid, hi, y - left)]
        return tuple(counts), horizon

    def realized(self, tau: int) -> tuple[int, ...]:
        """``N_s(tau)``: sequences each source has contributed in steps ``< tau`` (cached, pure)."""
        return self._split(tau)[0]

    def horizon(self, tau: int) -> int:
        """Last step whose weights ``realized(tau)`` depends on (>= tau - 1; non-decreasing in tau)."""
        return self._split(tau)[1]

    def step_counts(self, step: int) -> tuple[int, ...]:
        """Sequences per source in global batch ``step``."""
        before, after = self.realized(step), self.realized(step + 1)
        return tuple(a - b for a, b in zip(after, before, strict=True))

    def realized_one(self, tau: int, source: int) -> int:
        """``N_source(tau)`` alone: only the nodes on the source's path are split (O(log K) nodes)."""
        lo, hi, y = 0, self.num_sources, self.batch_size * tau
        while hi - lo > 1:
            left = self._left_count(lo, hi, y)[0]
            mid = lo + (hi - lo) // 2
            if source < mid:
                hi, y = mid, left
            else:
                lo, y = mid, y - left
        return y

    def first_step_exceeding(self, source: int, limit: int, horizon: int) -> int | None:
        """First step whose batch pushes ``source`` past ``limit`` sequences, if before ``horizon``."""
        if self.realized_one(horizon, source) <= limit:
            return None
        lo, hi = 0, horizon  # smallest tau with realized(tau) > limit
        while lo < hi:
            mid = (lo + hi) // 2
            if self.realized_one(mid, source) > limit:
                hi = mid
            else:
                lo = mid + 1
        return lo - 1
