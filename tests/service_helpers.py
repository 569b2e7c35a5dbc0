"""Real servers for tests: prepared sources from real corpora and uvicorn processes on loopback."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from mixer_service.prepare.readers import iter_documents
from mixer_service.prepare.tokenizer import load_tokenizer
from mixer_service.prepare.writer import prepare_source

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "data" / "raw"


def prepare_real_sources(out: Path, domain_docs: int = 3000, web_docs: int = 60) -> Path:
    """ABC folk tunes (domain) and State of the Union addresses (web), byte-level tokens."""
    for needed in (RAW / "abc", RAW / "sotu"):
        if not needed.is_dir():
            raise RuntimeError(f"{needed} is missing: run scripts/fetch_corpora.sh first")
    tok = load_tokenizer()
    abc = itertools.islice(
        iter_documents([RAW / "abc"], fmt="text", split_regex=r"^X:", glob="**/*.abc"), domain_docs
    )
    prepare_source(abc, out / "abc", tok, name="abc", progress=False)
    sotu = itertools.islice(iter_documents([RAW / "sotu"], fmt="text", glob="*.txt"), web_docs)
    prepare_source(sotu, out / "sotu", tok, name="sotu", progress=False)
    return out


JOB = {
    "sources": [{"name": "abc", "role": "repeat"}, {"name": "sotu", "role": "once"}],
    "seq_len": 64,
    "global_batch": 8,
    "seed": 11,
    "total_steps": 2000,
}
SCHEDULE = {"phases": [{"start_step": 0, "weights": {"abc": 0.05, "sotu": 0.95}}]}


class Server:
    """``mixer serve`` in its own process on a free loopback port."""

    def __init__(
        self,
        sources: Path,
        state: Path,
        port: int,
        redis_url: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.args = [
            sys.executable,
            "-m",
            "mixer_service.cli",
            "serve",
            "--sources-dir",
            str(sources),
            "--state-dir",
            str(state),
            "--port",
            str(port),
        ]
        if redis_url:
            self.args += ["--redis-url", redis_url]
        self.env = os.environ | {"MIXER_LOG_LEVEL": "WARNING"} | (env or {})
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> Server:
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/v1/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not become healthy")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
