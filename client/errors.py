"""One exception per failure kind, so a trainer can catch at the level it cares about (as in httpx).

MixerClientError
├── RequestError          no usable answer from any replica (refused, timed out, dropped), retries spent
├── HTTPStatusError       the service answered with an error status (problem+json ``detail`` kept)
│   ├── ClientRequestError    4xx: the request itself is wrong (token, job, step), so retrying cannot help
│   └── ServerError           5xx on every retry
├── ChecksumError         every answer failed verification (corrupt payload, or not the batch asked for)
├── JobReplaced           the job id now names another job (deleted and recreated): its steps are not yours
└── HistoryRewritten      a step came back computed under another schedule history than this run got

Every error carries ``attempts``: how many requests were sent before giving up, so callers and tests can
tell a fail-fast error (1) from one that survived the whole retry budget.
"""

from __future__ import annotations


class MixerClientError(Exception):
    """Base of everything the mixer client raises."""

    def __init__(self, message: str, *, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class RequestError(MixerClientError):
    """No replica produced an HTTP response: connection refused or reset, or timed out, on every attempt."""

    def __init__(self, message: str, *, attempts: int, urls: list[str]) -> None:
        super().__init__(message, attempts=attempts)
        self.urls = urls


class HTTPStatusError(MixerClientError):
    """The service answered with an error status; ``title`` and ``detail`` are the problem+json ones.

    ``retry_after`` is the server's Retry-After in seconds (503 while the state store is down, a source
    is unavailable or the store is behind), if any.
    """

    def __init__(self, message: str, *, attempts: int, status: int, detail: str, url: str,
                 retry_after: float | None = None, title: str = "") -> None:
        super().__init__(message, attempts=attempts)
        self.status, self.detail, self.url, self.retry_after = status, detail, url, retry_after
        self.title = title


class ClientRequestError(HTTPStatusError):
    """A 4xx: bad token (401/403), unknown job (404), invalid step/rank/world (422); never retried."""


class ServerError(HTTPStatusError):
    """A 5xx (every 503 is retried: store down or behind, source unavailable) that outlived every retry."""


class JobReplaced(MixerClientError):
    """Batches of one run came from two incarnations of the job id: it was deleted and recreated.

    Steps of the new job would silently continue the old run's data order, so the loader stops instead.
    """

    def __init__(self, message: str, *, expected: str, got: str) -> None:
        super().__init__(message, attempts=1)
        self.expected, self.got = expected, got


class HistoryRewritten(MixerClientError):
    """A step this run already received was served again under another schedule-log prefix.

    The service accepted a change that rewrites served steps (e.g. a state store restored from a backup);
    training on would mix two histories, so the loader stops instead.
    """

    def __init__(self, message: str, *, step: int, expected: str, got: str) -> None:
        super().__init__(message, attempts=1)
        self.step, self.expected, self.got = step, expected, got


class ChecksumError(MixerClientError):
    """Every batch received failed verification: malformed, checksum mismatch, or another step/rank/world."""
