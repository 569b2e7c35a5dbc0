"""A progress line every few seconds while a person waits for training.

    step 120/1000  loss 3.412  41.2k tok/s  data stall 0.8%  abc seen 1.53x  eta 2m31s

Numbers are over the interval since the previous line (loss: its last step), so a slowdown shows at
once instead of being averaged away. The domain repetition comes from the service (``describe``), asked
once per line, never per step.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from client import MixerClient, MixerClientError

log = logging.getLogger(__name__)


class ProgressLine:
    """Call with each step's metrics record (``train(progress=...)``); prints at most every ``interval_s``.

    ``describe(data_step)`` adds text such as the domain repetition; it is called only when a line is
    printed. The last step (``total_steps``) always prints.
    """

    def __init__(self, total_steps: int, interval_s: float = 5.0,
                 describe: Callable[[int], str] | None = None, out: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total_steps, self.interval_s, self.describe = total_steps, interval_s, describe
        self.out, self.clock = out, clock
        self._last_time = clock()
        self._last_tokens: int | None = None
        self._last_step = 0
        self._wait = self._busy = 0.0
        self.lines = 0

    def __call__(self, record: dict[str, Any]) -> None:
        self._wait += record["data_wait_s"]
        self._busy += record["step_time_s"]
        now = self.clock()
        if self._last_tokens is None:  # the first step: rates start here, not at start-up
            self._last_tokens = record["tokens"] - record["tokens"] // max(record["step"], 1)
            self._last_step = record["step"] - 1
            self._last_time = now - record["step_time_s"]
        if now - self._last_time < self.interval_s and record["step"] < self.total_steps:
            return
        elapsed = max(now - self._last_time, 1e-9)
        rate = (record["tokens"] - self._last_tokens) / elapsed
        eta = (self.total_steps - record["step"]) * elapsed / max(record["step"] - self._last_step, 1)
        parts = [f"step {record['step']}/{self.total_steps}", f"loss {record['loss']:.3f}",
                 f"{_si(rate)} tok/s", f"data stall {100 * self._wait / max(self._busy, 1e-9):.1f}%"]
        if self.describe is not None:
            parts.append(self.describe(int(record["data_step"])))
        parts.append(f"eta {_duration(eta)}")
        print("  ".join(p for p in parts if p), file=self.out or sys.stderr, flush=True)
        self.lines += 1
        self._last_time, self._last_tokens, self._last_step = now, record["tokens"], record["step"]
        self._wait = self._busy = 0.0


def domain_repetition(client: MixerClient, job: str, sources: list[str]) -> Callable[[int], str]:
    """``abc seen 1.53x`` for each repeated source: mean times its documents were seen through a step."""

    def describe(data_step: int) -> str:
        parts = []
        for source in sources:
            try:
                reps = client.repetitions(job, source, data_step)
            except MixerClientError as exc:  # a progress line must never stop training
                log.warning("repetition query failed",
                            extra={"job": job, "source": source, "error": str(exc)})
                parts.append(f"{source} seen ?")
                continue
            parts.append(f"{source} seen {reps['mean']:.2f}x")
        return "  ".join(parts)

    return describe


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _si(value: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"
