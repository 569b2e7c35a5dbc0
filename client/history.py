"""What a run has received, so a rewritten history is caught by the trainer even when no replica can tell.

Every batch names the chain hash of the schedule-log prefix it was computed under (``log_chain``). For a
step already served that value never changes (later versions take effect after every served step), so a
second answer for the same step under another chain means the state store accepted a change that rewrites
steps this run trained on — e.g. after a restore from a backup. The pins are kept as step ranges, one per
schedule version seen, so they stay small and can ride in a checkpoint's ``state_dict``.
"""

from __future__ import annotations

import bisect
from typing import Any

from client.errors import HistoryRewritten


class LogPins:
    """Step ranges ``[first, last]`` and the log chain each was received under."""

    def __init__(self) -> None:
        self._firsts: list[int] = []
        self._ranges: list[tuple[int, int, str]] = []

    def check(self, step: int, chain: str | None, since: int | None = None) -> None:
        """Pin ``step`` to ``chain``, or raise ``HistoryRewritten`` if it, or any step this run received in
        ``[since, step)`` (the steps the same schedule version governs), was received under another chain.

        The second half catches a run resumed past the rewritten steps: a change that took effect at step
        30 of a store restored from a backup makes step 60 say ``since`` 30 under a chain that steps 30..59,
        received before, do not have."""
        if chain is None:  # a server from before log chains: nothing to compare
            return
        low = step if since is None else min(since, step)
        i = bisect.bisect_right(self._firsts, low) - 1
        for first, last, pinned in self._ranges[max(i, 0):]:
            if first > step:
                break
            if last >= low and pinned != chain:
                seen = max(first, low)
                what = (f"step {step} was received before" if seen == step else
                        f"step {step} is computed under a schedule version that took effect at step {since}, "
                        f"but step {seen} was received")
                raise HistoryRewritten(
                    f"{what} under schedule log {pinned[:12]}…, now under {chain[:12]}…: the service's "
                    "schedule history was rewritten (a state store restored from a backup?); the batches "
                    "this run trained on are no longer the job's. Stop and ask the operator "
                    "(docs/operations.md, history_conflict)", step=seen, expected=pinned, got=chain)
        i = bisect.bisect_right(self._firsts, step) - 1
        if i >= 0 and self._ranges[i][1] >= step:
            return
        self._insert(step, chain, i)

    def _insert(self, step: int, chain: str, i: int) -> None:
        joins_left = i >= 0 and self._ranges[i][1] == step - 1 and self._ranges[i][2] == chain
        j = i + 1
        joins_right = j < len(self._ranges) and self._ranges[j][0] == step + 1 and self._ranges[j][2] == chain
        if joins_left and joins_right:
            self._ranges[i] = (self._ranges[i][0], self._ranges[j][1], chain)
            del self._ranges[j], self._firsts[j]
        elif joins_left:
            self._ranges[i] = (self._ranges[i][0], step, chain)
        elif joins_right:
            self._ranges[j] = (step, self._ranges[j][1], chain)
            self._firsts[j] = step
        else:
            self._ranges.insert(j, (step, step, chain))
            self._firsts.insert(j, step)

    def state(self) -> list[list[Any]]:
        """Plain lists, fit for a ``torch.load(weights_only=True)`` checkpoint."""
        return [list(r) for r in self._ranges]

    def load(self, state: list[list[Any]]) -> None:
        """Add the pins of a saved state; a saved range that contradicts a held one raises."""
        for first, last, chain in state:
            for step in (int(first), int(last)):
                self.check(step, str(chain))
            self._fill(int(first), int(last), str(chain))

    def _fill(self, first: int, last: int, chain: str) -> None:
        """Pin every step of ``[first, last]`` (ends already pinned) by merging the ranges between them."""
        lo = bisect.bisect_right(self._firsts, first) - 1
        hi = bisect.bisect_right(self._firsts, last) - 1
        inside = self._ranges[lo : hi + 1]
        if any(c != chain for _, _, c in inside):
            step = next(f for f, _, c in inside if c != chain)
            raise HistoryRewritten(f"a saved state pins steps {first}..{last} to another schedule log than "
                                   f"this loader received for step {step}", step=step, expected=chain,
                                   got=next(c for _, _, c in inside if c != chain))
        self._ranges[lo : hi + 1] = [(self._ranges[lo][0], max(self._ranges[hi][1], last), chain)]
        self._firsts[lo : hi + 1] = [self._ranges[lo][0]]
