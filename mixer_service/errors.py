"""One exception hierarchy for the whole service.

Every error a user can cause is a ``MixerError`` with a message that names the bad field or file; the HTTP
layer maps each subclass to one status code (RFC 9457 problem+json) and the CLI prints it as one line.
"""


class MixerError(Exception):
    """Base of every error the service reports to a user."""


class InvalidInput(MixerError):
    """A request, config or schedule is malformed (HTTP 422)."""


class TooLarge(InvalidInput):
    """A request asks for more work than this server's configured limit (HTTP 413)."""


class NotFound(MixerError):
    """An unknown job, source or document (HTTP 404)."""


class Conflict(MixerError):
    """The request contradicts existing state, e.g. a source fingerprint mismatch (HTTP 409)."""


class StaleVersion(MixerError):
    """An If-Match precondition no longer holds (HTTP 412)."""


class CorruptData(MixerError):
    """A prepared source is truncated, corrupt or incomplete; the message names the file."""


class StoreUnavailable(MixerError):
    """The state store (e.g. Redis) cannot be reached (HTTP 503, retry later)."""


class SourceUnavailable(MixerError):
    """A source a job needs is missing, changed or corrupt on this server (HTTP 503, naming the source)."""


class StoreBehind(MixerError):
    """The state store holds less than this process has already seen: a job missing, a version or served
    high water lower, another incarnation, or a broken log chain (HTTP 503, naming the fault).

    Serving on would compute bytes under a log this process cannot prove current, so it refuses instead.
    """

    def __init__(self, fault: str, detail: str) -> None:
        super().__init__(detail)
        self.fault = fault
