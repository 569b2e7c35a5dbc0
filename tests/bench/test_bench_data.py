"""The head-to-head benchmark feeds both sides the same tokens: check the tiling and the three writers.

``bench/bench_vs_streaming.py`` compares us with mosaicml-streaming only if the prepared source, the MDS
samples and the Megatron files it writes hold one token stream. Unit-sized stand-in for the real stream
(ids below GPT-2's vocabulary, each document ending in EOS) so no corpus is tokenized here.
"""

from __future__ import annotations

import http.server
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import common  # noqa: E402

EOS = 50256


@pytest.fixture
def stream(monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    docs = [np.append(rng.integers(0, EOS, rng.integers(5, 400)), EOS).astype(np.uint16) for _ in range(60)]
    tokens, lengths = np.concatenate(docs), np.array([d.size for d in docs], dtype=np.int64)
    monkeypatch.setattr(common, "real_token_stream", lambda: (tokens, lengths, ["stand-in"]))
    return tokens, lengths


def test_tiling_repeats_whole_documents_until_the_size(stream) -> None:
    tokens, lengths = stream
    want = int(tokens.size * 2.5)
    pieces = list(common.tiled(want))
    out = np.concatenate([t for t, _ in pieces])
    docs = np.concatenate([n for _, n in pieces])
    assert want <= out.size < want + lengths.max()
    assert docs.sum() == out.size and out[np.cumsum(docs) - 1].tolist() == [EOS] * docs.size
    assert np.array_equal(out[: 2 * tokens.size], np.tile(tokens, 2))
    assert np.array_equal(out[2 * tokens.size :], tokens[: out.size - 2 * tokens.size])


def test_prepared_megatron_and_mds_hold_the_same_stream(stream, tmp_path: Path) -> None:
    from streaming import StreamingDataset

    from mixer_service.sources import PreparedSource, ShardCache
    from mixer_service.sources.adopted import AdoptedSource

    size, seq_len = int(stream[0].size * 3.3), 97
    prepared = PreparedSource.open(common.tiled_prepared(tmp_path / "p" / "web", size, shard_tokens=1000),
                                   cache_dir=tmp_path / "c1")
    adopted = AdoptedSource.open(common.tiled_megatron(tmp_path / "m" / "web", size),
                                 ShardCache(tmp_path / "c2", None))
    assert adopted.meta.fingerprint == prepared.meta.fingerprint  # same tokens, same documents
    whole = np.asarray(prepared.tokens[: prepared.meta.num_tokens])
    mds = StreamingDataset(local=str(common.tiled_mds(tmp_path / "mds", size, seq_len)), batch_size=1)
    assert len(mds) == whole.size // seq_len
    for i in (0, 1, len(mds) // 2, len(mds) - 1):
        assert np.array_equal(mds[i]["tokens"], whole[i * seq_len : (i + 1) * seq_len])


def test_latency_proxy_forwards_each_request_unchanged() -> None:
    body = bytes(range(256)) * 4096

    class Origin(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            part = body[int(self.headers.get("X-Skip", 0)) :]
            self.send_response(206 if self.headers.get("X-Skip") else 200)
            self.send_header("Content-Length", str(len(part)))
            self.end_headers()
            self.wfile.write(part)

        def log_message(self, *args: object) -> None:
            pass

    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    import httpx

    try:
        with common.latency_proxy(f"http://127.0.0.1:{origin.server_address[1]}", 40, 60) as url:
            for skip in (0, 1000):
                r = httpx.get(url + "/obj", headers={"X-Skip": str(skip)} if skip else {})
                assert r.status_code == (206 if skip else 200) and r.content == body[skip:]
    finally:
        origin.shutdown()
