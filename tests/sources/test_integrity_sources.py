"""Integrity of source bytes (issue 17, sources layer): bit rot after verification, truncation under a
running server, meta.json edits that keep the fingerprint, out-of-vocabulary ids, put-back files and
regenerated adopted corpora. Each test failed on the code before the fix (a 200 with wrong bytes, a
SIGBUS, or a stale record)."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_helpers import Server, reblock
from test_sources_adopted import manifest, write_megatron

from mixer_contract.errors import CorruptData
from mixer_contract.job import JobConfig
from mixer_service.prepare.tokenizer import ByteTokenizer
from mixer_service.prepare.writer import prepare_source
from mixer_service.service.source_registry import SOURCE_RECHECK_S
from mixer_service.sources import PreparedSource, ShardCache
from mixer_service.sources.adopted import AdoptedSource
from mixer_service.sources.source_format import INDEX_BLOCK_ENTRIES, META_FILE, OFFSETS_FILE, MetaFile

TOK = ByteTokenizer()


def byte_docs(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = random.Random(seed)
    return [np.frombuffer(f"doc {i}: {'lorem ipsum ' * rng.randint(5, 60)}".encode(), np.uint8)
            .astype(np.uint16) for i in range(n)]


def rot_in_place(path: Path, at: int) -> None:
    """Flip one bit of ``path`` at byte ``at`` in place and put its mtime back: what bit rot leaves."""
    st = os.stat(path)
    with open(path, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0x10]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def job(name: str, steps: int = 200) -> dict:
    return {"job_id": f"j-{name}", "author": "t", "reason": "t",
            "config": {"sources": [{"name": name, "role": "repeat"}], "seq_len": 64, "global_batch": 8,
                       "seed": 5, "total_steps": steps},
            "schedule": {"phases": [{"start_step": 0, "weights": {name: 1}}]}}


# -- bit rot after verification ------------------------------------------------------------------------


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    """A prepared source of three shards (byte tokens)."""
    docs = [f"tune {i} " + "abc " * (20 + i % 50) for i in range(600)]
    prepare_source(docs, tmp_path / "src" / "web", TOK, name="web", shard_tokens=40_000, progress=False)
    return tmp_path / "src" / "web"


def test_bit_rot_in_a_cached_shard_is_caught_on_read_and_rebuilt(sharded: Path) -> None:
    # memory_bytes=0: the checked disk reads under test (a resident copy would never read the file again)
    src = PreparedSource.open(sharded, cache=ShardCache(sharded / ".cache" / "shards", memory_bytes=0))
    want = np.asarray(src.tokens).copy()
    entry = sharded / ".cache" / "shards" / f"{src.shards[0].raw_sha256}.bin"
    rot_in_place(entry, 5000)  # stat unchanged: only a check on read can see it
    np.testing.assert_array_equal(src.tokens[0 : len(src.tokens)], want)
    np.testing.assert_array_equal(src.document(3), want[src.doc_offsets[3] : src.doc_offsets[4] - 1])
    assert src.cache.stats.rebuilt == 1 and src.problems() == []


def test_bit_rot_in_the_document_index_is_refused_by_name(sharded: Path) -> None:
    src = PreparedSource.open(sharded)
    plain = np.load(sharded / OFFSETS_FILE)
    assert int(src.doc_offsets[300]) == plain[300]  # verified, then rots under the server
    rot_in_place(sharded / OFFSETS_FILE, 128 + 8 * 300 + 1)
    assert src.changed() is None  # the stat did not move
    with pytest.raises(CorruptData, match=f"{OFFSETS_FILE}: checksum mismatch in bytes"):
        src.doc_offsets[300]
    assert any(OFFSETS_FILE in p for p in src.problems())


# -- truncation under load: never SIGBUS -----------------------------------------------------------------


def test_truncating_files_under_load_answers_503_never_kills_the_server(sources_dir: Path,
                                                                         tmp_path: Path) -> None:
    root = tmp_path / "sources"
    shutil.copytree(sources_dir / "abc", root / "abc", ignore=shutil.ignore_patterns(".cache"))
    write_megatron(root / "web" / "doc", byte_docs(3000), TOK.eos_id)
    manifest(root / "web", "megatron", ["doc"], TOK, name="web")
    bodies: dict[tuple[str, int], bytes] = {}
    failures: list[str] = []
    stop = threading.Event()

    def pull(srv: Server, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                name, step = rng.choice(["abc", "web"]), rng.randrange(16)
                try:
                    r = client.get(f"{srv.url}/v1/jobs/j-{name}/batches/{step}")
                except httpx.TransportError as exc:
                    failures.append(f"transport error: {exc!r}")
                    return
                if r.status_code == 200:
                    if bodies.setdefault((name, step), r.content) != r.content:
                        failures.append(f"{name} step {step}: 200 with other bytes")
                elif r.status_code != 503 or "doc.bin" not in r.text:
                    failures.append(f"{name} step {step}: {r.status_code} {r.text[:200]}")

    with Server(root, tmp_path / "state") as srv:
        for name in ("abc", "web"):
            assert httpx.post(f"{srv.url}/v1/jobs", json=job(name)).status_code == 201
        threads = [threading.Thread(target=pull, args=(srv, i)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        for cached in (root / ".cache" / "shards").glob("*.bin"):
            os.truncate(cached, cached.stat().st_size // 3)  # the shard cache, under 4 clients
        bin_path = root / "web" / "doc.bin"
        os.truncate(bin_path, bin_path.stat().st_size // 2)  # Megatron's writer opens with "wb"
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join()
        assert srv.proc.poll() is None, f"server died: exit {srv.proc.returncode}"
        assert not failures, failures[:5]
        r = httpx.get(f"{srv.url}/v1/jobs/j-web/batches/3")
        assert r.status_code == 503 and "doc.bin" in r.text and "truncated" in r.text, r.text
        assert httpx.get(f"{srv.url}/v1/jobs/j-abc/batches/3").status_code == 200


# -- meta.json edits: the root the job pinned ---------------------------------------------------------


def test_meta_json_edits_that_keep_the_fingerprint_are_refused_by_every_replica(sharded: Path,
                                                                                tmp_path: Path) -> None:
    root, state = sharded.parent, tmp_path / "state"
    original = (sharded / META_FILE).read_text()
    src = PreparedSource.open(sharded)
    with Server(root, state) as running:
        assert httpx.post(f"{running.url}/v1/jobs", json=job("web")).status_code == 201
        assert httpx.get(f"{running.url}/v1/jobs/j-web/batches/0").status_code == 200
        pinned = httpx.get(f"{running.url}/v1/jobs/j-web/batches/1").content
        meta = json.loads(original)
        meta["shards"][0], meta["shards"][1] = meta["shards"][1], meta["shards"][0]
        (sharded / META_FILE).write_text(json.dumps(meta, indent=2))
        assert MetaFile.load(sharded).source.fingerprint == src.meta.fingerprint  # unchanged
        # Refused within SOURCE_RECHECK_S; until then only the bytes the job pinned are served.
        deadline = time.monotonic() + SOURCE_RECHECK_S + 5
        while (r := httpx.get(f"{running.url}/v1/jobs/j-web/batches/1")).status_code == 200:
            assert r.content == pinned, "a wrong byte served while the edit was not yet seen"
            assert time.monotonic() < deadline, "still served long after meta.json changed"
            time.sleep(0.05)
        assert r.status_code == 503 and "web" in r.text, r.text
    with Server(root, state) as fresh:
        r = httpx.get(f"{fresh.url}/v1/jobs/j-web/batches/1")
        assert r.status_code == 503 and "web" in r.text and "root" in r.text, r.text
    (sharded / META_FILE).write_text(original)
    index = np.load(sharded / OFFSETS_FILE)
    index[10] += 3
    np.save(sharded / OFFSETS_FILE, index)
    reblock(sharded, INDEX_BLOCK_ENTRIES)  # its block hash rewritten to match
    with Server(root, state) as fresh:
        r = httpx.get(f"{fresh.url}/v1/jobs/j-web/batches/1")
        assert r.status_code == 503 and "web" in r.text and "root" in r.text, r.text


def test_a_job_config_without_root_keeps_its_json() -> None:
    doc = {"sources": [{"name": "web", "role": "repeat", "fingerprint": "f"}], "seq_len": 64,
           "global_batch": 8, "seed": 1, "total_steps": 10}
    assert "root" not in JobConfig.parse(doc).to_json()["sources"][0]
    pinned = doc | {"sources": [doc["sources"][0] | {"root": "r"}]}
    assert JobConfig.parse(pinned).to_json()["sources"][0]["root"] == "r"


# -- out-of-vocabulary ids -------------------------------------------------------------------------------


def test_an_out_of_vocabulary_token_is_refused_naming_file_and_offset(tmp_path: Path) -> None:
    docs = byte_docs(50)
    docs[7] = docs[7].copy()
    docs[7][4] = 60000
    write_megatron(tmp_path / "m" / "doc", docs, TOK.eos_id)
    manifest(tmp_path / "m", "megatron", ["doc"], TOK)  # vocab_size 257
    src = AdoptedSource.open(tmp_path / "m", ShardCache(tmp_path / "cache"))
    at = 2 * (sum(d.size + 1 for d in docs[:7]) + 4)
    with pytest.raises(CorruptData, match=f"doc.bin: token id 60000 at byte {at} is outside the vocabulary"):
        src.document(0)


# -- put back, regenerated, read-only, lying dtype code --------------------------------------------------


@pytest.mark.parametrize("name", [OFFSETS_FILE, META_FILE])
def test_a_put_back_file_is_accepted_without_polling_readiness(sharded: Path, name: str) -> None:
    src = PreparedSource.open(sharded)
    path = sharded / name
    original = path.read_bytes()
    path.write_bytes(original[:-8] + b"\x00" * 8 if name == OFFSETS_FILE else original.replace(b'"', b"'", 1))
    assert src.changed() is not None
    path.write_bytes(original)  # from a backup: a new mtime, the same bytes
    assert src.changed() is None  # the request path itself accepts it again: no /v1/ready poll needed
    assert src.document(5).size


def test_regenerated_adopted_files_are_adopted_again_and_the_corpus_stays_untouched(tmp_path: Path) -> None:
    corpus = tmp_path / "m"
    write_megatron(corpus / "doc", byte_docs(40), TOK.eos_id)
    manifest(corpus, "megatron", ["doc"], TOK)
    listing = sorted(p.name for p in corpus.iterdir())
    cache = ShardCache(tmp_path / "cache")
    first = AdoptedSource.open(corpus, cache)
    assert first.meta.num_docs == 40
    write_megatron(corpus / "doc", byte_docs(25, seed=1), TOK.eos_id)  # same manifest, new files
    again = AdoptedSource.open(corpus, cache)
    assert again.meta.num_docs == 25 and again.meta.fingerprint != first.meta.fingerprint
    np.testing.assert_array_equal(again.document(24), byte_docs(25, seed=1)[24])
    assert sorted(p.name for p in corpus.iterdir()) == listing  # records live under the cache dir


def test_an_idx_whose_dtype_code_lies_is_named(tmp_path: Path) -> None:
    docs = byte_docs(10)
    write_megatron(tmp_path / "m" / "doc", docs, TOK.eos_id)
    idx = tmp_path / "m" / "doc.idx"
    raw = bytearray(idx.read_bytes())
    seqs = struct.unpack("<Q", raw[18:26])[0]
    lengths = np.frombuffer(bytes(raw[34 : 34 + 4 * seqs]), "<i4")
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1].astype(np.int64) * 4)])
    raw[34 + 4 * seqs : 34 + 12 * seqs] = pointers.astype("<i8").tobytes()  # int32 pointers, code 8 (uint16)
    idx.write_bytes(bytes(raw))
    manifest(tmp_path / "m", "megatron", ["doc"], TOK)
    with pytest.raises(CorruptData, match="dtype code 8 says uint16, but the pointers advance 4 bytes"):
        AdoptedSource.open(tmp_path / "m", ShardCache(tmp_path / "cache"))
