"""``mixer prepare --ray`` on a real two-node Ray cluster (``ray start --head`` + ``ray start --address``,
one CPU each, started once for this module): the merged source is byte-identical to the single-process
prepare, whatever the part boundaries, with a killed worker, from S3, and through the CLI."""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_helpers import music21_abc_books

from mixer_contract.errors import InvalidInput
from mixer_service.prepare.parts import merge_parts, tokenize_part
from mixer_service.prepare.readers import iter_documents
from mixer_service.prepare.tokenizer import ByteTokenizer, TextTokenizer, load_tokenizer
from mixer_service.prepare.writer import prepare_source
from mixer_service.service.process import free_port

ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed")
from mixer_service.prepare.ray_prepare import prepare_source_ray  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = ROOT / "data" / "tokenizer"
ABC_SPLIT = r"^X:"
BUCKET = "corpora"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_DEFAULT_REGION": "us-east-1"}
RAY = [str(Path(sys.executable).parent / "ray")]


# ---------------------------------------------------------------- a real two-node cluster


def _node_ports() -> list[str]:
    """Every port a node binds, free: two nodes share this host, and anything else on it keeps its own."""
    return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())]


def _ray(args: Sequence[str], env: dict[str, str]) -> None:
    done = subprocess.run([*RAY, *args], env=env, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        pytest.fail(f"ray {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}", pytrace=False)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """Address of a head and a worker node (1 CPU each), connected to from this process; stopped after."""
    # A short temp dir: Ray's unix sockets live under it (108-byte path limit).
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # Token auth off and set explicitly: this process imported Ray (and cached its auth mode) before any
    # token could be set, and nothing is read from or written to ~/.ray. The nodes live only for this module.
    mp = pytest.MonkeyPatch()
    for key, value in (("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0")):
        mp.setenv(key, value)  # this driver and the CLI runs below use them too
    env = {**os.environ, **CREDENTIALS}
    address = f"127.0.0.1:{free_port()}"
    common = ["--num-cpus", "1", "--object-store-memory", str(200 << 20), "--disable-usage-stats"]
    try:
        _ray(["start", "--head", "--node-ip-address", "127.0.0.1", "--port", address.split(":")[1],
              "--temp-dir", temp, "--include-dashboard", "false",
              *common, *_node_ports()], env)
        _ray(["start", "--address", address, "--node-ip-address", "127.0.0.1", *common, *_node_ports()], env)
        ray.init(address=address, logging_level="WARNING")
        alive = [n for n in ray.nodes() if n["Alive"]]
        assert len(alive) == 2, alive
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([*RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        mp.undo()
        shutil.rmtree(temp, ignore_errors=True)


# ---------------------------------------------------------------- inputs and helpers


@pytest.fixture(scope="module")
def abc_files() -> list[Path]:
    """The first ABC tune books of music21's corpus (about 1 MB of real text)."""
    picked, size = [], 0
    for f in music21_abc_books():
        picked.append(f)
        size += f.stat().st_size
        if size > 1 << 20:
            break
    return picked


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    """GPT-2 BPE when fetched (the real case: a Rust tokenizer shipped to workers), else byte-level."""
    vocab, merges = TOKENIZER_DIR / "gpt2_vocab.json", TOKENIZER_DIR / "gpt2_merges.txt"
    if vocab.is_file() and merges.is_file():
        return load_tokenizer(vocab=vocab, merges=merges)
    return ByteTokenizer()


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory: pytest.TempPathFactory, abc_files: list[Path]) -> list[Path]:
    """The same tunes as JSONL.zst, Parquet (with nulls and empties) and a text folder split at ``^X:``."""
    root = tmp_path_factory.mktemp("mixed")
    tunes = list(iter_documents(abc_files[:3], fmt="text", split_regex=ABC_SPLIT))
    jsonl = root / "a.jsonl.zst"
    lines = "".join(json.dumps({"text": t}) + "\n" for t in tunes[:200] + ["", "x"])
    jsonl.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    parquet = root / "b.parquet"
    pq.write_table(pa.table({"text": tunes[200:400] + [None, ""]}), parquet, row_group_size=50)
    text_dir = root / "c"
    text_dir.mkdir()
    for f in abc_files[3:6]:
        shutil.copy(f, text_dir / f.name)
    return [jsonl, parquet, text_dir]


def single_process(inputs: Sequence[Path], out: Path, tok: TextTokenizer, **kw) -> None:
    docs = iter_documents(inputs, split_regex=kw.pop("split_regex", None))
    prepare_source(docs, out, tok, "src", progress=False, **kw)


def assert_same_source(a: Path, b: Path) -> None:
    """Same file names and same bytes, meta.json (fingerprint, shard and block hashes) included."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert len(names) >= 3
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


# ---------------------------------------------------------------- on the cluster


def test_identical_to_single_process_on_two_nodes(cluster, abc_files, tokenizer, tmp_path) -> None:
    marks = tmp_path / "nodes"
    marks.mkdir()

    class NodeRecorder:
        """The real tokenizer, noting which node each batch ran on (pickled by value to workers)."""

        def __init__(self, inner: TextTokenizer, directory: Path) -> None:
            self.inner, self.directory = inner, directory
            self.vocab_size, self.eos_id, self.fingerprint = inner.vocab_size, inner.eos_id, inner.fingerprint

        def encode_batch(self, texts):
            import ray as worker_ray

            (self.directory / worker_ray.get_runtime_context().get_node_id()).touch()
            return self.inner.encode_batch(texts)

    single_process(abc_files, tmp_path / "one", tokenizer, split_regex=ABC_SPLIT, shard_tokens=40_000)
    meta = prepare_source_ray(abc_files, tmp_path / "ray", NodeRecorder(tokenizer, marks), "src",
                              split_regex=ABC_SPLIT, shard_tokens=40_000, part_bytes=100_000,
                              chunk_tokens=20_000, progress=False)
    assert_same_source(tmp_path / "one", tmp_path / "ray")
    assert meta.num_tokens > 100_000
    assert len(list(marks.iterdir())) == 2  # both nodes tokenized parts
    assert not (tmp_path / ".prepare-staging").exists()


@pytest.mark.parametrize("max_docs", [None, 333])
def test_mixed_formats_with_empties_and_max_docs(
    cluster, mixed_inputs, tokenizer, tmp_path, max_docs
) -> None:
    single_process(mixed_inputs, tmp_path / "one", tokenizer, split_regex=ABC_SPLIT, max_docs=max_docs,
                   batch_docs=64)
    prepare_source_ray(mixed_inputs, tmp_path / "ray", tokenizer, "src", split_regex=ABC_SPLIT,
                       max_docs=max_docs, part_bytes=1, progress=False, batch_docs=64)
    assert_same_source(tmp_path / "one", tmp_path / "ray")


def test_killed_worker_is_retried_and_result_identical(cluster, abc_files, tmp_path) -> None:
    marker = tmp_path / "killed-once"

    class KillOnce(ByteTokenizer):
        """Byte-level, but the first batch anywhere SIGKILLs its own worker process (Ray retries the task)."""

        def encode_batch(self, texts):
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            return super().encode_batch(texts)

    single_process(abc_files, tmp_path / "one", ByteTokenizer(), split_regex=ABC_SPLIT)
    prepare_source_ray(abc_files, tmp_path / "ray", KillOnce(), "src", split_regex=ABC_SPLIT,
                       part_bytes=200_000, progress=False)
    assert marker.exists()
    assert_same_source(tmp_path / "one", tmp_path / "ray")


def test_reader_error_is_the_readers_message(cluster, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(InvalidInput, match=re.escape(f"{bad}:2: no field 'text'")):
        prepare_source_ray([bad], tmp_path / "out", ByteTokenizer(), progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".prepare-staging").exists()


def test_s3_prefix_is_the_same_source_as_its_local_copy(cluster, abc_files, tmp_path, monkeypatch) -> None:
    server_mod = pytest.importorskip("moto.server")
    from mixer_service.sources.origins import s3_client

    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    port = free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = s3_client(endpoint)
        client.create_bucket(Bucket=BUCKET)
        for f in abc_files[:4]:
            client.upload_file(str(f), BUCKET, f"abc/{f.name}")
        for skipped in ("abc/.hidden/skip.abc", "abc/sub/deeper.abc"):  # hidden; below the glob's depth
            client.put_object(Bucket=BUCKET, Key=skipped, Body=b"X: not me")
        local = tmp_path / "local"
        local.mkdir()
        for f in abc_files[:4]:
            shutil.copy(f, local / f.name)
        single_process([local], tmp_path / "one", ByteTokenizer(), split_regex=ABC_SPLIT)
        prepare_source_ray([f"s3://{BUCKET}/abc"], tmp_path / "ray", ByteTokenizer(), "src",
                           split_regex=ABC_SPLIT, glob="*.abc", s3_endpoint=endpoint, part_bytes=1,
                           progress=False)
    finally:
        server.stop()
    assert_same_source(tmp_path / "one", tmp_path / "ray")


def test_cli_on_the_cluster_and_on_embedded_local_ray(cluster, abc_files, tmp_path) -> None:
    files = [str(f) for f in abc_files[:3]]
    single_process(abc_files[:3], tmp_path / "one", ByteTokenizer(), split_regex=ABC_SPLIT)
    env = {**os.environ}
    for out, flag in ((tmp_path / "src", f"--ray={cluster}"), (tmp_path / "local" / "src", "--ray")):
        argv = [sys.executable, "-m", "mixer_service.cli", "prepare", *files, "--out", str(out),
                "--name", "src", "--split-regex", ABC_SPLIT, "--no-progress", flag]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        assert summary["num_docs"] > 100
        assert_same_source(tmp_path / "one", out)


# ---------------------------------------------------------------- part boundaries (no cluster needed)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    docs=st.lists(st.text(max_size=40), min_size=1, max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=8),
    chunk_tokens=st.integers(1, 300),
    shard_tokens=st.integers(1, 500),
    batch=st.tuples(st.integers(1, 200), st.integers(1, 9)),
    max_docs=st.none() | st.integers(1, 70),
)
def test_any_part_boundaries_merge_to_the_same_bytes(
    docs, cuts, chunk_tokens, shard_tokens, batch, max_docs, tmp_path_factory
) -> None:
    """However the documents are split into parts (empty parts too) and chunks, the merge writes the bytes
    of the single-process prepare, ``max_docs`` and the empty-document count included."""
    tmp = tmp_path_factory.mktemp("parts")
    tok, (batch_chars, batch_docs) = ByteTokenizer(), batch
    kw = {"shard_tokens": shard_tokens, "max_docs": max_docs, "progress": False, "batch_chars": batch_chars,
          "batch_docs": batch_docs}
    bounds = [0, *sorted(min(c, len(docs)) for c in cuts), len(docs)]
    chunks = [c for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False))
              for c in tokenize_part(i, docs[a:b], tok, chunk_tokens, batch_chars=7, batch_docs=3)]
    try:
        prepare_source(docs, tmp / "one", tok, "src", **kw)
    except InvalidInput as exc:
        with pytest.raises(InvalidInput, match=re.escape(str(exc))):
            merge_parts(chunks, tmp / "merged", tok, "src", **kw)
        return
    merge_parts(chunks, tmp / "merged", tok, "src", **kw)
    assert_same_source(tmp / "one", tmp / "merged")
    ends = np.load(tmp / "merged" / "doc_offsets.npy")
    assert len(ends) - 1 == min(sum(1 for d in docs if d), max_docs or len(docs))
