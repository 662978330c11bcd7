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
from meshproxy.upstream_address import resolve

log = logging.getLogger("meshproxy.upstream")


async def connect(pool: UpstreamPool) -> UpstreamConnection:
    """A new connection to the pool's server, with its dial timeout."""
    loop = asyncio.get_running_loop()
    settings = pool.settings
    host, port = resolve(pool.host, pool.port)  # `meshproxy local`: mesh names -> its proxy
    try:
        transport, protocol = await asyncio.wait_for(
            loop.create_connection(
                lambda: UpstreamConnection(pool),
                host,
                port,
                ssl=pool.ssl,
                server_hostname=(settings.server_name or pool.host) if pool.ssl else None,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if pool.ssl else None,
            ),
            settings.dial_timeout if settings.dial_timeout > 0 else None,
        )
        if pool.ssl is not None and settings.peer_cert_uri:
            try:
                check_peer_uri(transport, settings.peer_cert_uri)
            except ssl.SSLError:
                transport.close()
                raise
    except TimeoutError:
        raise UpstreamDialTimeout(f"dial {pool.host}:{pool.port}: timeout") from None
    except ssl.SSLError as exc:  # before OSError, its base: a refused certificate is logged
        log.warning(
            "dial %s://%s:%d: TLS handshake failed: %s", pool.scheme, pool.host, pool.port, exc
        )
        raise UpstreamConnectError(f"dial {pool.host}:{pool.port}: TLS: {exc}") from None
    except OSError as exc:
        raise UpstreamConnectError(f"dial {pool.host}:{pool.port}: {exc}") from None
    return protocol


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
