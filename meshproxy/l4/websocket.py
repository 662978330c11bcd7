"""A WebSocket tunnel: the byte pipe, plus enough knowledge of RFC 6455 framing to say goodbye.

After the handshake a WebSocket is relayed byte for byte by the pipe (meshproxy.l4.pipe); the
proxy never decodes messages. It only follows frame boundaries in each direction, so that on a
graceful shutdown it can write a Close frame with code 1001 "going away" (RFC 6455 §7.4.1) to
both sides at a point where a frame may start, instead of cutting TCP under a message.

Frame boundaries are tracked by hand (`FrameBoundary`: header lengths, RFC 6455 §5.2): wsproto
would parse every frame and unmask every payload byte, a copy per byte for what needs a few
integer operations per frame. The Close frames the proxy writes come from wsproto, in the role
the proxy plays on each side (server towards the client: unmasked; client towards the backend:
masked, RFC 6455 §5.3).
"""

from __future__ import annotations

from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection

from meshproxy.l4.pipe import DOWNSTREAM, END_IDLE, UPSTREAM, BytePipe

GOING_AWAY = 1001  # RFC 6455 §7.4.1
_CLOSE_OPCODE = 0x8


def close_frame(to_client: bool, reason: str = "proxy shutting down") -> bytes:
    """A Close frame with code 1001, as the server (to the client) or the client (to the
    backend) writes it."""
    role = ConnectionType.SERVER if to_client else ConnectionType.CLIENT
    return Connection(role).send(CloseConnection(code=GOING_AWAY, reason=reason))


def header_size(header: bytes) -> int:
    """The length of the frame header that starts `header` (RFC 6455 §5.2), or 0 if fewer
    than its first two bytes are there."""
    if len(header) < 2:
        return 0
    second = header[1]
    length = second & 0x7F
    extended = 2 if length == 126 else 8 if length == 127 else 0
    return 2 + extended + (4 if second & 0x80 else 0)


class FrameBoundary:
    """Follows one direction of a WebSocket: whether the next byte starts a frame, and whether
    a Close frame went by. Bytes in, no copies of payloads."""

    __slots__ = ("close_seen", "header", "remaining")

    def __init__(self) -> None:
        self.header = b""  # the part of a frame header read so far
        self.remaining = 0  # payload bytes of the current frame still to come
        self.close_seen = False

    @property
    def at_boundary(self) -> bool:
        return not self.header and not self.remaining

    def feed(self, data: bytes) -> None:
        i = 0
        n = len(data)
        while i < n:
            if self.remaining:
                take = min(self.remaining, n - i)
                self.remaining -= take
                i += take
                continue
            have = len(self.header)
            header = self.header + data[i : i + 14 - have]  # a header is at most 14 bytes
            size = header_size(header)
            if size == 0 or len(header) < size:
                self.header = header
                i += len(header) - have
                continue
            i += size - have
            self.header = b""
            length = header[1] & 0x7F
            if length == 126:
                length = int.from_bytes(header[2:4], "big")
            elif length == 127:
                length = int.from_bytes(header[2:10], "big")
            self.remaining = length
            if header[0] & 0x0F == _CLOSE_OPCODE:
                self.close_seen = True


class WebSocketTunnel(BytePipe):
    """A byte pipe carrying a WebSocket: `going_away()` ends it with Close frames."""

    __slots__ = ("_frames", "_going_away")

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # What each side sent: DOWNSTREAM's frames go to the backend, UPSTREAM's to the client.
        self._frames = (FrameBoundary(), FrameBoundary())
        self._going_away = False

    def _on_data(self, index: int, data: bytes) -> None:
        if self._going_away:
            return  # after the proxy's Close frames nothing more may follow them
        self._frames[index].feed(data)
        super()._on_data(index, data)

    def going_away(self, reason: str = "proxy shutting down") -> None:
        """Graceful shutdown: a Close frame with 1001 to each side whose stream is at a frame
        boundary and not already closing, then the pipe ends (both connections closed after
        what they buffered is sent). A side in the middle of a frame is just closed."""
        if self.ended:
            return
        self._say_goodbye(reason)
        self.close()

    def _say_goodbye(self, reason: str) -> None:
        self._going_away = True
        client, backend = self._transports
        to_client, to_backend = self._frames[UPSTREAM], self._frames[DOWNSTREAM]
        if to_client.at_boundary and not to_client.close_seen and not client.is_closing():
            client.write(close_frame(to_client=True, reason=reason))
        if to_backend.at_boundary and not to_backend.close_seen and not backend.is_closing():
            backend.write(close_frame(to_client=False, reason=reason))

    def _end(self, reason: str) -> None:
        # The idle timeout ends a WebSocket as a shutdown does: with Close 1001 both ways.
        if reason == END_IDLE and not self.ended and not self._going_away:
            self._say_goodbye("idle timeout")
        super()._end(reason)


__all__ = ["DOWNSTREAM", "UPSTREAM", "FrameBoundary", "WebSocketTunnel", "close_frame"]
