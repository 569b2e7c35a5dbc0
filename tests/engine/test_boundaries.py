"""Document boundaries: engine (against provenance and EOS tokens), wire format, loader tensors."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from service_helpers import JOB, Server, prepare_real_sources

from client import MixerClient, MixerLoader
from client.dataset import document_positions
from mixer_contract import wire
from mixer_contract.job import JobConfig
from mixer_contract.schedule import Schedule
from mixer_service.cli import main
from mixer_service.engine import MixingEngine
from mixer_service.sources.prepared import PreparedSource

# short rows over a domain-heavy mixture: many documents end inside a row
CONFIG = JOB | {"seq_len": 512, "total_steps": 50, "allow_wrap": True}
WEIGHTS = {"phases": [{"start_step": 0, "weights": {"abc": 0.5, "sotu": 0.5}}]}


@pytest.fixture(scope="module")
def engine(sources_dir) -> MixingEngine:
    config = JobConfig.parse(CONFIG)
    sources = {n: PreparedSource.open(sources_dir / n) for n in ("abc", "sotu")}
    return MixingEngine.create(config, sources, [(0, Schedule.parse(WEIGHTS, config.source_names))])


@pytest.mark.parametrize("step, rank, world", [(0, 0, 1), (7, 1, 2), (49, 3, 4)])
def test_boundaries_are_the_provenance_span_starts(engine, step, rank, world):
    rows = engine.row_boundaries(step, rank, world)
    provenance = engine.provenance(step, rank, world)
    assert len(rows) == len(provenance) == CONFIG["global_batch"] // world
    for starts, row in zip(rows, provenance, strict=True):
        lengths = [span.length for span in row.spans]
        assert starts == np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
        assert sum(lengths) == CONFIG["seq_len"]


def test_rows_that_wrap_around_a_small_source_agree_with_provenance(tmp_path):
    """Small sources finish several epochs in 50 steps, so rows that run off a source's end and continue
    at its start (the last chunk of every epoch) are certain to be checked."""
    small = prepare_real_sources(tmp_path, domain_docs=50, web_docs=2)
    config = JobConfig.parse(CONFIG)
    sources = {n: PreparedSource.open(small / n) for n in ("abc", "sotu")}
    engine = MixingEngine.create(config, sources, [(0, Schedule.parse(WEIGHTS, config.source_names))])
    wrapped = 0
    for step in range(CONFIG["total_steps"]):
        for starts, row in zip(engine.row_boundaries(step), engine.provenance(step), strict=True):
            lengths = [span.length for span in row.spans]
            assert starts == np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
            docs = [span.doc for span in row.spans]
            wrapped += any(b < a for a, b in zip(docs, docs[1:], strict=False))
    assert wrapped >= 4


def test_every_boundary_follows_an_end_of_document_token(engine, sources_dir):
    """Independent of provenance: prepared sources end each document with EOS, so a piece that starts
    inside a row must follow an EOS token of that row; and no EOS appears without a boundary after it."""
    eos = {name: PreparedSource.open(sources_dir / name).meta.eos_id for name in ("abc", "sotu")}
    pieces = 0
    for step in range(10):
        batch = engine.batch(step)
        for tokens, source, starts in zip(batch.tokens, batch.source_ids.tolist(),
                                          engine.row_boundaries(step), strict=True):
            eos_id = eos[engine.config.source_names[source]]
            after_eos = (np.flatnonzero(tokens[:-1] == eos_id) + 1).tolist()
            assert starts[1:] == after_eos
            pieces += len(starts)
    assert pieces - 10 * CONFIG["global_batch"] > 40  # the check saw many documents end mid-row


def test_the_wire_carries_boundaries_only_when_asked(engine):
    batch = engine.batch(3)
    header = {"job": "j", "step": 3, "rank": 0, "world": 1, "sources": ["abc", "sotu"]}
    plain = wire.encode(batch.tokens, batch.source_ids, header, "zstd")
    assert b"boundaries" not in plain and wire.decode(plain).boundaries is None
    rows = engine.row_boundaries(3)
    decoded = wire.decode(wire.encode(batch.tokens, batch.source_ids, header, "zstd", boundaries=rows))
    assert [r.tolist() for r in decoded.boundaries] == rows
    assert decoded.tokens.tobytes() == wire.decode(plain).tokens.tobytes()  # the payload is unchanged


@pytest.mark.parametrize("bad", [[[0]], [[1], [0]], [[0, 0], [0]], [[0, 4], [0]], "0,1"])
def test_malformed_boundaries_are_a_wire_error(bad):
    tokens = np.zeros((2, 4), dtype=np.uint16)
    data = wire.encode(tokens, np.zeros(2, dtype=np.int16), {}, "none", boundaries=bad)
    with pytest.raises(wire.WireError, match="boundaries"):
        wire.decode(data)


def test_position_ids_and_cu_seqlens_from_boundaries():
    """Rows of 6 served tokens (inputs are the first 5); a piece starting at the last token is dropped."""
    position_ids, cu_seqlens, longest = document_positions(
        [np.array([0, 2]), np.array([0]), np.array([0, 3, 5])], length=5)
    assert position_ids.tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    assert cu_seqlens.tolist() == [0, 2, 5, 10, 13, 15] and cu_seqlens.dtype == torch.int32
    assert longest == 5


@pytest.fixture(scope="module")
def served_job(sources_dir, tmp_path_factory) -> Iterator[tuple[str, str]]:
    """A real server and a job with short rows (many documents end mid-row): (url, job)."""
    server = Server(sources_dir, tmp_path_factory.mktemp("state")).start()
    job = f"bounds-{uuid.uuid4().hex[:8]}"
    with MixerClient(server.url) as client:
        client.create_job({"job_id": job, "config": CONFIG, "schedule": WEIGHTS, "author": "test",
                           "reason": "boundaries"})
    yield server.url, job
    server.stop()


def test_the_loader_turns_served_boundaries_into_positions_that_match_provenance(served_job):
    url, job = served_job
    length = CONFIG["seq_len"] - 1
    with MixerClient(url) as client, MixerLoader(client, job, end_step=4, rank=1, world=2,
                                                 boundaries=True) as loader:
        assert "boundaries" not in client.batch(job, 0).header  # the default response is unchanged
        for batch in loader:
            rows = client.provenance(job, batch["step"], rank=1, world=2)
            expected = []
            for row in rows:
                starts = np.cumsum([0] + [s["length"] for s in row["spans"]])[:-1]
                expected.append(np.concatenate([np.arange(b - a) for a, b in
                                                zip(starts, [*starts[1:], CONFIG["seq_len"]], strict=True)]))
            assert batch["position_ids"].tolist() == np.stack(expected)[:, :length].tolist()
            assert batch["cu_seqlens"][-1] == len(rows) * length and batch["cu_seqlens"].dtype == torch.int32
            assert torch.all(batch["cu_seqlens"].diff() > 0) and batch["max_seqlen"] <= length


def test_export_with_boundaries_writes_each_rows_piece_starts(served_job, tmp_path, monkeypatch):
    from streaming import StreamingDataset

    url, job = served_job
    monkeypatch.setenv("MIXER_URL", url)
    assert main(["export", job, "--steps", "10:12", "--out", str(tmp_path / "mds"), "--boundaries"]) == 0
    dataset = StreamingDataset(local=str(tmp_path / "mds"), shuffle=False, batch_size=1)
    with MixerClient(url) as client:
        served = [client.batch(job, step, boundaries=True) for step in (10, 11)]
    expected = [starts for batch in served for starts in batch.boundaries]
    assert len(dataset) == len(expected)
    for i, starts in enumerate(expected):
        assert dataset[i]["boundaries"].tolist() == starts.tolist()
