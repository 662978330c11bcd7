"""One request/response exchange between a client connection and whatever serves it.

The downstream protocol (HTTP/1.1 now, HTTP/2 later) feeds the request body in and writes the
response out through its `Sink`; the serving side (an upstream connection, or a local response)
drives the response through the methods here. Neither side knows the other's wire protocol:
fields are (lower-case name, value) pairs (http.fields), bodies are byte chunks, trailers are
pairs, and flow control is per exchange (pausing one HTTP/2 stream never pauses its
connection).

States, and who moves them:

1. *received* — the downstream protocol parsed the head and built the exchange (`has_body`
   says whether a body follows; `body_complete` is already true if not).
2. *routed* — dispatch picked a router and runs its chain (`router`, `service` set); a
   middleware may answer locally (`respond`) or pass it on.
3. *sending* — an upstream pool attached itself (`upstream`, a typed `UpstreamHandle`) and
   `attach_body_target`: body chunks go straight to it; until then they are buffered up to
   `body_high_water`, then the downstream pauses this exchange's body
   (`Sink.pause_request_body`). The downstream ends the body with `on_request_end`, after
   setting `request_trailers` if any.
4. *responding* — the serving side called `start_response` (`response_started`), then
   `send_body`* and `end_response` (`finished`), with `response_trailers` set before it if
   any; 1xx interim responses may precede it (`Sink.write_interim`); a 101 instead hands both
   connections to a byte pipe (`Sink.switch_protocols`).
5. *done* — the chain's `finish` reached dispatch (`handled`), which records metrics and calls
   `Sink.exchange_done`. A failure on the way (`ProxyError`) becomes a local answer, or an
   `abort` once the response has started. `client_gone` and `request_error` record that the
   downstream side ended it (the client left, its body was malformed: RFC 9112 §7.1).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from meshproxy.http.fields import Fields, field_list, http_date
from meshproxy.http.grpc import is_grpc, local_answer_fields
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
        headers: Fields,
        content_length: int | None,
        no_body: bool,
    ) -> None: ...

    def write_body(self, ex: Exchange, chunk: bytes) -> None: ...

    def write_end(self, ex: Exchange) -> None:
        """The response is complete; `ex.response_trailers`, if any, follow the body."""

    def write_interim(self, ex: Exchange, status: int, headers: Fields) -> None: ...

    def switch_protocols(
        self,
        ex: Exchange,
        headers: list[tuple[bytes, bytes]],
        upstream: asyncio.Transport,
        upstream_leftover: bytes,
        upstream_writing_paused: bool | None,
    ) -> None:
        """The backend answered 101 to an upgrade: relay it and tunnel both connections."""

    def flush(self, ex: Exchange) -> None:
        """Write out what the sink holds back for `ex` (a head waiting for its first body
        bytes): the serving side has nothing more for now."""

    def exchange_done(self, ex: Exchange) -> None: ...

    def abort(self, ex: Exchange) -> None: ...

    def write_continue(self, ex: Exchange) -> None: ...

    def pause_request_body(self, ex: Exchange) -> None:
        """Stop reading `ex`'s request body from the client (its stream only)."""

    def resume_request_body(self, ex: Exchange) -> None: ...


class UpstreamHandle(Protocol):
    """What an exchange knows of the upstream connection or stream serving it."""

    def client_gone(self) -> None:
        """The client left: end the try (the pool drops a connection in an unknown state)."""

    def pause_reading(self) -> None:
        """The client reads slower than the backend sends: stop reading this response."""

    def resume_reading(self) -> None: ...


class BodyTarget(Protocol):
    def send_body(self, chunk: bytes) -> None: ...

    def end_body(self) -> None: ...


ResponseHook = Callable[["Exchange", int, list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]]


class ReplayBuffer:
    """A bounded copy of the request body, for trying the request again."""

    __slots__ = ("chunks", "limit", "overflow", "size")

    def __init__(self, limit: int) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.limit = limit  # < 0: unlimited
        self.overflow = False

    def add(self, chunk: bytes) -> None:
        if self.overflow:
            return
        self.size += len(chunk)
        if 0 <= self.limit < self.size:
            self.overflow = True
            self.chunks = []
            return
        self.chunks.append(chunk)


class Exchange:
    __slots__ = (
        "_body_buffer",
        "_body_buffered",
        "body_complete",
        "body_high_water",
        "body_target",
        "body_waiter",
        "client_gone",
        "continue_sent",
        "deadline",
        "entrypoint",
        "finished",
        "handled",
        "has_body",
        "protocol",
        "replay_body",
        "request",
        "request_bytes",
        "request_error",
        "request_target",
        "request_trailers",
        "response_bytes",
        "response_headers",
        "response_hooks",
        "response_started",
        "response_trailers",
        "retries",
        "router",
        "server_url",
        "service",
        "sink",
        "span",
        "started_at",
        "status",
        "swallow",
        "swallowed_status",
        "upstream",
        "why",
    )

    def __init__(
        self, sink: Sink, request: Request, entrypoint: str, started_at: float, has_body: bool
    ) -> None:
        self.sink = sink
        self.request = request
        self.request_target = request.target  # as received, before any rewrite (access log)
        self.entrypoint = entrypoint
        self.started_at = started_at
        self.has_body = has_body
        self.status = 0
        self.response_started = False
        self.finished = False
        self.handled = False  # the serving side is done with it (see Sink.exchange_done)
        self.client_gone = False
        self.continue_sent = False  # a 100 Continue went to the client
        # perf_counter time by which the exchange must be over (gRPC's grpc-timeout); 0: none
        self.deadline = 0.0
        self.request_error = 0  # the status that ended a request that could not be read
        self.body_complete = not has_body
        self.body_target: BodyTarget | None = None
        self._body_buffer: list[bytes] = []
        self._body_buffered = 0
        self.body_high_water = BODY_BUFFER_HIGH_WATER
        # Called when the body is complete, or has outgrown `body_high_water` (buffering).
        self.body_waiter: Callable[[], None] | None = None
        self.router = ""
        self.service = ""
        self.upstream: UpstreamHandle | None = None
        self.request_trailers: list[tuple[bytes, bytes]] | None = None
        self.response_trailers: list[tuple[bytes, bytes]] | None = None
        self.protocol = ""  # metrics label, computed once
        self.request_bytes = 0  # request body bytes received (traefik_*_requests_bytes_total)
        # The server span (observability.tracing.ServerSpan) while tracing samples it, or None:
        # typed loosely so this compiled module never imports the OpenTelemetry SDK.
        self.span: Any = None
        # Why the proxy itself failed or refused the exchange ("" if it did not): one of the
        # codes of observability.access_log.WHY_CODES, set where the failure is decided, for
        # the access log, the span and `meshproxy_exchange_failures_total`.
        self.why = ""
        self.retries = 0  # tries after the first (Traefik's RetryAttempts)
        self.server_url = ""  # the server the balancer picked last (Traefik's ServiceURL)
        # What went to the client: the response head's fields and body bytes (access log).
        self.response_headers: Fields | None = None
        self.response_bytes = 0
        # Set by middlewares: edit response headers on the way out (headers middleware) ...
        self.response_hooks: list[ResponseHook] | None = None
        # ... drop a response whose status makes it worth another try (retry on status) ...
        self.swallow: Callable[[int, int | None], bool] | None = None
        self.swallowed_status = 0
        # ... and keep a copy of the request body so it can be sent again (None: no copy).
        self.replay_body: ReplayBuffer | None = None

    # -- request body (fed by the downstream protocol) -----------------------------------

    def on_request_body(self, chunk: bytes) -> None:
        if self.replay_body is not None:
            self.replay_body.add(chunk)
        self.request_bytes += len(chunk)
        target = self.body_target
        if target is not None:
            target.send_body(chunk)
            return
        self._body_buffer.append(chunk)
        self._body_buffered += len(chunk)
        if self._body_buffered > self.body_high_water:
            self.sink.pause_request_body(self)
            if self.body_waiter is not None:
                self._wake_body_waiter()

    def on_request_end(self) -> None:
        self.body_complete = True
        if self.body_target is not None:
            self.body_target.end_body()
        elif self.body_waiter is not None:
            self._wake_body_waiter()

    def _wake_body_waiter(self) -> None:
        waiter, self.body_waiter = self.body_waiter, None
        if waiter is not None:
            waiter()

    @property
    def buffered_body_size(self) -> int:
        return sum(len(chunk) for chunk in self._body_buffer)

    def attach_body_target(self, target: BodyTarget) -> None:
        """Start streaming the request body to `target` (buffered bytes first)."""
        self.body_target = target
        if self._body_buffer:
            buffered, self._body_buffer = self._body_buffer, []
            paused = self._body_buffered > self.body_high_water
            self._body_buffered = 0
            for chunk in buffered:
                target.send_body(chunk)
            if paused:
                self.sink.resume_request_body(self)
        if self.body_complete and self.has_body:
            target.end_body()

    def detach_body_target(self) -> None:
        self.body_target = None

    def keep_body_for_replay(self, limit: int) -> None:
        """Start keeping a copy of the request body (up to `limit` bytes, < 0 unlimited) so a
        later `rewind_body` can send it again. Must come before any body byte is forwarded."""
        replay = ReplayBuffer(limit)
        if self.body_target is not None:
            replay.overflow = True  # part of the body already left: it can't be replayed
        for chunk in self._body_buffer:
            replay.add(chunk)
        self.replay_body = replay

    def rewind_body(self) -> bool:
        """Make the whole request body available again for another try; False if it can't be
        (not kept, larger than the replay limit, or not fully received yet)."""
        replay = self.replay_body
        if not self.has_body:
            return True
        if replay is None or replay.overflow or not self.body_complete:
            return False
        self.body_target = None
        self._body_buffer = list(replay.chunks)
        self._body_buffered = 0  # already counted once: never pause the client for a replay
        return True

    @property
    def body_untouched(self) -> bool:
        """No request body byte has left the proxy (a retry can still send the whole request)."""
        return self.body_target is None

    # -- response (driven by the serving side) --------------------------------------------

    def start_response(
        self,
        status: int,
        headers: Fields,
        content_length: int | None,
        no_body: bool,
    ) -> None:
        """The response head (end-to-end fields only; the reason phrase follows the code,
        as in Go's server)."""
        swallow = self.swallow
        if swallow is not None and swallow(status, content_length):
            self.swallowed_status = status  # this try's response goes nowhere
            return
        self._write_head(status, headers, content_length, no_body)

    def _write_head(
        self, status: int, headers: Fields, content_length: int | None, no_body: bool
    ) -> None:
        if self.response_hooks:
            headers = field_list(headers)
            for hook in self.response_hooks:
                headers = hook(self, status, headers)
        self.status = status
        self.response_started = True
        self.response_headers = headers
        self.sink.write_head(self, status, headers, content_length, no_body)

    def send_body(self, chunk: bytes) -> None:
        if not self.swallowed_status:
            self.response_bytes += len(chunk)
            self.sink.write_body(self, chunk)

    def end_response(self) -> None:
        if self.swallowed_status:
            return
        self.finished = True
        self.sink.write_end(self)

    def respond(
        self,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """A complete local response (errors, 404, ...). To a gRPC call it is a Trailers-Only
        response instead (`_respond_grpc`)."""
        if is_grpc(self.request):
            self._respond_grpc(status, body, headers)
            return
        hdrs = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"x-content-type-options", b"nosniff"),
            (b"date", http_date()),
        ]
        if headers:
            hdrs.extend(headers)
        hdrs.append((b"content-length", str(len(body)).encode()))
        self.start_response(status, hdrs, len(body), self.request.method == "HEAD")
        if body and self.request.method != "HEAD":
            self.send_body(body)
        self.end_response()

    def _respond_grpc(
        self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None
    ) -> None:
        """The local answer `status` to a gRPC call, as gRPC clients understand it: a
        Trailers-Only response (gRPC PROTOCOL-HTTP2.md): `:status 200`, content-type
        application/grpc, `grpc-status` mapped from `status` (http.grpc.grpc_status_for) and
        `grpc-message` (the answer's text), no body: on HTTP/2 one HEADERS frame that ends the
        stream (`no_body`), on HTTP/1.1 the same fields as a head with `content-length: 0`.
        Without it a gRPC client reads a 502 page as "Received http2 header with status: 502"
        and guesses the code. `ex.status` keeps the HTTP status the answer stands for, so
        metrics, access logs and the circuit breaker count it as for any other client, and a
        retry on status still sees it (`swallow`, given the HTTP status)."""
        swallow = self.swallow
        if swallow is not None and swallow(status, 0):
            self.swallowed_status = status
            return
        message = body.decode("utf-8", "replace").strip() or reason_phrase(status).decode()
        http1 = not self.request.http_version.startswith("2")
        fields = local_answer_fields(status, message, http1)
        if headers:
            fields.extend(headers)  # retry-after of a 429 and the like: harmless, informative
        self._write_head(200, fields, 0, True)
        self.finished = True
        self.sink.write_end(self)
        self.status = status

    def abort(self) -> None:
        """The response cannot be completed: cut the client connection."""
        self.sink.abort(self)


class NullSink:
    """A sink that discards the response: used for mirrored requests."""

    def write_head(
        self,
        ex: Exchange,
        status: int,
        headers: Fields,
        content_length: int | None,
        no_body: bool,
    ) -> None:
        pass

    def write_body(self, ex: Exchange, chunk: bytes) -> None:
        pass

    def write_end(self, ex: Exchange) -> None:
        pass

    def write_interim(self, ex: Exchange, status: int, headers: Fields) -> None:
        pass

    def switch_protocols(
        self,
        ex: Exchange,
        headers: list[tuple[bytes, bytes]],
        upstream: asyncio.Transport,
        upstream_leftover: bytes,
        upstream_writing_paused: bool | None,
    ) -> None:
        ex.finished = True
        upstream.close()  # nobody to tunnel to

    def flush(self, ex: Exchange) -> None:
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

    def pause_request_body(self, ex: Exchange) -> None:
        pass

    def resume_request_body(self, ex: Exchange) -> None:
        pass


Finish = Callable[[Exchange, BaseException | None], None]
"""Called exactly once when a handler is done with an exchange: with None, or with the error
that ended it (a ProxyError carries the status Traefik would answer)."""

Handler = Callable[[Exchange, Finish], None]
"""Services and middlewares: `handler(ex, finish)` starts serving `ex` and returns at once;
the work continues in callbacks (continuation-passing, as Envoy's filter chains do), so a
request costs no Task or Future unless a handler must really wait (a dial, a backoff)."""
