"""Errors raised while proxying, each carrying the status Traefik answers with."""

from __future__ import annotations


class ProxyError(Exception):
    status = 500
    body = b"Internal Server Error"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.__class__.__name__)
        self.detail = detail


class NoServerAvailable(ProxyError):
    status = 503
    body = b"no available server\n"


class UpstreamConnectError(ProxyError):
    """The backend could not be reached; no request byte was written (safe to retry)."""

    status = 502
    body = b"Bad Gateway"


class UpstreamDialTimeout(UpstreamConnectError):
    status = 504
    body = b"Gateway Timeout"


class UpstreamError(ProxyError):
    """The backend failed after the request was (at least partly) sent."""

    status = 502
    body = b"Bad Gateway"


class UpstreamResponseTimeout(UpstreamError):
    status = 504
    body = b"Gateway Timeout"


class ClientGone(ProxyError):
    status = 499
    body = b"Client Closed Request"


class ResponseAborted(ProxyError):
    """The response had started when the exchange failed; the client connection is cut."""

    status = 502


class StreamRefused(UpstreamConnectError):
    """The backend refused the stream before processing it: RST_STREAM(REFUSED_STREAM) or a
    GOAWAY whose last_stream_id is below it (RFC 9113 §8.7, §6.8). Nothing reached the
    application, so retry may send it elsewhere."""


class NoStreamAvailable(UpstreamConnectError):
    """Every connection to the server is full and `MAX_WAITING` sends already wait, or this
    one waited `dial_timeout` for a stream: nothing was sent (503, as Envoy's overflow).
    Defined here, not in meshproxy.http2.upstream (which mypyc compiles): a compiled subclass
    of an interpreted class loses its class attribute overrides (`status` read 502)."""

    status = 503
    body = b"Service Unavailable"
