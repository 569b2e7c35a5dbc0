"""The batch serving path made cheaper without changing a byte: framing, compression and prefetch."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zstandard
from service_helpers import JOB, SCHEDULE

from mixer_contract import wire
from mixer_service.engine import MixingEngine
from mixer_service.service.jobs import JobManager
from mixer_service.service.routes.batches import make_batch
from mixer_service.service.source_registry import SourceRegistry
from mixer_service.store import open_store

TOKENS = (np.arange(4 * 2048, dtype=np.uint32) * 2654435761 % 50257).astype(np.uint16).reshape(4, 2048)
SOURCE_IDS = np.array([1, 0, 1, 1])
HEADER = {"job": "j", "incarnation": "inc", "step": 7, "rank": 1, "world": 2, "sources": ["abc", "sotu"],
          "schedule_version": 1, "log_chain": "c" * 64, "log_since": 0}


def split(frame: bytes) -> tuple[dict, bytes]:
    (length,) = wire._LEN.unpack_from(frame, 4)
    return json.loads(frame[8:8 + length]), frame[8 + length:]


def test_the_uncompressed_frame_of_a_fixed_batch_is_byte_for_byte_what_clients_were_served():
    """Pinned from the framing before it stopped copying the payload (sha256 of the whole message)."""
    plain = wire.encode(TOKENS, SOURCE_IDS, HEADER, "none")
    assert hashlib.sha256(plain).hexdigest() == \
        "373c6c8239f000281f33531fb4856ad4c92066374a290284f935670795928b46"
    with_bounds = wire.encode(TOKENS, SOURCE_IDS, HEADER, "none", boundaries=[[0], [0, 5], [0], [0, 9, 100]])
    assert hashlib.sha256(with_bounds).hexdigest() == \
        "53c365c93d2ed4853173772a193a23c6ca4ceaab79daa80e3bda4e08b80255e0"


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_a_zstd_frame_is_a_fresh_compressor_s_and_decodes_to_the_same_tokens(dtype):
    """The per-thread compressor emits what a new level-1 compressor per response did (a zstandard upgrade
    may change both alike, so this compares with one rather than pinning compressed bytes)."""
    tokens = TOKENS.astype(dtype)
    frame = wire.encode(tokens, SOURCE_IDS, HEADER, "zstd")
    head, payload = split(frame)
    plain_head, plain_payload = split(wire.encode(tokens, SOURCE_IDS, HEADER, "none"))
    assert payload == zstandard.ZstdCompressor(level=1).compress(plain_payload)
    assert head == plain_head | {"compression": "zstd", "payload_bytes": len(payload)}
    decoded = wire.decode(frame)
    assert decoded.tokens.dtype == dtype and np.array_equal(decoded.tokens, tokens)


def test_frames_encoded_on_many_threads_at_once_are_identical():
    """Compressors are per thread (zstandard's are not thread-safe): 8 threads, 200 frames, one result."""
    expected = {c: wire.encode(TOKENS, SOURCE_IDS, HEADER, c) for c in wire.COMPRESSIONS}
    with ThreadPoolExecutor(8) as pool:
        frames = list(pool.map(lambda i: (c := wire.COMPRESSIONS[i % 2],
                                          wire.encode(TOKENS, SOURCE_IDS, HEADER, c)), range(200)))
    assert all(frame == expected[c] for c, frame in frames)


@pytest.mark.parametrize("layout", ["big-endian", "fortran", "strided"])
def test_arrays_the_framing_cannot_view_are_sent_as_their_little_endian_row_major_bytes(layout):
    tokens = {"big-endian": TOKENS.astype(">u2"), "fortran": np.asfortranarray(TOKENS),
              "strided": np.repeat(TOKENS, 2, axis=1)[:, ::2]}[layout]
    assert wire.encode(tokens, SOURCE_IDS, HEADER, "none")[-TOKENS.nbytes:] == TOKENS.astype("<u2").tobytes()
    assert np.array_equal(wire.decode(wire.encode(tokens, SOURCE_IDS, HEADER, "zstd")).tokens, TOKENS)


def test_each_upcoming_step_s_shards_are_worked_out_once_as_ranks_walk_the_steps(sources_dir, tmp_path,
                                                                                  monkeypatch):
    """Found: every step's prefetch looked two steps ahead, so each step's whole-batch shard list was
    computed twice (~3% of a 64 x 2048 batch request's CPU, docs/benchmarks.md)."""
    looked_up: list[int] = []
    shards_for_step = MixingEngine.shards_for_step

    def recording(engine: MixingEngine, step: int, *args, **kwargs):
        looked_up.append(step)
        return shards_for_step(engine, step, *args, **kwargs)

    monkeypatch.setattr(MixingEngine, "shards_for_step", recording)
    manager = JobManager(open_store(None, tmp_path / "state.sqlite"),
                         SourceRegistry.load(sources_dir, tmp_path / "cache"))
    manager.create("j", JOB, SCHEDULE, "test", "t")
    prefetched: dict[tuple[str, str], int] = {}
    world = 4
    make_batch(manager, 1 << 20, prefetched, "j", 0, 0, world, "none", False)
    ahead = len(looked_up)  # the look-ahead: steps 1..ahead
    assert looked_up == list(range(1, ahead + 1)) and ahead >= 1
    for step in range(6):
        for rank in range(world):
            make_batch(manager, 1 << 20, prefetched, "j", step, rank, world, "none", False)
    assert sorted(looked_up) == list(range(1, 6 + ahead))
    make_batch(manager, 1 << 20, prefetched, "j", 2, 0, world, "none", False)  # a step served again
    assert len(looked_up) == 5 + ahead
