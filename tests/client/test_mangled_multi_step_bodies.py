"""A hostile proxy in front of a real server mangles multi-step bodies (frames swapped, duplicated,
replaced by another job's / rank's frame of the same step, trailing bytes, a valid prefix only). The
loader must hand the trainer only the right batch for each step, in order, or raise -- never other data."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import numpy as np
import pytest
from service_helpers import new_job

from client import MixerClient, MixerLoader
from mixer_contract import wire


def frames(body: bytes) -> list[bytes]:
    out, at = [], 0
    while at < len(body):
        (head_len,) = wire._LEN.unpack_from(body, at + 4)
        size = json.loads(body[at + 8: at + 8 + head_len])["payload_bytes"]
        out.append(body[at: at + 8 + head_len + size])
        at += 8 + head_len + size
    return out


class Mangler(BaseHTTPRequestHandler):
    upstream, other_job, how = "", "", ""

    def do_GET(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        r = httpx.get(f"{self.upstream}{parts.path}?{parts.query}")
        body = r.content
        query = dict(parse_qsl(parts.query))
        if r.status_code == 200 and int(query.get("steps", "1")) > 1:
            f = frames(body)
            if self.how == "swap":
                f[0], f[1] = f[1], f[0]
            elif self.how == "dup":
                f[1] = f[0]
            elif self.how == "garbage":
                f.append(b"\0" * 3)
            elif self.how == "prefix":
                f = f[:-1]
            elif self.how in ("other_job", "other_rank"):
                path = parts.path.replace(f"/jobs/{query.get('job', '')}", "")
                step = int(parts.path.rsplit("/", 1)[1]) + 1
                q = dict(query, steps="1")
                if self.how == "other_job":
                    url = f"{self.upstream}/v1/jobs/{self.other_job}/batches/{step}"
                else:
                    url = f"{self.upstream}{parts.path.rsplit('/', 1)[0]}/{step}"
                    q["rank"] = str((int(q.get("rank", "0")) + 1) % int(q.get("world", "1")))
                f[1] = httpx.get(f"{url}?{urlencode(q)}").content
                del path
            body = b"".join(f)
        self.send_response(r.status_code)
        self.send_header("Content-Type", r.headers.get("content-type", "application/octet-stream"))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("how", ["swap", "dup", "garbage", "prefix", "other_job", "other_rank"])
def test_a_mangled_multi_step_body_never_reaches_the_trainer(server, how) -> None:
    job, other = new_job(server.url), new_job(server.url, seed=12345)
    with MixerLoader(server.url, job, end_step=20, steps_per_request=1, rank=0, world=2) as loader:
        expected = {b["step"]: b["input_ids"].numpy().copy() for b in loader}
    handler = type("M", (Mangler,), {"upstream": server.url, "other_job": other, "how": how})
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    got, errors = [], 0
    try:
        client = MixerClient(f"http://127.0.0.1:{proxy.server_address[1]}", max_retries=0)
        with MixerLoader(client, job, end_step=20, steps_per_request=4, rank=0, world=2) as loader:
            while len(got) < 20 and errors < 20:
                try:
                    b = next(loader)
                except StopIteration:
                    break
                except Exception:
                    errors += 1
                    continue
                got.append((b["step"], b["input_ids"].numpy().copy()))
        client.close()
    finally:
        proxy.shutdown()
        proxy.server_close()
    steps = [s for s, _ in got]
    assert steps == list(range(len(steps))), steps
    for s, ids in got:
        assert np.array_equal(ids, expected[s]), f"{how}: step {s} handed to the trainer is another batch"
