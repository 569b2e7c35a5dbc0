"""Sources in an S3-compatible object store (moto's standalone server on a loopback port, started here):
shards fetched on demand into a bounded LRU cache, verified on arrival, retried then refused by name."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_helpers import JOB, SCHEDULE, Server, reblock

from mixer_contract import wire
from mixer_contract.errors import CorruptData, InvalidInput, SourceUnavailable
from mixer_contract.job import JobConfig
from mixer_contract.schedule import Schedule
from mixer_service.engine import MixingEngine
from mixer_service.prepare.tokenizer import ByteTokenizer
from mixer_service.prepare.writer import prepare_source
from mixer_service.service.process import free_port
from mixer_service.sources import PreparedSource, ShardCache
from mixer_service.sources.origins import S3Origin, s3_client
from mixer_service.sources.prefetch import prefetch_ahead

BUCKET = "corpora"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3 API on 127.0.0.1 (moto's threaded server), with one bucket."""
    server_mod = pytest.importorskip("moto.server")
    mp = pytest.MonkeyPatch()
    for key, value in CREDENTIALS.items():
        mp.setenv(key, value)
    port = free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    s3_client(endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()
    mp.undo()


def upload(endpoint: str, directory: Path, prefix: str) -> None:
    client = s3_client(endpoint)
    for path in sorted(directory.iterdir()):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory, abc_docs) -> Path:
    out = tmp_path_factory.mktemp("many") / "abc"
    prepare_source(abc_docs, out, ByteTokenizer(), name="abc", shard_tokens=40_000, progress=False)
    return out


@pytest.fixture(scope="module")
def abc_docs(sources_dir) -> list[str]:
    src = PreparedSource.open(sources_dir / "abc")
    return [ByteTokenizer().decode(src.document(i)) for i in range(len(src))]


def test_bounded_cache_serves_the_same_tokens_and_evicts_lru(s3, many_shards, tmp_path) -> None:
    upload(s3, many_shards, "many/abc")
    local = PreparedSource.open(many_shards, cache_dir=tmp_path / "local-cache")
    shard_bytes = max(sh.raw_bytes for sh in local.shards)
    limit = 3 * shard_bytes
    # memory_bytes=0: the disk bound under test (a resident copy would outlive its disk entry's eviction)
    cache = ShardCache(tmp_path / "cache", limit_bytes=limit, memory_bytes=0)
    origin = S3Origin(s3_client(s3), BUCKET, "many/abc")
    remote = PreparedSource.open_remote(origin, tmp_path / "index", cache)
    assert remote.meta.fingerprint == local.meta.fingerprint
    assert len(remote.shards) >= 6 and cache.stats.fetches == 0  # opening fetched no shard
    for i in range(0, len(local), 7):
        np.testing.assert_array_equal(remote.document(i), local.document(i))
        assert sum(p.stat().st_size for p in (tmp_path / "cache").glob("*.bin")) <= limit
    assert cache.stats.fetches == len(remote.shards) and cache.stats.evictions == len(remote.shards) - 3
    np.testing.assert_array_equal(remote.document(0), local.document(0))  # evicted: fetched again
    assert cache.stats.fetches == len(remote.shards) + 1
    # Prefetch the shards a step will need, then the reads are hits.
    hits, fetches = cache.stats.hits, cache.stats.fetches
    for future in remote.prefetch([0, 1]):
        future.result()
    assert cache.stats.fetches > fetches
    remote.tokens.read(0, int(remote.shard_offsets[2]))
    assert cache.stats.hits == hits + 2


def test_corrupt_object_is_refused_by_name(s3, many_shards, tmp_path) -> None:
    upload(s3, many_shards, "bad/abc")
    data = bytearray((many_shards / "tokens-00001.zst").read_bytes())
    data[len(data) // 2] ^= 0xFF
    s3_client(s3).put_object(Bucket=BUCKET, Key="bad/abc/tokens-00001.zst", Body=bytes(data))
    remote = PreparedSource.open_remote(S3Origin(s3_client(s3), BUCKET, "bad/abc"), tmp_path / "index",
                                        ShardCache(tmp_path / "cache"))
    remote.tokens.shard(0)
    with pytest.raises(CorruptData, match=r"s3://corpora/bad/abc/tokens-00001\.zst: shard checksum mismatch"):
        remote.tokens.shard(1)
    assert list((tmp_path / "cache").glob("*.bin")) and not list((tmp_path / "cache").glob("*tmp*"))


def test_unreachable_store_retries_then_names_the_shard(s3, many_shards, tmp_path, caplog) -> None:
    upload(s3, many_shards, "gone/abc")
    remote = PreparedSource.open_remote(S3Origin(s3_client(s3), BUCKET, "gone/abc"), tmp_path / "index",
                                        ShardCache(tmp_path / "cache"))
    dead = S3Origin(s3_client(f"http://127.0.0.1:{free_port()}", timeout_s=1), BUCKET, "gone/abc",
                    attempts=3, backoff_s=0.01)
    for shard in remote._shards:
        object.__setattr__(shard, "origin", dead)  # the store goes away after open
    with pytest.raises(SourceUnavailable, match=r"s3://corpora/gone/abc/tokens-00000\.zst: object store "
                                                r"unreachable after 3 attempts"):
        remote.tokens.shard(0)
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 3


def test_mixer_serve_from_s3_with_a_cache_limit(s3, sources_dir, tmp_path) -> None:
    for name in ("abc", "sotu"):
        upload(s3, sources_dir / name, f"job/{name}")
    config = JobConfig.parse_new(JOB)  # as the server stores a new job
    local = {n: PreparedSource.open(sources_dir / n, cache_dir=tmp_path / "expect") for n in ("abc", "sotu")}
    engine = MixingEngine.create(config, local, [(0, Schedule.parse(SCHEDULE, config.source_names))])
    sizes = [s.meta.num_tokens * 2 for s in local.values()]  # one shard each
    # One window of each source (here each whole source: one shard) beside the document indexes and records:
    # the least the server starts with (a smaller limit is refused, tests/sources/test_cache_bound.py, which
    # also serves under eviction).
    limit = sum(sizes) + (1 << 20)
    srv = Server(tmp_path / "empty", tmp_path / "state", env=CREDENTIALS)
    (tmp_path / "empty").mkdir()
    srv.args += ["--sources-url", f"s3://{BUCKET}/job", "--s3-endpoint", s3, "--cache-dir",
                 str(tmp_path / "cache"), "--cache-limit", str(limit)]
    with srv:
        body = {"job_id": "j", "config": JOB, "schedule": SCHEDULE, "author": "t", "reason": "t"}
        assert httpx.post(f"{srv.url}/v1/jobs", json=body).status_code == 201
        for step in range(40):
            r = httpx.get(f"{srv.url}/v1/jobs/j/batches/{step}")
            assert r.status_code == 200, r.text
            assert wire.decode(r.content).tokens.tobytes() == engine.batch(step).tokens.tobytes()
        assert httpx.get(f"{srv.url}/v1/ready").status_code == 200
    assert sum(p.stat().st_size for p in (tmp_path / "cache" / "shards").glob("*.bin")) <= limit


@pytest.mark.parametrize("kind", ["window", "sliding"])
def test_prefetch_ahead_means_steady_steps_never_fetch(s3, many_shards, tmp_path, kind) -> None:
    """With a shard-local order and a cache of a few shards, prefetching what the next step reads (known
    from the schedule) leaves every step's own reads as cache hits."""
    upload(s3, many_shards, "ahead/abc")
    cache = ShardCache(tmp_path / "cache", limit_bytes=8 * 40_000 * 2)
    origin = S3Origin(s3_client(s3), BUCKET, "ahead/abc")
    remote = PreparedSource.open_remote(origin, tmp_path / "index", cache)
    config = JobConfig.parse({"sources": [{"name": "abc", "role": "repeat"}], "seq_len": 256,
                              "global_batch": 4, "seed": 5, "total_steps": 400,
                              "order": {"kind": kind, "window_shards": 2}})
    engine = MixingEngine.create(config, {"abc": remote},
                                 [(0, Schedule.parse({"phases": [{"start_step": 0, "weights": {"abc": 1}}]},
                                                     ["abc"]))])
    engine.batch(0)
    for step in range(0, 60):
        for future in prefetch_ahead(engine, step, lookahead=1):
            future.result()
        fetches = cache.stats.fetches
        engine.batch(step + 1)
        assert cache.stats.fetches == fetches, f"step {step + 1} waited on a fetch"
    assert cache.stats.fetches > 2  # the steps did move across shards


def test_the_document_index_is_read_in_verified_blocks_by_ranged_gets(s3, many_shards, tmp_path) -> None:
    """Nothing of the index is downloaded at open; a lookup fetches the one block it needs (HTTP Range)."""
    source = Path(shutil.copytree(many_shards, tmp_path / "abc"))
    reblock(source, 16)
    upload(s3, source, "blocked/abc")
    local = PreparedSource.open(source, cache_dir=tmp_path / "local-cache")
    remote = PreparedSource.open_remote(S3Origin(s3_client(s3), BUCKET, "blocked/abc"), tmp_path / "index",
                                        ShardCache(tmp_path / "cache"))
    assert remote.doc_offsets.verified_blocks == 0 and len(local.doc_offsets) > 16 * 8
    np.testing.assert_array_equal(remote.document(100), local.document(100))
    assert remote.doc_offsets.verified_blocks == 1
    np.testing.assert_array_equal(np.asarray(remote.doc_offsets), np.asarray(local.doc_offsets))


def test_a_location_with_no_source_is_not_ready_and_says_why(s3, tmp_path) -> None:
    """An S3 prefix (or a directory) that holds nothing servable used to start "ready" with 0 sources."""
    from mixer_service.service.source_registry import SourceRegistry

    (tmp_path / "empty").mkdir()
    remote = SourceRegistry.load(tmp_path / "empty", tmp_path / "cache", s3_endpoint=s3,
                                 remote_urls=[f"s3://{BUCKET}/no-such-prefix"])
    assert remote.problems() == [f"s3://{BUCKET}/no-such-prefix holds no source (no meta.json or "
                                 "mixer-source.json under it or one level down)"]
    local = SourceRegistry.load(tmp_path / "empty")
    [problem] = local.problems()
    assert "holds no source" in problem and str(tmp_path / "empty") in problem


def upload_tree(endpoint: str, directory: Path, prefix: str) -> None:
    """Every file under ``directory``, sub-directories (MDS, mixer-index/) included, under ``prefix``."""
    client = s3_client(endpoint)
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(directory).as_posix()}")


@pytest.fixture(scope="module")
def adopted_corpora(tmp_path_factory) -> dict[str, Path]:
    """The same small corpus as Megatron files, a flat array and (with mosaicml-streaming) an MDS dataset,
    each registered by a manifest, in blocks of 2^12 tokens so each spans several cache entries."""
    from test_sources_adopted import flat_stream, manifest, write_megatron

    rng = np.random.default_rng(7)
    docs = [rng.integers(0, 256, size=int(n), dtype=np.uint16) for n in rng.integers(50, 900, size=60)]
    tok = type("Tok", (), {"fingerprint": "bytes-test", "vocab_size": 257, "eos_id": 256})()
    root = tmp_path_factory.mktemp("adopted-s3")
    write_megatron(root / "megatron" / "doc", docs, tok.eos_id)
    manifest(root / "megatron", "megatron", ["doc"], tok, name="megatron")
    (root / "flat").mkdir()
    np.save(root / "flat" / "tokens.npy", flat_stream(docs, tok.eos_id))
    manifest(root / "flat", "flat", ["tokens.npy"], tok, name="flat")
    out = {"megatron": root / "megatron", "flat": root / "flat"}
    try:
        import streaming
    except ImportError:
        return out
    with streaming.MDSWriter(out=str(root / "mds" / "data"), columns={"tokens": "ndarray:uint16"},
                             compression="zstd", size_limit=1 << 14) as writer:
        for d in docs:
            writer.write({"tokens": d})
    manifest(root / "mds", "mds", ["data"], tok, name="mds")
    return out | {"mds": root / "mds"}


@pytest.fixture
def small_blocks(monkeypatch) -> int:
    from mixer_service.sources import adopted

    monkeypatch.setattr(adopted, "BLOCK_TOKENS", 1 << 12)
    return 1 << 12


def test_adopted_megatron_flat_and_mds_prefixes_serve_the_local_bytes(s3, adopted_corpora, small_blocks,
                                                                      tmp_path) -> None:
    """Each adopted format under an S3 prefix: the local corpus's fingerprint and tokens, read by ranged
    GETs into a shard cache bounded to three blocks (or MDS shards)."""
    from mixer_service.sources.adopted import AdoptedSource

    for fmt, directory in adopted_corpora.items():
        upload_tree(s3, directory, f"adopted/{fmt}")
        local = AdoptedSource.open(directory, ShardCache(tmp_path / fmt / "local" / "shards"))
        limit = 3 * small_blocks * 2 if fmt != "mds" else 3 * max(
            int(n) for n in np.diff(local.shard_offsets)) * 2
        cache = ShardCache(tmp_path / fmt / "cache", limit_bytes=limit)
        remote = AdoptedSource.open_remote(S3Origin(s3_client(s3), BUCKET, f"adopted/{fmt}"),
                                           tmp_path / fmt / "state", cache)
        assert remote.meta.fingerprint == local.meta.fingerprint, fmt
        assert len(remote.shard_offsets) > 4 and cache.stats.fetches == 0, fmt  # nothing fetched at open
        np.testing.assert_array_equal(np.asarray(remote.doc_offsets), np.asarray(local.doc_offsets))
        for i in range(len(local)):
            np.testing.assert_array_equal(remote.document(i), local.document(i))
            assert sum(p.stat().st_size for p in (tmp_path / fmt / "cache").glob("*.bin")) <= limit
        assert cache.stats.evictions > 0, fmt


def test_an_index_shipped_under_the_prefix_is_used_without_reading_tokens(s3, adopted_corpora, tmp_path,
                                                                          monkeypatch) -> None:
    """``mixer adopt --index`` output uploaded as ``<prefix>/mixer-index/``: opening from S3 reads the
    manifest, the index and the probes only."""
    from mixer_service.sources import adopted
    from mixer_service.sources.adopted import INDEX_SUBDIR, AdoptedSource

    directory = Path(shutil.copytree(adopted_corpora["megatron"], tmp_path / "corpus"))
    record = adopted.adopt(directory, directory / INDEX_SUBDIR, force=True)
    upload_tree(s3, directory, "shipped/megatron")
    monkeypatch.setattr(adopted, "scan_region", lambda *a: pytest.fail("read every token at open"))
    origin = S3Origin(s3_client(s3), BUCKET, "shipped/megatron")
    remote = AdoptedSource.open_remote(origin, tmp_path / "state", ShardCache(tmp_path / "cache"))
    assert remote.meta.fingerprint == record["fingerprint"]
    np.testing.assert_array_equal(remote.document(5), AdoptedSource.open(
        directory, ShardCache(tmp_path / "local" / "shards")).document(5))


def test_mixer_serve_opens_every_adopted_format_under_a_url(s3, adopted_corpora, tmp_path) -> None:
    from mixer_service.service.source_registry import SourceRegistry

    for fmt, directory in adopted_corpora.items():
        upload_tree(s3, directory, f"served/{fmt}")
    registry = SourceRegistry.load(None, tmp_path / "cache", s3_endpoint=s3, remote_urls=[f"s3://{BUCKET}/served"])
    assert registry.problems() == [] and len(registry.sources) == len(adopted_corpora)
    assert registry.broken == {}


def test_a_location_with_unrecognised_files_is_not_ready_and_names_them(s3, adopted_corpora, tmp_path,
                                                                        caplog) -> None:
    """Tokenized files without a manifest (or nothing at all) under a URL or a directory: not ready, the
    reason names what is there, and one structured log line says it."""
    from mixer_service.service.source_registry import SourceRegistry

    s3_client(s3).upload_file(str(adopted_corpora["megatron"] / "doc.bin"), BUCKET, "stray/web/doc.bin")
    remote = SourceRegistry.load(None, tmp_path / "cache", s3_endpoint=s3, remote_urls=[f"s3://{BUCKET}/stray"])
    [problem] = remote.problems()
    assert problem.startswith(f"s3://{BUCKET}/stray holds no source") and "web/doc.bin" in problem
    assert "mixer-source.json" in problem
    local_root = tmp_path / "local"
    shutil.copytree(adopted_corpora["megatron"], local_root / "web", ignore=shutil.ignore_patterns("mixer-*"))
    [problem] = SourceRegistry.load(local_root).problems()
    assert "holds no source" in problem and "web/doc.bin" in problem and "web/doc.idx" in problem
    missing = SourceRegistry.load(None, tmp_path / "cache", s3_endpoint=s3,
                                  remote_urls=[f"s3://{BUCKET}/no-such-prefix"])
    assert missing.problems()[0].endswith("under it or one level down)")
    empty = [r for r in caplog.records if getattr(r, "event", "") == "sources.empty"]
    assert [r.location for r in empty] == [f"s3://{BUCKET}/stray", str(local_root),
                                           f"s3://{BUCKET}/no-such-prefix"]
    with pytest.raises(InvalidInput, match="not a directory"):
        SourceRegistry.load(tmp_path / "no-such-dir")  # a local typo stops the server at start, by name


def test_a_server_whose_url_holds_no_source_answers_503_with_the_reason(s3, adopted_corpora,
                                                                        tmp_path) -> None:
    upload(s3, adopted_corpora["flat"], "unmanifested/web")
    s3_client(s3).delete_object(Bucket=BUCKET, Key="unmanifested/web/mixer-source.json")
    srv = Server(tmp_path / "empty", tmp_path / "state", env=CREDENTIALS,
                 extra_args=["--sources-url", f"s3://{BUCKET}/unmanifested", "--s3-endpoint", s3,
                             "--cache-dir", str(tmp_path / "cache")])
    (tmp_path / "empty").mkdir()
    srv.proc = subprocess.Popen(srv.args, env=srv.env, stdout=subprocess.DEVNULL, stderr=srv._stderr)
    try:
        deadline, r = time.monotonic() + 60, None
        while time.monotonic() < deadline and srv.proc.poll() is None:
            try:
                r = httpx.get(f"{srv.url}/v1/ready", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert r is not None and r.status_code == 503, srv.tail()
        assert "holds no source" in r.json()["detail"] and "web/tokens.npy" in r.json()["detail"]
    finally:
        srv.stop()
