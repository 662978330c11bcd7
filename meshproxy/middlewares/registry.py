"""Middleware kind (struct field name) -> builder. Kinds not listed are reported as
unsupported, which disables the routers that use them."""

from __future__ import annotations

from meshproxy.middlewares.base import MiddlewareBuilder
from meshproxy.middlewares.ip_allow_list import build_ip_allow_list

MIDDLEWARE_BUILDERS: dict[str, MiddlewareBuilder] = {
    "ip_allow_list": build_ip_allow_list,
    "ip_white_list": build_ip_allow_list,
}
