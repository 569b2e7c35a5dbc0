"""``mixer export``: served steps of a real job, written as MDS and read back with StreamingDataset."""

from __future__ import annotations

import json

import pytest
from service_helpers import JOB, new_job

from client import MixerClient
from mixer_service.cli import main


@pytest.fixture
def job(server) -> str:
    return new_job(server.url, prefix="export", reason="export")


def read_mds(directory) -> list[dict]:
    from streaming import StreamingDataset

    dataset = StreamingDataset(local=str(directory), shuffle=False, batch_size=1)
    return [dataset[i] for i in range(len(dataset))]


def test_export_writes_the_served_rows_in_order(server, job, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIXER_URL", server.url)
    out = tmp_path / "mds"
    assert main(["export", job, "--steps", "3:6", "--out", str(out), "--compression", "zstd", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 3 * JOB["global_batch"]
    samples = read_mds(out)
    with MixerClient(server.url) as client:
        served = [client.batch(job, step) for step in range(3, 6)]
    expected = [(b.header["step"], r, b.header["sources"][s], tokens) for b in served
                for r, (tokens, s) in enumerate(zip(b.tokens, b.source_ids.tolist(), strict=True))]
    assert len(samples) == len(expected)
    for sample, (step, row, source, tokens) in zip(samples, expected, strict=True):
        assert (sample["step"], sample["row"], sample["source"]) == (step, row, source)
        assert sample["tokens"].dtype == tokens.dtype and sample["tokens"].tobytes() == tokens.tobytes()
    assert {s["source"] for s in samples} <= {"abc", "sotu"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_export_refuses_bad_input_and_changes_nothing(server, job, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIXER_URL", server.url)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main(["export", job, "--steps", "0:1", "--out", str(taken)]) == 2
    assert "not empty" in capsys.readouterr().err and sorted(p.name for p in taken.iterdir()) == ["keep.txt"]
    with pytest.raises(SystemExit):
        main(["export", job, "--steps", "4:2", "--out", str(tmp_path / "x")])
    assert "0 <= A < B" in capsys.readouterr().err
    assert main(["export", "no-such-job", "--steps", "0:1", "--out", str(tmp_path / "y")]) == 3
    assert "HTTP 404" in capsys.readouterr().err
    end = JOB["total_steps"]
    assert main(["export", job, "--steps", f"{end - 1}:{end + 1}", "--out", str(tmp_path / "z")]) == 2
    assert "HTTP 422" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
