"""Adopting datatrove's tokenized output in place (``.ds`` tokens + ``.ds.index`` document ends), locally and
under an S3 prefix: written by the real ``datatrove`` package (DocumentTokenizer, DocumentTokenizerMerger)
over real text with the GPT-2 tokenizer, served with the fingerprint and the bytes of a prepared source of
the same documents, verified like every adopted format, and bad files refused by name."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
import test_sources_adopted
import test_sources_s3
from service_helpers import RAW
from test_sources_adopted import assert_same, assert_served_like_prepared, manifest
from test_sources_s3 import BUCKET, upload

from mixer_contract.errors import CorruptData, InvalidInput
from mixer_service.prepare.readers import iter_documents
from mixer_service.prepare.writer import prepare_source
from mixer_service.sources import PreparedSource, ShardCache, datatrove_ds
from mixer_service.sources import adopted as adopted_mod
from mixer_service.sources.adopted import AdoptedSource
from mixer_service.sources.origins import S3Origin, s3_client

pytest.importorskip("datatrove")
from datatrove.data import Document  # noqa: E402
from datatrove.executor import LocalPipelineExecutor  # noqa: E402
from datatrove.pipeline.tokens import DocumentTokenizer, DocumentTokenizerMerger  # noqa: E402
from datatrove.pipeline.tokens.tokenizer import TokenizedFile  # noqa: E402

corpus = test_sources_adopted.corpus  # fixtures shared with the other adopted formats and the S3 tests
s3 = test_sources_s3.s3
UNSHUFFLED = ["00000_unshuffled.ds", "00001_unshuffled.ds"]  # DocumentTokenizer's names for tasks 0 and 1


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """The 40 documents ``corpus`` prepared, in the same order."""
    return list(itertools.islice(iter_documents([RAW / "sotu"], fmt="text", glob="*.txt"), 40))


def tokenize(texts: list[str], out: Path, tok, *, eos: bool = True, shuffle: bool = False) -> Path:
    """Run datatrove's DocumentTokenizer over ``texts`` in two tasks (each tokenizes one half), with the
    GPT-2 tokenizer saved as a local tokenizer.json (no hub); returns the output folder."""
    out.mkdir(parents=True, exist_ok=True)
    tok.backend.save(str(out / "tokenizer.json"))

    def read(data, rank: int = 0, world_size: int = 1):
        half = len(texts) // world_size
        for i in range(rank * half, (rank + 1) * half):
            yield Document(text=texts[i], id=str(i))

    step = DocumentTokenizer(str(out / "ds"), tokenizer_name_or_path=str(out / "tokenizer.json"),
                             eos_token="<|endoftext|>" if eos else None, shuffle_documents=shuffle, seed=7)
    LocalPipelineExecutor([read, step], tasks=2, workers=1, logging_dir=str(out / "logs")).run()
    return out / "ds"


@pytest.fixture(scope="module")
def datatrove_dir(texts, corpus, tmp_path_factory) -> Path:
    """Unshuffled datatrove output of the corpus: task 0 holds documents 0-19, task 1 documents 20-39."""
    out = tokenize(texts, tmp_path_factory.mktemp("dt"), corpus[2])
    assert sorted(p.name for p in out.glob("*.ds")) == UNSHUFFLED
    return out


def copy_adoptable(src: Path, dst: Path, tok, files: list[str] = UNSHUFFLED, **extra) -> Path:
    shutil.copytree(src, dst)
    manifest(dst, "datatrove", files, tok, **extra)
    return dst


def test_tokenizer_output_has_the_prepared_fingerprint(corpus, datatrove_dir, tmp_path, monkeypatch) -> None:
    """Same documents and EOS after each: same fingerprint, offsets and tokens as ``mixer prepare``; served
    in place (nothing copied into the cache); a later open reuses the record without hashing a token."""
    _, prepared, tok = corpus
    directory = copy_adoptable(datatrove_dir, tmp_path / "d", tok)
    cache = ShardCache(tmp_path / "cache")
    adopted = AdoptedSource.open(directory, cache)
    assert_same(adopted, prepared)
    assert list((tmp_path / "cache").glob("*.bin")) == []
    monkeypatch.setattr(datatrove_ds, "adopt_file", lambda *a: pytest.fail("re-hashed at open"))
    assert_same(AdoptedSource.open(directory, cache), prepared)


def test_shuffled_and_merged_output_is_the_prepared_source_of_its_order(corpus, texts, tmp_path) -> None:
    """datatrove shuffles whole documents (in each task, then again in the merger, which also splits files):
    the adopted source is the prepared source of the same documents in the merged files' order."""
    docs, _, tok = corpus
    shuffled = tokenize(texts, tmp_path / "s", tok, shuffle=True)
    merger = DocumentTokenizerMerger(str(shuffled), str(tmp_path / "merged"), "sotu",
                                     max_tokens_per_file=60_000, seed=11, progress=False)
    LocalPipelineExecutor([merger], tasks=1, workers=1, logging_dir=str(tmp_path / "logs-merge")).run()
    files = sorted(p.name for p in (tmp_path / "merged").glob("*.ds"))
    assert len(files) > 1
    manifest(tmp_path / "merged", "datatrove", files, tok)
    adopted = AdoptedSource.open(tmp_path / "merged", ShardCache(tmp_path / "cache"))
    where = {d.tobytes(): i for i, d in enumerate(docs)}
    order = [where[adopted.document(i).tobytes()] for i in range(len(adopted))]
    assert sorted(order) == list(range(len(docs))) and order != sorted(order)
    prepare_source([texts[i] for i in order], tmp_path / "p", tok, name="sotu", progress=False)
    assert_same(adopted, PreparedSource.open(tmp_path / "p"))


def test_uint32_tokens(corpus, tmp_path) -> None:
    """datatrove writes 4-byte tokens for vocabularies over 65,536 ids (token_size 4): adopted as uint32."""
    docs, prepared, tok = corpus
    (tmp_path / "w").mkdir()
    writer = TokenizedFile(str(tmp_path / "w"), "wide.ds", token_size=4)
    for d in docs:
        writer.write(np.append(d, tok.eos_id).tolist(), None)
    writer.close()
    manifest(tmp_path / "w", "datatrove", ["wide.ds"], tok, dtype="uint32")
    adopted = AdoptedSource.open(tmp_path / "w", ShardCache(tmp_path / "cache"))
    assert adopted.meta.dtype == "uint32"
    np.testing.assert_array_equal(adopted.doc_offsets, prepared.doc_offsets)
    np.testing.assert_array_equal(np.asarray(adopted.tokens), np.asarray(prepared.tokens))


def test_blocks_are_verified_and_token_ids_checked(corpus, datatrove_dir, tmp_path, monkeypatch) -> None:
    """A byte changed inside the probed ends keeps the record but fails its block's hash on use; a token
    outside the vocabulary (adopted as such) is refused when its block is first read."""
    _, _, tok = corpus
    monkeypatch.setattr(adopted_mod, "BLOCK_TOKENS", 1 << 14)
    directory = copy_adoptable(datatrove_dir, tmp_path / "d", tok)
    cache = ShardCache(tmp_path / "cache")
    AdoptedSource.open(directory, cache)
    path = directory / UNSHUFFLED[1]
    tokens = np.fromfile(path, dtype="<u2")
    tokens[tokens.size // 2] ^= 1  # between the 64 KiB probes
    tokens.tofile(path)
    fresh = AdoptedSource.open(directory, cache)
    fresh.document(0)  # the other file's blocks still serve
    with pytest.raises(CorruptData, match=rf"{UNSHUFFLED[1]}: tokens \d+ block checksum mismatch"):
        np.asarray(fresh.tokens)
    tokens[tokens.size // 2] = tok.vocab_size + 7
    tokens.tofile(path)
    shutil.rmtree(tmp_path / "adopted")  # adopt these bytes: the id itself must be refused
    again = AdoptedSource.open(directory, cache)
    with pytest.raises(CorruptData, match=rf"{UNSHUFFLED[1]}: token id {tok.vocab_size + 7} .* vocabulary"):
        np.asarray(again.tokens)


def _swap_ends(d: Path) -> None:
    ends = np.fromfile(d / f"{UNSHUFFLED[0]}.index", "<u8")
    ends[[2, 3]] = ends[[3, 2]]
    ends.tofile(d / f"{UNSHUFFLED[0]}.index")


def _end_past_file(d: Path) -> None:
    ends = np.fromfile(d / f"{UNSHUFFLED[0]}.index", "<u8")
    np.append(ends, ends[-1] + 100).astype("<u8").tofile(d / f"{UNSHUFFLED[0]}.index")


def _truncate(d: Path) -> None:
    data = (d / UNSHUFFLED[0]).read_bytes()
    (d / UNSHUFFLED[0]).write_bytes(data[: len(data) - 10])


@pytest.mark.parametrize(("damage", "error", "match"), [
    (_swap_ends, CorruptData, rf"{UNSHUFFLED[0]}\.index: document ends are not increasing \(document 3"),
    (_end_past_file, CorruptData, rf"{UNSHUFFLED[0]}\.index: the last document ends at token \d+, past the "
                                  rf"end of .*{UNSHUFFLED[0]} "),
    (_truncate, CorruptData, rf"{UNSHUFFLED[0]}\.index: .* past the end of .*{UNSHUFFLED[0]} .*truncated"),
    (lambda d: (d / f"{UNSHUFFLED[1]}.index").unlink(), CorruptData, rf"{UNSHUFFLED[1]}\.index: cannot read"),
])
def test_bad_files_are_named(damage, error, match, corpus, datatrove_dir, tmp_path) -> None:
    directory = copy_adoptable(datatrove_dir, tmp_path / "d", corpus[2])
    damage(directory)
    with pytest.raises(error, match=match):
        AdoptedSource.open(directory, ShardCache(tmp_path / "cache"))


def test_wrong_token_size_and_missing_eos_are_named(corpus, texts, datatrove_dir, tmp_path) -> None:
    _, _, tok = corpus
    directory = copy_adoptable(datatrove_dir, tmp_path / "d", tok, dtype="uint32")
    with pytest.raises(InvalidInput, match=rf"{UNSHUFFLED[0]}: .* its tokens are 2 bytes \(datatrove "
                                           r"token_size 2\); the manifest says uint32"):
        AdoptedSource.open(directory, ShardCache(tmp_path / "cache"))
    no_eos = tokenize(texts, tmp_path / "n", tok, eos=False)
    manifest(no_eos, "datatrove", UNSHUFFLED, tok)
    with pytest.raises(InvalidInput, match=rf"{UNSHUFFLED[0]}: documents do not all end with eos_id .*"
                                           "eos_token"):
        AdoptedSource.open(no_eos, ShardCache(tmp_path / "cache"))


def test_s3_prefix_through_the_bounded_cache(s3, corpus, datatrove_dir, tmp_path, monkeypatch) -> None:
    """The same output under s3://: the same fingerprint and tokens, each block one ranged GET into a cache
    bounded below the corpus (evicting), the record reused at the next open, a changed object refused."""
    _, prepared, tok = corpus
    block = 1 << 14
    monkeypatch.setattr(adopted_mod, "BLOCK_TOKENS", block)
    upload(s3, copy_adoptable(datatrove_dir, tmp_path / "d", tok), "dt/sotu")
    origin = S3Origin(s3_client(s3), BUCKET, "dt/sotu")
    limit = 3 * block * 2
    cache = ShardCache(tmp_path / "cache" / "shards", limit_bytes=limit)
    adopted = AdoptedSource.open_remote(origin, tmp_path / "cache" / "adopted" / "sotu", cache)
    for future in adopted.prefetch([0, 1]):  # what the serving path asks for the next steps' blocks
        future.result()
    assert cache.stats.fetches == 2
    assert_same(adopted, prepared)
    assert cache.stats.fetches >= len(adopted.shard_offsets) - 1 and cache.stats.evictions > 0
    assert cache.used_bytes <= limit
    real_adopt_file = datatrove_ds.adopt_file
    monkeypatch.setattr(datatrove_ds, "adopt_file", lambda *a: pytest.fail("re-hashed at open"))
    again = AdoptedSource.open_remote(origin, tmp_path / "cache" / "adopted" / "sotu", cache)
    assert again.meta.fingerprint == prepared.meta.fingerprint
    tokens = np.fromfile(tmp_path / "d" / UNSHUFFLED[1], dtype="<u2")
    tokens[tokens.size // 2] ^= 1  # same size, same probed ends: only the block's hash can tell
    s3_client(s3).put_object(Bucket=BUCKET, Key=f"dt/sotu/{UNSHUFFLED[1]}", Body=tokens.tobytes())
    fresh = AdoptedSource.open_remote(origin, tmp_path / "cache" / "adopted" / "sotu",
                                      ShardCache(tmp_path / "cache2", limit_bytes=limit))
    with pytest.raises(CorruptData, match=rf"s3://{BUCKET}/dt/sotu/{UNSHUFFLED[1]} \(bytes \d+-\d+\): shard "
                                          "checksum mismatch"):
        np.asarray(fresh.tokens)
    monkeypatch.setattr(datatrove_ds, "adopt_file", real_adopt_file)  # a new size: adopted again, and refused
    truncated = (tmp_path / "d" / UNSHUFFLED[0]).read_bytes()[:-10]
    s3_client(s3).put_object(Bucket=BUCKET, Key=f"dt/sotu/{UNSHUFFLED[0]}", Body=truncated)
    url = f"s3://{BUCKET}/dt/sotu/{UNSHUFFLED[0]}"
    with pytest.raises(CorruptData, match=rf"{url}\.index: .* past the end of {url} .*truncated"):
        AdoptedSource.open_remote(origin, tmp_path / "cache" / "adopted" / "sotu", cache)


def test_served_batches_equal_the_prepared_source(corpus, datatrove_dir, tmp_path) -> None:
    """Two real servers, one with the prepared source and one with the datatrove files adopted under the
    same name: every batch is byte-identical."""
    _, prepared, tok = corpus
    copy_adoptable(datatrove_dir, tmp_path / "adopted" / "sotu", tok)
    assert_served_like_prepared(prepared, tmp_path)


def test_the_server_finds_adopted_prefixes_under_a_sources_url(s3, corpus, datatrove_dir, tmp_path) -> None:
    """``--sources-url s3://bucket/prefix`` opens adopted prefixes (a manifest, no meta.json) beside prepared
    ones; before, it listed only prepared ones and started with 0 sources."""
    from mixer_service.service.source_registry import SourceRegistry

    _, prepared, tok = corpus
    upload(s3, copy_adoptable(datatrove_dir, tmp_path / "d", tok), "fleet/sotu")
    (tmp_path / "local").mkdir()
    registry = SourceRegistry.load(tmp_path / "local", tmp_path / "cache", s3_endpoint=s3,
                                   remote_urls=[f"s3://{BUCKET}/fleet"])
    assert registry.problems() == [] and sorted(registry.sources) == ["sotu"]
    assert registry.get("sotu").meta.fingerprint == prepared.meta.fingerprint
