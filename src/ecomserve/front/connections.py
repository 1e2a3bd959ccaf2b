"""uvicorn's HTTP protocol with the bounds a public port needs.

uvicorn closes idle keep-alive connections only after a first response, caps concurrency only once
a request's headers arrive, and sets no deadline on headers. 20,100 connections that never sent a
byte exhausted Triton's file descriptors; here a connection past `max_connections` is closed at
once (counted per listening port), and one that sends no complete request head within the idle
timeout is closed too."""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_closed_over_limit = 0


def closed_over_limit() -> int:
    """Connections closed because `max_connections` were open (for the front's metrics)."""
    return _closed_over_limit


class BoundedHttpProtocol(HttpToolsProtocol):
    max_connections = 1024
    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        global _closed_over_limit
        super().connection_made(transport)
        # Counted per port: a flood on the metrics port must not lock clients out of the HTTP port.
        if sum(1 for other in self.connections if other.server == self.server) > self.max_connections:
            _closed_over_limit += 1
            transport.abort()
            return
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # A new request on a kept-alive connection: its head must arrive in time too.
        self._cancel_head_deadline()
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def on_headers_complete(self) -> None:
        self._cancel_head_deadline()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _cancel_head_deadline(self) -> None:
        deadline = getattr(self, "_head_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def bounded_protocol(max_connections: int, header_timeout_s: float) -> type[BoundedHttpProtocol]:
    return type(
        "BoundedHttp",
        (BoundedHttpProtocol,),
        {"max_connections": max_connections, "header_timeout_s": header_timeout_s},
    )
