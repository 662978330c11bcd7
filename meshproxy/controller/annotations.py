"""Service annotations (`mesh.traefik.io/*`, then the old `maesh.containo.us/*`)."""

from __future__ import annotations

from typing import Any

PREFIXES = ("mesh.traefik.io/", "maesh.containo.us/")
TRAFFIC_TYPES = ("http", "tcp", "udp")
SCHEMES = ("http", "https", "h2c")


class AnnotationError(ValueError):
    pass


def annotation(annotations: dict[str, str], name: str) -> str | None:
    for prefix in PREFIXES:
        value = annotations.get(prefix + name)
        if value is not None:
            return value
    return None


def traffic_type(annotations: dict[str, str], default: str) -> str:
    value = annotation(annotations, "traffic-type")
    if value is None:
        return default
    if value not in TRAFFIC_TYPES:
        raise AnnotationError(f"traffic-type {value!r} is not one of {', '.join(TRAFFIC_TYPES)}")
    return value


def scheme(annotations: dict[str, str]) -> str:
    value = annotation(annotations, "scheme")
    if value is None:
        return "http"
    if value not in SCHEMES:
        raise AnnotationError(f"scheme {value!r} is not one of {', '.join(SCHEMES)}")
    return value


def _integer(annotations: dict[str, str], name: str) -> int | None:
    value = annotation(annotations, name)
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        raise AnnotationError(f"{name} {value!r} is not an integer") from None


def middlewares(annotations: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Middleware kind suffix -> definition, for an HTTP service. Suffixes sort into a stable
    chain order (Traefik Mesh iterates a Go map, so its order changes between rebuilds)."""
    out: dict[str, dict[str, Any]] = {}
    attempts = _integer(annotations, "retry-attempts")
    if attempts is not None:
        if attempts <= 0:
            raise AnnotationError(f"retry-attempts must be > 0, got {attempts}")
        out["retry"] = {"retry": {"attempts": attempts}}
    average = _integer(annotations, "ratelimit-average")
    burst = _integer(annotations, "ratelimit-burst")
    if average is not None and burst is not None:
        if average <= 0 or burst <= 0:
            raise AnnotationError("ratelimit-average and ratelimit-burst must be > 0")
        out["rate-limit"] = {"rateLimit": {"average": average, "burst": burst}}
    expression = annotation(annotations, "circuit-breaker-expression")
    if expression is not None:
        from meshproxy.middlewares.breaker_expression import ExpressionError, parse_expression

        try:
            parse_expression(expression)
        except ExpressionError as exc:
            raise AnnotationError(f"circuit-breaker-expression: {exc}") from None
        out["circuit-breaker"] = {"circuitBreaker": {"expression": expression}}
    return dict(sorted(out.items()))
