"""One exception hierarchy for both sides of the wire, and its problem+json table.

Every error a user can cause is a ``MixerError`` with a message that names the bad field or file; the HTTP
layer answers each subclass with the status, title and ``fault`` below (RFC 9457 problem+json) and the CLI
prints it as one line.
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


# Most specific first: the first class an error is an instance of decides its status and title.
STATUS: list[tuple[type[MixerError], int, str]] = [
    (TooLarge, 413, "Content too large"),
    (InvalidInput, 422, "Invalid input"),
    (NotFound, 404, "Not found"),
    (Conflict, 409, "Conflict"),
    (StaleVersion, 412, "Precondition failed"),
    (StoreUnavailable, 503, "State store unavailable"),
    (StoreBehind, 503, "State store is behind this replica"),
    (SourceUnavailable, 503, "Source unavailable"),
    (CorruptData, 503, "Corrupt data"),
]

# The extension member ``fault`` names why a 503 was answered, for clients, logs and the metric.
FAULTS: list[tuple[type[MixerError], str]] = [
    (SourceUnavailable, "source_unavailable"),
    (StoreUnavailable, "store_unavailable"),
    (CorruptData, "corrupt_data"),
]

# Titles of every status the API answers, its own refusals (auth, limits, If-Match) included.
TITLES = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found",
          405: "Method not allowed",
          409: "Conflict", 412: "Precondition failed", 413: "Content too large", 422: "Invalid input",
          428: "Precondition required", 500: "Internal error", 503: "Service unavailable"}


def status_of(exc: MixerError) -> tuple[int, str]:
    """(HTTP status, problem title) of an error; 500 for a ``MixerError`` the table does not name."""
    return next(((status, title) for cls, status, title in STATUS if isinstance(exc, cls)),
                (500, "Internal error"))


def fault_of(exc: MixerError) -> str | None:
    """The ``fault`` member of a 503 answer, None for every other error."""
    if isinstance(exc, StoreBehind):
        return exc.fault
    return next((name for cls, name in FAULTS if isinstance(exc, cls)), None)
