"""`python -m trainer` / `torchrun -m trainer` against a real `mixer serve` on loopback, on CPU (gloo).

The torchrun test is the contract a user relies on: each rank reads only its rows (together they tile
every global batch), and a run killed with SIGKILL and resumed from its checkpoint trains exactly the
losses an uninterrupted run trains.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from service_helpers import new_job

from client import MixerClient
from trainer.train_command import build_parser, main, parse_args

pytestmark = pytest.mark.slow
SEQ_LEN, GLOBAL_BATCH, TOTAL_STEPS, MAX_STEPS = 33, 8, 64, 60
TINY = ["--preset", "gpt-tiny", "--lr", "1e-2", "--min-lr", "1e-3", "--warmup-steps", "2",
        "--eval-interval", "0", "--progress-interval", "0", "--prefetch", "2"]


def weighted_job(url: str, weights: dict[str, float], total_steps: int = TOTAL_STEPS) -> str:
    """A job of the sources in ``weights`` (abc repeated, sotu once) with one constant phase."""
    roles = {"abc": "repeat", "sotu": "once"}
    config = {"sources": [{"name": n, "role": roles[n]} for n in weights], "seq_len": SEQ_LEN,
              "global_batch": GLOBAL_BATCH, "seed": 3, "total_steps": total_steps, "allow_wrap": True}
    return new_job(url, {"phases": [{"start_step": 0, "weights": weights}]}, config=config, prefix="train",
                   reason="trainer cli")


def torchrun(args: list[str], out: Path) -> subprocess.Popen[str]:
    """Two CPU ranks under the real torchrun launcher, in their own process group (so a kill gets all)."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "trainer", *args, "--out", str(out)]
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "stderr.log", "a")  # the child holds it; closed at exit
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen[str], out: Path) -> None:
    assert process.wait(timeout=300) == 0, (out / "stderr.log").read_text()[-3000:]


def kill_tree(process: subprocess.Popen[str]) -> None:
    """SIGKILL torchrun and its workers at once, as a lost node would. The workers run in sessions of their
    own, so killing torchrun's process group alone would leave them training."""
    pids, frontier = [process.pid], [process.pid]
    while frontier:
        children = Path(f"/proc/{frontier.pop()}/task")
        for task in children.glob("*/children") if children.is_dir() else []:
            found = [int(p) for p in task.read_text().split()]
            pids += found
            frontier += found
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=60)
    for pid in pids[1:]:  # the workers' parent is gone; wait until the kernel has removed them
        while Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid):
            time.sleep(0.01)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def losses(out: Path) -> dict[int, float]:
    """Loss per step; when a killed run and its resumption both logged a step, the later line wins."""
    if not (out / "metrics.jsonl").exists():
        return {}
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.endswith("}")]  # a line may be half-written
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def row_hashes(client: MixerClient, job: str, step: int) -> list[str]:
    return [hashlib.sha256(row.astype("<i8").tobytes()).hexdigest() for row in client.batch(job, step).tokens]


def test_torchrun_ranks_tile_each_batch_and_a_killed_run_resumes_exactly(server, tmp_path):
    job = weighted_job(server.url, {"abc": 0.25, "sotu": 0.75})
    common = ["--url", server.url, "--job", job, "--max-steps", str(MAX_STEPS), "--eval-steps",
              f"{MAX_STEPS}:{TOTAL_STEPS}", *TINY]
    full = tmp_path / "full"
    finish(torchrun([*common, "--data-log", "--checkpoint-interval", "20"], full), full)

    # ranks: disjoint slices that tile every global batch (by content, against the W=1 batch)
    logs = {r: [json.loads(line) for line in (full / f"data-rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)}
    assert [e["step"] for e in logs[0]] == [e["step"] for e in logs[1]] == list(range(MAX_STEPS))
    with MixerClient(server.url) as client:
        for step in range(MAX_STEPS):
            rank0, rank1 = logs[0][step]["rows"], logs[1][step]["rows"]
            assert len(rank0) == len(rank1) == GLOBAL_BATCH // 2
            assert rank0 + rank1 == row_hashes(client, job, step)
        assert client.job(job)["trained_step"] == MAX_STEPS - 1  # progress reached the service
    summary = json.loads((full / "summary.json").read_text())
    assert summary["steps"] == MAX_STEPS and summary["tokens"] == MAX_STEPS * GLOBAL_BATCH * (SEQ_LEN - 1)
    assert set(summary["eval"]) == {"abc", "sotu"}  # per-source eval on the steps after training
    log = (full / "stderr.log").read_text()
    assert "tok/s" in log and "data stall" in log and "abc seen" in log

    # killed with SIGKILL past its first checkpoint (step 5), so steps after it are lost and retrained
    run = tmp_path / "run"
    process = torchrun([*common, "--checkpoint-interval", "5"], run)
    while process.poll() is None and max(losses(run), default=0) < 7:
        time.sleep(0.01)
    kill_tree(process)
    killed_at = max(losses(run))
    assert killed_at < MAX_STEPS, "the run finished before it could be killed; raise MAX_STEPS"
    resumed_from = torch.load(run / "ckpt.pt", weights_only=True)["step"]
    assert resumed_from < killed_at  # some trained steps were lost with the process
    time.sleep(1)
    assert max(losses(run)) == killed_at  # and nothing of the killed run trains on
    finish(torchrun([*common, "--checkpoint-interval", "5", "--resume"], run), run)
    assert losses(run) == losses(full)


def test_single_process_with_document_mask_finetune_and_a_config_file(server, tmp_path):
    job = weighted_job(server.url, {"abc": 0.25, "sotu": 0.75}, total_steps=12)
    domain = weighted_job(server.url, {"abc": 1.0}, total_steps=8)
    config = tmp_path / "run.toml"
    config.write_text(f'url = "{server.url}"\njob = "{job}"\nout = "{tmp_path / "out"}"\n'
                      'preset = "gpt-tiny"\nwarmup-steps = 2\nprogress_interval = 0\neval-steps = "10:12"\n'
                      f'finetune-job = "{domain}"\nfinetune-steps = "0:4"\nfinetune-lr = 1e-3\n'
                      'finetune-epochs = 2\nfinetune-split = "abc"\n')
    r = subprocess.run([sys.executable, "-m", "trainer", "--config", str(config), "--eval-interval", "5",
                        "--doc-causal-mask"],
                       capture_output=True, text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 10  # up to the held-out eval steps
    history = summary["finetune"]["history"]
    assert history[0]["epoch"] == 0 and {"abc", "sotu"} <= history[0].keys()
    assert summary["finetune"]["best"]["abc"] <= history[0]["abc"]
    assert (tmp_path / "out" / "finetuned.pt").is_file()
    evals = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals if "eval" in e] == [5, 10]  # the flag beat the file's default
    posted = httpx.get(f"{server.url}/v1/jobs/{job}/evals").json()["curves"]  # the overfitting watch's input
    assert {s: [p[0] for p in c] for s, c in posted.items()} == {"abc": [4, 9], "sotu": [4, 9]}


def test_eval_steps_that_overlap_training_are_refused_before_anything_runs(server, tmp_path):
    job = weighted_job(server.url, {"abc": 0.25, "sotu": 0.75}, total_steps=12)
    with pytest.raises(SystemExit, match="overlaps the 11 training steps"):
        main(["--url", server.url, "--job", job, "--out", str(tmp_path), "--max-steps", "11",
              "--eval-steps", "10:12"])
    assert not list(tmp_path.iterdir())
    with MixerClient(server.url) as client:
        assert client.job(job)["served_high_water"] < 0  # nothing was fetched


def test_every_flag_has_help_and_bad_input_is_refused(tmp_path, capsys):
    for action in build_parser()._actions:
        assert action.help, action.dest
    cases: list[tuple[list[str], str]] = [
        (["--job", "j", "--out", "o"], "--url"),
        (["--url", "u", "--job", "j", "--out", "o", "--eval-steps", "5:5"], "0 <= A < B"),
    ]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"url": "u", "job": "j", "out": "o", "learning_rate": 1}))
    cases.append((["--config", str(bad)], "unknown option 'learning_rate'"))
    for argv, message in cases:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err


def test_config_file_values_yield_to_flags(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"url": "http://a", "job": "j", "out": "runs/x", "lr": 0.5,
                                  "eval-steps": "3:5"}))
    args: Any = parse_args(["--config", str(config), "--lr", "0.25"])
    assert (args.url, args.lr, args.out, args.eval_steps) == ("http://a", 0.25, Path("runs/x"), range(3, 5))
