"""Adopting tokenized corpora in place: Megatron-LM .bin/.idx, flat token arrays (.npy and raw .bin, the
OLMo/Dolma layout) and MDS token columns serve exactly the tokens of a prepared source of the same
documents, with the same fingerprint, and are verified like prepared sources."""

from __future__ import annotations

import itertools
import json
import shutil
import struct
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_helpers import RAW, Server

from mixer_contract import wire
from mixer_contract.errors import CorruptData, InvalidInput
from mixer_service.prepare.readers import iter_documents
from mixer_service.prepare.tokenizer import load_tokenizer
from mixer_service.prepare.writer import prepare_source
from mixer_service.sources import PreparedSource, ShardCache
from mixer_service.sources.adopted import MANIFEST, OFFSETS, PROBE_BYTES, RECORD, AdoptedSource, state_dir

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "data" / "tokenizer"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[list[np.ndarray], PreparedSource, object]:
    """State of the Union addresses tokenized with GPT-2 BPE, and the prepared source of them."""
    if not (TOKENIZER / "gpt2_vocab.json").is_file() or not (RAW / "sotu").is_dir():
        pytest.skip("GPT-2 tokenizer or corpus missing: run scripts/fetch_corpora.sh")
    tok = load_tokenizer(vocab=TOKENIZER / "gpt2_vocab.json", merges=TOKENIZER / "gpt2_merges.txt")
    texts = list(itertools.islice(iter_documents([RAW / "sotu"], fmt="text", glob="*.txt"), 40))
    docs = [np.asarray(t, dtype=np.uint16) for t in tok.encode_batch(texts)]
    root = tmp_path_factory.mktemp("adopt")
    prepare_source(texts, root / "prepared", tok, name="sotu", shard_tokens=50_000, progress=False)
    return docs, PreparedSource.open(root / "prepared"), tok


def manifest(directory: Path, fmt: str, files: list[str], tok, **extra) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).write_text(json.dumps({
        "format": fmt, "name": "sotu", "files": files, "tokenizer_fingerprint": tok.fingerprint,
        "vocab_size": tok.vocab_size, "dtype": "uint16", "eos_id": tok.eos_id} | extra))


def write_megatron(prefix: Path, docs: list[np.ndarray], eos: int) -> None:
    """MMIDIDX v1 as Megatron-LM's _IndexWriter lays it out (one sequence per document, EOD appended)."""
    seqs = [np.append(d, eos).astype(np.uint16) for d in docs]
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".bin").write_bytes(b"".join(s.tobytes() for s in seqs))
    lengths = np.array([s.size for s in seqs], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1].astype(np.int64) * 2)]).astype(np.int64)
    doc_index = np.arange(len(seqs) + 1, dtype=np.int64)
    with open(prefix.with_suffix(".idx"), "wb") as fh:
        fh.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8))
        fh.write(struct.pack("<Q", len(seqs)) + struct.pack("<Q", len(doc_index)))
        fh.write(lengths.tobytes() + pointers.tobytes() + doc_index.tobytes())


def flat_stream(docs: list[np.ndarray], eos: int) -> np.ndarray:
    return np.concatenate([np.append(d, eos) for d in docs]).astype(np.uint16)


def assert_same(adopted: AdoptedSource, prepared: PreparedSource) -> None:
    assert adopted.meta.fingerprint == prepared.meta.fingerprint
    assert adopted.meta.num_docs == prepared.meta.num_docs
    assert adopted.meta.num_tokens == prepared.meta.num_tokens
    np.testing.assert_array_equal(adopted.doc_offsets, prepared.doc_offsets)
    np.testing.assert_array_equal(np.asarray(adopted.tokens), np.asarray(prepared.tokens))
    for i in (0, 7, len(prepared) - 1):
        np.testing.assert_array_equal(adopted.document(i), prepared.document(i))


def test_megatron_bin_idx(corpus, tmp_path: Path) -> None:
    docs, prepared, tok = corpus
    write_megatron(tmp_path / "m" / "sotu_text_document", docs, tok.eos_id)
    manifest(tmp_path / "m", "megatron", ["sotu_text_document"], tok)
    cache = ShardCache(tmp_path / "cache")
    assert_same(AdoptedSource.open(tmp_path / "m", cache), prepared)
    assert list((tmp_path / "cache").glob("*.bin")) == []  # served in place: nothing copied


@pytest.mark.parametrize("suffix", [".npy", ".bin"])
def test_flat_token_array(suffix: str, corpus, tmp_path: Path) -> None:
    docs, prepared, tok = corpus
    stream = flat_stream(docs, tok.eos_id)
    half = int(np.flatnonzero(stream == tok.eos_id)[len(docs) // 2]) + 1  # two files, split after an EOS
    (tmp_path / "f").mkdir()
    for i, part in enumerate((stream[:half], stream[half:])):
        if suffix == ".npy":
            np.save(tmp_path / "f" / f"part-{i}.npy", part)
        else:
            part.tofile(tmp_path / "f" / f"part-{i}.bin")
    manifest(tmp_path / "f", "flat", [f"part-0{suffix}", f"part-1{suffix}"], tok)
    assert_same(AdoptedSource.open(tmp_path / "f", ShardCache(tmp_path / "cache")), prepared)


def test_mds_token_column(corpus, tmp_path: Path) -> None:
    streaming = pytest.importorskip("streaming")
    docs, prepared, tok = corpus
    columns = {"id": "int", "tokens": "ndarray:uint16"}
    with streaming.MDSWriter(out=str(tmp_path / "d" / "mds"), columns=columns, compression="zstd",
                             size_limit=1 << 16) as writer:
        for i, d in enumerate(docs):
            writer.write({"id": i, "tokens": d})
    manifest(tmp_path / "d", "mds", ["mds"], tok)
    cache = ShardCache(tmp_path / "cache")
    adopted = AdoptedSource.open(tmp_path / "d", cache)
    assert len(adopted.shard_offsets) > 2  # several MDS shards, each extracted on first use
    assert_same(adopted, prepared)


def test_the_cache_limit_leaves_room_for_a_window_of_adopted_shards(corpus, tmp_path: Path) -> None:
    """Found: the start-up check summed the windows of prepared sources only, so a limit too small for an
    adopted MDS source's shards was accepted, and every request then fought over the room."""
    streaming = pytest.importorskip("streaming")
    docs, _, tok = corpus
    with streaming.MDSWriter(out=str(tmp_path / "d" / "mds"), columns={"tokens": "ndarray:uint16"},
                             compression="zstd", size_limit=1 << 16) as writer:
        for d in docs:
            writer.write({"tokens": d})
    manifest(tmp_path / "d", "mds", ["mds"], tok)
    adopted = AdoptedSource.open(tmp_path / "d", ShardCache(tmp_path / "c1"))
    assert len(adopted.shards) > 2
    small = ShardCache(tmp_path / "c2", limit_bytes=1 << 16)
    with pytest.raises(InvalidInput, match=r"the default \(sliding\) order of each of the 1 sources"):
        small.check_limit([AdoptedSource.open(tmp_path / "d", small)])
    megatron_dir = tmp_path / "m"
    write_megatron(megatron_dir / "doc", docs, tok.eos_id)
    manifest(megatron_dir, "megatron", ["doc"], tok)
    in_place = ShardCache(tmp_path / "c3", limit_bytes=1 << 16)
    in_place.check_limit([AdoptedSource.open(megatron_dir, in_place)])  # read in place: nothing to hold


def test_adopted_blocks_are_verified_and_changes_detected(corpus, tmp_path: Path) -> None:
    docs, prepared, tok = corpus
    write_megatron(tmp_path / "m" / "doc", docs, tok.eos_id)
    manifest(tmp_path / "m", "megatron", ["doc"], tok)
    cache = ShardCache(tmp_path / "cache")
    adopted = AdoptedSource.open(tmp_path / "m", cache)
    assert adopted.changed() is None and adopted.problems() == []
    data = bytearray((tmp_path / "m" / "doc.bin").read_bytes())
    assert len(data) > 3 * PROBE_BYTES
    data[len(data) // 2] ^= 0x04  # between the probed ends: the record is reused, the block is not
    (tmp_path / "m" / "doc.bin").write_bytes(bytes(data))
    fresh = AdoptedSource.open(tmp_path / "m", cache)  # the stored record is reused: no re-hash at open
    with pytest.raises(CorruptData, match="doc.bin"):
        fresh.document(0)
    assert any("doc.bin" in p for p in adopted.problems())


def test_an_adoption_record_without_index_blocks_is_hashed_whole(corpus, tmp_path: Path) -> None:
    docs, prepared, tok = corpus
    write_megatron(tmp_path / "m" / "doc", docs, tok.eos_id)
    manifest(tmp_path / "m", "megatron", ["doc"], tok)
    AdoptedSource.open(tmp_path / "m", ShardCache(tmp_path / "cache"))
    state = state_dir(tmp_path / "m", ShardCache(tmp_path / "cache"))
    record_path = state / RECORD
    record = json.loads(record_path.read_text())
    del record["doc_index_blocks"]  # written before per-block index hashes
    record_path.write_text(json.dumps(record))
    adopted = AdoptedSource.open(tmp_path / "m", ShardCache(tmp_path / "cache"))
    np.testing.assert_array_equal(adopted.doc_offsets, np.asarray(prepared.doc_offsets))
    index = np.load(state / OFFSETS, mmap_mode="r+")
    index[3] += 1
    index.flush()
    with pytest.raises(CorruptData, match="document index hash mismatch"):
        AdoptedSource.open(tmp_path / "m", ShardCache(tmp_path / "cache"))


def test_bad_manifests_and_layouts_are_named(corpus, tmp_path: Path) -> None:
    docs, _, tok = corpus
    manifest(tmp_path / "a", "parquet", ["x"], tok)
    with pytest.raises(InvalidInput, match="format must be one of"):
        AdoptedSource.open(tmp_path / "a", ShardCache(tmp_path / "cache"))
    no_eos = np.concatenate(docs).astype(np.uint16)
    (tmp_path / "b").mkdir()
    np.save(tmp_path / "b" / "t.npy", no_eos)
    manifest(tmp_path / "b", "flat", ["t.npy"], tok)
    with pytest.raises(InvalidInput, match="end with eos_id"):
        AdoptedSource.open(tmp_path / "b", ShardCache(tmp_path / "cache"))


def test_served_batches_equal_the_prepared_source(corpus, tmp_path: Path) -> None:
    """Two real servers, one with the prepared source and one with the Megatron files adopted under the
    same name: every batch is byte-identical, so a job can move between them."""
    docs, prepared, tok = corpus
    write_megatron(tmp_path / "adopted" / "sotu" / "doc", docs, tok.eos_id)
    manifest(tmp_path / "adopted" / "sotu", "megatron", ["doc"], tok)
    assert_served_like_prepared(prepared, tmp_path)


def assert_served_like_prepared(prepared: PreparedSource, tmp_path: Path) -> None:
    """``tmp_path/adopted/sotu`` (already written) and a copy of ``prepared`` under the same name, each served
    by a real server: the first 5 batches of one job in the global order are byte-identical."""
    shutil.copytree(prepared.meta.path, tmp_path / "prepared" / "sotu",
                    ignore=shutil.ignore_patterns(".cache"))
    # The global order: the window order (the default for new jobs) also depends on where shards fall,
    # which differs between a prepared source and adopted files (docs/epoch_order.md).
    job = {"job_id": "j", "author": "t", "reason": "t",
           "config": {"sources": [{"name": "sotu", "role": "repeat"}], "seq_len": 128, "global_batch": 4,
                      "seed": 3, "total_steps": 100, "order": {"kind": "global"}},
           "schedule": {"phases": [{"start_step": 0, "weights": {"sotu": 1}}]}}
    bodies = []
    for name in ("prepared", "adopted"):
        with Server(tmp_path / name, tmp_path / f"state-{name}") as srv:
            assert httpx.post(f"{srv.url}/v1/jobs", json=job).status_code == 201
            steps = []
            for step in range(5):
                r = httpx.get(f"{srv.url}/v1/jobs/j/batches/{step}")
                assert r.status_code == 200, r.text
                steps.append(wire.decode(r.content).tokens.tobytes())
            bodies.append(steps)
    assert bodies[0] == bodies[1]
