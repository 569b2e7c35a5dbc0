"""Bounded value types: one definition per concept, used by the routes, the engine and both stores.

Every integer that arrives from a request (step, trained step, rank/world, version, limits) is checked here
and nowhere else; the HTTP layer's schema is generated from the same bounds, so the OpenAPI schema, the
engine and the stores cannot disagree about what is valid.
Integers stay below 2**53 so every JSON client (JavaScript included) reads them exactly and SQLite's 64-bit
columns never overflow; booleans are never integers.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from mixer_contract.errors import InvalidInput

MAX_INT = 2**53 - 1


@dataclass(frozen=True)
class IntRange:
    """An integer concept with inclusive bounds: ``check`` here, the same bounds in the HTTP schema."""

    name: str
    low: int
    high: int = MAX_INT
    doc: str = ""

    def check(self, value: Any, field: str | None = None) -> int:
        """``value`` if it is an int (not a bool) in range, else ``InvalidInput`` naming the field."""
        if isinstance(value, bool) or not isinstance(value, int) or not self.low <= value <= self.high:
            raise InvalidInput(
                f"{field or self.name}: must be an integer in [{self.low}, {self.high}], got {value!r}"
            )
        return value

    def below(self, value: Any, end: int, field: str | None = None) -> int:
        """``check``, and also below ``end`` (e.g. a job's total steps)."""
        self.check(value, field)
        if value >= end:
            raise InvalidInput(f"{field or self.name}: must be an integer in [{self.low}, {end}), "
                               f"got {value!r}")
        return value


STEP = IntRange("step", 0, doc="a global step, 0-based")
TRAINED_STEP = IntRange("trained_step", -1, doc="last step the trainer finished; -1: nothing trained yet")
VERSION = IntRange("version", 1, doc="schedule version, 1-based")
RANK = IntRange("rank", 0, doc="this trainer's rank, 0-based")
WORLD = IntRange("world", 1, doc="number of ranks sharing the global batch")
COUNT = IntRange("count", 0, doc="a non-negative count")
# Several steps in one batch request spread its fixed costs (HTTP, framing, the head read) over them.
STEPS = IntRange("steps", 1, 64, doc="consecutive steps one batch request returns")
# Job shapes: bounded so one job cannot ask for more memory per batch than a machine has.
SEQ_LEN = IntRange("seq_len", 2, 2**20, doc="tokens per sequence")
GLOBAL_BATCH = IntRange("global_batch", 1, 2**20, doc="sequences per global batch")
SEED = IntRange("seed", 0, doc="seed of every permutation of the job")
TOTAL_STEPS = IntRange("total_steps", 1, doc="steps the job will be trained for")

def check_step(step: Any, total_steps: int, field: str = "step") -> int:
    """A step of a job with ``total_steps`` steps."""
    return STEP.below(step, total_steps, field)


def check_trained_step(step: Any, total_steps: int) -> int:
    """Progress a trainer reports: ``-1`` (nothing trained, e.g. rewound to the start) to the last step."""
    return TRAINED_STEP.below(step, total_steps)


@dataclass(frozen=True)
class RankSlice:
    """Rank ``rank`` of ``world`` owns rows ``[rank * B/world, (rank + 1) * B/world)`` of a global batch."""

    rank: int
    world: int

    @classmethod
    def of(cls, rank: Any, world: Any, global_batch: int) -> RankSlice:
        WORLD.check(world)
        if global_batch % world:
            raise InvalidInput(f"world: must be a positive divisor of global_batch={global_batch}, "
                               f"got {world}")
        RANK.check(rank)
        if rank >= world:
            raise InvalidInput(f"rank: must be in [0, {world}), got {rank}")
        return cls(rank, world)

    def rows(self, global_batch: int) -> slice:
        per_rank = global_batch // self.world
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


# A schedule weight is an exact fraction whose numerator and denominator have at most this many digits,
# as given and as stored (after normalising to sum 1): every stored weight then parses again, and the
# engine's exact arithmetic stays small. 30 digits (100 bits) are ample for any mixture.
WEIGHT_DIGITS = 30


def check_weight_size(weight: Fraction, field: str) -> Fraction:
    """``weight`` if its numerator and denominator have at most ``WEIGHT_DIGITS`` digits each."""
    bound = 10**WEIGHT_DIGITS
    if abs(weight.numerator) >= bound or weight.denominator >= bound:
        raise InvalidInput(f"{field}: weights are fractions p/q of at most {WEIGHT_DIGITS} digits each, "
                           f"got one with {len(str(weight.numerator))} over {len(str(weight.denominator))}")
    return weight
