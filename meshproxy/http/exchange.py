"""One request/response exchange between a client connection and whatever serves it.

The downstream protocol (HTTP/1.1 now, HTTP/2 later) feeds the request body in and writes the
response out; the serving side (an upstream connection, or a local response) drives the
response through the methods here. Neither side knows the other's wire protocol.
"""

from __future__ import annotations

from typing import Any, Protocol

from meshproxy.http.request import Request
from meshproxy.http.status import reason_phrase

# Request body bytes held while no upstream is attached, before the client is paused.
BODY_BUFFER_HIGH_WATER = 256 * 1024


class Sink(Protocol):
    """What the downstream connection offers to write a response and steer the client.

    `write_head` takes end-to-end headers only: whoever builds the response (the upstream
    parser, a local answer) has already left out hop-by-hop ones."""

    def write_head(
        self,
        ex: Exchange,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        content_length: int | None,
        no_body: bool,
    ) -> None: ...

    def write_body(self, ex: Exchange, chunk: bytes) -> None: ...

    def write_end(self, ex: Exchange) -> None: ...

    def flush(self) -> None: ...

    def exchange_done(self, ex: Exchange) -> None: ...

    def abort(self, ex: Exchange) -> None: ...

    def write_continue(self, ex: Exchange) -> None: ...

    def pause_client(self) -> None: ...

    def resume_client(self) -> None: ...


class BodyTarget(Protocol):
    def send_body(self, chunk: bytes) -> None: ...

    def end_body(self) -> None: ...


class Exchange:
    __slots__ = (
        "_body_buffer",
        "_body_buffered",
        "body_complete",
        "body_target",
        "client_gone",
        "entrypoint",
        "finished",
        "handled",
        "has_body",
        "protocol",
        "request",
        "response_started",
        "router",
        "service",
        "sink",
        "started_at",
        "status",
        "upstream",
    )

    def __init__(
        self, sink: Sink, request: Request, entrypoint: str, started_at: float, has_body: bool
    ) -> None:
        self.sink = sink
        self.request = request
        self.entrypoint = entrypoint
        self.started_at = started_at
        self.has_body = has_body
        self.status = 0
        self.response_started = False
        self.finished = False
        self.handled = False  # the serving side is done with it (see Sink.exchange_done)
        self.client_gone = False
        self.body_complete = not has_body
        self.body_target: BodyTarget | None = None
        self._body_buffer: list[bytes] = []
        self._body_buffered = 0
        self.router = ""
        self.service = ""
        self.upstream: Any = None
        self.protocol = ""  # metrics label, computed once

    # -- request body (fed by the downstream protocol) -----------------------------------

    def on_request_body(self, chunk: bytes) -> None:
        target = self.body_target
        if target is not None:
            target.send_body(chunk)
            return
        self._body_buffer.append(chunk)
        self._body_buffered += len(chunk)
        if self._body_buffered > BODY_BUFFER_HIGH_WATER:
            self.sink.pause_client()

    def on_request_end(self) -> None:
        self.body_complete = True
        if self.body_target is not None:
            self.body_target.end_body()

    def attach_body_target(self, target: BodyTarget) -> None:
        """Start streaming the request body to `target` (buffered bytes first)."""
        self.body_target = target
        if self._body_buffer:
            buffered, self._body_buffer = self._body_buffer, []
            paused = self._body_buffered > BODY_BUFFER_HIGH_WATER
            self._body_buffered = 0
            for chunk in buffered:
                target.send_body(chunk)
            if paused:
                self.sink.resume_client()
        if self.body_complete and self.has_body:
            target.end_body()

    def detach_body_target(self) -> None:
        self.body_target = None

    @property
    def body_untouched(self) -> bool:
        """No request body byte has left the proxy (a retry can still send the whole request)."""
        return self.body_target is None

    # -- response (driven by the serving side) --------------------------------------------

    def start_response(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        content_length: int | None,
        no_body: bool,
    ) -> None:
        self.status = status
        self.response_started = True
        self.sink.write_head(self, status, reason, headers, content_length, no_body)

    def send_body(self, chunk: bytes) -> None:
        self.sink.write_body(self, chunk)

    def end_response(self) -> None:
        self.finished = True
        self.sink.write_end(self)

    def respond(
        self,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        reason: bytes | None = None,
    ) -> None:
        """A complete local response (errors, 404, ...)."""
        hdrs = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"x-content-type-options", b"nosniff"),
        ]
        if headers:
            hdrs.extend(headers)
        hdrs.append((b"content-length", str(len(body)).encode()))
        self.start_response(
            status, reason or reason_phrase(status), hdrs, len(body), self.request.method == "HEAD"
        )
        if body and self.request.method != "HEAD":
            self.send_body(body)
        self.end_response()

    def abort(self) -> None:
        """The response cannot be completed: cut the client connection."""
        self.sink.abort(self)


class NullSink:
    """A sink that discards the response: used for mirrored requests."""

    def write_head(
        self,
        ex: Exchange,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        content_length: int | None,
        no_body: bool,
    ) -> None:
        pass

    def write_body(self, ex: Exchange, chunk: bytes) -> None:
        pass

    def write_end(self, ex: Exchange) -> None:
        pass

    def flush(self) -> None:
        pass

    def exchange_done(self, ex: Exchange) -> None:
        pass

    def abort(self, ex: Exchange) -> None:
        ex.finished = True
        upstream = ex.upstream
        if upstream is not None:
            upstream.client_gone()

    def write_continue(self, ex: Exchange) -> None:
        pass

    def pause_client(self) -> None:
        pass

    def resume_client(self) -> None:
        pass
