"""Traefik's sourceCriterion: which requests share a rate-limit bucket or an in-flight count."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshproxy.config.dynamic import SourceCriterion
from meshproxy.middlewares.base import MiddlewareConfigError
from meshproxy.middlewares.ip_strategy import client_ip_getter


def source_key_getter(criterion: SourceCriterion | None, path: str) -> Callable[[Any], str]:
    """request -> source key. Exactly one criterion may be set; none means the peer IP."""
    if criterion is None:
        return lambda request: request.client_ip
    chosen = [
        name
        for name, value in (
            ("ipStrategy", criterion.ip_strategy),
            ("requestHeaderName", criterion.request_header_name),
            ("requestHost", criterion.request_host or None),
        )
        if value is not None
    ]
    if len(chosen) > 1:
        raise MiddlewareConfigError(path, f"only one source criterion may be set, got {chosen}")
    if criterion.request_header_name is not None:
        header = criterion.request_header_name.strip().lower()

        def by_header(request: Any) -> str:
            values = request.header_values(header)
            return values[0] if values else ""

        return by_header
    if criterion.request_host:
        return lambda request: request.host_header.decode("latin-1")
    return client_ip_getter(criterion.ip_strategy, f"{path}.ipStrategy")
