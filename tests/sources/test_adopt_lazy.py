"""Adoption without reading the corpus at open: ``mixer adopt --index`` reads it once (threads hashing blocks
while one reads in order) and writes an index that ships with the corpus; a server opening the corpus copies
that index instead of reading any token, with the same fingerprint, the same bytes served, the corpus left
untouched, and every block still checked before use."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
from pathlib import Path

import httpx
import numpy as np
import pytest
import test_sources_adopted
from service_helpers import Server
from test_sources_adopted import assert_same, manifest, write_megatron

from mixer_contract import wire
from mixer_contract.errors import CorruptData
from mixer_service.sources import ShardCache, adopt_command
from mixer_service.sources import adopted as adopted_mod
from mixer_service.sources.adopted import INDEX_SUBDIR, OFFSETS, RECORD, AdoptedSource, adopt

corpus = test_sources_adopted.corpus  # GPT-2 tokens of real text and their prepared source


def mixer_adopt(*argv: str) -> int:
    """``mixer adopt ARGV`` through its own argparse registration; its exit code."""
    parser = argparse.ArgumentParser(prog="mixer")
    adopt_command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["adopt", *argv])
    return args.func(args)


def index_corpus(directory: Path, *argv: str, capsys) -> dict:
    """``mixer adopt --index DIRECTORY ARGV``, which must succeed; the JSON it printed."""
    assert mixer_adopt("--index", str(directory), *argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``directory`` with its size and mtime: what "left untouched" means."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


def no_token_reads(monkeypatch) -> None:
    monkeypatch.setattr(adopted_mod, "scan_region", lambda *a: pytest.fail("read every token at open"))


@pytest.fixture
def megatron(corpus, tmp_path) -> Path:
    docs, _, tok = corpus
    write_megatron(tmp_path / "sources" / "sotu" / "doc", docs, tok.eos_id)
    manifest(tmp_path / "sources" / "sotu", "megatron", ["doc"], tok)
    return tmp_path / "sources" / "sotu"


def test_a_shipped_index_opens_the_corpus_without_reading_a_token(corpus, megatron, tmp_path, capsys,
                                                                  monkeypatch) -> None:
    _, prepared, _ = corpus
    printed = index_corpus(megatron, capsys=capsys)
    assert printed["fingerprint"] == prepared.meta.fingerprint
    assert printed["index"] == str(megatron / INDEX_SUBDIR)
    no_token_reads(monkeypatch)
    for replica in ("a", "b"):  # each replica's cache dir starts empty
        cache = ShardCache(tmp_path / f"cache-{replica}" / "shards")
        assert_same(AdoptedSource.open(megatron, cache), prepared)
        state = tmp_path / f"cache-{replica}" / "adopted"
        assert list(state.rglob(RECORD)) and not list(state.rglob(OFFSETS))  # the index is read where it is


def test_a_read_only_corpus_is_indexed_elsewhere_and_served(corpus, megatron, tmp_path, capsys) -> None:
    """The corpus is never written: ``--out`` takes the index, and a server adopts the read-only corpus with
    its record under the cache dir, serving the prepared source's batches."""
    _, prepared, _ = corpus
    before = snapshot(megatron)
    modes = {p: p.stat().st_mode for p in [megatron, *megatron.iterdir()]}
    for path in modes:
        path.chmod(stat.S_IMODE(path.stat().st_mode) & ~0o222)
    try:
        printed = index_corpus(megatron, "--out", str(tmp_path / "index"), "--workers", "3", capsys=capsys)
        assert printed["fingerprint"] == prepared.meta.fingerprint
        with Server(tmp_path / "sources", tmp_path / "state") as srv:
            job = {"job_id": "j", "author": "t", "reason": "t",
                   "config": {"sources": [{"name": "sotu", "role": "repeat",
                                           "fingerprint": prepared.meta.fingerprint}],
                              "seq_len": 128, "global_batch": 4, "seed": 3, "total_steps": 100},
                   "schedule": {"phases": [{"start_step": 0, "weights": {"sotu": 1}}]}}
            assert httpx.post(f"{srv.url}/v1/jobs", json=job).status_code == 201
            r = httpx.get(f"{srv.url}/v1/jobs/j/batches/0")
            assert r.status_code == 200, r.text
            assert wire.decode(r.content).tokens.size == 4 * 128
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    assert snapshot(megatron) == before
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == sorted([RECORD, OFFSETS])


def test_a_block_changed_after_indexing_is_refused_by_name(megatron, tmp_path, capsys, monkeypatch) -> None:
    """The shipped record is reused (same size, same probed ends), so a byte changed in the middle is caught
    by its block's hash before the block is served, as with a record derived at open."""
    index_corpus(megatron, capsys=capsys)
    data = bytearray((megatron / "doc.bin").read_bytes())
    data[len(data) // 2] ^= 0x04
    (megatron / "doc.bin").write_bytes(bytes(data))
    no_token_reads(monkeypatch)
    source = AdoptedSource.open(megatron, ShardCache(tmp_path / "cache" / "shards"))
    with pytest.raises(CorruptData, match=r"doc\.bin: tokens 0 block checksum mismatch"):
        source.document(source.meta.num_docs // 2)
    assert any("doc.bin" in p for p in source.problems())


def test_a_stale_shipped_index_is_not_used(corpus, megatron, tmp_path, capsys, caplog) -> None:
    """Files regenerated after indexing (another size): the shipped index is ignored and the corpus adopted
    again, from its current bytes."""
    docs, _, tok = corpus
    index_corpus(megatron, capsys=capsys)
    write_megatron(megatron / "doc", docs[:-1], tok.eos_id)
    source = AdoptedSource.open(megatron, ShardCache(tmp_path / "cache" / "shards"))
    assert source.meta.num_docs == len(docs) - 1
    assert any(getattr(r, "event", "") == "adopt.shipped_stale" for r in caplog.records)


def test_threads_do_not_change_the_record(megatron, tmp_path, monkeypatch) -> None:
    """Blocks hashed by 1 or 4 threads, many blocks in flight: the same record, block for block."""
    monkeypatch.setattr(adopted_mod, "BLOCK_TOKENS", 1 << 10)
    one = adopt(megatron, tmp_path / "one", workers=1)
    four = adopt(megatron, tmp_path / "four", workers=4)
    assert len(one["parts"][0]["blocks"]) > 16
    assert one == four


def test_bad_arguments_change_nothing(megatron, tmp_path, capsys) -> None:
    before = snapshot(megatron)
    assert mixer_adopt("--index", str(tmp_path / "missing")) == 2
    assert "not a directory" in capsys.readouterr().err
    assert mixer_adopt("--index", str(megatron), "--workers", "0") == 2
    assert "--workers" in capsys.readouterr().err
    assert mixer_adopt("--index", "s3://bucket/prefix") == 2
    assert "--out is required" in capsys.readouterr().err
    os.remove(megatron / "doc.idx")
    assert mixer_adopt("--index", str(megatron)) == 2
    assert "doc.idx" in capsys.readouterr().err
    assert not (megatron / INDEX_SUBDIR / RECORD).exists()
    assert set(snapshot(megatron)) == set(before) - {"doc.idx"}


def test_the_document_index_shipped_is_verified_on_use(megatron, tmp_path, capsys) -> None:
    """A shipped ``.mixer-doc_offsets.npy`` damaged after indexing is refused by its block hash."""
    index_corpus(megatron, capsys=capsys)
    index = np.load(megatron / INDEX_SUBDIR / OFFSETS, mmap_mode="r+")
    index[3] += 1
    index.flush()
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    with pytest.raises(CorruptData, match="index"):
        source = AdoptedSource.open(megatron, ShardCache(tmp_path / "cache" / "shards"))
        source.document(2)


def test_a_shipped_index_removed_later_means_adopting_again(corpus, megatron, tmp_path, capsys) -> None:
    _, prepared, _ = corpus
    index_corpus(megatron, capsys=capsys)
    cache = ShardCache(tmp_path / "cache" / "shards")
    AdoptedSource.open(megatron, cache)
    shutil.rmtree(megatron / INDEX_SUBDIR)
    assert_same(AdoptedSource.open(megatron, cache), prepared)
