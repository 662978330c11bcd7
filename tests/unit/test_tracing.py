"""observability.tracing with the SDK's in-memory exporter, or an exporter that blocks."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from meshproxy.http.errors import UpstreamConnectError
from meshproxy.http.exchange import Exchange, NullSink
from meshproxy.http.request import Request
from meshproxy.observability.tracing import Tracing, TracingSettings, redact_query

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def exchange(headers: list[tuple[bytes, bytes]]) -> Exchange:
    request = Request(
        "GET", b"/a?b=1", [(b"host", b"svc:8080"), *headers], b"svc:8080", "10.0.0.1", 4
    )
    return Exchange(NullSink(), request, "web", 0.0, False)


class Blocking(SpanExporter):
    """Holds the SDK's worker in its first export until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait(10)
        return SpanExportResult.SUCCESS


class Failing(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.FAILURE


def test_a_try_is_a_child_client_span_and_its_context_replaces_the_clients_traceparent():
    """W3C Trace Context §3.2: the proxy forwards its own span as the parent (`parent-id`),
    same trace id; the request's own traceparent is replaced, not duplicated."""
    memory = InMemorySpanExporter()
    tracing = Tracing(TracingSettings(schedule_delay_ms=10), exporter=memory)
    ex = exchange([(b"traceparent", TRACEPARENT.encode())])
    tracing.start_server(ex)
    ex.service = "s@file"
    attempt = ex.span.attempt(ex, "http://10.0.0.2:80", b"10.0.0.2:80")
    sent = [v for n, v in ex.request.headers if n == b"traceparent"]
    attempt.end(ex, 502, UpstreamConnectError("refused"))
    ex.span.end(ex, 502)
    tracing.provider.force_flush()
    client, server = memory.get_finished_spans()
    assert server.kind is SpanKind.SERVER and client.kind is SpanKind.CLIENT
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert sent == [f"00-{TRACE_ID}-{client.context.span_id:016x}-01".encode()]
    assert client.attributes is not None and client.attributes["error.type"]
    assert client.attributes["server.address"] == "10.0.0.2"
    assert server.attributes is not None and server.attributes["server.port"] == 8080
    assert server.attributes["http.response.status_code"] == 502
    tracing.shutdown()


def test_spans_beyond_the_bounded_queue_are_dropped_and_counted():
    """BatchSpanProcessor's queue is bounded (OTEL_BSP_MAX_QUEUE_SIZE): with the exporter
    stuck, ending a span never waits; the ones that do not fit are counted as queue_full."""
    blocking = Blocking()
    tracing = Tracing(
        TracingSettings(queue_size=4, batch_size=1, schedule_delay_ms=1), exporter=blocking
    )
    tracing.tracer.start_span("first").end()
    assert blocking.entered.wait(10)  # the worker holds "first" in its export
    for _ in range(10):
        tracing.tracer.start_span("more").end()
    assert tracing.dropped() == {"queue_full": 6, "export_failed": 0}
    blocking.release.set()
    tracing.shutdown()


def test_spans_of_a_failed_export_are_counted():
    """A collector that refuses a batch (an OTLP failure) loses its spans: export_failed."""
    tracing = Tracing(TracingSettings(schedule_delay_ms=1), exporter=Failing())
    for _ in range(3):
        tracing.tracer.start_span("s").end()
    tracing.provider.force_flush()
    assert tracing.dropped()["export_failed"] == 3
    tracing.shutdown()


def test_an_unsampled_parent_is_followed_and_still_propagated_without_recording():
    """ParentBased sampling (Traefik's): a parent whose sampled flag is clear (W3C Trace
    Context §3.2.2.5) makes a span that records nothing; the request sent upstream carries
    the same trace id with the flag still clear, so the services behind agree."""
    memory = InMemorySpanExporter()
    tracing = Tracing(TracingSettings(schedule_delay_ms=10), exporter=memory)
    ex = exchange([(b"traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-00".encode())])
    tracing.start_server(ex)
    attempt = ex.span.attempt(ex, "http://10.0.0.2:80", b"10.0.0.2:80")
    (sent,) = [v.decode() for n, v in ex.request.headers if n == b"traceparent"]
    attempt.end(ex, 200, None)
    ex.span.end(ex, 200)
    tracing.provider.force_flush()
    version, trace_id, span_id, flags = sent.split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "00")
    assert span_id != "00f067aa0ba902b7"
    assert memory.get_finished_spans() == ()
    tracing.shutdown()


def test_query_redaction_follows_go_url_values_encode_as_traefik_exports_it():
    """Traefik 3.7 `safeURL` (pkg/observability/tracing): every value becomes `REDACTED`
    unless its name is in `safeQueryParams` (case-sensitive), re-encoded by Go's
    `url.Values.Encode` (sorted names, QueryEscape: space as `+`). The expected strings are
    what the real `traefik` 3.7 binary exported for these queries (OTLP, 2026-11-30; the
    integration test re-checks them against the binary when it is installed)."""
    safe = frozenset({"safe", "Keep"})
    assert redact_query("q=1", safe) == "q=REDACTED"
    assert redact_query("b=2&a=1&a=3&safe=x%20y&safe=z", safe) == (
        "a=REDACTED&b=REDACTED&safe=x+y&safe=z"
    )
    assert redact_query("flag", safe) == "flag=REDACTED"
    assert redact_query("a=%20b&", safe) == "a=REDACTED"
    assert redact_query("x=1;y=2", safe) == "x=REDACTED&y=REDACTED"
    assert redact_query("keep=v&Keep=w", safe) == "Keep=w&keep=REDACTED"
    assert redact_query("k=a+b&safe=a+b%2B", safe) == "k=REDACTED&safe=a+b%2B"
    assert redact_query("=v", safe) == "=REDACTED"
    assert redact_query("%C3%A9=1", safe) == "%C3%A9=REDACTED"
    assert redact_query("\u00c3\u00a9=1", safe) == "%C3%A9=REDACTED"  # raw UTF-8, as latin-1
    assert redact_query("", safe) == ""


def test_client_span_url_full_redacts_query_and_server_user_info():
    """Traefik 3.7 `safeURL`: the try's `url.full` has its query redacted and the server
    URL's user info replaced by `REDACTED:REDACTED`; a safe parameter keeps its value."""
    memory = InMemorySpanExporter()
    settings = TracingSettings(schedule_delay_ms=10, safe_query_params=frozenset({"page"}))
    tracing = Tracing(settings, exporter=memory)
    ex = exchange([])
    ex.request.target = b"/a?token=s3cr3t&page=2"
    tracing.start_server(ex)
    attempt = ex.span.attempt(ex, "http://user:pw@10.0.0.2:80/", b"10.0.0.2:80")
    attempt.end(ex, 200, None)
    ex.span.end(ex, 200)
    tracing.provider.force_flush()
    client, server = memory.get_finished_spans()
    assert client.attributes is not None and server.attributes is not None
    assert client.attributes["url.full"] == (
        "http://REDACTED:REDACTED@10.0.0.2:80/a?page=2&token=REDACTED"
    )
    assert server.attributes["url.query"] == "b=REDACTED"  # the request's own query
    tracing.shutdown()


def test_safe_query_params_flag_is_honoured_without_a_warning():
    """Traefik's `--tracing.safeQueryParams=a,b` (static option, a list): accepted without
    the old "not implemented" warning and carried to the tracer's settings."""
    from meshproxy.config.static import build_static
    from meshproxy.observability.tracing import settings_from_static

    config, warnings = build_static(
        None,
        [
            "--tracing.otlp.http.endpoint=http://127.0.0.1:9/v1/traces",
            "--tracing.safeQueryParams=page,Sort",
        ],
    )
    assert not [w for w in warnings if "safeQueryParams" in w]
    assert config.tracing is not None
    settings = settings_from_static(config.tracing)
    assert settings.safe_query_params == frozenset({"page", "Sort"})
