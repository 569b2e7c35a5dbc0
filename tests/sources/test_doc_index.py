"""The document index verified block by block (``sources.DocIndex``): lookups equal numpy's, touch only
their blocks, refuse a corrupt block by name, and a remote index is a sparse local file filled by ranged
reads, checked on arrival and healed when its local copy is damaged."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from service_helpers import reblock

from mixer_contract.errors import CorruptData
from mixer_contract.job import JobConfig
from mixer_contract.schedule import Schedule
from mixer_service.engine import MixingEngine
from mixer_service.prepare.tokenizer import ByteTokenizer
from mixer_service.prepare.writer import prepare_source
from mixer_service.sources import PreparedSource, ShardCache
from mixer_service.sources.doc_index import DocIndex
from mixer_service.sources.origins import LocalOrigin
from mixer_service.sources.source_format import META_FILE, OFFSETS_FILE, MetaFile


def flip_entry(directory: Path, i: int, delta: int = 1) -> None:
    index = np.load(directory / OFFSETS_FILE, mmap_mode="r+")
    index[i] += delta  # same shape, same ends: only a hash can tell
    index.flush()


class CountingOrigin(LocalOrigin):
    """A real local origin that counts ranged reads (what an object store would be asked for)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.ranges: list[tuple[int, int]] = []

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        self.ranges.append((start, stop))
        return super().read_range(name, start, stop)


@pytest.fixture(scope="module")
def many_docs(tmp_path_factory) -> Path:
    """20,000 short real-looking documents: 40 index blocks of 512 entries (4 KiB, a disk page each)."""
    out = tmp_path_factory.mktemp("many") / "web"
    docs = [f"document {i}: " + "word " * (1 + i % 13) for i in range(20_000)]
    prepare_source(docs, out, ByteTokenizer(), name="web", progress=False)
    reblock(out, 512)
    return out


@pytest.fixture
def copy(many_docs, tmp_path) -> Path:
    return Path(shutil.copytree(many_docs, tmp_path / "web"))


def test_lookups_equal_numpy_and_read_only_their_blocks(many_docs) -> None:
    src = PreparedSource.open(many_docs)
    index, plain = src.doc_offsets, np.load(many_docs / OFFSETS_FILE)
    assert index.verified_blocks == 2  # the first and the last, at open
    total = int(plain[-1])
    probes = np.r_[-3, 0, 1, total - 1, total, total + 9, plain[::97], plain[::89] + 1, plain[5::89] - 1]
    for side in ("left", "right"):
        np.testing.assert_array_equal(index.searchsorted(probes, side=side), plain.searchsorted(probes, side))
        assert index.searchsorted(int(plain[777]), side=side) == plain.searchsorted(plain[777], side)
    fresh = PreparedSource.open(many_docs).doc_offsets
    fresh.searchsorted(int(plain[5000]) + 1, side="right")
    assert fresh.verified_blocks == 3  # one binary search reads one block
    assert int(fresh[9001]) == plain[9001] and fresh[-1] == total and fresh[0] == 0
    np.testing.assert_array_equal(fresh[1000:1003], plain[1000:1003])
    np.testing.assert_array_equal(fresh[np.array([3, 7000, -1])], plain[[3, 7000, -1]])
    assert fresh.verified_blocks == 6
    np.testing.assert_array_equal(np.asarray(fresh), plain)
    assert fresh.verified_blocks == 40
    for side in ("left", "right"):  # every block checked: one search over the whole map
        np.testing.assert_array_equal(fresh.searchsorted(probes, side=side), plain.searchsorted(probes, side))


def test_the_engine_over_a_many_block_index_equals_the_plain_one(many_docs, tmp_path) -> None:
    one_block = Path(shutil.copytree(many_docs, tmp_path / "one"))
    reblock(one_block, 1 << 20)
    config = JobConfig.parse({"seq_len": 300, "global_batch": 16, "total_steps": 200, "seed": 3,
                              "sources": [{"name": "web", "role": "repeat"}], "allow_wrap": True})
    schedule = [(0, Schedule.parse({"phases": [{"start_step": 0, "weights": {"web": 1.0}}]}, ["web"]))]
    blocked, plain = (MixingEngine.create(config, {"web": PreparedSource.open(d)}, schedule)
                      for d in (many_docs, one_block))
    for step in (0, 1, 57, 199):
        assert blocked.row_boundaries(step) == plain.row_boundaries(step)
        assert blocked.provenance(step, 1, 2) == plain.provenance(step, 1, 2)
        np.testing.assert_array_equal(blocked.batch(step).tokens, plain.batch(step).tokens)
    np.testing.assert_array_equal(blocked.repetition_counts("web", 199), plain.repetition_counts("web", 199))
    assert blocked.repetition_count("web", 12345, 120) == plain.repetition_count("web", 12345, 120)


def test_a_corrupt_block_refuses_only_the_lookups_that_need_it(copy) -> None:
    flip_entry(copy, 20 * 512 + 7)  # block 20 of 40
    with pytest.raises(CorruptData, match="document index hash mismatch in block 20"):
        PreparedSource.open(copy, verify="full")
    src = PreparedSource.open(copy)  # fast: opened without reading block 20
    assert src.document(3).size and src.document(19_000).size
    with pytest.raises(CorruptData, match=re.escape(f"{copy / OFFSETS_FILE}: document index hash mismatch")):
        src.document(20 * 512 + 100)
    assert any("block 20" in p for p in src.problems()), "readiness names the bad block"
    flip_entry(copy, 20 * 512 + 7, -1)  # put back (in place: the stamp changes, the bytes are the original)
    os.utime(copy / OFFSETS_FILE)
    assert src.problems() == [] and src.changed() is None
    assert src.document(20 * 512 + 100).size


def test_first_offsets_that_disagree_with_the_index_are_refused(copy) -> None:
    info = MetaFile.load(copy)
    firsts = list(info.doc_index.firsts)
    firsts[9] += 1  # still increasing: only the block's own data can tell
    blocks = dataclasses.replace(info.doc_index, firsts=tuple(firsts))
    (copy / META_FILE).write_text(dataclasses.replace(info, doc_index=blocks).to_json())
    src = PreparedSource.open(copy)
    with pytest.raises(CorruptData, match="block 9 does not agree with meta.json"):
        src.document(9 * 512 + 3)


def test_a_remote_index_is_fetched_block_by_block_into_a_sparse_file(copy, tmp_path) -> None:
    origin = CountingOrigin(copy)
    cache = ShardCache(tmp_path / "cache")
    remote = PreparedSource.open_remote(origin, tmp_path / "index", cache)
    local = PreparedSource.open(copy)
    path = tmp_path / "index" / OFFSETS_FILE
    assert origin.ranges == []  # nothing of the index is read at open (the .npy header is made here)
    assert path.stat().st_blocks * 512 < path.stat().st_size // 4  # a hole until blocks arrive
    np.testing.assert_array_equal(remote.document(12_345), local.document(12_345))
    assert len(origin.ranges) == 1 and remote.doc_offsets.verified_blocks == 1  # one 4 KiB ranged read

    again = PreparedSource.open_remote(CountingOrigin(copy), tmp_path / "index", cache)
    np.testing.assert_array_equal(again.document(12_346), local.document(12_346))
    assert again.doc_offsets.verified_blocks == 1 and again.origin.ranges == []  # reused, re-hashed

    data = bytearray(path.read_bytes())  # the local copy is damaged under the running server
    data[128 + 8 * 12_346 + 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert again.changed() is None  # a cache, not the source: no outage, the block is fetched again
    np.testing.assert_array_equal(again.document(12_346), local.document(12_346))
    assert len(again.origin.ranges) == 1


def test_a_corrupt_remote_index_block_is_refused_on_arrival(copy, tmp_path) -> None:
    remote = PreparedSource.open_remote(CountingOrigin(copy), tmp_path / "index", ShardCache(tmp_path / "c"))
    flip_entry(copy, 30 * 512 + 1)
    with pytest.raises(CorruptData, match=re.escape(f"{copy / OFFSETS_FILE}: document index block 30 hash "
                                                    "mismatch on arrival")):
        remote.document(30 * 512 + 5)
    assert remote.document(5).size  # other blocks still serve


def test_a_remote_index_file_replaced_by_another_worker_is_followed(copy, tmp_path) -> None:
    """Two worker processes share one cache directory: a file one of them re-creates must not make the
    other write blocks into a file it no longer maps (which would refuse every later lookup)."""
    cache = ShardCache(tmp_path / "cache")
    first = PreparedSource.open_remote(CountingOrigin(copy), tmp_path / "index", cache)
    local = PreparedSource.open(copy)
    np.testing.assert_array_equal(first.document(100), local.document(100))
    path = tmp_path / "index" / OFFSETS_FILE
    path.unlink()  # the other worker starts while the file is missing and makes a new one
    PreparedSource.open_remote(CountingOrigin(copy), tmp_path / "index", cache)
    np.testing.assert_array_equal(first.document(15_000), local.document(15_000))
    np.testing.assert_array_equal(first.document(100), local.document(100))  # re-checked in the new file
    assert first.doc_offsets.verified_blocks == 2


def test_a_source_prepared_before_block_hashes_is_hashed_whole_at_open(copy, tmp_path) -> None:
    info = MetaFile.load(copy)
    (copy / META_FILE).write_text(dataclasses.replace(info, doc_index=None).to_json())
    plain = np.load(copy / OFFSETS_FILE)
    src = PreparedSource.open(copy)
    assert not isinstance(src.doc_offsets, DocIndex)
    np.testing.assert_array_equal(src.doc_offsets, plain)
    remote = PreparedSource.open_remote(CountingOrigin(copy), tmp_path / "index", ShardCache(tmp_path / "c"))
    np.testing.assert_array_equal(remote.doc_offsets, plain)  # copied whole, as before
    flip_entry(copy, 20 * 512 + 7)
    with pytest.raises(CorruptData, match="doc_offsets.npy: document index hash mismatch"):
        PreparedSource.open(copy)


@pytest.mark.parametrize("bad", [
    {"entries": 0}, {"entries": -512}, {"firsts": [0, 5, 5]}, {"sha256": ["0" * 64]}, {"data_offset": -1},
    {"firsts": "0"}, {"entries": "many"},
])
def test_a_malformed_block_list_is_refused_by_name(copy, bad) -> None:
    meta = json.loads((copy / META_FILE).read_text())
    meta["doc_index_blocks"] |= bad
    (copy / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CorruptData, match="meta.json: invalid meta.json"):
        PreparedSource.open(copy)
