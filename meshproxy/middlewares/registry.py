"""Middleware kind (struct field name) -> builder. Kinds not listed are reported as
unsupported, which disables the routers that use them. `chain` is resolved by the compiler."""

from __future__ import annotations

from meshproxy.middlewares.base import MiddlewareBuilder
from meshproxy.middlewares.buffering import build_buffering
from meshproxy.middlewares.circuit_breaker import build_circuit_breaker
from meshproxy.middlewares.headers import build_headers
from meshproxy.middlewares.in_flight import build_in_flight_req
from meshproxy.middlewares.ip_allow_list import build_ip_allow_list
from meshproxy.middlewares.path_rewrite import (
    build_add_prefix,
    build_replace_path,
    build_replace_path_regex,
    build_strip_prefix,
    build_strip_prefix_regex,
)
from meshproxy.middlewares.rate_limit import build_rate_limit
from meshproxy.middlewares.retry import build_retry

MIDDLEWARE_BUILDERS: dict[str, MiddlewareBuilder] = {
    "add_prefix": build_add_prefix,
    "buffering": build_buffering,
    "circuit_breaker": build_circuit_breaker,
    "headers": build_headers,
    "in_flight_req": build_in_flight_req,
    "ip_allow_list": build_ip_allow_list,
    "ip_white_list": build_ip_allow_list,
    "rate_limit": build_rate_limit,
    "replace_path": build_replace_path,
    "replace_path_regex": build_replace_path_regex,
    "retry": build_retry,
    "strip_prefix": build_strip_prefix,
    "strip_prefix_regex": build_strip_prefix_regex,
}
