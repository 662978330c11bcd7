"""Prometheus metrics with Traefik's names and labels.

The hot path only bumps plain counters in dicts keyed by label tuples; prometheus-client renders
them at scrape time through a custom collector. Series of routers and services that left the
config are dropped on reload, as Traefik does.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

if TYPE_CHECKING:
    from meshproxy.http.exchange import Exchange

DEFAULT_BUCKETS = (0.1, 0.3, 1.2, 5.0)
_METHODS = {
    m: m
    for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "PRI")
}


_CODES = {code: str(code) for code in range(100, 600)}


def method_label(method: str) -> str:
    return _METHODS.get(method, "EXTENSION_METHOD")


def protocol_label(ex: Exchange) -> str:
    if ex.protocol:
        return ex.protocol
    ex.protocol = _protocol_label(ex)
    return ex.protocol


def _protocol_label(ex: Exchange) -> str:
    request = ex.request
    upgrade = request.upgrade
    if upgrade is not None and upgrade.lower() == b"websocket":
        return "websocket"
    for name, value in request.headers:
        if name == b"content-type" and value.startswith(b"application/grpc"):
            return "grpc-web" if value.startswith(b"application/grpc-web") else "grpc"
        if name == b"accept" and value.find(b"text/event-stream") >= 0:  # `in` costs more
            return "sse"
    return "http"


# OpenSSL's names of the TLS 1.2 suites Go offers, as Go (and so Traefik's tls_cipher) names
# them; TLS 1.3 suites have one name in both.
_GO_CIPHERS = {
    "ECDHE-ECDSA-AES128-GCM-SHA256": "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256": "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384": "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384": "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305": "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "ECDHE-RSA-CHACHA20-POLY1305": "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    "ECDHE-ECDSA-AES128-SHA": "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    "ECDHE-RSA-AES128-SHA": "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    "ECDHE-ECDSA-AES256-SHA": "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    "ECDHE-RSA-AES256-SHA": "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    "AES128-GCM-SHA256": "TLS_RSA_WITH_AES_128_GCM_SHA256",
    "AES256-GCM-SHA384": "TLS_RSA_WITH_AES_256_GCM_SHA384",
}


def tls_labels(ex: Exchange) -> tuple[str, str]:
    """(tls_version, tls_cipher) of the connection `ex` came on, as Traefik writes them
    ("1.3", "TLS_AES_128_GCM_SHA256"); ("", "") when it was not decrypted here. HTTP/1.1
    sinks hold their transport, HTTP/2 ones their connection's."""
    sink: Any = ex.sink
    transport = getattr(sink, "transport", None)
    if transport is None:
        transport = getattr(getattr(sink, "conn", None), "transport", None)
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return "", ""
    version = str(ssl_object.version() or "")
    cipher = ssl_object.cipher()
    name = str(cipher[0]) if cipher else ""
    return version.removeprefix("TLSv"), _GO_CIPHERS.get(name, name)


class _Histogram:
    """Per-bucket counts (not cumulative) plus one overflow slot past the last bound, so an
    observation is one bisect and one increment; and the body bytes of the same series
    (Traefik's `*_requests_bytes_total` / `*_responses_bytes_total`), so they cost no lookup."""

    __slots__ = ("buckets", "count", "request_bytes", "response_bytes", "sum")

    def __init__(self, size: int) -> None:
        self.buckets = [0] * (size + 1)
        self.count = 0
        self.sum = 0.0
        self.request_bytes = 0
        self.response_bytes = 0


def _by_label(table: dict[Any, _Histogram]) -> dict[tuple[str, ...], _Histogram]:
    """Series keyed by (status code, method, ...) as label values: the code as text, and
    methods outside the standard set merged into EXTENSION_METHOD, as Traefik does."""
    merged: dict[tuple[str, ...], _Histogram] = {}
    for (status, method, *rest), hist in table.items():
        key = (_CODES.get(status) or str(status), method_label(method), *rest)
        into = merged.get(key)
        if into is None:
            merged[key] = hist
            continue
        total = _Histogram(len(hist.buckets) - 1)
        total.count = into.count + hist.count
        total.sum = into.sum + hist.sum
        total.buckets = [a + b for a, b in zip(into.buckets, hist.buckets, strict=True)]
        total.request_bytes = into.request_bytes + hist.request_bytes
        total.response_bytes = into.response_bytes + hist.response_bytes
        merged[key] = total
    return merged


class UDPCounters:
    """One UDP entrypoint's counters: bumped by `meshproxy.l4.udp.UDPEntryPoint` (plain int
    additions on the datagram path), rendered at scrape time as `meshproxy_udp_*`. Traefik
    exports no UDP metrics, hence our own names. `closed` and `dropped` count by reason."""

    __slots__ = (
        "bytes_from_client",
        "bytes_from_server",
        "closed",
        "datagrams_from_client",
        "datagrams_from_server",
        "dropped",
        "opened",
        "sessions",
    )

    def __init__(self) -> None:
        self.sessions = 0  # open now
        self.opened = 0
        self.closed: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self.datagrams_from_client = 0
        self.bytes_from_client = 0
        self.datagrams_from_server = 0
        self.bytes_from_server = 0

    def session_closed(self, reason: str) -> None:
        self.sessions -= 1
        self.closed[reason] = self.closed.get(reason, 0) + 1

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


class TCPCounters:
    """One entrypoint's TCP-routed connections, counted when each ends (the byte pipe's
    `PipeStats`): rendered as `meshproxy_tcp_connections_total` and `meshproxy_tcp_bytes_total`.
    Traefik counts only open connections (`traefik_open_connections`), hence our names."""

    __slots__ = ("bytes_from_client", "bytes_from_server", "connections")

    def __init__(self) -> None:
        self.connections = 0
        self.bytes_from_client = 0
        self.bytes_from_server = 0

    def closed(self, stats: Any) -> None:
        """A relayed connection ended: `stats` is its meshproxy.l4.pipe.PipeStats."""
        self.connections += 1
        self.bytes_from_client += stats.bytes_from_downstream
        self.bytes_from_server += stats.bytes_from_upstream


class RequestMetrics:
    """Request counters and histograms per entrypoint, router and service, plus process gauges."""

    def __init__(
        self,
        buckets: Iterable[float] = DEFAULT_BUCKETS,
        *,
        entrypoint_labels: bool = True,
        router_labels: bool = False,
        service_labels: bool = True,
    ) -> None:
        self.bounds = tuple(sorted(buckets))
        self.entrypoint_labels = entrypoint_labels
        self.router_labels = router_labels
        self.service_labels = service_labels
        # (status, method, protocol, entrypoint / router+service / service) -> histogram
        self.entrypoint: dict[tuple[int, str, str, str], _Histogram] = {}
        self.router: dict[tuple[int, str, str, str, str], _Histogram] = {}
        self.service: dict[tuple[int, str, str, str], _Histogram] = {}
        # The series the last request went to, per table, and its labels: the next request
        # with the same labels (the usual case) finds it by four identity checks instead of
        # a key tuple built, hashed and looked up. `_forget_last` after any table is rebuilt.
        self._ep_hist: _Histogram | None = None
        self._ep_status = 0
        self._ep_method = ""
        self._ep_protocol = ""
        self._ep_name = ""
        self._svc_hist: _Histogram | None = None
        self._svc_status = 0
        self._svc_method = ""
        self._svc_protocol = ""
        self._svc_name = ""
        self.retries: dict[str, int] = {}
        # (tls version, cipher, entrypoint / router+service / service) -> requests
        self.tls_entrypoint: dict[tuple[str, str, str], int] = {}
        self.tls_router: dict[tuple[str, str, str, str], int] = {}
        self.tls_service: dict[tuple[str, str, str], int] = {}
        self.open_connections: dict[tuple[str, str], int] = {}
        # (entrypoint, status) -> requests refused or cut for their framing, before routing
        self.protocol_errors: dict[tuple[str, int], int] = {}
        self.server_up: dict[tuple[str, str], int] = {}
        # (service, server url) -> ejections by passive outlier detection (balancer.outlier)
        self.outlier_ejections: dict[tuple[str, str], int] = {}
        # (service, server url) -> 1 while ejected
        self.outlier_ejected: dict[tuple[str, str], int] = {}
        self.udp: dict[str, UDPCounters] = {}  # UDP entrypoint -> its counters
        self.tcp: dict[str, TCPCounters] = {}  # entrypoint -> its TCP-routed connections
        # (entrypoint, service, why code) -> exchanges the proxy failed or refused itself
        self.failures: dict[tuple[str, str, str], int] = {}
        # access log lines not written (file unwritable, disk full), see access_log.py
        self.access_log_errors = 0
        self.reloads_total = 0
        self.last_reload_success = 0.0
        self.reload_failures_total = 0
        self.registry = CollectorRegistry(auto_describe=False)
        # A collector by duck typing (collect()), not by subclassing prometheus' Collector: a
        # class compiled by mypyc (setup.py) must not inherit from a third-party class.
        self.registry.register(self)  # type: ignore[arg-type]

    # -- hot path -----------------------------------------------------------------------

    def _forget_last(self) -> None:
        """The series tables were rebuilt: the remembered series may be gone from them."""
        self._ep_hist = None
        self._svc_hist = None

    def _series(self, table: dict[Any, _Histogram], key: Any) -> _Histogram:
        hist = table.get(key)
        if hist is None:
            hist = table[key] = _Histogram(len(self.bounds))
        return hist

    # Series are keyed by the raw status code and method (llhttp accepts only its own list of
    # methods, so they are few); labels are made from them at scrape time, not per request.

    def record_request(self, ex: Exchange, status: int, seconds: float) -> None:
        """Once per request: entrypoint (and router) series."""
        method = ex.request.method
        protocol = ex.protocol or protocol_label(ex)
        index = bisect_left(self.bounds, seconds)  # first bound >= seconds
        if self.entrypoint_labels:
            name = ex.entrypoint
            hist = self._ep_hist
            if (
                hist is None
                or status != self._ep_status
                or method is not self._ep_method
                or protocol is not self._ep_protocol
                or name is not self._ep_name
            ):
                key = (status, method, protocol, name)
                hist = self.entrypoint.get(key) or self._series(self.entrypoint, key)
                self._ep_hist = hist
                self._ep_status, self._ep_method = status, method
                self._ep_protocol, self._ep_name = protocol, name
            hist.count += 1
            hist.sum += seconds
            hist.buckets[index] += 1
            hist.request_bytes += ex.request_bytes
            hist.response_bytes += ex.response_bytes
        if self.router_labels and ex.router:
            hist = self._series(self.router, (status, method, protocol, ex.router, ex.service))
            hist.count += 1
            hist.sum += seconds
            hist.buckets[index] += 1
            hist.request_bytes += ex.request_bytes
            hist.response_bytes += ex.response_bytes

    def record_service(self, service: str, ex: Exchange, status: int, seconds: float) -> None:
        """Once per attempt at a server."""
        if self.service_labels:
            method = ex.request.method
            protocol = ex.protocol or protocol_label(ex)
            hist = self._svc_hist
            if (
                hist is None
                or status != self._svc_status
                or method is not self._svc_method
                or protocol is not self._svc_protocol
                or service is not self._svc_name
            ):
                key = (status, method, protocol, service)
                hist = self.service.get(key) or self._series(self.service, key)
                self._svc_hist = hist
                self._svc_status, self._svc_method = status, method
                self._svc_protocol, self._svc_name = protocol, service
            hist.count += 1
            hist.sum += seconds
            hist.buckets[bisect_left(self.bounds, seconds)] += 1
            # the exchange's bytes so far: a try that was retried adds what it sent and got
            hist.request_bytes += ex.request_bytes
            hist.response_bytes += ex.response_bytes

    def record_tls(self, ex: Exchange) -> None:
        """Once per request decrypted here: `traefik_*_requests_tls_total` series (Traefik
        counts the entrypoint, router and service ones once per request, by TLS version and
        cipher suite)."""
        version, cipher = tls_labels(ex)
        if self.entrypoint_labels:
            key = (version, cipher, ex.entrypoint)
            self.tls_entrypoint[key] = self.tls_entrypoint.get(key, 0) + 1
        if self.router_labels and ex.router:
            rkey = (version, cipher, ex.router, ex.service)
            self.tls_router[rkey] = self.tls_router.get(rkey, 0) + 1
        if self.service_labels and ex.service:
            skey = (version, cipher, ex.service)
            self.tls_service[skey] = self.tls_service.get(skey, 0) + 1

    def record_failure(self, ex: Exchange) -> None:
        """An exchange with a "why" code (`ex.why`, see observability.access_log)."""
        key = (ex.entrypoint, ex.service, ex.why)
        self.failures[key] = self.failures.get(key, 0) + 1

    def add_retry(self, service: str) -> None:
        self.retries[service] = self.retries.get(service, 0) + 1

    def add_protocol_error(self, entrypoint: str, status: int) -> None:
        """A request refused for its head (400, 414, 431, 501, 505) or cut for its body (400,
        408): Traefik's Go server answers these before any handler, so they are not in
        `traefik_entrypoint_requests_total`; `meshproxy_http_protocol_errors_total` has them."""
        key = (entrypoint, status)
        self.protocol_errors[key] = self.protocol_errors.get(key, 0) + 1

    def connection_delta(self, entrypoint: str, protocol: str, delta: int) -> None:
        key = (entrypoint, protocol)
        self.open_connections[key] = self.open_connections.get(key, 0) + delta

    def udp_counters(self, entrypoint: str) -> UDPCounters:
        """The counters of one UDP entrypoint (made on first use, kept for the process)."""
        counters = self.udp.get(entrypoint)
        if counters is None:
            counters = self.udp[entrypoint] = UDPCounters()
        return counters

    def tcp_counters(self, entrypoint: str) -> TCPCounters:
        """The TCP-routed connection counters of one entrypoint (made on first use)."""
        counters = self.tcp.get(entrypoint)
        if counters is None:
            counters = self.tcp[entrypoint] = TCPCounters()
        return counters

    # -- reloads ------------------------------------------------------------------------

    def reload_succeeded(self, routers: set[str], services: set[str]) -> None:
        self.reloads_total += 1
        self.last_reload_success = time.time()
        self.router = {k: v for k, v in self.router.items() if k[3] in routers}
        self.service = {k: v for k, v in self.service.items() if k[3] in services}
        self._forget_last()
        self.retries = {k: v for k, v in self.retries.items() if k in services}
        self.tls_router = {k: v for k, v in self.tls_router.items() if k[2] in routers}
        self.tls_service = {k: v for k, v in self.tls_service.items() if k[2] in services}
        self.failures = {k: v for k, v in self.failures.items() if not k[1] or k[1] in services}
        self.server_up = {k: v for k, v in self.server_up.items() if k[0] in services}
        self.outlier_ejections = {
            k: v for k, v in self.outlier_ejections.items() if k[0] in services
        }
        self.outlier_ejected = {k: v for k, v in self.outlier_ejected.items() if k[0] in services}

    def reload_failed(self) -> None:
        self.reload_failures_total += 1

    # -- exposition ---------------------------------------------------------------------

    def _histogram(
        self, name: str, doc: str, labels: list[str], table: dict[Any, _Histogram]
    ) -> Iterator[Any]:
        scope = name.split("_")[1]
        counter = CounterMetricFamily(
            f"traefik_{scope}_requests",
            f"How many HTTP requests processed on a {scope}, "
            "partitioned by status code, protocol, and method.",
            labels=labels,
        )
        hist = HistogramMetricFamily(name, doc, labels=labels)
        request_bytes = CounterMetricFamily(
            f"traefik_{scope}_requests_bytes",
            f"The total size of requests in bytes handled by a {scope}, "
            "partitioned by status code, protocol, and method.",
            labels=labels,
        )
        response_bytes = CounterMetricFamily(
            f"traefik_{scope}_responses_bytes",
            f"The total size of responses in bytes handled by a {scope}, "
            "partitioned by status code, protocol, and method.",
            labels=labels,
        )
        for key, value in _by_label(table).items():
            cumulative = 0
            buckets = []
            for bound, count in zip(self.bounds, value.buckets, strict=False):
                cumulative += count
                buckets.append((repr(float(bound)), cumulative))
            buckets.append(("+Inf", value.count))
            hist.add_metric(list(key), buckets, value.sum)
            counter.add_metric(list(key), value.count)
            request_bytes.add_metric(list(key), value.request_bytes)
            response_bytes.add_metric(list(key), value.response_bytes)
        yield counter
        yield hist
        yield request_bytes
        yield response_bytes

    def _tls_family(self, scope: str, labels: list[str], table: dict[Any, int]) -> Iterator[Any]:
        family = CounterMetricFamily(
            f"traefik_{scope}_requests_tls",
            f"How many HTTP requests with TLS processed on a {scope}, "
            "partitioned by TLS version and TLS cipher.",
            labels=labels,
        )
        for key, count in table.items():
            family.add_metric(list(key), count)
        yield family

    def collect(self) -> Iterator[Any]:
        yield from self._histogram(
            "traefik_entrypoint_request_duration_seconds",
            "How long it took to process the request on an entrypoint, partitioned by status "
            "code, protocol, and method.",
            ["code", "method", "protocol", "entrypoint"],
            self.entrypoint,
        )
        if self.router_labels:
            yield from self._histogram(
                "traefik_router_request_duration_seconds",
                "How long it took to process the request on a router, partitioned by service, "
                "status code, protocol, and method.",
                ["code", "method", "protocol", "router", "service"],
                self.router,
            )
        yield from self._histogram(
            "traefik_service_request_duration_seconds",
            "How long it took to process the request on a service, partitioned by status code, "
            "protocol, and method.",
            ["code", "method", "protocol", "service"],
            self.service,
        )
        yield from self._tls_family(
            "entrypoint", ["tls_version", "tls_cipher", "entrypoint"], self.tls_entrypoint
        )
        if self.router_labels:
            yield from self._tls_family(
                "router", ["tls_version", "tls_cipher", "router", "service"], self.tls_router
            )
        yield from self._tls_family(
            "service", ["tls_version", "tls_cipher", "service"], self.tls_service
        )
        retries = CounterMetricFamily(
            "traefik_service_retries",
            "How many request retries happened on a service.",
            labels=["service"],
        )
        for service, count in self.retries.items():
            retries.add_metric([service], count)
        yield retries
        open_conns = GaugeMetricFamily(
            "traefik_open_connections",
            "How many open connections exist, by entryPoint and protocol",
            labels=["entrypoint", "protocol"],
        )
        for (entrypoint, protocol), count in self.open_connections.items():
            open_conns.add_metric([entrypoint, protocol], count)
        yield open_conns
        errors = CounterMetricFamily(
            "meshproxy_http_protocol_errors",
            "HTTP requests refused or cut by the entrypoint for their framing, by status code.",
            labels=["entrypoint", "code"],
        )
        for (entrypoint, status), count in self.protocol_errors.items():
            errors.add_metric([entrypoint, str(status)], count)
        yield errors
        failures = CounterMetricFamily(
            "meshproxy_exchange_failures",
            "Requests the proxy failed or refused itself, by why code (no_route, "
            "no_healthy_server, upstream_connect_failure, upstream_reset, timeout, "
            "rate_limited, breaker_open, denied, client_gone, internal_error).",
            labels=["entrypoint", "service", "why"],
        )
        for (entrypoint, service, why), count in self.failures.items():
            failures.add_metric([entrypoint, service, why], count)
        yield failures
        log_errors = CounterMetricFamily(
            "meshproxy_accesslog_write_errors",
            "Access log writes that failed (permission denied, disk full): lines lost.",
        )
        log_errors.add_metric([], self.access_log_errors)
        yield log_errors
        up = GaugeMetricFamily(
            "traefik_service_server_up",
            "service server is up, described by gauge value of 0 or 1.",
            labels=["service", "url"],
        )
        for (service, url), value in self.server_up.items():
            up.add_metric([service, url], value)
        yield up
        ejections = CounterMetricFamily(
            "meshproxy_outlier_ejections",
            "Servers taken out of a service by passive outlier detection.",
            labels=["service", "url"],
        )
        for (service, url), count in self.outlier_ejections.items():
            ejections.add_metric([service, url], count)
        yield ejections
        ejected = GaugeMetricFamily(
            "meshproxy_outlier_ejected",
            "1 while passive outlier detection keeps the server out of the service.",
            labels=["service", "url"],
        )
        for (service, url), value in self.outlier_ejected.items():
            ejected.add_metric([service, url], value)
        yield ejected
        yield from self._udp_families()
        yield from self._tcp_families()
        reloads = CounterMetricFamily("traefik_config_reloads", "Config reloads")
        reloads.add_metric([], self.reloads_total)
        yield reloads
        failures = CounterMetricFamily(
            "meshproxy_config_reload_failures",
            "Configurations refused (undecodable, or every router broken): the last good one "
            "kept serving.",
        )
        failures.add_metric([], self.reload_failures_total)
        yield failures
        last = GaugeMetricFamily("traefik_config_last_reload_success", "Last config reload success")
        last.add_metric([], self.last_reload_success)
        yield last

    def _tcp_families(self) -> Iterator[Any]:
        connections = CounterMetricFamily(
            "meshproxy_tcp_connections",
            "Connections relayed by TCP routers, counted when they end.",
            labels=["entrypoint"],
        )
        payload = CounterMetricFamily(
            "meshproxy_tcp_bytes",
            "Bytes relayed by TCP routers, by direction (from_client, from_server), counted "
            "when their connection ends.",
            labels=["entrypoint", "direction"],
        )
        for entrypoint, counters in self.tcp.items():
            connections.add_metric([entrypoint], counters.connections)
            payload.add_metric([entrypoint, "from_client"], counters.bytes_from_client)
            payload.add_metric([entrypoint, "from_server"], counters.bytes_from_server)
        yield connections
        yield payload

    def _udp_families(self) -> Iterator[Any]:
        labels = ["entrypoint"]
        sessions = GaugeMetricFamily(
            "meshproxy_udp_sessions", "Open UDP sessions (client addresses).", labels=labels
        )
        opened = CounterMetricFamily(
            "meshproxy_udp_sessions_opened", "UDP sessions opened.", labels=labels
        )
        closed = CounterMetricFamily(
            "meshproxy_udp_sessions_closed",
            "UDP sessions ended, by reason (idle, evicted_source, evicted_entrypoint, "
            "upstream_error, open_error, router_removed, shutdown).",
            labels=["entrypoint", "reason"],
        )
        datagrams = CounterMetricFamily(
            "meshproxy_udp_datagrams",
            "UDP datagrams relayed, by direction (from_client, from_server).",
            labels=["entrypoint", "direction"],
        )
        payload = CounterMetricFamily(
            "meshproxy_udp_bytes",
            "UDP payload bytes relayed, by direction (from_client, from_server).",
            labels=["entrypoint", "direction"],
        )
        dropped = CounterMetricFamily(
            "meshproxy_udp_datagrams_dropped",
            "UDP datagrams not relayed, by reason (no_route, no_server, pending_full, "
            "backpressure, send_error).",
            labels=["entrypoint", "reason"],
        )
        for entrypoint, counters in self.udp.items():
            sessions.add_metric([entrypoint], counters.sessions)
            opened.add_metric([entrypoint], counters.opened)
            for reason, count in counters.closed.items():
                closed.add_metric([entrypoint, reason], count)
            for reason, count in counters.dropped.items():
                dropped.add_metric([entrypoint, reason], count)
            datagrams.add_metric([entrypoint, "from_client"], counters.datagrams_from_client)
            datagrams.add_metric([entrypoint, "from_server"], counters.datagrams_from_server)
            payload.add_metric([entrypoint, "from_client"], counters.bytes_from_client)
            payload.add_metric([entrypoint, "from_server"], counters.bytes_from_server)
        yield sessions
        yield opened
        yield closed
        yield datagrams
        yield payload
        yield dropped

    def render(self) -> bytes:
        return generate_latest(self.registry)
