"""Passive outlier detection: a server that keeps failing leaves its balancer for a while.

Beyond Traefik (whose v3.6 `passiveHealthCheck` is a fixed window); modelled on Envoy's
outlier detection (consecutive errors, ejection time growing with each ejection, a cap on the
share of a cluster ejected at once) and Linkerd's consecutive-failure accrual.

- A *connect failure* is a try where the server could not be reached: refused, reset or
  timed out while connecting (no request byte written). `consecutiveFailures` of them in a
  row (default 5) eject the server. What a request carries cannot cause one, so no client
  can eject a healthy server with them: only the server's own state (dead, not listening,
  backlog full) does.
- A connection that broke or timed out *after* the request was sent (the proxy's own
  502/504) is the application's answer to that request as much as the server's state: a
  handler that panics (Go's net/http then drops the connection) or hangs on one input does
  it to every pod, so one client hitting it could eject half a healthy service (fresh
  tester F6: 20 requests ejected 2 of 4 pods). It counts only when
  `consecutiveGatewayFailures` > 0 (default off; Envoy's consecutive_gateway_failure, which
  counts both kinds), and otherwise neither counts nor resets the run.
- A *5xx* answered by the server counts only when `consecutive5xx` > 0 (default off): an
  application's 500 may be one endpoint's bug, and ejecting healthy pods one by one because a
  client hammers it would move the problem, not fix it.
- The kinds that count add to one run per server; it ejects when it reaches the smallest
  threshold set for a kind it holds.
- Any other answer resets the server's counters. A client that went away (499) counts neither
  way.
- An ejection lasts `baseEjectionTime` (30 s) x 2^(ejections in a row - 1), at most
  `maxEjectionTime` (300 s); the count goes back to zero once the server has stayed in for
  `maxEjectionTime`.
- Never more than `maxEjectionPercent` (50) of a service's servers are ejected at once
  (rounded down, so a lone server is never ejected), and never the last available one: a 503
  for everyone is worse than trying a doubtful server.

On by default (the `outlierDetection` key of a loadBalancer, a meshproxy extension, can tune
or disable it: `enabled: false`): a dead pod otherwise gets its share of requests until the
controller's Endpoints update lands, and with the defaults above a healthy server can only be
ejected by five failed connection attempts in a row. Why it is safe on by default is in
docs/load-balancing.md.

Returns to service happen in `sweep` (the daemon's housekeeping, once a second), so nothing
holds a reference to a balancer a reload replaced.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any

from meshproxy.balancer.strategies import ServerState
from meshproxy.http.errors import UpstreamConnectError, UpstreamError

if TYPE_CHECKING:
    from meshproxy.balancer.http_services import LoadBalancerService
    from meshproxy.observability.metrics import RequestMetrics

log = logging.getLogger("meshproxy.balancer.outlier")


@dataclass(frozen=True)
class OutlierSettings:
    """A loadBalancer's `outlierDetection` (durations in seconds)."""

    enabled: bool = True
    consecutive_failures: int = 5
    consecutive_gateway_failures: int = 0
    consecutive_5xx: int = 0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 50


class OutlierDetector:
    """Counts one service's failures per server and ejects (see the module docstring)."""

    def __init__(self, settings: OutlierSettings, metrics: RequestMetrics) -> None:
        self.settings = settings
        self.metrics = metrics

    def record(
        self,
        service: LoadBalancerService,
        state: ServerState,
        exc: BaseException | None,
        status: int,
        now: float,
    ) -> None:
        """One try at `state`'s server ended with `exc` (None: an answer with `status`)."""
        settings = self.settings
        if isinstance(exc, UpstreamConnectError):
            state.consecutive_failures += 1
            limits = [
                n
                for n in (
                    settings.consecutive_failures,
                    settings.consecutive_gateway_failures,
                    settings.consecutive_5xx,
                )
                if n
            ]
            if limits and state.consecutive_failures >= min(limits):
                self.eject(service, state, now, f"{state.consecutive_failures} failures in a row")
        elif isinstance(exc, UpstreamError):
            # after the request was sent: the application's answer unless asked for
            if settings.consecutive_gateway_failures > 0:
                state.consecutive_failures += 1
                if state.consecutive_failures >= settings.consecutive_gateway_failures:
                    self.eject(
                        service,
                        state,
                        now,
                        f"{state.consecutive_failures} gateway failures in a row",
                    )
        elif status >= 500:
            if settings.consecutive_5xx > 0:
                state.consecutive_failures += 1
                if state.consecutive_failures >= settings.consecutive_5xx:
                    self.eject(service, state, now, f"{state.consecutive_failures} 5xx in a row")
        else:
            state.consecutive_failures = 0

    def eject(self, service: LoadBalancerService, state: ServerState, now: float, why: str) -> bool:
        """Take `state`'s server out of `service` if the caps allow; True if it was."""
        if state.ejected:
            return False
        states = service.states
        settings = self.settings
        ejected = sum(1 for s in states if s.ejected)
        allowed = len(states) * settings.max_ejection_percent // 100
        others_available = any(s.available for s in states if s is not state)
        if ejected >= allowed or not others_available:
            log.debug(
                "service %s: server %s not ejected (%s): %d of %d already out, cap %d%%",
                service.name,
                state.url,
                why,
                ejected,
                len(states),
                settings.max_ejection_percent,
            )
            return False
        if state.ejected_until and now - state.ejected_until > settings.max_ejection_time:
            state.ejections = 0  # it behaved for a long time since its last ejection
        state.ejections += 1
        duration = min(
            settings.base_ejection_time * (2 ** (state.ejections - 1)),
            settings.max_ejection_time,
        )
        state.ejected = True
        state.last_ejection = now
        state.ejected_until = now + duration
        state.consecutive_failures = 0
        key = (service.name, state.url)
        self.metrics.outlier_ejections[key] = self.metrics.outlier_ejections.get(key, 0) + 1
        self.metrics.outlier_ejected[key] = 1
        log.warning(
            "service %s: server %s ejected for %.0fs after %s (ejection %d in a row)",
            service.name,
            state.url,
            duration,
            why,
            state.ejections,
        )
        service.refresh()
        return True

    def sweep(self, service: LoadBalancerService, now: float | None = None) -> None:
        """Return the servers whose ejection is over (`now` on perf_counter's clock)."""
        now = perf_counter() if now is None else now
        returned = False
        for state in service.states:
            if state.ejected and now >= state.ejected_until:
                state.ejected = False
                returned = True
                self.metrics.outlier_ejected[(service.name, state.url)] = 0
                log.warning(
                    "service %s: server %s back after its ejection", service.name, state.url
                )
        if returned:
            service.refresh()

    def describe(self, state: ServerState, now: float | None = None) -> dict[str, Any]:
        """The admin API's view of one server's detector state."""
        now = perf_counter() if now is None else now
        return {
            "ejected": state.ejected,
            "ejectedForSeconds": round(max(state.ejected_until - now, 0.0), 3)
            if state.ejected
            else 0,
            "ejections": state.ejections,
            "consecutiveFailures": state.consecutive_failures,
        }


class TraefikPassive(OutlierDetector):
    """Traefik 3.6's `passiveHealthCheck` (pkg/healthcheck: PassiveServiceHealthChecker): a
    try fails when the server was not reached or answered >= 500, any other answer clears
    the server's failures; `maxFailedAttempts` failures within `failureWindow` take the
    server DOWN for `failureWindow`. No share cap: as in Traefik, every server may go down
    (503). Where we differ: with an active check as well, Traefik keeps the server down until
    the active check passes; here it comes back after `failureWindow` and the active check
    decides from then on. When set, it replaces outlierDetection for the service."""

    def __init__(self, failure_window: float, max_failed_attempts: int, metrics: Any) -> None:
        super().__init__(OutlierSettings(), metrics)
        self.failure_window = failure_window
        self.max_failed_attempts = max_failed_attempts

    def record(
        self,
        service: LoadBalancerService,
        state: ServerState,
        exc: BaseException | None,
        status: int,
        now: float,
    ) -> None:
        if not isinstance(exc, (UpstreamConnectError, UpstreamError)) and status < 500:
            state.consecutive_failures = 0
            state.failure_times = []
            return
        window_start = now - self.failure_window
        times = [t for t in state.failure_times if t > window_start]
        times.append(now)
        state.failure_times = times
        state.consecutive_failures = len(times)
        if len(times) < self.max_failed_attempts or state.ejected:
            return
        state.ejected = True
        state.last_ejection = now
        state.ejected_until = now + self.failure_window
        key = (service.name, state.url)
        self.metrics.outlier_ejections[key] = self.metrics.outlier_ejections.get(key, 0) + 1
        self.metrics.outlier_ejected[key] = 1
        log.warning(
            "service %s: server %s DOWN for %gs after %d failures within %gs (passiveHealthCheck)",
            service.name,
            state.url,
            self.failure_window,
            len(times),
            self.failure_window,
        )
        service.refresh()


def settings_from_config(raw: Any) -> OutlierSettings:
    """OutlierSettings from the decoded `outlierDetection` (None: the defaults). Raises
    ValueError naming the key of an out-of-range value."""
    if raw is None:
        return OutlierSettings()
    defaults = OutlierSettings()

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    settings = OutlierSettings(
        enabled=pick(raw.enabled, True),
        consecutive_failures=pick(raw.consecutive_failures, defaults.consecutive_failures),
        consecutive_gateway_failures=pick(
            raw.consecutive_gateway_failures, defaults.consecutive_gateway_failures
        ),
        consecutive_5xx=pick(raw.consecutive5xx, defaults.consecutive_5xx),
        base_ejection_time=float(pick(raw.base_ejection_time, defaults.base_ejection_time)),
        max_ejection_time=float(pick(raw.max_ejection_time, defaults.max_ejection_time)),
        max_ejection_percent=pick(raw.max_ejection_percent, defaults.max_ejection_percent),
    )
    if settings.consecutive_failures < 0:
        raise ValueError("consecutiveFailures must be >= 0")
    if settings.consecutive_gateway_failures < 0:
        raise ValueError("consecutiveGatewayFailures must be >= 0")
    if settings.consecutive_5xx < 0:
        raise ValueError("consecutive5xx must be >= 0")
    if settings.base_ejection_time <= 0:
        raise ValueError("baseEjectionTime must be > 0")
    if settings.max_ejection_time < settings.base_ejection_time:
        raise ValueError("maxEjectionTime must be >= baseEjectionTime")
    if not 0 <= settings.max_ejection_percent <= 100:
        raise ValueError("maxEjectionPercent must be within 0..100")
    return settings
