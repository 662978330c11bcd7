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
