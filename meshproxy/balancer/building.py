"""Assembling a loadBalancer service from its config, for the runtime compiler: strategy,
per-server state handed on from the previous build, sticky cookie, outlier detection and
health checks; and linking a parent (`weighted`, `mirroring` with `healthCheck`) to the
status of its children, as Traefik's RegisterStatusUpdater does.

Errors are ValueError whose message starts with the key at fault, relative to the service
(`loadBalancer.healthCheck.scheme: ...`); the compiler disables the service with it.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from meshproxy.balancer.health import (
    HealthCheckConfigError,
    HealthKey,
    HealthRegistry,
    spec_from_config,
)
from meshproxy.balancer.http_services import LoadBalancerService, MirroringService, WeightedService
from meshproxy.balancer.outlier import OutlierDetector, TraefikPassive, settings_from_config
from meshproxy.balancer.sticky import Sticky
from meshproxy.balancer.strategies import ServerState, make_strategy
from meshproxy.config.dynamic import ServersLoadBalancer
from meshproxy.http.upstream import ServerTarget, TransportSettings
from meshproxy.observability.metrics import RequestMetrics


def load_balancer_service(
    qualified: str,
    lb: ServersLoadBalancer,
    servers: list[tuple[ServerTarget, int]],
    pass_host: bool,
    metrics: RequestMetrics,
    previous: Any,
    transport: TransportSettings,
    health: HealthRegistry,
    wanted: dict[HealthKey, list[LoadBalancerService]],
    warnings: list[str],
) -> LoadBalancerService:
    """The service for `lb`. `previous` is the live object of the same name (if any): its
    per-server states (in-flight counts, latency estimates, ejections) and its rotation are
    kept for the servers still configured. Health checks wanted are added to `wanted`."""
    try:
        make_strategy(lb.strategy, [], [])
    except ValueError as exc:
        raise ValueError(f"loadBalancer.strategy: {exc}") from None
    old: dict[str, ServerState] = {}
    if isinstance(previous, LoadBalancerService):
        old = {state.url: state for state in previous.states}
    by_url: dict[str, ServerState] = {}
    states = []
    for target, _ in servers:
        state = by_url.get(target.url) or old.get(target.url) or ServerState(target.url)
        by_url[target.url] = state
        states.append(state)
    sticky = None
    if lb.sticky is not None and lb.sticky.cookie is not None:
        sticky = Sticky(lb.sticky.cookie, qualified, [t.url for t, _ in servers])
    try:
        outlier_settings = settings_from_config(lb.outlier_detection)
    except ValueError as exc:
        raise ValueError(f"loadBalancer.outlierDetection.{exc}") from None
    outlier: OutlierDetector | None = None
    passive = lb.passive_health_check
    if passive is not None:
        window = 10.0 if passive.failure_window is None else float(passive.failure_window)
        attempts = 1 if passive.max_failed_attempts is None else passive.max_failed_attempts
        if window <= 0:
            raise ValueError("loadBalancer.passiveHealthCheck.failureWindow must be > 0")
        if attempts <= 0:
            raise ValueError("loadBalancer.passiveHealthCheck.maxFailedAttempts must be > 0")
        kept = previous.outlier if isinstance(previous, LoadBalancerService) else None
        if isinstance(kept, TraefikPassive) and (kept.failure_window, kept.max_failed_attempts) == (
            window,
            attempts,
        ):
            outlier = kept
        else:
            outlier = TraefikPassive(window, attempts, metrics)
    elif outlier_settings.enabled:
        kept = previous.outlier if isinstance(previous, LoadBalancerService) else None
        if (
            kept is not None
            and not isinstance(kept, TraefikPassive)
            and kept.settings == outlier_settings
        ):
            outlier = kept
        else:
            outlier = OutlierDetector(outlier_settings, metrics)
    else:
        for state in states:  # detection turned off: nobody stays out because of it
            state.ejected = False
            state.consecutive_failures = 0
    checkers: list[Any] = [None] * len(states)
    if lb.health_check is not None:
        try:
            spec = spec_from_config(lb.health_check, warnings)
        except HealthCheckConfigError as exc:
            raise ValueError(
                "; ".join(f"loadBalancer.healthCheck.{error}" for error in exc.errors)
            ) from None
        for index, state in enumerate(states):
            key = (state.url, spec, transport)
            checker = health.get(key)
            checkers[index] = checker
            state.healthy = checker.healthy
    else:
        for state in states:
            state.healthy = True
    service = LoadBalancerService(
        qualified, servers, pass_host, metrics, states, lb.strategy, sticky, outlier
    )
    service.checkers = checkers
    service.health_check = lb.health_check is not None
    for checker in checkers:
        if checker is not None:
            listeners = wanted.setdefault((checker.url, checker.spec, checker.transport), [])
            if service not in listeners:
                listeners.append(service)
    if isinstance(previous, LoadBalancerService) and previous.weights_key == service.weights_key:
        service.strategy.adopt(previous.strategy)
    service.refresh()
    return service


def reports_status(child: Any) -> bool:
    """Whether a child service tells its parents when it goes up or down: a loadBalancer
    with `healthCheck`, a weighted or mirroring service with `healthCheck` (Traefik:
    RegisterStatusUpdater fails otherwise)."""
    return bool(getattr(child, "health_check", False))


def link_weighted(parent: WeightedService, children: list[tuple[str, Any]]) -> None:
    """`weighted.healthCheck`: each child reports its status to `parent`. Raises ValueError
    (Traefik's message) for a child that cannot."""
    parent.child_names = [name for name, _ in children]
    for index, (name, child) in enumerate(children):
        if child is None or not reports_status(child):
            raise ValueError(
                f"child service {name} of {parent.name} not a healthcheck.StatusUpdater: "
                "healthCheck not enabled in config for this service"
            )
        child.updaters.append(partial(parent.set_child_up, index))
        parent.set_child_up(index, child.up)


def link_mirroring(parent: MirroringService, name: str, main: Any) -> None:
    """`mirroring.healthCheck`: the mirroring service's status is its main service's."""
    if main is None or not reports_status(main):
        raise ValueError(
            f"child service {name} of {parent.name} not a healthcheck.StatusUpdater: "
            "healthCheck not enabled in config for this service"
        )
    parent.main_name = name
    main.updaters.append(parent.set_main_up)
    parent.set_main_up(main.up)
