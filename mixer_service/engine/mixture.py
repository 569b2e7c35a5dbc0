"""The exact-mixture arithmetic: how many sequences each source contributes to every global batch.

Invariant kept here and nowhere else: for every source ``s`` and step count ``tau``, the realised
cumulative sequence count ``N_s(tau)`` is an integer, never decreases, sums over sources to
``B * tau``, and differs from the schedule's cumulative target ``C_s(tau) = B * sum_{u<tau} w_s(u)`` by
at most 1.

``N(tau)`` is a pure function of the schedule pieces (no replay of earlier steps), computed by splitting
the stream down a binary tree of sources. A node's realised count ``y`` is translated back into "time"
through the inverse of the node's own target curve, and its left child receives
``round(C_left(C_node^-1(y)))``. That map is monotone with slope <= 1, so both children stay monotone,
and each level adds at most 1/2 of error: a tree of depth <= 2 (up to four sources) keeps the bound <= 1.

A node that is ahead of its target is split by looking at where its target *will* cross ``y``, so
``N(tau)`` may depend on the weights of a few steps at or after ``tau``; ``horizon(tau)`` names the last
such step. A schedule change must take effect after the horizon of everything already served, which is
how "changes never rewrite history" stays exact (see ``MixingEngine.first_changeable_step``).
"""

from __future__ import annotations

import bisect
from fractions import Fraction
from functools import lru_cache

from mixer_service.engine.schedule import Piece
from mixer_service.errors import InvalidInput

MAX_SOURCES = 4
_HALF = Fraction(1, 2)

Tree = int | tuple["Tree", "Tree"]


def source_tree(num_sources: int) -> Tree:
    """Depth <= 2 split tree; the first source sits highest (error <= 1/2 when it is alone there)."""
    shapes: dict[int, Tree] = {1: 0, 2: (0, 1), 3: (0, (1, 2)), 4: ((0, 1), (2, 3))}
    if num_sources not in shapes:
        raise InvalidInput(f"sources: a job mixes 1 to {MAX_SOURCES} sources (got {num_sources}); "
                           "prepare several corpora of one kind into a single source")
    return shapes[num_sources]


def _total(values: tuple[Fraction, ...], leaves: tuple[int, ...]) -> Fraction:
    """Sum of the per-source ``values`` over a node's ``leaves``."""
    return sum((values[k] for k in leaves), Fraction(0))


def _leaves(node: Tree) -> tuple[int, ...]:
    return (node,) if isinstance(node, int) else _leaves(node[0]) + _leaves(node[1])


class MixturePlan:
    """Cumulative targets and realised per-source sequence counts for one schedule log."""

    def __init__(self, pieces: list[Piece], num_sources: int, batch_size: int) -> None:
        self.pieces = pieces
        self.num_sources = num_sources
        self.batch_size = batch_size
        self._starts = [p.start for p in pieces]
        self._tree = source_tree(num_sources)
        cum = [Fraction(0)] * num_sources
        self._cum_at_start: list[tuple[Fraction, ...]] = []
        for p in pieces:
            self._cum_at_start.append(tuple(cum))
            if p.end is not None:
                cum = list(self._advance(p, tuple(cum), p.end - p.start))
        self._split = lru_cache(maxsize=4096)(self._compute_split)

    def _advance(self, p: Piece, cum: tuple[Fraction, ...], m: int) -> tuple[Fraction, ...]:
        """Targets after ``m`` more steps of piece ``p`` (sum of an arithmetic series)."""
        b = self.batch_size
        tri = Fraction(m * (m - 1), 2)
        return tuple(c + b * (m * w + s * tri) for c, w, s in zip(cum, p.w0, p.slope, strict=True))

    def _piece_index(self, tau: int) -> int:
        return bisect.bisect_right(self._starts, tau) - 1

    def target(self, tau: int) -> tuple[Fraction, ...]:
        """``C_s(tau)``: the schedule's cumulative sequence target per source after ``tau`` steps."""
        i = self._piece_index(tau)
        p = self.pieces[i]
        return self._advance(p, self._cum_at_start[i], tau - p.start)

    def _node_target(self, leaves: tuple[int, ...], tau: int) -> Fraction:
        return _total(self.target(tau), leaves)

    def _crossing_step(self, leaves: tuple[int, ...], y: Fraction) -> int | None:
        """Smallest ``tau`` with ``C_node(tau + 1) >= y > 0``; None if the node's target never gets there."""
        for i, p in enumerate(self.pieces):
            if p.end is None:
                rate = self.batch_size * _total(p.w0, leaves)
                if rate == 0:
                    return None
                need = -((_total(self._cum_at_start[i], leaves) - y) // rate)  # ceil((y - start) / rate)
                return p.start + int(need) - 1
            if self._node_target(leaves, p.end) < y:
                continue
            lo, hi = 1, p.end - p.start  # smallest m in [lo, hi] with C(start + m) >= y
            while lo < hi:
                mid = (lo + hi) // 2
                if self._node_target(leaves, p.start + mid) >= y:
                    hi = mid
                else:
                    lo = mid + 1
            return p.start + lo - 1
        raise AssertionError("schedule pieces must end with an open piece")

    def _left_share(self, node: tuple[Tree, Tree], y: int) -> tuple[Fraction, int]:
        """``C_left(C_node^-1(y))``, the left child's target when the node's target reached ``y``, and the
        last step whose weights that consulted."""
        if y <= 0:
            return Fraction(0), -1
        leaves, left = _leaves(node), _leaves(node[0])
        tau = self._crossing_step(leaves, Fraction(y))
        if tau is None:  # the node's target stops below y, so the left child's target has stopped too
            return _total(self._cum_at_start[-1], left), self.pieces[-1].start
        c0, c1 = self.target(tau), self.target(tau + 1)
        node0, left0 = _total(c0, leaves), _total(c0, left)
        node_rate, left_rate = _total(c1, leaves) - node0, _total(c1, left) - left0
        if node_rate == 0:
            return left0, tau
        return left0 + (Fraction(y) - node0) * left_rate / node_rate, tau

    def _compute_split(self, tau: int) -> tuple[tuple[int, ...], int]:
        counts = [0] * self.num_sources
        horizon = tau - 1

        def split(node: Tree, y: int) -> None:
            nonlocal horizon
            if isinstance(node, int):
                counts[node] = y
                return
            share, consulted = self._left_share(node, y)
            horizon = max(horizon, consulted)
            left = int((share + _HALF).__floor__())
            split(node[0], left)
            split(node[1], y - left)

        split(self._tree, self.batch_size * tau)
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

    def first_step_exceeding(self, source: int, limit: int, horizon: int) -> int | None:
        """First step whose batch pushes ``source`` past ``limit`` sequences, if before ``horizon``."""
        if self.realized(horizon)[source] <= limit:
            return None
        lo, hi = 0, horizon  # smallest tau with realized(tau) > limit
        while lo < hi:
            mid = (lo + hi) // 2
            if self.realized(mid)[source] > limit:
                hi = mid
            else:
                lo = mid + 1
        return lo - 1
