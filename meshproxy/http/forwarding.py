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


# Fields that may not travel as trailers (RFC 9110 §6.5.1): framing, routing, controls,
# authentication, hop-by-hop ones, and the proxy's own forwarding fields (a backend that merges
# trailers into headers must not see a forged client address). Dropped when forwarded.
NOT_TRAILERS = HOP_BY_HOP | frozenset(
    {
        b"content-length",
        b"content-type",
        b"content-encoding",
        b"content-range",
        b"host",
        b"expect",
        b"max-forwards",
        b"cache-control",
        b"authorization",
        b"set-cookie",
        b"cookie",
        b"www-authenticate",
        b"forwarded",
        b"x-real-ip",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-proto",
        b"x-forwarded-server",
        b"x-forwarded-prefix",
    }
)


def trailer_lines(trailers: list[tuple[bytes, bytes]]) -> bytes:
    """The last chunk with `trailers` (RFC 9112 §7.1.2), those allowed as trailers only."""
    lines = [n + b": " + v + b"\r\n" for n, v in trailers if n not in NOT_TRAILERS]
    return b"0\r\n" + b"".join(lines) + b"\r\n"


# Fields a peer cannot make hop-by-hop by naming them in Connection (RFC 9110 §7.6.1 lets a
# sender list its own hop-by-hop fields, not the message's framing, its routing, or what the
# proxy itself adds): dropping Content-Length would forward a body without framing (request
# smuggling), dropping X-Forwarded-* would hide the client from the backend (as Traefik's
# CVE-2024-45410).
NOT_NOMINABLE = frozenset(
    {
        b"content-length",
        b"host",
        b"date",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-proto",
        b"x-forwarded-server",
        b"x-forwarded-prefix",
        b"x-real-ip",
    }
)


def connection_tokens(value: bytes) -> list[bytes]:
    """Header names listed in a Connection header (they are hop-by-hop too), except those a
    peer may not name (`NOT_NOMINABLE`)."""
    tokens = [t.strip().lower() for t in value.split(b",")]
    return [t for t in tokens if t and t not in NOT_NOMINABLE]
