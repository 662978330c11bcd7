"""Request metrics: Traefik's names and labels, whatever the per-request bookkeeping."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meshproxy.http.exchange import Exchange, NullSink
from meshproxy.http.request import Request
from meshproxy.observability.metrics import RequestMetrics


def exchange(method: str) -> Exchange:
    request = Request(method, b"/", [(b"host", b"svc")], b"svc", "10.0.0.1", 40000)
    return Exchange(NullSink(), request, "web", 0.0, False)


def samples(metrics: RequestMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_series_get_traefik_labels_and_unusual_methods_merge_into_extension_method():
    metrics = RequestMetrics(buckets=(0.1, 1.0))
    metrics.record_request(exchange("GET"), 200, 0.05)
    metrics.record_request(exchange("GET"), 200, 0.5)
    metrics.record_request(exchange("PROPFIND"), 207, 2.0)
    metrics.record_request(exchange("MKCOL"), 207, 0.05)
    metrics.record_service("app@file", exchange("GET"), 502, 0.05)
    got = samples(metrics)
    get = {"code": "200", "entrypoint": "web", "method": "GET", "protocol": "http"}
    other = {**get, "code": "207", "method": "EXTENSION_METHOD"}

    def value(name: str, labels: dict[str, str]) -> float:
        return got[(name, frozenset(labels.items()))]

    assert value("traefik_entrypoint_requests_total", get) == 2
    assert value("traefik_entrypoint_requests_total", other) == 2
    bucket = "traefik_entrypoint_request_duration_seconds_bucket"
    assert value(bucket, {**other, "le": "0.1"}) == 1
    assert value(bucket, {**other, "le": "1.0"}) == 1
    assert value(bucket, {**other, "le": "+Inf"}) == 2
    assert value("traefik_entrypoint_request_duration_seconds_sum", other) == 2.05
    service = {"code": "502", "method": "GET", "protocol": "http", "service": "app@file"}
    assert value("traefik_service_requests_total", service) == 1


def test_body_bytes_counted_per_series_as_traefik_names_them():
    """Traefik's `traefik_{entrypoint,router,service}_{requests,responses}_bytes_total`
    (pkg/middlewares/metrics): body bytes read from the client and written to it, with the
    labels of the request counter."""
    metrics = RequestMetrics(router_labels=True)
    ex = exchange("POST")
    ex.router, ex.service = "r@file", "app@file"
    ex.on_request_body(b"x" * 10)
    ex.on_request_body(b"y" * 5)
    ex.respond(201, b"created")
    metrics.record_service("app@file", ex, 201, 0.01)
    metrics.record_request(ex, 201, 0.01)
    metrics.record_request(ex, 201, 0.01)
    got = samples(metrics)
    labels = {"code": "201", "method": "POST", "protocol": "http"}
    ep = frozenset({**labels, "entrypoint": "web"}.items())
    assert got[("traefik_entrypoint_requests_bytes_total", ep)] == 30
    assert got[("traefik_entrypoint_responses_bytes_total", ep)] == 14
    router = frozenset({**labels, "router": "r@file", "service": "app@file"}.items())
    assert got[("traefik_router_requests_bytes_total", router)] == 30
    service = frozenset({**labels, "service": "app@file"}.items())
    assert got[("traefik_service_responses_bytes_total", service)] == 7


def test_certificate_expiry_labels_as_traefik(tmp_path):
    """`traefik_tls_certs_not_after{cn,serial,sans}` (Traefik's tls certificate store):
    the leaf's subject CN, its serial number in decimal, its DNS SANs comma-joined, and the
    notAfter time in Unix seconds."""
    import datetime

    import trustme
    from cryptography import x509

    from meshproxy.observability.runtime_metrics import certificate_labels

    ca = trustme.CA()
    cert = ca.issue_cert("a.example.test", "b.example.test", common_name="a.example.test")
    chain = cert.cert_chain_pems[0].bytes()
    leaf = x509.load_pem_x509_certificate(chain)
    (cn, serial, sans), not_after = certificate_labels(chain)
    assert cn == "a.example.test"
    assert serial == str(leaf.serial_number)
    assert sans == "a.example.test,b.example.test"
    assert not_after == leaf.not_valid_after_utc.replace(tzinfo=datetime.UTC).timestamp()


def test_router_series_are_opt_in_as_traefik_add_routers_labels():
    """Traefik's `--metrics.prometheus.addRoutersLabels` is false by default: no
    traefik_router_* family at all until it is set (reference/traefik-proxy.md §6.1)."""
    ex = exchange("GET")
    ex.router, ex.service = "r@file", "app@file"
    off, on = RequestMetrics(), RequestMetrics(router_labels=True)
    for metrics in (off, on):
        metrics.record_request(ex, 200, 0.01)
    assert not any(name.startswith("traefik_router_") for name, _ in samples(off))
    router = frozenset(
        {"code": "200", "method": "GET", "protocol": "http", "router": "r@file"}.items()
        | {("service", "app@file")}
    )
    assert samples(on)[("traefik_router_requests_total", router)] == 1


def test_each_request_lands_in_its_own_series_whatever_came_before():
    """Traefik's request counters are one series per label set (code, method, protocol,
    entrypoint / service): requests alternating between label sets, services and entrypoints
    each count in their own series, and a reload that drops a service starts its series anew
    if it comes back (the proxy remembers the last series used; it must never reuse it for
    other labels or after the tables are rebuilt)."""
    metrics = RequestMetrics(buckets=(1.0,))
    plan = [
        ("GET", 200, "web", "a@file"),
        ("GET", 200, "web", "a@file"),
        ("GET", 404, "web", "a@file"),
        ("POST", 200, "web", "a@file"),
        ("GET", 200, "websecure", "b@file"),
        ("GET", 200, "web", "a@file"),
    ]
    for method, status, entrypoint, service in plan:
        ex = exchange(method)
        ex.entrypoint = "".join(entrypoint)  # a str object of its own, as from another config
        metrics.record_request(ex, status, 0.01)
        metrics.record_service("".join(service), ex, status, 0.01)
    got = samples(metrics)

    def count(kind: str, labels: dict[str, str]) -> float:
        return got.get((f"traefik_{kind}_requests_total", frozenset(labels.items())), 0)

    base = {"protocol": "http"}
    assert count("entrypoint", {**base, "code": "200", "method": "GET", "entrypoint": "web"}) == 3
    assert count("entrypoint", {**base, "code": "404", "method": "GET", "entrypoint": "web"}) == 1
    assert count("entrypoint", {**base, "code": "200", "method": "POST", "entrypoint": "web"}) == 1
    assert (
        count("entrypoint", {**base, "code": "200", "method": "GET", "entrypoint": "websecure"})
        == 1
    )
    assert count("service", {**base, "code": "200", "method": "GET", "service": "a@file"}) == 3
    assert count("service", {**base, "code": "200", "method": "GET", "service": "b@file"}) == 1
    metrics.reload_succeeded({"r"}, {"b@file"})  # a@file is gone: its series too
    metrics.record_service("a@file", exchange("GET"), 200, 0.01)  # it came back
    got = samples(metrics)
    assert count("service", {**base, "code": "200", "method": "GET", "service": "a@file"}) == 1
