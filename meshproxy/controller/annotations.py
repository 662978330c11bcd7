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


# meshproxy's own annotations: Traefik Mesh has none for these, so they live in our namespace
# rather than in `mesh.traefik.io/` (docs/load-balancing.md).
OWN_PREFIX = "meshproxy.io/"


def load_balancer_options(annotations: dict[str, str]) -> dict[str, Any]:
    """Options added to every loadBalancer of an HTTP service, from
    `meshproxy.io/health-check-path` (enables Traefik's healthCheck; `-interval`, `-timeout`
    tune it) and `meshproxy.io/load-balancer-strategy` (wrr, p2c, ewma)."""
    from meshproxy.balancer.strategies import STRATEGIES
    from meshproxy.config.durations import parse_duration

    options: dict[str, Any] = {}
    path = annotations.get(OWN_PREFIX + "health-check-path")
    if path is not None:
        if not path.startswith("/"):
            raise AnnotationError(f"health-check-path {path!r} must start with /")
        check: dict[str, Any] = {"path": path}
        for key in ("interval", "timeout"):
            value = annotations.get(f"{OWN_PREFIX}health-check-{key}")
            if value is None:
                continue
            try:
                seconds = parse_duration(value)
            except ValueError as exc:
                raise AnnotationError(f"health-check-{key}: {exc}") from None
            if seconds <= 0:
                raise AnnotationError(f"health-check-{key} must be > 0, got {value!r}")
            check[key] = value
        options["healthCheck"] = check
    strategy = annotations.get(OWN_PREFIX + "load-balancer-strategy")
    if strategy is not None:
        if strategy not in STRATEGIES:
            raise AnnotationError(
                f"load-balancer-strategy {strategy!r} is not one of {', '.join(STRATEGIES)}"
            )
        options["strategy"] = strategy
    return options
