"""buffering: read the whole request body before forwarding it, with size limits.

As Traefik: a request body larger than `maxRequestBodyBytes` gets 413 and never reaches the
backend; a buffered body is sent with a Content-Length. A response declaring a Content-Length
over `maxResponseBodyBytes` is replaced by a 500. Differences: bodies are held in memory (the
`mem*` thresholds, where Traefik spills to disk, are accepted and ignored) and a chunked
response is not cut when it outgrows the limit. `retryExpression` is refused.
"""

from __future__ import annotations

from meshproxy.config.dynamic import Buffering
from meshproxy.http.errors import ProxyError
from meshproxy.http.exchange import Exchange
from meshproxy.middlewares.base import BuildContext, Finish, Handler, MiddlewareConfigError


class RequestTooLarge(ProxyError):
    status = 413
    body = b"Request Entity Too Large"


class ResponseTooLarge(ProxyError):
    status = 500
    body = b"Internal Server Error"


def build_buffering(options: Buffering, next_handler: Handler, ctx: BuildContext) -> Handler:
    if options.retry_expression:
        raise MiddlewareConfigError("retryExpression", "is not supported; use a retry middleware")
    max_request = options.max_request_body_bytes or 0
    max_response = options.max_response_body_bytes or 0
    if max_request < 0:
        raise MiddlewareConfigError("maxRequestBodyBytes", "must not be negative")
    if max_response < 0:
        raise MiddlewareConfigError("maxResponseBodyBytes", "must not be negative")

    def forward(ex: Exchange, finish: Finish) -> None:
        if not max_response:
            next_handler(ex, finish)
            return
        outer = ex.swallow
        too_large = False

        def drop_large(status: int, content_length: int | None) -> bool:
            nonlocal too_large
            too_large = content_length is not None and content_length > max_response
            return too_large or (outer is not None and outer(status, content_length))

        def done(ex: Exchange, exc: BaseException | None) -> None:
            ex.swallow = outer
            if too_large and exc is None:
                ex.swallowed_status = 0
                exc = ResponseTooLarge("the response body is larger than maxResponseBodyBytes")
            finish(ex, exc)

        ex.swallow = drop_large
        next_handler(ex, done)

    def buffering(ex: Exchange, finish: Finish) -> None:
        request = ex.request
        if not ex.has_body:
            forward(ex, finish)
            return
        if max_request and (request.content_length or 0) > max_request:
            finish(ex, RequestTooLarge("the request body is larger than maxRequestBodyBytes"))
            return

        def body_read() -> None:
            size = ex.buffered_body_size
            if max_request and size > max_request:
                finish(ex, RequestTooLarge("the request body is larger than maxRequestBodyBytes"))
                return
            if request.content_length is None:  # was chunked: now its length is known
                request.content_length = size
                request.set_header(b"content-length", str(size).encode())
            forward(ex, finish)

        if ex.body_complete:
            body_read()
            return
        ex.body_high_water = max_request if max_request else 1 << 62
        ex.body_waiter = body_read
        # The body is read here, not by the backend: a client waiting for 100 Continue
        # (RFC 9110 §10.1.1) gets it from the proxy.
        ex.sink.write_continue(ex)

    return buffering
