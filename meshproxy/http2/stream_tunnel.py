"""WebSocket over HTTP/2 (RFC 8441): an extended CONNECT stream bridged to an HTTP/1.1
WebSocket backend through the byte pipe (meshproxy.l4.pipe).

The client's `CONNECT` with `:protocol websocket` becomes an ordinary exchange whose request is
what the HTTP/1.1 upstream pool sends as a WebSocket handshake (`websocket_request`: GET,
`Upgrade: websocket`, a fresh `Sec-WebSocket-Key`, the client's sec-websocket-version,
-protocol and -extensions; routers see its `:path`). When the backend answers 101 (checked by
the pool, Sec-WebSocket-Accept included), `open_stream_tunnel` answers `:status 200` on the
stream (RFC 8441 §5: no Sec-WebSocket-Accept on HTTP/2) and hands the stream, through
`StreamTransport`, and the backend socket to the entrypoint's byte pipe: the WebSocket frames
travel as DATA, untouched. Any other answer from the backend is relayed on the stream as a
normal response; the connection serves its other streams either way.

`StreamTransport` is the small adapter that makes one HTTP/2 stream look like an asyncio
transport to the pipe, flow control honoured both ways:
- writing: DATA goes out as far as the stream's and connection's windows allow; the rest is
  queued on the stream, and past `WRITE_HIGH_WATER` bytes the pipe is told `pause_writing`
  (so it stops reading the backend) until a WINDOW_UPDATE drains it below `WRITE_LOW_WATER`;
  the client connection's own transport pausing pauses it too;
- reading: the client's DATA is acknowledged (WINDOW_UPDATE) only as the pipe takes it; while
  the pipe pauses reading, what arrives is held unacknowledged, so the client's window bounds
  it (the stream's initial window);
- `write_eof` is END_STREAM (a half-close, as TCP's FIN); `close` ends the stream once what is
  queued is sent (RST_STREAM(CANCEL) if the client still sends); `abort` resets at once. The
  pipe's `connection_lost` comes when the stream is closed both ways or reset.
"""

from __future__ import annotations

import asyncio
import base64
import os
from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes
from h2.exceptions import StreamClosedError

from meshproxy.http.exchange import Exchange
from meshproxy.l4.pipe import PipeEnd

if TYPE_CHECKING:
    from meshproxy.http.request import Request
    from meshproxy.http2.server import H2Stream

WRITE_HIGH_WATER = 64 * 1024
WRITE_LOW_WATER = 16 * 1024
# What a 101 carries that HTTP/2 does not (RFC 9113 §8.2.2; RFC 8441 §5: no
# Sec-WebSocket-Accept).
_NOT_RELAYED = frozenset({b"connection", b"upgrade", b"sec-websocket-accept", b"keep-alive"})


def websocket_request(request: Request) -> None:
    """Turn the request of an extended CONNECT (RFC 8441 §4, method already GET) into the
    HTTP/1.1 WebSocket handshake the upstream pool sends (RFC 6455 §4.1): `Upgrade:
    websocket` and a key of our own (the client sent none: RFC 8441 §5)."""
    request.upgrade = b"websocket"
    key = base64.b64encode(os.urandom(16))
    request.headers = [(n, v) for n, v in request.headers if n != b"sec-websocket-key"]
    request.headers.append((b"sec-websocket-key", key))
    if not any(n == b"sec-websocket-version" for n, _ in request.headers):
        request.headers.append((b"sec-websocket-version", b"13"))


def open_stream_tunnel(
    stream: H2Stream,
    ex: Exchange,
    headers: list[tuple[bytes, bytes]],
    upstream: asyncio.Transport,
    upstream_leftover: bytes,
    upstream_writing_paused: bool | None,
) -> None:
    """The backend switched to WebSocket: answer 200 on the stream and pipe the stream and
    the backend socket together (see the module docstring)."""
    conn = stream.conn
    ex.status = 200  # what the client got (the backend's 101 is an HTTP/1.1 matter)
    ex.response_started = True
    ex.finished = True
    if stream.response_done or conn.closed:
        upstream.close()  # the client left while the backend answered
        return
    fields = [(b":status", b"200")]
    fields += [(n, v) for n, v in headers if n not in _NOT_RELAYED]
    try:
        conn.h2.send_headers(stream.stream_id, fields)
    except StreamClosedError:  # the client's RST_STREAM is being handled
        stream.closed_under_us()
        upstream.close()
        return
    conn.flush()
    adapter = StreamTransport(stream)
    stream.tunnel = adapter
    leftover = b"".join(stream.early)  # client DATA that came before the answer
    stream.early = []
    unacked, stream.unacked = stream.unacked, 0
    entry = conn.entry
    entry.on_open(1)  # the tunnel counts as a connection until the pipe closes (it counts down)
    entry.open_tunnel(
        PipeEnd(adapter, leftover=leftover, eof=adapter.remote_ended),  # type: ignore[arg-type]
        PipeEnd(upstream, leftover=upstream_leftover, writing_paused=upstream_writing_paused),
        websocket=True,
    )
    if unacked:
        conn.acknowledge(stream, unacked)
        conn.flush()


class StreamTransport:
    """One HTTP/2 stream as the asyncio transport the byte pipe expects (see the module
    docstring for the flow-control rules)."""

    def __init__(self, stream: H2Stream) -> None:
        self.stream = stream
        self.protocol: Any = None
        self.reading = True
        self.inbox: list[bytes] = []  # client DATA held while the pipe pauses reading
        self.inbox_size = 0  # flow-controlled bytes in `inbox`, acknowledged on delivery
        self.remote_ended = stream.request_done  # END_STREAM from the client
        self.eof_delivered = False
        self.local_ended = False  # END_STREAM sent
        self.eof_pending = False  # write_eof waiting for queued bytes
        self.closing = False
        self.lost = False
        self.writing_paused = False  # what the pipe was last told

    # -- asyncio.Transport, as the pipe uses it ------------------------------------------

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        transport = self.stream.conn.transport
        return transport.get_extra_info(name, default) if transport is not None else default

    def is_closing(self) -> bool:
        return self.closing or self.lost

    def write(self, data: bytes) -> None:
        stream = self.stream
        if self.closing or self.local_ended or self.lost or stream.response_done or not data:
            return
        stream.progress += 1
        conn = stream.conn
        if stream.pending:
            stream.pending.append(data)
            stream.pending_size += len(data)
            self._check_writing()
            return
        try:
            sent = conn.send_data(stream, data)
        except StreamClosedError:
            stream.closed_under_us()  # its reset, being handled, ends the pipe's side
            return
        else:
            if sent < len(data):
                rest = data[sent:] if sent else data
                stream.pending.append(rest)
                stream.pending_size += len(rest)
        conn.flush()
        self._check_writing()

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """END_STREAM, after what is queued: the client reads EOF, and may still send."""
        if self.local_ended or self.lost:
            return
        if self.stream.pending:
            self.eof_pending = True
            return
        self._end_stream()

    def get_write_buffer_size(self) -> int:
        return self.stream.pending_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (WRITE_LOW_WATER, WRITE_HIGH_WATER)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        if self.reading or self.lost:
            return
        self.reading = True
        inbox, self.inbox = self.inbox, []
        size, self.inbox_size = self.inbox_size, 0
        stream = self.stream
        if size:
            stream.conn.acknowledge(stream, size)
            stream.conn.flush()
        for data in inbox:
            if self.lost or not self.reading:
                break
            self.protocol.data_received(data)
        if self.remote_ended and not self.eof_delivered and self.reading and not self.lost:
            self.eof_delivered = True
            self.protocol.eof_received()

    def close(self) -> None:
        """End the stream once what is queued is sent; a client still sending is reset."""
        if self.closing or self.lost:
            return
        self.closing = True
        if self.stream.pending:
            self.eof_pending = True  # drained() ends it
            return
        self._end_stream()
        self._close_if_done(force=True)

    def abort(self) -> None:
        if self.lost:
            return
        self.closing = True
        stream = self.stream
        stream.conn.reset(stream, ErrorCodes.CANCEL)
        self._lost(None)

    # -- events from the HTTP/2 connection ------------------------------------------------

    def data_from_client(self, data: bytes, size: int) -> None:
        if self.lost or self.remote_ended:
            return
        stream = self.stream
        if not self.reading or self.protocol is None:
            self.inbox.append(data)
            self.inbox_size += size
            return
        if size:
            stream.conn.acknowledge(stream, size)
        if data:
            self.protocol.data_received(data)

    def eof_from_client(self) -> None:
        self.remote_ended = True
        stream = self.stream
        stream.request_done = True
        if self.reading and not self.eof_delivered and not self.lost:
            self.eof_delivered = True
            self.protocol.eof_received()
        self._close_if_done()

    def stream_closed(self) -> None:
        """The client reset the stream, or its connection is gone."""
        self._lost(ConnectionResetError("HTTP/2 stream reset"))

    def drained(self) -> None:
        """The stream's queue shrank (a WINDOW_UPDATE)."""
        if not self.stream.pending and self.eof_pending:
            self.eof_pending = False
            self._end_stream()
            if self.closing:
                self._close_if_done(force=True)
        self._check_writing()

    def transport_paused(self, paused: bool) -> None:
        self._check_writing()

    # -- internals ------------------------------------------------------------------------

    def _end_stream(self) -> None:
        stream = self.stream
        if self.local_ended or stream.response_done:
            return
        self.local_ended = True
        try:
            stream.conn.h2.end_stream(stream.stream_id)
        except StreamClosedError:
            stream.closed_under_us()
            return
        stream.conn.flush()
        self._close_if_done()

    def _close_if_done(self, force: bool = False) -> None:
        """Closed both ways (or closing and the client still sending): the pipe's side is
        lost."""
        if self.lost:
            return
        if self.local_ended and self.remote_ended:
            stream = self.stream
            stream.response_done = True
            self._lost(None)
        elif force and self.local_ended:
            stream = self.stream
            stream.conn.reset(stream, ErrorCodes.CANCEL)
            self._lost(None)

    def _lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        stream = self.stream
        conn = stream.conn
        stream.tunnel = None
        stream.ex = None  # handled long ago; no exchange/stream cycle left behind
        stream.response_done = True
        stream.pending = []
        stream.pending_size = 0
        conn.streams.pop(stream.stream_id, None)
        conn.tunnel_closed()
        protocol = self.protocol
        if protocol is not None:
            # As asyncio delivers it: on the next loop iteration, never inside a write.
            asyncio.get_event_loop().call_soon(protocol.connection_lost, exc)

    def _check_writing(self) -> None:
        stream = self.stream
        size = stream.pending_size
        paused = stream.conn.write_paused or size > WRITE_HIGH_WATER
        if self.writing_paused and not paused and size <= WRITE_LOW_WATER:
            self.writing_paused = False
            if self.protocol is not None and not self.lost:
                self.protocol.resume_writing()
        elif paused and not self.writing_paused:
            self.writing_paused = True
            if self.protocol is not None and not self.lost:
                self.protocol.pause_writing()
