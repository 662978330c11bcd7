"""The byte pipe: relays bytes between two connected transports until both are done.

One pipe carries every connection whose bytes the proxy does not interpret: a TCP route
(`meshproxy.tcp.proxy`), and the same code is meant for TLS passthrough, a WebSocket or another
upgrade after an HTTP/1.1 `101 Switching Protocols` (RFC 9110 §7.8, §15.2.2) and CONNECT
tunnels (RFC 9110 §9.3.6).

Hand-over: the caller gives two *open* transports (their `connection_lost` not yet delivered),
each as a `PipeEnd` with the bytes it already read from that side and did not forward
(`leftover`, replayed first, in order), whether that side already sent EOF (its protocol must
then have returned True from `eof_received`, so the transport is still open for writing), and,
if known, whether that transport's writing is paused. `BytePipe.start()` installs the pipe's
own protocol on both transports (`transport.set_protocol`); from then on the pipe owns them and
the caller must not touch them. Example, after a backend's 101 on an HTTP/1.1 connection::

    pipe = BytePipe(
        PipeEnd(client_transport, leftover=bytes_after_the_request_head),
        PipeEnd(backend_transport, leftover=bytes_after_the_101_head),
        PipeSettings(idle_timeout=...),
        on_closed=lambda stats: metrics.connection_delta(entrypoint, "TCP", -1),
    )
    pipe.start()

Behaviour, and the rule each point follows:

- Flow control both ways, asyncio's contract: when one side's write buffer goes over its
  high-water mark the transport calls `pause_writing`, and the pipe stops reading the other
  side until `resume_writing`. Per direction the pipe holds at most one high-water mark plus
  one read, however long the stream.
- Half-close: EOF read from one side becomes `write_eof()` (a FIN, RFC 9293 §3.6) on the other,
  and the other direction keeps flowing, as Traefik's TCP proxy does (pkg/tcp/proxy.go copies
  each direction, then `CloseWrite`s its destination). TLS half-closes too (RFC 8446 §6.1: a
  close_notify closes the sender's write side only; Go's tls.Conn.CloseWrite is what Traefik
  calls), but asyncio's SSL transports cannot (`can_write_eof()` is False). Then the two
  directions differ: the client's EOF is not passed on to a TLS server and the server->client
  direction still flows, so a client that half-closes after its request over a route to a
  `tls: true` server gets the answer (ending the pipe at that EOF, as before, lost it; the
  pipe ends when the server ends too, on terminationDelay if set, or on the idle timeout);
  the server's EOF toward a TLS client ends the pipe, since it often delimits the answer
  (a close-delimited body) and the client learns it only from the close.
- The pipe ends when both sides have sent EOF, when either connection is lost (peer reset,
  write error, closed elsewhere), on the idle timeout, or on `close()`/`abort()` by its owner.
  Ending closes both transports with `close()`, so bytes already buffered are still delivered;
  a transport whose buffered bytes make no progress for `drain_timeout` seconds after that is
  aborted, so a peer that stops reading cannot hold a socket forever.
- `on_closed(stats)` runs exactly once, after *both* transports reported `connection_lost`,
  which is when both sockets are closed: a gauge counted down there agrees with the process's
  file descriptors. `wait_closed()` gives the same `PipeStats` to a coroutine.
- Idle timeout: no byte read from either side for `idle_timeout` seconds ends the pipe (0: no
  timeout). Traefik sets no deadline on a routed TCP connection (pkg/server/router/tcp/router.go
  clears the entrypoint's deadline before handing it over), but a mesh proxy that keeps dead
  idle connections forever leaks them; the default is Envoy's tcp_proxy `idle_timeout`, 1 hour.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("meshproxy.pipe")

DOWNSTREAM = 0
UPSTREAM = 1

# Why a pipe ended (PipeStats.reason).
END_EOF = "eof"  # both sides sent EOF
END_CLOSED = "closed"  # a connection was closed without an EOF read first
END_RESET = "reset"  # a connection was lost with an error (reset, write error)
END_IDLE = "idle timeout"
END_OWNER = "closed by owner"
END_ABORTED = "aborted by owner"
END_TERMINATION = "termination delay"  # the other direction outlived terminationDelay

DEFAULT_IDLE_TIMEOUT = 3600.0
DEFAULT_DRAIN_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class PipeSettings:
    """Timeouts of a pipe, in seconds.

    idle_timeout: the pipe ends when no byte was read from either side for this long; 0 turns
        it off (Traefik's behaviour on TCP routes). Default 1 h, Envoy's tcp_proxy default.
    drain_timeout: once the pipe ended, a transport whose unsent bytes do not shrink for this
        long is aborted (its socket freed) instead of waiting for a peer that does not read.
        0 waits forever.
    termination_delay: seconds the other direction may still flow after one side's EOF
        (Traefik's terminationDelay); None or negative: no limit.
    """

    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    # Traefik's TCP `terminationDelay`: once one side sent EOF (passed on as a FIN), the other
    # direction may flow this long, then the pipe ends (pkg/tcp/proxy.go sets a read deadline
    # on the other side). None or negative: it flows until it ends by itself (half-close lasts).
    termination_delay: float | None = None

    def __post_init__(self) -> None:
        if self.idle_timeout < 0 or self.drain_timeout < 0:
            raise ValueError("pipe timeouts must be >= 0 seconds")


@dataclass(slots=True)
class PipeEnd:
    """One side handed to a pipe.

    transport: connected, `connection_lost` not delivered yet; reading may be paused or not.
    leftover: bytes already read from this side and not forwarded; sent to the other side
        before anything the pipe reads.
    eof: this side already sent EOF (the caller's protocol returned True from `eof_received`).
    writing_paused: whether the caller's protocol got `pause_writing` without a matching
        `resume_writing` on this transport; None guesses it from the write buffer's size.
    """

    transport: asyncio.Transport
    leftover: bytes = b""
    eof: bool = False
    writing_paused: bool | None = None


@dataclass(frozen=True, slots=True)
class PipeStats:
    """How a pipe ended: `reason` (one of the END_* strings), the bytes read from each side
    (leftovers included) and the seconds from `start()` to both transports closed."""

    reason: str
    bytes_from_downstream: int
    bytes_from_upstream: int
    duration: float


class _Side(asyncio.Protocol):
    """The protocol the pipe installs on one of its transports: forwards every event to the
    pipe with the side's index."""

    __slots__ = ("index", "pipe")

    def __init__(self, pipe: BytePipe, index: int) -> None:
        self.pipe = pipe
        self.index = index

    def data_received(self, data: bytes) -> None:
        self.pipe._on_data(self.index, data)

    def eof_received(self) -> bool:
        self.pipe._on_eof(self.index)
        return True  # the pipe closes the transport itself, when both directions are done

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipe._on_lost(self.index, exc)

    def pause_writing(self) -> None:
        self.pipe._on_writing(self.index, paused=True)

    def resume_writing(self) -> None:
        self.pipe._on_writing(self.index, paused=False)


class BytePipe:
    """Relays bytes between `downstream` (the side that connected to the proxy) and `upstream`
    until both are done; see the module docstring for the rules. Not thread-safe: runs on the
    event loop that owns both transports."""

    __slots__ = (
        "_drain_sizes",
        "_ends",
        "_last_read",
        "_loop",
        "_lost",
        "_on_closed",
        "_read_open",
        "_reading",
        "_reason",
        "_received",
        "_settings",
        "_started",
        "_stats",
        "_termination",
        "_timer",
        "_transports",
        "_waiters",
        "_write_paused",
    )

    def __init__(
        self,
        downstream: PipeEnd,
        upstream: PipeEnd,
        settings: PipeSettings | None = None,
        on_closed: Callable[[PipeStats], None] | None = None,
    ) -> None:
        self._ends: tuple[PipeEnd, PipeEnd] | None = (downstream, upstream)
        self._transports = (downstream.transport, upstream.transport)
        self._settings = settings or PipeSettings()
        self._on_closed = on_closed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._read_open = [True, True]  # no EOF and no loss seen from that side yet
        self._reading = [False, False]  # what the pipe last asked of the transport
        self._write_paused = [False, False]  # that side's write buffer is over its high mark
        self._lost = [False, False]
        self._received = [0, 0]
        self._reason = ""  # set once, when the pipe ends
        self._started = 0.0
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._termination: asyncio.TimerHandle | None = None
        self._drain_sizes = [0, 0]
        self._stats: PipeStats | None = None
        self._waiters: list[asyncio.Future[PipeStats]] = []

    # -- the owner's interface -----------------------------------------------------------

    def start(self) -> None:
        """Take both transports over, replay the leftovers, pass on EOFs already seen, and
        relay from then on. Call once, on the loop running the transports."""
        ends = self._ends
        if ends is None:
            raise RuntimeError("BytePipe.start() called twice")
        self._ends = None
        loop = self._loop = asyncio.get_running_loop()
        self._started = self._last_read = loop.time()
        for index, end in enumerate(ends):
            transport = end.transport
            transport.set_protocol(_Side(self, index))
            paused = end.writing_paused
            if paused is None:
                paused = transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]
            self._write_paused[index] = paused
        for index, end in enumerate(ends):
            if end.leftover:
                self._on_data(index, end.leftover)
        for index, end in enumerate(ends):
            if end.eof:
                self._on_eof(index)
        if self._reason:
            return
        # The caller may have left either side paused (while dialling, while parsing): the
        # pipe's view wins from here on.
        for index in (DOWNSTREAM, UPSTREAM):
            self._apply_reading(index, force=True)
        if self._settings.idle_timeout > 0:
            self._timer = loop.call_later(self._settings.idle_timeout, self._check_idle)

    def close(self, reason: str = END_OWNER) -> None:
        """End the pipe now: both transports closed after what they buffered is sent."""
        self._end(reason)

    def abort(self, reason: str = END_ABORTED) -> None:
        """End the pipe now and drop whatever is buffered (a reset where the OS sends one)."""
        self._end(reason)
        for index, transport in enumerate(self._transports):
            if not self._lost[index]:
                transport.abort()

    @property
    def ended(self) -> bool:
        """True once the pipe has ended (its transports may still be closing)."""
        return bool(self._reason)

    @property
    def stats(self) -> PipeStats | None:
        """How the pipe ended, once both transports are closed; None before."""
        return self._stats

    async def wait_closed(self) -> PipeStats:
        """Wait until both transports are closed; returns how the pipe ended."""
        if self._stats is not None:
            return self._stats
        waiter: asyncio.Future[PipeStats] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return await waiter

    # -- events from the two transports ----------------------------------------------------

    def _on_data(self, index: int, data: bytes) -> None:
        if self._reason:
            return  # ending: the other side is being closed, nothing more goes to it
        self._received[index] += len(data)
        self._last_read = self._loop.time()  # type: ignore[union-attr]
        other = self._transports[1 - index]
        if not other.is_closing():
            other.write(data)

    def _on_eof(self, index: int) -> None:
        if not self._read_open[index]:
            return
        self._read_open[index] = False
        self._reading[index] = False
        if self._reason:
            return
        if not self._read_open[1 - index]:
            self._end(END_EOF)  # both directions done; close() sends the last FIN
            return
        other = self._transports[1 - index]
        if other.is_closing():
            return  # closed under us (a write error): its connection_lost ends the pipe
        if other.can_write_eof():
            other.write_eof()  # sent after what is buffered; the other direction flows on
        elif index == UPSTREAM:
            # An asyncio SSL transport toward the client: the server's EOF often delimits
            # its answer (a close-delimited body), which the client learns only from a
            # close; so end both, as before (a close_notify, then the connection closes).
            self._end(END_EOF)
            return
        # else: the client's EOF cannot reach a TLS server, but the server->client direction
        # still flows: the server may answer a request that ended with this EOF.
        delay = self._settings.termination_delay
        if delay is not None and delay >= 0 and self._loop is not None:
            self._termination = self._loop.call_later(delay, self._end, END_TERMINATION)

    def _on_lost(self, index: int, exc: Exception | None) -> None:
        if self._lost[index]:
            return
        self._lost[index] = True
        self._read_open[index] = False
        if not self._reason:
            self._end(END_RESET if exc is not None else END_CLOSED)
        if self._lost[1 - index]:
            self._finish()

    def _on_writing(self, index: int, paused: bool) -> None:
        self._write_paused[index] = paused
        self._apply_reading(1 - index)

    # -- internals ---------------------------------------------------------------------------

    def _apply_reading(self, index: int, force: bool = False) -> None:
        """Read from `index` exactly when the pipe runs, that side has not sent EOF, and the
        other side's write buffer is under its high-water mark."""
        if not self._read_open[index]:
            # After EOF the transport reads no more by itself; asking it to resume could make
            # it read the EOF again.
            self._reading[index] = False
            return
        want = not self._reason and not self._write_paused[1 - index]
        if want == self._reading[index] and not force:
            return
        self._reading[index] = want
        transport = self._transports[index]
        if transport.is_closing():
            return
        if want:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def _check_idle(self) -> None:
        self._timer = None
        if self._reason:
            return
        loop = self._loop
        assert loop is not None
        remaining = self._last_read + self._settings.idle_timeout - loop.time()
        if remaining > 0:
            self._timer = loop.call_later(remaining, self._check_idle)
        else:
            self._end(END_IDLE)

    def _end(self, reason: str) -> None:
        if self._reason:
            return
        self._reason = reason
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._termination is not None:
            self._termination.cancel()
            self._termination = None
        for index, transport in enumerate(self._transports):
            if not self._lost[index]:
                self._drain_sizes[index] = transport.get_write_buffer_size()
                transport.close()
        drain = self._settings.drain_timeout
        if drain > 0 and not all(self._lost) and self._loop is not None:
            self._timer = self._loop.call_later(drain, self._check_drain)

    def _check_drain(self) -> None:
        """After the end: abort a transport whose unsent bytes did not shrink since the last
        check (its peer stopped reading); look again later at one that makes progress."""
        self._timer = None
        waiting = False
        for index, transport in enumerate(self._transports):
            if self._lost[index]:
                continue
            size = transport.get_write_buffer_size()
            if size == 0 or size >= self._drain_sizes[index]:
                transport.abort()
            else:
                self._drain_sizes[index] = size
                waiting = True
        if waiting and self._loop is not None:
            self._timer = self._loop.call_later(self._settings.drain_timeout, self._check_drain)

    def _finish(self) -> None:
        if self._stats is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = self._loop.time() if self._loop is not None else self._started
        stats = self._stats = PipeStats(
            self._reason or END_CLOSED,
            self._received[DOWNSTREAM],
            self._received[UPSTREAM],
            now - self._started,
        )
        callback, self._on_closed = self._on_closed, None
        if callback is not None:
            try:
                callback(stats)
            except Exception:  # the owner's bug must not leave the pipe half-finished
                log.exception("pipe on_closed callback failed")
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(stats)
