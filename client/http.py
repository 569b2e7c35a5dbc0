"""Blocking HTTP client for the mixer service: verified batches, retries with backoff, replica failover.

Every replica serves identical bytes for a (job, step, rank, world) (they share one state store), so any
failure that might be transient (refused or dropped connection, timeout, 5xx, a batch that fails its
checksum) is retried on the next replica after an exponential backoff with full jitter. A 4xx is the
caller's mistake and is raised at once. The client sticks to the replica that last answered, so a healthy
deployment keeps one warm keep-alive connection per replica and no request pays for failover.
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from collections.abc import Callable, Collection
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from client.errors import ChecksumError, ClientRequestError, HTTPStatusError, RequestError, ServerError
from mixer_contract import wire

log = logging.getLogger(__name__)

T = TypeVar("T")
_RETRYABLE_4XX = frozenset({408, 429})  # a timed-out or rate-limited request may succeed later
_CONNECT_TIMEOUT_S = 5.0  # a dead replica should cost seconds, not the full read timeout, before failover


class MixerClient:
    """Thread-safe client for one service deployment (one URL per replica): the one REST client.

    The trainer's loader, the operator CLI, ``mixer export``, the demo and the benchmarks all talk to
    the service through it, so URL building (``job_path``), problem+json parsing and the retry policy
    live here once. Every 5xx (503: store down or behind, source unavailable) is retried on the next
    replica, honouring Retry-After; 408/429 too; any other 4xx raises at once.

    ``timeout`` bounds each request in seconds (connecting to a dead replica gives up sooner).
    ``max_retries`` counts retries after the first attempt; the n-th retry waits a random time in
    ``[0, min(backoff_max, backoff_base * 2**(n-1))]`` ("full jitter", so many trainers restarting at once
    do not hammer a recovering service in lockstep), or at least the server's Retry-After, capped at
    ``backoff_max``.
    """

    def __init__(
        self,
        urls: list[str] | str,
        token: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 8,
        backoff_base: float = 0.25,
        backoff_max: float = 8.0,
    ) -> None:
        self.urls = [u.rstrip("/") for u in ([urls] if isinstance(urls, str) else urls)]
        if not self.urls:
            raise ValueError("urls: need at least one replica URL")
        if max_retries < 0 or backoff_base < 0 or backoff_max < 0:
            raise ValueError("max_retries, backoff_base and backoff_max must be >= 0")
        self.max_retries, self.backoff_base, self.backoff_max = max_retries, backoff_base, backoff_max
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, _CONNECT_TIMEOUT_S))
        )
        self._current = 0  # index of the replica to try first
        self._lock = threading.Lock()
        self._closed = threading.Event()  # wakes threads sleeping in a backoff when the client closes

    @property
    def url(self) -> str:
        """The replica the next request goes to first (the one that answered last)."""
        return self.urls[self._current]

    def request(self, method: str, path: str, *, ok: Collection[int] = (), retries: int | None = None,
                **kwargs: Any) -> httpx.Response:
        """One REST call with retries and failover; a status outside 2xx and ``ok`` raises.

        ``path`` starts with ``/`` (build job paths with ``job_path``); ``retries`` overrides
        ``max_retries`` for this call (0 for a request that must not be repeated, such as a POST).
        """
        return self._request(method, path, lambda r: r, ok=ok, retries=retries, **kwargs)

    def get(self, path: str, **params: Any) -> Any:
        """The JSON body of ``GET path?params`` (``None`` values are left out)."""
        query = {k: v for k, v in params.items() if v is not None}
        return self._request("GET", path, lambda r: r.json(), params=query)

    def batch(
        self, job: str, step: int, rank: int = 0, world: int = 1, compression: str = "zstd",
        boundaries: bool = False,
    ) -> wire.WireBatch:
        """Rows ``rank::world`` of the job's global batch at ``step``, checksum- and header-verified.

        ``boundaries=True`` also asks for the start offset of every document piece in each row.
        """
        return self.batches(job, step, 1, rank, world, compression, boundaries)[0]

    def batches(
        self, job: str, step: int, steps: int, rank: int = 0, world: int = 1, compression: str = "zstd",
        boundaries: bool = False,
    ) -> list[wire.WireBatch]:
        """The batches of steps ``step, step + 1, ...`` in one request, each verified like ``batch``'s.

        A server that predates several steps a request sends only the first; the list then holds fewer
        than ``steps`` batches (never other steps), and the caller asks again for the rest.
        """
        verify = _checked_frames({"job": job, "step": step, "rank": rank, "world": world}, steps,
                                 boundaries=boundaries)
        params: dict[str, Any] = {"rank": rank, "world": world, "compression": compression}
        if boundaries:
            params["boundaries"] = "true"
        if steps != 1:
            params["steps"] = steps
        return self._request("GET", job_path(job, "batches", step), verify, params=params)

    def image_batch(
        self,
        source: str,
        step: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        compression: str = "none",
    ) -> wire.WireSamples:
        """Encoded images and labels of an image source's batch ``step`` (decode with client.images)."""
        verify = _checked(wire.decode_samples, {"source": source, "step": step, "rank": rank, "world": world})
        params = {
            "batch_size": batch_size,
            "seed": seed,
            "rank": rank,
            "world": world,
            "compression": compression,
        }
        return self._request(
            "GET", f"/v1/images/{quote(source, safe='')}/batches/{step}", verify, params=params
        )

    def sources(self) -> list[dict[str, Any]]:
        """The prepared sources on the server: name, fingerprint, docs, tokens, vocab_size, dtype."""
        return list(self.get("/v1/sources")["sources"])

    def jobs(self) -> list[dict[str, Any]]:
        """Every job the service knows, as ``job()`` describes each."""
        return list(self.get("/v1/jobs")["jobs"])

    def job(self, job: str) -> dict[str, Any]:
        """The job's description (config incl. ``total_steps``, schedule version, progress)."""
        return dict(self.get(job_path(job)))

    def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST a job (``{job_id, config, schedule, author, reason}``); sent once, never retried."""
        return dict(self.request("POST", "/v1/jobs", json=body, retries=0).json())

    def provenance(self, job: str, step: int, rank: int = 0, world: int = 1) -> list[dict[str, Any]]:
        """Per row: ``{"source", "seq_id", "spans": [{"doc", "offset", "length"}]}`` (an audit trail)."""
        return list(self.get(job_path(job, "provenance", step), rank=rank, world=world)["sequences"])

    def repetitions(self, job: str, source: str | None = None, step: int | None = None) -> dict[str, Any]:
        """How often ``source``'s documents were seen through ``step`` (default: the trained step)."""
        return dict(self.get(job_path(job, "repetitions"), source=source, step=step))

    def repetition_histogram(self, job: str, source: str | None = None, step: int | None = None
                             ) -> dict[str, int]:
        """``{times seen: documents}`` of ``source`` through ``step`` (default: the trained step)."""
        path = job_path(job, "repetitions", "histogram")
        return dict(self.get(path, source=source, step=step)["histogram"])

    def report_progress(self, job: str, step: int) -> None:
        """Tell the service the last step trained, so repetition metrics follow training (idempotent)."""
        self._request("PUT", job_path(job, "progress"), lambda r: None, json={"trained_step": step})

    def post_eval(self, job: str, step: int, source: str, loss: float, tokens: int = 0) -> None:
        """Send one held-out loss, so the service's overfitting watch can forecast the domain curve."""
        self._request("POST", job_path(job, "evals"), lambda r: None,
                      json={"step": step, "source": source, "loss": loss, "tokens": tokens})

    def close(self) -> None:
        """Close connections and wake any thread waiting to retry (it then raises its last error)."""
        self._closed.set()
        self._http.close()

    def __enter__(self) -> MixerClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _request(self, method: str, path: str, parse: Callable[[httpx.Response], T], *,
                 ok: Collection[int] = (), retries: int | None = None, **kwargs: Any) -> T:
        max_retries = self.max_retries if retries is None else retries
        tried: list[str] = []
        attempt = 0
        with self._lock:
            start = self._current
        while True:
            attempt += 1
            # Each request walks the replica ring on its own, so concurrent failovers cannot bounce it
            # back onto a replica it has just seen fail.
            index = (start + attempt - 1) % len(self.urls)
            base = self.urls[index]
            if base not in tried:
                tried.append(base)
            try:
                result = self._attempt(method, base + path, parse, attempt, ok, kwargs)
            except (RequestError, HTTPStatusError, ChecksumError) as error:
                retryable = not isinstance(error, HTTPStatusError) or (
                    isinstance(error, ServerError) or error.status in _RETRYABLE_4XX
                )
                if not retryable:
                    raise
                if attempt > max_retries or self._closed.is_set():
                    raise _give_up(error, method, path, attempt, tried) from error
                self._fail_over(index)
                retry_after = error.retry_after if isinstance(error, HTTPStatusError) else None
                delay = self._backoff(attempt, retry_after)
                log.warning(
                    "mixer request failed, retrying",
                    extra={
                        "method": method,
                        "path": path,
                        "url": base,
                        "attempt": attempt,
                        "error": str(error),
                        "retry_in_s": round(delay, 3),
                    },
                )
                if self._closed.wait(delay):
                    raise _give_up(error, method, path, attempt, tried) from error
                continue
            with self._lock:
                self._current = index  # stick to the replica that answered
            return result

    def _attempt(
        self,
        method: str,
        url: str,
        parse: Callable[[httpx.Response], T],
        attempt: int,
        ok: Collection[int],
        kwargs: dict[str, Any],
    ) -> T:
        """One request to one replica, mapped onto the client's error types."""
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise RequestError(
                f"{method} {url}: {type(exc).__name__}: {exc}", attempts=attempt, urls=[url]
            ) from exc
        if response.is_error and response.status_code not in ok:
            title, detail = problem(response)
            cls = ClientRequestError if response.status_code < 500 else ServerError
            raise cls(
                f"{method} {url}: HTTP {response.status_code} {problem_line(title, detail)}",
                attempts=attempt,
                status=response.status_code,
                detail=detail,
                url=url,
                retry_after=_retry_after(response),
                title=title,
            )
        try:
            return parse(response)
        except wire.WireError as exc:
            raise ChecksumError(f"{method} {url}: {exc}", attempts=attempt) from exc

    def _fail_over(self, failed: int) -> None:
        """Move to the next replica, unless a concurrent request already moved away from the failed one."""
        with self._lock:
            if self._current == failed:
                self._current = (failed + 1) % len(self.urls)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = random.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)))
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        return delay


def _checked(decode: Callable[[bytes], T], want: dict[str, Any]) -> Callable[[httpx.Response], T]:
    """Decode a framed body and check its header echoes the request: a misrouting proxy or cache would
    otherwise train on the wrong data silently. Header fields the client does not know are ignored."""

    def parse(response: httpx.Response) -> T:
        decoded = decode(response.content)
        _check_echo(decoded.header, want)  # type: ignore[attr-defined]
        return decoded

    return parse


def _checked_frames(want: dict[str, Any], steps: int, boundaries: bool
                    ) -> Callable[[httpx.Response], list[wire.WireBatch]]:
    """``_checked`` for a body of consecutive steps from ``want["step"]``: 1 to ``steps`` of them."""

    def parse(response: httpx.Response) -> list[wire.WireBatch]:
        batches = wire.decode_frames(response.content)
        if len(batches) > steps:
            raise wire.WireError(f"asked for {steps} step(s), the body holds {len(batches)}")
        for offset, batch in enumerate(batches):
            _check_echo(batch.header, want | {"step": want["step"] + offset})
            if boundaries and batch.boundaries is None:
                raise wire.WireError("asked for boundaries; this replica sent none (it predates the option)")
        return batches

    return parse


def _check_echo(header: dict[str, Any], want: dict[str, Any]) -> None:
    got = {k: header.get(k) for k in want}
    if got != want:
        raise wire.WireError(f"asked for {want}, the batch header says {got}")


def job_path(job: str, *parts: str | int) -> str:
    """``/v1/jobs/{job}/{part}/...`` with every segment percent-encoded: the one place job URLs are built."""
    return "/".join([f"/v1/jobs/{quote(job, safe='')}", *(quote(str(p), safe="") for p in parts)])


def _give_up(
    error: RequestError | HTTPStatusError | ChecksumError,
    method: str,
    path: str,
    attempts: int,
    tried: list[str],
) -> RequestError | HTTPStatusError | ChecksumError:
    """The last error, restated with the whole retry history (attempt count, every replica tried)."""
    message = f"{method} {path}: gave up after {attempts} attempt(s) on {', '.join(tried)}; last: {error}"
    if isinstance(error, RequestError):
        return RequestError(message, attempts=attempts, urls=tried)
    if isinstance(error, HTTPStatusError):
        return type(error)(
            message,
            attempts=attempts,
            status=error.status,
            detail=error.detail,
            url=error.url,
            retry_after=error.retry_after,
            title=error.title,
        )
    return ChecksumError(message, attempts=attempts)


def problem(response: httpx.Response) -> tuple[str, str]:
    """(title, detail) of an RFC 9457 problem+json body; else ("", the start of the body or the reason)."""
    try:
        body = response.json()
    except ValueError:
        return "", " ".join((response.text.strip() or response.reason_phrase).split())[:500]
    if isinstance(body, dict) and ("detail" in body or "title" in body):
        return str(body.get("title") or ""), str(body.get("detail") or body.get("title") or "")
    return "", str(body)[:500]


def problem_line(title: str, detail: str) -> str:
    """``title: detail`` on one line (just one of them when the other is empty or says the same)."""
    text = f"{title}: {detail}" if title and detail and title != detail else (detail or title)
    return " ".join(text.split())[:500]


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds; the header may be delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
