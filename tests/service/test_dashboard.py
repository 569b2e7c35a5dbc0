"""The dashboard as a person sees it: a real headless Chromium renders /dashboard from a real server.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages ended
by NUL on file descriptors 3 and 4), so the test needs no webdriver package, only the browser that
``scripts/setup.sh`` installs. ``MIXER_SCREENSHOT=1`` also writes the rendered page to docs/dashboard.png.
"""

from __future__ import annotations

import base64
import fcntl
import itertools
import json
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_helpers import JOB, OPERATOR, READER, ROOT, TOKENS, Server, prepare_real_sources

pytestmark = pytest.mark.server_env(TOKENS)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--remote-debugging-pipe"]
SCREENSHOT = ROOT / "docs" / "dashboard.png"

# A job worth looking at: warm-up at 10% domain, a ramp, then an operator's change (v2) that anneals earlier.
CONFIG = JOB | {"global_batch": 32, "total_steps": 1200}
SCHEDULE_V1 = {"phases": [{"start_step": 0, "weights": {"abc": 0.1, "sotu": 0.9}},
                          {"start_step": 300, "weights": {"abc": 0.1, "sotu": 0.9}, "ramp": True},
                          {"start_step": 700, "weights": {"abc": 0.4, "sotu": 0.6}},
                          {"start_step": 1000, "weights": {"abc": 1}}]}
SCHEDULE_V2 = {"phases": [{"start_step": 0, "weights": {"abc": 0.1, "sotu": 0.9}},
                          {"start_step": 300, "weights": {"abc": 0.1, "sotu": 0.9}, "ramp": True},
                          {"start_step": 600, "weights": {"abc": 0.5, "sotu": 0.5}},
                          {"start_step": 900, "weights": {"abc": 1}}]}
# At the trained step the domain source is in its third epoch: documents seen 1 or 2 times, both bars shown.
SERVED_BEFORE_CHANGE, SERVED, TRAINED = 400, 560, 536


def chromium_executable() -> str:
    for name in (os.environ.get("MIXER_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    pytest.fail("Chromium is not installed, so the dashboard cannot be checked: run scripts/setup.sh "
                "(it runs `apt-get install -y chromium`) or set MIXER_CHROMIUM to a Chromium binary",
                pytrace=False)


class Browser:
    """One headless Chromium tab, driven over the DevTools protocol on a pipe (no webdriver needed)."""

    def __init__(self, width: int = 1360, height: int = 900, timeout: float = 20) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="mixer-chromium-"))
        self.timeout = timeout
        # Chromium reads commands on fd 3 and writes replies on fd 4; bash moves the pipes there (no
        # preexec_fn, which is unsafe with threads). The pipe ends sit at fds >= 10 first so the redirections
        # onto 3 and 4 cannot clobber them (bash, not sh: dash refuses fd numbers above 9).
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        r, w = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
        for fd in (to_child_r, from_child_w):
            os.close(fd)
        self._log = open(self.profile / "chromium.log", "wb")  # noqa: SIM115 - closed in close()
        args = [chromium_executable(), *CHROMIUM_FLAGS, f"--user-data-dir={self.profile / 'profile'}",
                f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen(["bash", "-c", f'exec "$@" 3<&{r} 4>&{w} {r}<&- {w}>&-', "bash", *args],
                                     pass_fds=(r, w), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=self._log)
        os.close(r)
        os.close(w)
        self._buffer, self._next_id = b"", 0
        try:
            target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            attached = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
            self.session = attached["sessionId"]
            self.resize(width, height)
        except Exception:
            self.close()
            raise

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" not in self._buffer:
                if not select.select([self._from_child], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    raise TimeoutError(f"Chromium did not answer {method} in {self.timeout} s")
                chunk = os.read(self._from_child, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"Chromium exited: {self._log_tail()}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:  # anything else is an event
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def tab(self, method: str, params: dict[str, Any] | None = None) -> dict:
        return self.call(method, params, self.session)

    def resize(self, width: int, height: int) -> None:
        self.tab("Emulation.setDeviceMetricsOverride",
                 {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def goto(self, url: str) -> None:
        """Navigate and wait until the new document has loaded (its scripts then run on their own)."""
        self.tab("Page.navigate", {"url": url})
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def js(self, expression: str) -> Any:
        result = self.tab("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if value := self.js(expression):
                    return value
            except RuntimeError:  # e.g. the document is being replaced; try again
                pass
            time.sleep(0.1)
        error = self.js("document.body ? document.body.dataset.error || '' : ''")
        raise AssertionError(f"page never satisfied {expression!r} in {timeout} s; page error: {error!r}")

    def screenshot(self, path: Path) -> None:
        """The whole page, not only the viewport."""
        width, height = self.js("[document.documentElement.scrollWidth, "
                                "document.documentElement.scrollHeight]")
        self.resize(width, height)
        time.sleep(0.3)  # one more frame at the new size
        path.write_bytes(base64.b64decode(self.tab("Page.captureScreenshot", {"format": "png"})["data"]))

    def _log_tail(self) -> str:
        self._log.flush()
        return (self.profile / "chromium.log").read_bytes()[-2000:].decode(errors="replace")

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.call("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server_sources(tmp_path_factory):
    """A 300-tune domain set, so the served steps complete an epoch and the histogram has two bars."""
    return prepare_real_sources(tmp_path_factory.mktemp("sources"), domain_docs=300, web_docs=60)


def serve(http: httpx.Client, url: str, job: str, steps: range, pause: float = 0.0) -> None:
    for step in steps:
        r = http.get(f"{url}/v1/jobs/{job}/batches/{step}", params={"compression": "zstd"})
        assert r.status_code == 200, r.text
        if pause:
            time.sleep(pause)


@pytest.fixture(scope="module")
def job(server):
    """'spt-demo': served past an operator's schedule change, with trainers' progress reported."""
    with httpx.Client(headers=OPERATOR) as http:
        body = {"job_id": "spt-demo", "config": CONFIG, "schedule": SCHEDULE_V1, "author": "alice",
                "reason": "SPT: 10% domain, ramp to 40% from step 300, domain-only from 1000"}
        assert http.post(f"{server.url}/v1/jobs", json=body).status_code == 201
        serve(http, server.url, "spt-demo", range(SERVED_BEFORE_CHANGE))
        change = {"schedule": SCHEDULE_V2, "requested_step": 400, "author": "bob",
                  "reason": "anneal earlier: 50% domain by step 600, domain-only from 900"}
        etag = http.get(f"{server.url}/v1/jobs/spt-demo/schedule").headers["etag"]
        r = http.put(f"{server.url}/v1/jobs/spt-demo/schedule", json=change, headers={"If-Match": etag})
        assert r.status_code == 200 and r.json()["effective_step"] == SERVED_BEFORE_CHANGE, r.text
        serve(http, server.url, "spt-demo", range(SERVED_BEFORE_CHANGE, SERVED))
        r = http.put(f"{server.url}/v1/jobs/spt-demo/progress", json={"trained_step": TRAINED})
        assert r.status_code == 200
    return "spt-demo"


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


def api(url: str, path: str) -> Any:
    r = httpx.get(url + path, headers=READER)
    assert r.status_code == 200, r.text
    return r.json()


def test_dashboard_renders_what_the_api_says(server, job, browser):
    browser.goto(f"{server.url}/dashboard?token=rd-secret&refresh=1")
    browser.wait_for("Number(document.body.dataset.refreshes) >= 1")
    described = api(server.url, f"/v1/jobs/{job}")
    hist = api(server.url, f"/v1/jobs/{job}/repetitions/histogram")["histogram"]

    rows = browser.js("[...document.querySelectorAll('#jobs-table tbody tr')].map(r => r.innerText)")
    assert len(rows) == 1 and job in rows[0] and "v2" in rows[0]
    assert browser.js("document.getElementById('job-title').innerText") == f"Job {job}"
    kpis = browser.js("document.getElementById('kpis').innerText")
    assert f"{SERVED - 1}" in kpis and f"{TRAINED}" in kpis  # served high water, trained step

    # Schedule chart: one curve per source, a marker per version, and the ramps drawn as slopes.
    assert browser.js("[...document.querySelectorAll('#legend .legend-item')].map(e => e.innerText)") == \
        ["abc", "sotu"]
    paths = browser.js("Object.fromEntries([...document.querySelectorAll('#schedule-chart path.series')]"
                       ".map(p => [p.dataset.source, p.getAttribute('d')]))")
    assert set(paths) == {"abc", "sotu"}
    for d in paths.values():
        points = [tuple(map(float, p[1:].split(","))) for p in d.split()]
        pairs = itertools.pairwise(points)
        slopes = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in pairs if b[0] != a[0]]
        assert any(abs(s) > 1e-6 for s in slopes), "a ramp must be drawn as a slope"
    assert browser.js("[...document.querySelectorAll('#schedule-chart .version-marker')]"
                      ".map(e => e.dataset.version)") == ["1", "2"]
    assert browser.js("document.querySelector('#schedule-chart svg').getBBox().width") > 100

    # Tokens per source: the numbers the job reports, as drawn bars.
    assert browser.js("document.querySelectorAll('#tokens-chart rect.token-bar').length") == 2
    token_text = browser.js("document.getElementById('tokens-chart').textContent")
    for source, tokens in described["tokens_through_high_water"].items():
        assert tokens > 0 and f"{tokens:,}" in token_text, source

    # Repetitions: one histogram bar per distinct count, and the most-repeated documents listed.
    bars = browser.js("[...document.querySelectorAll('#histogram-chart rect.bar')].map(b => b.dataset.count)")
    assert len(bars) > 0 and sorted(bars, key=int) == sorted(hist, key=int)
    top_k = max(map(int, hist))
    assert len(bars) == 2 and top_k == 2  # every document seen e or e+1 times
    top = api(server.url, f"/v1/jobs/{job}/repetitions/at-least/{top_k}?limit=40")
    shown = browser.js("[...document.querySelectorAll('#top-docs .doc')].map(e => Number(e.dataset.doc))")
    assert shown == top["documents"] and len(shown) > 0
    history = browser.js("[...document.querySelectorAll('#history-table tbody tr')].map(r => r.innerText)")
    assert len(history) == 2 and "bob" in history[0] and "anneal earlier" in history[0]

    # Throughput: serve while the page polls; it must show a positive token rate computed from /v1/stats.
    with httpx.Client(headers=READER) as http:
        more = range(SERVED, SERVED + 60)
        feeder = threading.Thread(target=serve, args=(http, server.url, job, more, 0.04))
        feeder.start()
        try:
            browser.wait_for("Number(document.getElementById('throughput').dataset.tokensPerSecond) > 0")
        finally:
            feeder.join()
    assert browser.js("document.querySelectorAll('#throughput-chart polyline.spark').length") == 1
    assert browser.js("document.getElementById('error').hidden")

    if os.environ.get("MIXER_SCREENSHOT") == "1":
        browser.screenshot(SCREENSHOT)
        assert SCREENSHOT.stat().st_size > 10_000


def test_dashboard_without_a_token_shows_the_problem(server, job, browser):
    browser.goto(f"{server.url}/dashboard")
    error = browser.wait_for("document.body.dataset.error")
    assert "401" in error and "?token=" in error
    assert browser.js("document.getElementById('error').hidden") is False


def test_the_page_is_public_but_the_data_is_not(server, job):
    page = httpx.get(f"{server.url}/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["referrer-policy"] == "no-referrer"
    assert '<script src="dashboard/dashboard.js">' in page.text
    assert "http" not in page.text.split("<body")[1]  # nothing from elsewhere
    script = httpx.get(f"{server.url}/dashboard/dashboard.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert httpx.get(f"{server.url}/dashboard/..%2Fapp.py").status_code == 404
    assert httpx.get(f"{server.url}/v1/stats").status_code == 401


def test_stats_count_what_this_replica_served(server, job):
    before = api(server.url, "/v1/stats")
    served = before["jobs"][job]
    assert served["batches"] >= SERVED and set(served["tokens"]) == {"abc", "sotu"}
    with httpx.Client(headers=READER) as http:
        batch = http.get(f"{server.url}/v1/jobs/{job}/batches/0", params={"rank": 1, "world": 4})
        assert batch.status_code == 200
    after = api(server.url, "/v1/stats")
    assert after["jobs"][job]["batches"] == served["batches"] + 1
    rows = CONFIG["global_batch"] // 4
    added = sum(after["jobs"][job]["tokens"].values()) - sum(served["tokens"].values())
    assert added == rows * CONFIG["seq_len"]
    assert after["time"] >= before["time"]


def test_a_job_this_replica_cannot_serve_is_listed_with_its_error(tmp_path, browser):
    """One broken job (its web source gone from this replica) must not blank the page for the others."""
    sources = prepare_real_sources(tmp_path / "sources", domain_docs=120, web_docs=20)
    state = tmp_path / "state"
    domain_only = JOB | {"sources": [{"name": "abc", "role": "repeat"}]}
    with Server(sources, state, env=TOKENS) as srv, httpx.Client(headers=OPERATOR) as http:
        for job_id, config, weights in (("broken", CONFIG | {"allow_wrap": True}, {"abc": 0.1, "sotu": 0.9}),
                                        ("healthy", domain_only, {"abc": 1})):
            body = {"job_id": job_id, "config": config,
                    "schedule": {"phases": [{"start_step": 0, "weights": weights}]}}
            assert http.post(f"{srv.url}/v1/jobs", json=body).status_code == 201
    (sources / "sotu" / "meta.json").unlink()
    with Server(sources, state, env=TOKENS) as srv:
        browser.goto(f"{srv.url}/dashboard?token=rd-secret&refresh=1")
        browser.wait_for("Number(document.body.dataset.refreshes) >= 1")
        rows = browser.js("[...document.querySelectorAll('#jobs-table tbody tr')].map(r => r.innerText)")
        assert len(rows) == 2 and "broken" in rows[0] and "sotu" in rows[0] and "healthy" in rows[1]
        assert browser.js("document.getElementById('job-title').innerText") == "Job healthy"
        assert browser.js("document.getElementById('error').hidden")
