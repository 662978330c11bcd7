"""The load balancers' choices, on explicit clocks and seeded random generators: smooth
weighted round robin, Traefik's p2c, peak-EWMA P2C (balancer.strategies); sticky cookies
(balancer.sticky); passive outlier detection (balancer.outlier); health-check config
validation and the gRPC health answer (balancer.health)."""

from __future__ import annotations

import heapq
import random
from collections import Counter
from typing import Any

import pytest

from meshproxy.balancer.health import (
    HealthCheckConfigError,
    grpc_serving_status,
    probe_url,
    spec_from_config,
)
from meshproxy.balancer.http_services import LoadBalancerService
from meshproxy.balancer.outlier import OutlierDetector, OutlierSettings, settings_from_config
from meshproxy.balancer.sticky import cookie_name, fnv_hash, set_cookie_line, sticky_value
from meshproxy.balancer.strategies import (
    PeakEWMA,
    PowerOfTwo,
    RoundRobin,
    ServerState,
    make_strategy,
)
from meshproxy.config.durations import Duration
from meshproxy.config.dynamic import Cookie, HealthCheck, OutlierDetection
from meshproxy.http.errors import UpstreamConnectError
from meshproxy.http.upstream import ServerTarget
from meshproxy.observability.metrics import RequestMetrics


def states(n: int) -> list[ServerState]:
    return [ServerState(f"http://10.0.0.{i}") for i in range(n)]


def simulate(strategy, latencies: list[float], requests: int = 3000, gap: float = 0.002):
    """Open-loop arrivals every `gap` seconds on a simulated clock; server i answers in
    latencies[i] seconds. Returns how many requests each server got."""
    clock = [0.0]
    if isinstance(strategy, PeakEWMA):
        strategy.clock = lambda: clock[0]
    pending: list[tuple[float, int]] = []
    counts = Counter()
    for n in range(requests):
        now = n * gap
        while pending and pending[0][0] <= now:
            at, index = heapq.heappop(pending)
            clock[0] = at
            state = strategy.states[index]
            state.in_flight -= 1
            state.observe(latencies[index], at)
        clock[0] = now
        index = strategy.pick()
        counts[index] += 1
        strategy.states[index].in_flight += 1
        heapq.heappush(pending, (now + latencies[index], index))
    return counts


def test_round_robin_is_smooth_and_exact():
    """Traefik `wrr` (smooth weighted round robin, wrr_test.go): weights 3:1 give exactly 3
    and 1 in every 4 picks, interleaved; one slow server still gets one third."""
    rr = RoundRobin(states(2), [3, 1])
    picks = [rr.pick() for _ in range(8)]
    assert picks == [0, 0, 1, 0, 0, 0, 1, 0]
    counts = simulate(RoundRobin(states(3), [1, 1, 1]), [0.100, 0.005, 0.005], 3000)
    assert counts == {0: 1000, 1: 1000, 2: 1000}


def test_p2c_prefers_fewer_in_flight_and_keeps_first_on_tie():
    """Traefik p2c (p2c.go nextServer): of two distinct random servers, the one with fewer
    in-flight requests; on a tie the first drawn."""
    s = states(2)
    p2c = PowerOfTwo(s, [1, 1], random.Random(1))
    s[0].in_flight = 5
    assert {p2c.pick() for _ in range(50)} == {1}
    s[0].in_flight = 0
    picks = Counter(p2c.pick() for _ in range(2000))
    assert 900 < picks[0] < 1100  # tie: the first drawn, itself uniform


def test_p2c_and_ewma_send_a_slow_server_little_traffic():
    """Issue 13: one slow and two fast servers: p2c and peak-EWMA send the slow one under 15%
    of the requests (in-flight requests pile up on it), round robin one third."""
    latencies = [0.100, 0.005, 0.005]
    p2c = simulate(PowerOfTwo(states(3), [1, 1, 1], random.Random(7)), latencies)
    ewma = simulate(PeakEWMA(states(3), [1, 1, 1], random.Random(7)), latencies)
    assert p2c[0] / 3000 < 0.15
    assert ewma[0] / 3000 < 0.15
    assert ewma[0] <= p2c[0]  # latency-aware does at least as well on latency


def test_ewma_sees_latency_that_in_flight_counts_miss():
    """Linkerd's peak EWMA vs Traefik's p2c at low load: with requests one at a time no
    server ever has a request in flight, so p2c spreads evenly while EWMA ranks by latency."""
    latencies = [0.050, 0.005, 0.005]
    p2c = simulate(PowerOfTwo(states(3), [1, 1, 1], random.Random(3)), latencies, 600, 0.2)
    ewma = simulate(PeakEWMA(states(3), [1, 1, 1], random.Random(3)), latencies, 600, 0.2)
    assert p2c[0] > 150  # about a third
    assert ewma[0] < 60


def test_ewma_estimate_peaks_decays_and_forgets():
    """PeakEwma: a slower sample replaces the estimate at once; faster ones pull it down with
    time constant `decay`; with no traffic the estimate decays toward zero."""
    state = ServerState("http://a")
    state.observe(0.010, 0.0)
    state.observe(0.200, 1.0)
    assert state.rtt == 0.200
    state.observe(0.010, 11.0)  # one decay period later: e^-1 of the old estimate remains
    assert state.rtt == pytest.approx(0.200 * 0.3679 + 0.010 * 0.6321, rel=1e-3)
    assert state.estimate(11.0 + 50.0) < 0.001


def test_weights_are_honoured_by_every_strategy():
    """All strategies honour weights (issue 13): with equal latency under load (about 25
    requests in flight), 3:1 weights give about 3:1; weight 0 never gets a request. (The
    load-aware strategies read a weight as capacity: load per unit of weight is compared.)"""
    for strategy in (
        RoundRobin(states(3), [3, 1, 0]),
        PowerOfTwo(states(3), [3, 1, 0], random.Random(5)),
        PeakEWMA(states(3), [3, 1, 0], random.Random(5)),
    ):
        counts = simulate(strategy, [0.05, 0.05, 0.05], 4000, 0.002)
        assert counts[2] == 0
        assert 2.6 < counts[0] / counts[1] < 3.4, (strategy.name, counts)


def test_down_servers_are_skipped_and_none_up_is_minus_one():
    """A server down (health check or ejection) leaves every strategy; none up: -1 (503)."""
    for name in ("wrr", "p2c", "ewma"):
        s = states(3)
        strategy = make_strategy(name, s, [1, 1, 1], random.Random(2))
        s[1].healthy = False
        s[2].ejected = True
        strategy.refresh()
        assert {strategy.pick() for _ in range(30)} == {0}
        s[0].healthy = False
        strategy.refresh()
        assert strategy.pick() == -1


def test_unknown_strategy_names_the_supported_ones():
    with pytest.raises(ValueError, match="supported: wrr, p2c, ewma"):
        make_strategy("leastconn", [], [])


def _service(strategy: str, n: int = 3, previous=None, outlier=None) -> LoadBalancerService:
    targets = [(ServerTarget(f"http://10.0.0.{i}", None, b""), 1) for i in range(n)]  # type: ignore[arg-type]
    old = {s.url: s for s in previous.states} if previous else {}
    kept = [old.get(t.url) or ServerState(t.url) for t, _ in targets]
    return LoadBalancerService(
        "svc@file", targets, True, RequestMetrics(), kept, strategy, None, outlier
    )


def test_state_survives_a_reload_for_unchanged_servers():
    """traefik/traefik#13913: after a reload the new p2c balancer must still see the
    in-flight requests started before it, and those requests must end on the same counter."""
    old = _service("p2c")
    old.states[0].in_flight = 40  # a server busy with long requests
    new = _service("p2c", previous=old)
    assert new.states[0] is old.states[0]
    picks = Counter(new.strategy.pick() for _ in range(300))
    assert picks[0] == 0
    old.states[0].in_flight -= 40  # the old snapshot's requests end
    assert new.states[0].in_flight == 0


def test_sticky_names_and_values_match_traefik():
    """Traefik's cookie.GetName and sticky.go: `_` + 5 hex of sha1("_TRAEFIK_BACKEND_" +
    service) as default name (reference: `whoami@http` -> `_e1315`), a configured name
    sanitised to the token set, value sha256(url)[:16] (`http://127.0.0.1:8080` ->
    `d30a576c03187167`), and Go's fnv.New64 for the legacy values."""
    assert cookie_name(None, "whoami@http") == "_e1315"
    assert cookie_name("my cookie/é", "x") == "my_cookie__"
    assert sticky_value("http://127.0.0.1:8080") == "d30a576c03187167"
    assert fnv_hash("") == "cbf29ce484222325"
    assert fnv_hash("a") == "af63bd4c8601b7be"  # FNV-1 64 of "a"


def test_set_cookie_attributes_as_go_writes_them():
    """Go's http.Cookie.String order: Path, Domain, Max-Age, HttpOnly, Secure, SameSite;
    maxAge < 0 -> Max-Age=0; path defaults to /."""
    line = set_cookie_line(
        "lb",
        "abc",
        Cookie(secure=True, http_only=True, same_site="lax", max_age=60, domain=".ex.test"),
    )
    assert line == b"lb=abc; Path=/; Domain=ex.test; Max-Age=60; HttpOnly; Secure; SameSite=Lax"
    assert set_cookie_line("lb", "v", Cookie(max_age=-1, path="/app")) == (
        b"lb=v; Path=/app; Max-Age=0"
    )


def test_outlier_detection_ejects_backs_off_and_caps():
    """Passive outlier detection (Envoy's consecutive errors): 5 gateway failures in a row
    eject; the ejection doubles on repeat; at most 50% of servers out; a 2xx resets."""
    metrics = RequestMetrics()
    detector = OutlierDetector(OutlierSettings(base_ejection_time=10.0), metrics)
    service = _service("wrr", 4, outlier=detector)
    a, b, c, _ = service.states
    refused = UpstreamConnectError("refused")
    for _ in range(4):
        detector.record(service, a, refused, 502, 0.0)
    detector.record(service, a, None, 200, 0.0)  # a success resets the count
    for _ in range(4):
        detector.record(service, a, refused, 502, 0.0)
    assert not a.ejected
    detector.record(service, a, refused, 502, 1.0)
    assert a.ejected and a.ejected_until == 11.0
    assert metrics.outlier_ejections[("svc@file", a.url)] == 1
    assert {service.strategy.pick() for _ in range(20)} == {1, 2, 3}
    for _ in range(5):
        detector.record(service, b, refused, 502, 1.0)
    assert b.ejected
    for _ in range(5):
        detector.record(service, c, refused, 502, 1.0)
    assert not c.ejected  # 2 of 4 out already: the 50% cap
    detector.sweep(service, 11.0)
    assert not a.ejected and not b.ejected
    for _ in range(5):
        detector.record(service, a, refused, 502, 12.0)
    assert a.ejected and a.ejected_until == 12.0 + 20.0  # second ejection: twice as long
    assert service.metrics.server_up[("svc@file", a.url)] == 0


def test_outlier_counts_5xx_only_when_configured_and_never_ejects_a_lone_server():
    """5xx answered by the server count only with consecutive5xx; a service of one server
    (50% of 1 rounds to 0) never loses it."""
    detector = OutlierDetector(OutlierSettings(), RequestMetrics())
    service = _service("wrr", 2, outlier=detector)
    for _ in range(20):
        detector.record(service, service.states[0], None, 500, 0.0)
    assert not service.states[0].ejected
    strict = OutlierDetector(OutlierSettings(consecutive_5xx=3), RequestMetrics())
    service = _service("wrr", 2, outlier=strict)
    for _ in range(3):
        strict.record(service, service.states[0], None, 503, 0.0)
    assert service.states[0].ejected
    lone = _service("wrr", 1, outlier=detector)
    for _ in range(20):
        detector.record(lone, lone.states[0], UpstreamConnectError("x"), 502, 0.0)
    assert not lone.states[0].ejected


def test_outlier_counts_failures_after_the_request_only_when_asked():
    """By default only connect failures count: a connection broken after the request was
    sent (UpstreamError) is the application's answer and neither counts nor resets the run
    of connect failures; with consecutiveGatewayFailures (Envoy's consecutive_gateway_failure)
    both kinds count toward it."""
    from meshproxy.http.errors import UpstreamError

    detector = OutlierDetector(OutlierSettings(), RequestMetrics())
    service = _service("wrr", 4, outlier=detector)
    a = service.states[0]
    for _ in range(50):
        detector.record(service, a, UpstreamError("reset"), 502, 0.0)
    assert not a.ejected and a.consecutive_failures == 0
    for _ in range(4):
        detector.record(service, a, UpstreamConnectError("refused"), 502, 0.0)
        detector.record(service, a, UpstreamError("reset"), 502, 0.0)
    assert not a.ejected and a.consecutive_failures == 4
    detector.record(service, a, UpstreamConnectError("refused"), 502, 0.0)
    assert a.ejected
    gateway = OutlierDetector(OutlierSettings(consecutive_gateway_failures=3), RequestMetrics())
    service = _service("wrr", 4, outlier=gateway)
    b = service.states[1]
    for _ in range(3):
        gateway.record(service, b, UpstreamError("reset"), 502, 0.0)
    assert b.ejected
    assert (
        settings_from_config(
            OutlierDetection(consecutive_gateway_failures=2)
        ).consecutive_gateway_failures
        == 2
    )


def test_outlier_settings_errors_name_the_key():
    with pytest.raises(ValueError, match="maxEjectionPercent"):
        settings_from_config(OutlierDetection(max_ejection_percent=150))
    with pytest.raises(ValueError, match="baseEjectionTime"):
        settings_from_config(OutlierDetection(base_ejection_time=Duration(0)))


def test_health_check_spec_validation_and_defaults():
    """Traefik's ServerHealthCheck: interval 30s, timeout 5s, unhealthyInterval = interval,
    non-positive durations fall back to the default with a warning; an unknown scheme or
    mode, or a path that is a URL, is a config error naming the key."""
    warnings: list[str] = []
    spec = spec_from_config(HealthCheck(path="/health", interval=Duration(2)), warnings)
    assert (spec.interval, spec.unhealthy_interval, spec.timeout) == (2.0, 2.0, 5.0)
    spec = spec_from_config(HealthCheck(timeout=Duration(-1)), warnings)
    assert spec.timeout == 5.0 and "timeout" in warnings[0]
    for bad, key in (
        (HealthCheck(scheme="ftp"), "scheme"),
        (HealthCheck(mode="tcp"), "mode"),
        (HealthCheck(path="http://evil/x"), "path"),
        (HealthCheck(port=70000), "port"),
        (HealthCheck(method="GE T"), "method"),
    ):
        with pytest.raises(HealthCheckConfigError, match=f"^{key}:"):
            spec_from_config(bad)


def test_probe_url_resolves_path_scheme_and_port():
    """Traefik's newRequest: path resolved against the server URL, then scheme and port."""
    spec = spec_from_config(HealthCheck(path="/health?x=1", scheme="h2c", port=9000))
    assert probe_url("http://10.0.0.1:8080/base", spec) == "h2c://10.0.0.1:9000/health?x=1"
    assert probe_url("http://[::1]:80", spec_from_config(HealthCheck(port=81))) == (
        "http://[::1]:81/"
    )


def test_probe_url_keeps_the_host_for_every_scheme():
    """Traefik's newRequest does `target.Parse(path)` (Go's RFC 3986 §5.2 resolution, any
    scheme): an `h2c://` server keeps its host and port (Python's urljoin would drop them:
    h2c is not in its uses_relative list); https, a query, a relative path, a `port`
    override and an `https` scheme override all resolve the same way."""

    def url(server: str, **check: Any) -> str:
        return probe_url(server, spec_from_config(HealthCheck(**check)))

    assert url("h2c://127.0.0.1:19080", path="/health") == "h2c://127.0.0.1:19080/health"
    assert url("h2c://127.0.0.1:19080") == "h2c://127.0.0.1:19080/"
    assert url("h2c://10.0.0.1:80/base/", path="ready?x=1") == "h2c://10.0.0.1:80/base/ready?x=1"
    assert url("h2c://10.0.0.1:80", path="/h", port=81) == "h2c://10.0.0.1:81/h"
    assert url("h2c://10.0.0.1:80", path="/h", scheme="http") == "http://10.0.0.1:80/h"
    assert url("https://[::1]:8443/x", path="/h?a=b&c") == "https://[::1]:8443/h?a=b&c"
    assert url("http://10.0.0.1", path="/h", scheme="https", port=8443) == (
        "https://10.0.0.1:8443/h"
    )
    assert url("http://u:p@10.0.0.1:80", path="/h") == "http://10.0.0.1:80/h"


def test_health_check_errors_are_all_reported_with_their_keys():
    """README: every config error with its JSON path. A check with several faults lists
    each (not only the first); a CR/LF in `hostname` or a header value is refused at load
    (Go's http.Client refuses such a field value, so Traefik's probe could not send it),
    the error naming the header key."""
    with pytest.raises(HealthCheckConfigError) as caught:
        spec_from_config(HealthCheck(scheme="ftp", status=999, port=70000))
    assert [e.split(":")[0] for e in caught.value.errors] == ["scheme", "port", "status"]
    with pytest.raises(HealthCheckConfigError) as caught:
        spec_from_config(
            HealthCheck(
                hostname="h\r\nInjected: 2",
                headers={"X-A": "a\nb", "X-List": [1], "Bad Name": "v"},
            )
        )
    assert [e.split(": ")[0] for e in caught.value.errors] == [
        "hostname",
        "headers.X-A",
        "headers.X-List",
        "headers.Bad Name",
    ]


def test_health_check_header_scalars_are_taken_as_text():
    """Traefik 3.7 reads healthCheck.headers as map[string]string: YAML `X-Id: 1` and
    `X-On: true` are the strings "1" and "true" (checked with the binary: `X-Num: 5` shows
    as `"X-Num": "5"` in its API); meshproxy used to refuse the whole payload."""
    from meshproxy.config.decode import load_text
    from meshproxy.config.dynamic import decode_dynamic_obj

    text = """
http:
  services:
    s:
      loadBalancer:
        servers: [{url: "http://127.0.0.1:1"}]
        healthCheck: {path: /h, headers: {X-Id: 1, X-On: true, X-F: 1.5, X-S: "s"}}
"""
    decoded = decode_dynamic_obj(load_text(text))
    spec = spec_from_config(decoded.http.services["s"].load_balancer.health_check)
    assert dict(spec.headers) == {"X-Id": "1", "X-On": "true", "X-F": "1.5", "X-S": "s"}


async def test_a_checker_survives_an_unexpected_error_in_a_probe():
    """Issue 13: bad input is counted as unhealthy. An exception no probe foresaw (here
    urllib's ValueError for a port out of range, raised while building the probe) is a
    failed probe: the server goes DOWN with the error as lastError and probing goes on."""
    from meshproxy.balancer.health import HealthChecker
    from meshproxy.http.upstream import TransportSettings
    from tests.helpers import wait_for

    spec = spec_from_config(HealthCheck(path="/h", interval=Duration(0.02)))
    checker = HealthChecker("http://127.0.0.1:99999", spec, TransportSettings())
    checker.start()
    try:
        await wait_for(lambda: checker.probes >= 3, 5, "probes go on after an error")
        assert not checker.healthy
        assert "ValueError" in checker.last_error
        assert checker.task is not None and not checker.task.done()
    finally:
        checker.stop()


def test_probes_dial_where_the_data_path_dials():
    """Under `meshproxy local` mesh names resolve to the local proxy's entrypoint
    (meshproxy.upstream_address): a probe dials there and keeps the name as its Host field,
    unless `hostname` set one."""
    from meshproxy.balancer.health import dialled
    from meshproxy.upstream_address import set_resolver

    set_resolver(lambda host, port: ("127.0.0.1", 5000) if host.endswith(".mesh") else None)
    try:
        assert dialled("http://svc.ns.traefik.mesh/ready", {}) == (
            "http://127.0.0.1:5000/ready",
            {"Host": "svc.ns.traefik.mesh"},
        )
        assert dialled("http://svc.ns.traefik.mesh/r", {"Host": "x"})[1] == {"Host": "x"}
        assert dialled("http://10.0.0.1:8080/r", {}) == ("http://10.0.0.1:8080/r", {})
    finally:
        set_resolver(None)


def test_grpc_health_answer_is_parsed():
    """grpc.health.v1.HealthCheckResponse: field 1 varint, SERVING = 1; absent = UNKNOWN."""
    assert grpc_serving_status(b"\x08\x01") == 1
    assert grpc_serving_status(b"\x08\x02") == 2
    assert grpc_serving_status(b"") == 0
    assert grpc_serving_status(b"\x12\x02hi\x08\x01") == 1  # an unknown field skipped


def test_controller_annotations_add_health_checks_and_strategy():
    """docs/load-balancing.md: Traefik Mesh has no health-check annotation, so meshproxy's
    controller reads its own namespace: `meshproxy.io/health-check-path` (and -interval,
    -timeout) and `meshproxy.io/load-balancer-strategy` land on the service's loadBalancers;
    the output decodes as a dynamic config; a bad value skips only that service."""
    from meshproxy.config.dynamic import decode_dynamic_obj
    from tests.unit.test_controller_bad_input import build, endpoints, pod, svc

    notes = {
        "meshproxy.io/health-check-path": "/ready",
        "meshproxy.io/health-check-interval": "5s",
        "meshproxy.io/load-balancer-strategy": "ewma",
    }
    topology, config, _ = build(
        [
            svc("api", **notes),
            pod("api-1", "10.1.0.1"),
            endpoints("api", "api-1"),
            svc("bad", **{"meshproxy.io/health-check-path": "ready"}),
            svc("plain"),
        ]
    )
    lb = config["http"]["services"]["ns-api-80"]["loadBalancer"]
    assert lb["healthCheck"] == {"path": "/ready", "interval": "5s"}
    assert lb["strategy"] == "ewma"
    assert "healthCheck" not in config["http"]["services"]["ns-plain-80"]["loadBalancer"]
    assert "must start with /" in topology.services["bad@ns"].errors[0]
    assert "ns-bad-80" not in config["http"]["routers"]
    decoded = decode_dynamic_obj(config)
    assert decoded.http.services["ns-api-80"].load_balancer.health_check.path == "/ready"


def test_controller_h2c_service_with_health_check_path_probes_its_pods():
    """Traefik Mesh's `mesh.traefik.io/scheme: h2c` makes the controller write the pods as
    `h2c://ip:port`; with `meshproxy.io/health-check-path` each probe must still go to the
    pod (fresh tester F4: the URL lost its host and every pod went DOWN)."""
    from meshproxy.config.dynamic import decode_dynamic_obj
    from tests.unit.test_controller_bad_input import build, endpoints, pod, svc

    notes = {"mesh.traefik.io/scheme": "h2c", "meshproxy.io/health-check-path": "/ready"}
    _, config, _ = build([svc("api", **notes), pod("api-1", "10.1.0.1"), endpoints("api", "api-1")])
    lb = decode_dynamic_obj(config).http.services["ns-api-80"].load_balancer
    server = lb.servers[0].url
    assert server.startswith("h2c://10.1.0.1:")
    assert probe_url(server, spec_from_config(lb.health_check)) == server + "/ready"


def test_traefik_passive_health_check_window():
    """Traefik 3.6 passiveHealthCheck: a try fails when the server was not reached or answered
    >= 500; `maxFailedAttempts` failures within `failureWindow` take it down for the window
    (no share cap, as Traefik); any other answer clears its failures."""
    from meshproxy.balancer.outlier import TraefikPassive

    passive = TraefikPassive(10.0, 2, RequestMetrics())
    service = _service("wrr", 2, outlier=passive)
    a, b = service.states
    passive.record(service, a, None, 500, 0.0)
    passive.record(service, a, None, 200, 1.0)  # cleared
    passive.record(service, a, None, 502, 2.0)
    assert not a.ejected
    passive.record(service, a, None, 503, 13.0)  # the first is out of the window
    assert not a.ejected
    passive.record(service, a, UpstreamConnectError("refused"), 502, 14.0)
    assert a.ejected and a.ejected_until == 24.0
    for now in (15.0, 16.0):
        passive.record(service, b, None, 500, now)
    assert b.ejected and service.strategy.pick() == -1  # every server down: 503
    passive.sweep(service, 24.0)
    assert not a.ejected and b.ejected
