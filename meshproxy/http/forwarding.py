"""Header rules for a forwarding proxy: hop-by-hop removal and X-Forwarded-* handling."""

from __future__ import annotations

import socket

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

# Headers wiped from untrusted clients (Traefik's forwardedheaders list, plus "_" spellings).
_X_HEADERS = [
    b"x-forwarded-proto",
    b"x-forwarded-for",
    b"x-forwarded-host",
    b"x-forwarded-port",
    b"x-forwarded-server",
    b"x-forwarded-uri",
    b"x-forwarded-method",
    b"x-forwarded-tls-client-cert",
    b"x-forwarded-tls-client-cert-info",
    b"x-forwarded-prefix",
    b"x-real-ip",
]
UNTRUSTED_DROP = frozenset(_X_HEADERS + [h.replace(b"-", b"_") for h in _X_HEADERS])

SERVER_NAME = socket.gethostname().encode()


def connection_tokens(value: bytes) -> list[bytes]:
    """Header names listed in a Connection header (they are hop-by-hop too)."""
    return [t.strip().lower() for t in value.split(b",") if t.strip()]
