"""A permutation's table (domains up to ``_TABLE_MAX``) is built by encrypting the whole Feistel domain once
and walking through that table; it must be the very bijection the per-element cycle walk computes, or every
job's batches would change."""

from __future__ import annotations

import numpy as np
import pytest

from mixer_service.engine.permutation import _WHOLE_DOMAIN_MAX, Permutation

SIZES = [1, 2, 3, 5, 16, 17, 100, 511, 512, 513, 1013, 1333, 4095, 4096, 4097, 65535, 65536,
         _WHOLE_DOMAIN_MAX // 4 + 1, _WHOLE_DOMAIN_MAX + 1]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("key", [0, 1, 12345678901234567, 2**64 - 1])
def test_the_table_is_the_cycle_walk(n: int, key: int) -> None:
    perm = Permutation(n, key, table_max=1 << 21)
    walked = perm._walk(np.arange(n), perm._encrypt)
    tabled = perm.apply(np.arange(n))
    assert np.array_equal(tabled, walked)
    assert np.array_equal(np.sort(tabled), np.arange(n))
    assert np.array_equal(perm.invert(tabled), np.arange(n))


def test_a_row_order_pinned_before_the_table_changed() -> None:
    """The first 8 of a 512-element permutation, as computed before this change (per-element walk)."""
    perm = Permutation(512, 0x5EED)
    assert perm.apply(np.arange(8)).tolist() == PINNED


PINNED = [291, 398, 33, 105, 177, 234, 425, 202]
