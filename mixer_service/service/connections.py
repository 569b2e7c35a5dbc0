"""uvicorn's HTTP protocol with our own cap on open connections, below uvicorn's.

Past uvicorn's ``limit_concurrency`` every request is answered a bare text/plain 503, without ``fault``
or Retry-After, and idle keep-alive connections count towards it: 1,100 idle sockets locked a replica
out for as long as they stayed open. Here, a connection over ``--max-connections`` closes the connection
idle the longest (as its keep-alive timeout would have), so uvicorn's own cap, set well above ours, is not
reached, and requests are bounded by ``--max-in-flight``, which answers problem+json.
"""

from __future__ import annotations

import asyncio
import time

from uvicorn.protocols.http.auto import AutoHTTPProtocol


class CappedConnections(AutoHTTPProtocol):  # type: ignore[valid-type, misc]
    """uvicorn's own protocol (httptools, else h11); ``max_connections`` is set by each worker's app
    factory before it accepts a connection."""

    max_connections = 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.idle_since = time.monotonic()
        if len(self.connections) > self.max_connections:
            idle = [c for c in self.connections if c is not self and c.is_idle()]
            if idle:  # none: every connection has a request in flight, and --max-in-flight refuses them
                min(idle, key=lambda c: c.idle_since).timeout_keep_alive_handler()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.idle_since = time.monotonic()

    def is_idle(self) -> bool:
        """No request in progress or queued (a new connection counts as idle until its request arrives)."""
        cycle = self.cycle
        return ((cycle is None or cycle.response_complete) and not getattr(self, "pipeline", ())
                and not self.transport.is_closing())
