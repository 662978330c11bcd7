"""Metrics read from the live state at scrape time, never counted on the request path.

- `traefik_tls_certs_not_after{cn,serial,sans}`: the expiry (Unix seconds) of each certificate
  of the live config's TLS store, as Traefik's `tls.certs_not_after` gauge
  (pkg/tls/certificate_store.go: CN of the subject, serial number in decimal, DNS SANs
  joined by commas).
- `meshproxy_circuit_breaker_state{router,middleware,state}`: 1 for the state each
  circuitBreaker instance is in (standby, tripped, recovering), 0 for the two others: a
  Prometheus "state set", so `== 1` selects and alerts need no magic numbers. With workers,
  the node's state read from shared memory at scrape time.
- `meshproxy_retry_budget_remaining{router,middleware}`: retries a retry middleware with a
  `budget` may still make in its current window (its floor or ratio, minus retries made).
- `meshproxy_upstream_pool_connections{scheme,address,state}`: per upstream origin, the
  connections idle in the pool and the ones serving an exchange (HTTP/2: streams in flight).

Rate-limited requests are `meshproxy_exchange_failures_total{why="rate_limited"}` (metrics.py,
counted where the rateLimit middleware refuses them).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from time import monotonic
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from prometheus_client.core import GaugeMetricFamily

from meshproxy.middlewares.circuit_breaker import RECOVERING, STANDBY, TRIPPED, BreakerState
from meshproxy.middlewares.retry import RetryBudgetState

_BREAKER_STATES = (STANDBY, TRIPPED, RECOVERING)  # in the order of the shared state numbers


def certificate_labels(chain: bytes) -> tuple[tuple[str, str, str], float]:
    """((cn, serial, sans), not-after in Unix seconds) of the leaf of a PEM chain."""
    leaf = x509.load_pem_x509_certificate(chain)
    names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else ""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        sans = ",".join(san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        sans = ""
    expiry = leaf.not_valid_after_utc.replace(tzinfo=datetime.UTC).timestamp()
    return (cn, str(leaf.serial_number), sans), expiry


class RuntimeCollector:
    """A prometheus collector (by duck typing) over the live snapshot and runtime state:
    `snapshot()` gives the RuntimeSnapshot, `state` is the RuntimeState."""

    def __init__(self, snapshot: Callable[[], Any], state: Any) -> None:
        self.snapshot = snapshot
        self.state = state
        self._parsed: dict[bytes, tuple[tuple[str, str, str], float]] = {}

    def collect(self) -> Iterator[Any]:
        yield self._certificates()
        yield from self._middlewares()
        yield self._pools()

    def _certificates(self) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "traefik_tls_certs_not_after",
            "Certificate expiration timestamp",
            labels=["cn", "serial", "sans"],
        )
        seen: set[tuple[str, str, str]] = set()
        parsed: dict[bytes, tuple[tuple[str, str, str], float]] = {}
        for table in self.snapshot().l4_tables.values():
            store = getattr(table, "store", None)
            if store is None:
                continue
            for cert in store.certificates:
                entry = self._parsed.get(cert.chain) or certificate_labels(cert.chain)
                parsed[cert.chain] = entry
                if entry[0] not in seen:
                    seen.add(entry[0])
                    family.add_metric(list(entry[0]), entry[1])
        self._parsed = parsed  # certificates gone from the config are forgotten
        return family

    def _middlewares(self) -> Iterator[Any]:
        breakers = GaugeMetricFamily(
            "meshproxy_circuit_breaker_state",
            "1 for the state a circuitBreaker middleware is in (standby: closed, tripped: "
            "open, recovering: half-open), 0 for the others.",
            labels=["router", "middleware", "state"],
        )
        budgets = GaugeMetricFamily(
            "meshproxy_retry_budget_remaining",
            "Retries a retry middleware's budget still allows in its current window.",
            labels=["router", "middleware"],
        )
        now = monotonic()
        for (router, middleware), (_, obj) in sorted(self.state.middlewares.objects.items()):
            if isinstance(obj, BreakerState):
                current = obj.state
                cell = getattr(obj, "cell", None)
                if cell is not None:
                    # With workers the state is the node's (shared memory): read it now, not
                    # this worker's view as of its last request through the breaker, so every
                    # worker reports the same one and the supervisor's merge stays one-hot.
                    current = _BREAKER_STATES[int(cell.phase(now, obj.recovery)[0])]
                for state in _BREAKER_STATES:
                    value = 1.0 if current == state else 0.0
                    breakers.add_metric([router, middleware, state], value)
            elif isinstance(obj, RetryBudgetState):
                budgets.add_metric([router, middleware], budget_remaining(obj, now))
        yield breakers
        yield budgets

    def _pools(self) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "meshproxy_upstream_pool_connections",
            "Upstream connections per server origin: idle in the pool, or busy serving an "
            "exchange (HTTP/2: streams in flight on the pool's connections).",
            labels=["scheme", "address", "state"],
        )
        for (scheme, host, port, _), pool in sorted(
            self.state.pools.items(), key=lambda item: item[0][:3]
        ):
            address = f"{host}:{port}"
            idle: Any = getattr(pool, "idle", None)
            if idle is None:  # HTTP/2: open connections, each multiplexing streams
                idle = getattr(pool, "connections", ())
            family.add_metric([scheme, address, "idle"], len(idle))
            family.add_metric([scheme, address, "busy"], len(pool.busy))
        return family


def budget_remaining(budget: RetryBudgetState, now: float) -> float:
    """Retries `budget` allows now: the larger of its floor and ratio times requests, minus the
    retries already made, over its rolling window (middlewares.retry.RetryBudgetState)."""
    requests, retries = budget._totals(now)
    return max(0.0, max(budget.floor, budget.ratio * requests) - retries)
