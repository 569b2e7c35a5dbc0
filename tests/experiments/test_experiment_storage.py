"""The storage experiment's budget accounting: what a budget buys includes the per-sample index."""

from __future__ import annotations

import numpy as np

from experiments.storage import INDEX_BYTES, largest_n
from mixer_service.planner.image_budget import EncodedSizes
from mixer_service.sources.image_source import prepare_image_source


def test_largest_n_fits_the_budget_with_the_index_counted(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 60)
    sizes = EncodedSizes(images)
    budget = 12_000
    n = largest_n(sizes, 50, budget)
    assert 0 < n < 60
    meta = prepare_image_source(images[:n], labels[:n], tmp_path / "fit", 50)
    stored = meta.total_bytes + (tmp_path / "fit" / "index.npy").stat().st_size
    assert stored <= budget  # every byte on disk, the index included
    over = prepare_image_source(images[: n + 1], labels[: n + 1], tmp_path / "over", 50)
    assert over.total_bytes + (tmp_path / "over" / "index.npy").stat().st_size > budget
    # leaving the index out (as the experiment once did) claims more images than the budget holds
    q = np.full(60, 50)
    cumulative = np.cumsum(sizes.payload_bytes(q)) + sizes.header_bytes(q)
    assert int(np.searchsorted(cumulative, budget, "right")) > n
    assert INDEX_BYTES == 23  # shard, offset, length, header id, label, quality
