"""Deterministic epoch order for sample sources (e.g. images): batch rows -> sample ids, random access.

The same epoch discipline as token sources: epoch ``e`` is a keyed permutation of all samples, every
sample is served once per epoch, and rank ``r`` of ``W`` takes a fixed contiguous slice of the global batch.
"""

from __future__ import annotations

import numpy as np

from mixer_contract.errors import InvalidInput
from mixer_service.engine.permutation import Permutation, derive_key


def sample_indices(num_samples: int, name: str, seed: int, step: int, batch_size: int,
                   rank: int = 0, world: int = 1) -> np.ndarray:
    for field, value, low in (("step", step, 0), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidInput(f"{field}: must be an integer >= {low}, got {value!r}")
    if world < 1 or batch_size % world:
        raise InvalidInput(f"world: must be a positive divisor of batch_size={batch_size}, got {world}")
    if not 0 <= rank < world:
        raise InvalidInput(f"rank: must be in [0, {world}), got {rank}")
    per_rank = batch_size // world
    rows = step * batch_size + rank * per_rank + np.arange(per_rank, dtype=np.int64)
    epochs, positions = np.divmod(rows, num_samples)
    out = np.empty_like(rows)
    for epoch in np.unique(epochs).tolist():
        sel = epochs == epoch
        out[sel] = Permutation(num_samples, derive_key("samples", seed, name, epoch)).apply(positions[sel])
    return out
