"""The coroutine side of upstream connections: dialling, and one exchange on a fresh one.

Kept apart from upstream.py, which mypyc compiles (setup.py): compiled coroutines do not see
exceptions that an awaited future raises (mypyc 1.13), and dialling is not per request.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from meshproxy.http.errors import UpstreamConnectError, UpstreamDialTimeout
from meshproxy.http.exchange import Exchange
from meshproxy.http.transports import TLS_HANDSHAKE_TIMEOUT, check_peer_uri
from meshproxy.http.upstream import UpstreamConnection, UpstreamPool
from meshproxy.observability.log_limit import LIMIT, held_back
from meshproxy.upstream_address import resolve

log = logging.getLogger("meshproxy.upstream")


async def connect(pool: UpstreamPool) -> UpstreamConnection:
    """A new connection to the pool's server.

    As Go's http.Transport under Traefik (checked with Traefik 3.7: a server that accepts and
    never speaks TLS gets 504 after 10 s, with `dialTimeout: 2s` too): the transport's
    `dialTimeout` bounds the TCP connect only, then the TLS handshake has its own 10 s
    (TLS_HANDSHAKE_TIMEOUT, Go's TLSHandshakeTimeout). Either timing out is a 504
    (UpstreamDialTimeout: a timeout, no request byte sent, retryable). A handshake that fails
    (certificate refused either way, protocol alert) is a 502 (UpstreamConnectError).

    TLS failures are logged at ERROR, rate-limited per (cause, server): Traefik logs a refused
    certificate at ERR on every request; its 504 for a hung handshake only at DEBUG, but an
    operator running at the default level would otherwise see a 504 and no reason."""
    loop = asyncio.get_running_loop()
    settings = pool.settings
    host, port = resolve(pool.host, pool.port)  # `meshproxy local`: mesh names -> its proxy
    try:
        transport, protocol = await asyncio.wait_for(
            loop.create_connection(lambda: UpstreamConnection(pool), host, port),
            settings.dial_timeout if settings.dial_timeout > 0 else None,
        )
    except TimeoutError:
        raise UpstreamDialTimeout(f"dial {pool.host}:{pool.port}: timeout") from None
    except OSError as exc:
        raise UpstreamConnectError(f"dial {pool.host}:{pool.port}: {exc}") from None
    if pool.ssl is not None:
        transport = await _handshake(pool, transport, protocol)
    return protocol


async def _handshake(
    pool: UpstreamPool, transport: asyncio.Transport, protocol: UpstreamConnection
) -> asyncio.Transport:
    """TLS over the connected `transport` within TLS_HANDSHAKE_TIMEOUT; the protocol then
    writes to the TLS transport. Raises UpstreamDialTimeout or UpstreamConnectError."""
    loop = asyncio.get_running_loop()
    settings = pool.settings
    context = pool.ssl
    assert context is not None
    try:
        tls = await asyncio.wait_for(
            loop.start_tls(
                transport,
                protocol,
                context,
                server_hostname=settings.server_name or pool.host,
                # the loop's own limit aborts with a plain ConnectionAbortedError: wait_for's
                # (the same 10 s) must fire first, so a hung handshake reads as a timeout
                ssl_handshake_timeout=2 * TLS_HANDSHAKE_TIMEOUT,
            ),
            TLS_HANDSHAKE_TIMEOUT,
        )
        if tls is None:
            raise ConnectionError("the server closed the connection during the TLS handshake")
        protocol.connection_made(tls)
        if settings.peer_cert_uri:
            check_peer_uri(tls, settings.peer_cert_uri)
    except TimeoutError:
        transport.abort()
        _log_tls(pool, "TLS handshake timeout", f"no answer in {TLS_HANDSHAKE_TIMEOUT:.0f}s")
        raise UpstreamDialTimeout(f"dial {pool.host}:{pool.port}: TLS handshake timeout") from None
    except ssl.SSLError as exc:  # before OSError, its base: a refused certificate
        transport.abort()
        _log_tls(pool, "TLS handshake failed", str(exc))
        raise UpstreamConnectError(f"dial {pool.host}:{pool.port}: TLS: {exc}") from None
    except OSError as exc:
        transport.abort()
        _log_tls(pool, "TLS handshake failed", str(exc) or type(exc).__name__)
        raise UpstreamConnectError(f"dial {pool.host}:{pool.port}: TLS: {exc}") from None
    return tls  # type: ignore[return-value]


def _log_tls(pool: UpstreamPool, cause: str, detail: str) -> None:
    # keyed by the detail too: a different failure (another certificate) is news
    held = LIMIT.allow(f"{cause}: {detail}", (pool.host, pool.port))
    if held is not None:
        log.error(
            "dial %s://%s:%d: %s: %s%s",
            pool.scheme,
            pool.host,
            pool.port,
            cause,
            detail,
            held_back(held),
        )


def start_on(
    conn: UpstreamConnection, ex: Exchange, head: bytes, chunked_body: bool
) -> asyncio.Future[None]:
    """`conn.start` as an awaitable."""
    future: asyncio.Future[None] = conn.loop.create_future()

    def done(exc: BaseException | None) -> None:
        if not future.done():
            if exc is None:
                future.set_result(None)
            else:
                future.set_exception(exc)

    conn.start(ex, head, chunked_body, done)
    return future


async def exchange_fresh(pool: UpstreamPool, ex: Exchange, head: bytes, chunked_body: bool) -> None:
    """Send `ex` on a newly dialled connection."""
    conn = await connect(pool)
    await start_on(conn, ex, head, chunked_body)  # an EOF before any answer: UpstreamError
