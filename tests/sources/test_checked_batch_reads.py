"""Batched checked reads (issue 21): a batch's rows and index lookups are read together, each 4 KiB block
checked once, and answer exactly what the one-read-per-lookup path answers, bit rot included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from service_helpers import reblock
from test_integrity_sources import TOK, rot_in_place

from mixer_contract.errors import CorruptData
from mixer_service.prepare.writer import prepare_source
from mixer_service.sources import PreparedSource, ShardCache
from mixer_service.sources.source_format import OFFSETS_FILE


@pytest.fixture(scope="module")
def many_docs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("many") / "web"
    docs = [f"document {i}: " + "word " * (1 + i % 13) for i in range(20_000)]
    prepare_source(docs, out, TOK, name="web", shard_tokens=100_000, progress=False)
    return out


@pytest.mark.parametrize("entries", [512, 700, 4096, 1 << 20])
def test_an_index_window_answers_what_numpy_answers(many_docs: Path, entries: int) -> None:
    reblock(many_docs, entries)
    src, plain = PreparedSource.open(many_docs), np.load(many_docs / OFFSETS_FILE)
    rng = np.random.default_rng(entries)
    for _ in range(50):
        values = np.r_[rng.integers(-3, plain[-1] + 5, 40), plain[rng.integers(0, len(plain), 5)]]
        window = src.doc_offsets.window(values)
        probes = np.r_[values, values + rng.integers(-3, 4, values.size)]  # some outside the window
        for side in ("left", "right"):
            got = window.searchsorted(probes, side=side)
            np.testing.assert_array_equal(got, plain.searchsorted(probes, side))
        for a in rng.integers(0, len(plain), 10).tolist():
            c = min(a + int(rng.integers(0, 30)), len(plain))
            np.testing.assert_array_equal(window[a:c], plain[a:c])


def test_gathered_rows_equal_slices_and_bit_rot_is_rebuilt(many_docs: Path) -> None:
    # memory_bytes=0: the checked disk reads under test (a resident copy would never read the file again)
    src = PreparedSource.open(many_docs, cache=ShardCache(many_docs / ".cache" / "shards", memory_bytes=0))
    shard = src.tokens.shard(1)
    want = np.asarray(shard).copy()
    starts = np.array([9000, 0, 4000, 4100, len(want) - 2048])
    out = np.zeros((6, 2048), dtype=want.dtype)
    entry = many_docs / ".cache" / "shards" / f"{src.shards[1].raw_sha256}.bin"
    rot_in_place(entry, 4100 * want.itemsize + 7)  # a block two rows share
    shard.gather_rows(starts, 2048, out, np.array([5, 0, 1, 2, 3]))
    for row, start in zip([5, 0, 1, 2, 3], starts.tolist(), strict=True):
        np.testing.assert_array_equal(out[row], want[start:start + 2048])
    assert src.cache.stats.rebuilt == 1 and not out[4].any()


def test_bit_rot_in_an_index_run_a_window_reads_is_refused_by_name(many_docs: Path) -> None:
    reblock(many_docs, 512)
    src, plain = PreparedSource.open(many_docs), np.load(many_docs / OFFSETS_FILE)
    src.doc_offsets.window(plain[[5000]])  # verified, then rots under the server
    rot_in_place(many_docs / OFFSETS_FILE, 128 + 8 * 5001 + 1)
    with pytest.raises(CorruptData, match="checksum mismatch"):
        src.doc_offsets.window(plain[[5000]])
