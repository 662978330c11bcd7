"""OpenTelemetry tracing: a server span per request, a client span per upstream attempt.

What Traefik v3 does (pkg/observability/tracing, pkg/middlewares/observability), with the
OpenTelemetry SDK rather than anything hand-written:

- The parent context is extracted from the request's fields by the global text-map
  propagator, which the SDK builds from `OTEL_PROPAGATORS` (default `tracecontext,baggage`,
  as Traefik's autoprop; `b3`, `b3multi` come with opentelemetry-propagator-b3).
- The server span (kind SERVER, named after the method, as Traefik) starts when the exchange
  reaches the entrypoint's dispatcher and ends when dispatch's `finish` runs; it carries the
  HTTP semantic-convention attributes (`http.request.method`, `url.path`, `url.scheme`,
  `server.address`, `network.peer.address`, `http.response.status_code`, ...), Traefik's
  `entry_point`, `traefik.router.name`, `traefik.service.name`, the router's middlewares and,
  when the proxy itself failed or refused the exchange, the "why" code (`meshproxy.why`, and
  `error.type` as the conventions name a failure's class).
- Each try at a server is a client span (kind CLIENT, named `ReverseProxy` as Traefik's),
  child of the server span: retries are sibling spans, the n-th retry carrying
  `http.request.resend_count = n`, each failed try its `error.type`. The try's context is
  injected into the request sent upstream (`traceparent`, `tracestate`, `baggage`, or the B3
  fields), replacing whatever the client sent, as Go's propagators `Set` them.
- Sampling is head sampling: `ParentBased(TraceIdRatioBased(sampleRate))`, Traefik's.
- Export is OTLP/HTTP (protobuf) from a `BatchSpanProcessor`: spans are queued (a bounded
  deque, `OTEL_BSP_MAX_QUEUE_SIZE`, 2048) and exported by the SDK's worker thread, so a
  collector that is down, slow or answering 500 costs the request path only a deque append.
  What cannot be queued (queue full) or could not be delivered (export failed after the
  exporter's retries) is counted in `meshproxy_tracing_spans_dropped_total{reason}`.

The endpoint, headers and timeout come from Traefik's `tracing.otlp.http.*` options when
given, else from the standard `OTEL_EXPORTER_OTLP_[TRACES_]*` variables, which the exporter
reads itself; `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` are honoured likewise.

Nothing here runs when tracing is not configured: the hot path then pays one `is None` test
in dispatch and one per try in the balancer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, TextMapPropagator
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode

from meshproxy.http.fields import field_list

if TYPE_CHECKING:
    from meshproxy.http.exchange import Exchange

log = logging.getLogger("meshproxy.tracing")

DEFAULT_SERVICE_NAME = "traefik"  # Traefik's tracing.serviceName default: dashboards carry over
CLIENT_SPAN = "ReverseProxy"  # Traefik's name for the span around one upstream round trip
# The SDK's processor metric for spans it could not queue (semantic conventions, otel.sdk.*)
_PROCESSED_METRIC = "otel.sdk.processor.span.processed"
_INTERNAL_METRICS = "OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED"
# network.protocol.version as the conventions spell it ("2", not "2.0")
_VERSIONS = {"2.0": "2", "3.0": "3"}


@dataclass
class TracingSettings:
    """The static `tracing` options that act (config.static.Tracing), decoded.

    `endpoint` None: the exporter's own default from `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` /
    `OTEL_EXPORTER_OTLP_ENDPOINT` (`http://localhost:4318/v1/traces`). `timeout` in seconds,
    None likewise. `sample_rate` in 0..1. `queue_size`, `batch_size`, `schedule_delay_ms`
    None: the SDK's `OTEL_BSP_*` values (2048, 512, 5000)."""

    service_name: str | None = None
    sample_rate: float = 1.0
    endpoint: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None
    resource_attributes: dict[str, str] = field(default_factory=dict)
    queue_size: int | None = None
    batch_size: int | None = None
    schedule_delay_ms: float | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # fields recorded as `http.request.header.<name>` / `http.response.header.<name>` (lower
    # case, a list of values), as Traefik's capturedRequestHeaders / capturedResponseHeaders
    captured_request_headers: tuple[str, ...] = ()
    captured_response_headers: tuple[str, ...] = ()
    # query parameter names whose values are exported as sent (case-sensitive, Traefik's
    # tracing.safeQueryParams); every other value becomes `REDACTED`
    safe_query_params: frozenset[str] = frozenset()


class _FieldsGetter(Getter[Any]):
    """Reads a `Request`'s fields (lower-case bytes pairs) for the propagators."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        name = key.lower().encode("latin-1")
        values = [v.decode("latin-1") for n, v in carrier.headers if n == name]
        return values or None

    def keys(self, carrier: Any) -> list[str]:
        return [n.decode("latin-1") for n, _ in carrier.headers]


_GETTER = _FieldsGetter()


class _CountingExporter(SpanExporter):
    """The OTLP exporter, counting the spans of every export that failed (collector down,
    5xx after the exporter's retries, timeout): they are lost, and the operator must see it."""

    def __init__(self, inner: SpanExporter, tracing: Tracing) -> None:
        self.inner = inner
        self.tracing = tracing

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:  # the SDK would log and drop them too; count them first
            self.tracing.add_dropped("export_failed", len(spans))
            raise
        if result is not SpanExportResult.SUCCESS:
            self.tracing.add_dropped("export_failed", len(spans))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def _sampler(rate: float) -> Sampler:
    """Traefik's: the parent's decision when there is a parent, else `rate` of trace ids."""
    return ParentBased(TraceIdRatioBased(min(max(rate, 0.0), 1.0)))


class Tracing:
    """One process's tracer, processor and exporter; see the module docstring.

    `router_middlewares(router)` gives the qualified middleware names of a router of the
    live config (the daemon reads them from the snapshot); None: not recorded.
    `exporter` replaces the OTLP exporter (tests of the processor alone)."""

    def __init__(
        self,
        settings: TracingSettings,
        router_middlewares: Any = None,
        exporter: SpanExporter | None = None,
    ) -> None:
        self.settings = settings
        self.router_middlewares = router_middlewares
        self._lock = threading.Lock()  # drops are counted from the SDK's worker thread too
        self._dropped: dict[str, int] = {}
        attributes: dict[str, Any] = dict(settings.resource_attributes)
        service = settings.service_name or os.environ.get("OTEL_SERVICE_NAME")
        attributes["service.name"] = service or DEFAULT_SERVICE_NAME
        resource = Resource.create(attributes)
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(
                endpoint=settings.endpoint,
                headers=settings.headers or None,
                timeout=settings.timeout,
                certificate_file=settings.tls_ca,
                client_certificate_file=settings.tls_cert,
                client_key_file=settings.tls_key,
            )
        # A full queue makes the SDK log a warning per span dropped, on the request path:
        # `meshproxy_tracing_spans_dropped_total` counts them instead.
        logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)
        # The SDK reports the spans its bounded queue refused as a metric of its own: read
        # from an in-memory reader at scrape time, never on the request path.
        self._reader = InMemoryMetricReader()
        self._meters = MeterProvider(metric_readers=[self._reader])
        # The SDK records its processor metrics only when this variable is on (read once, by
        # the constructor): set for that call alone, so nothing else changes behaviour.
        saved = os.environ.get(_INTERNAL_METRICS)
        os.environ[_INTERNAL_METRICS] = "true"
        try:
            self.processor = BatchSpanProcessor(
                _CountingExporter(exporter, self),
                max_queue_size=settings.queue_size,
                max_export_batch_size=settings.batch_size,
                schedule_delay_millis=settings.schedule_delay_ms,
                meter_provider=self._meters,
            )
        finally:
            if saved is None:
                del os.environ[_INTERNAL_METRICS]
            else:
                os.environ[_INTERNAL_METRICS] = saved
        self.provider = TracerProvider(resource=resource, sampler=_sampler(settings.sample_rate))
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("meshproxy")
        # The global propagator, as the SDK built it from OTEL_PROPAGATORS at import.
        self.propagator: TextMapPropagator = propagate.get_global_textmap()

    # -- request path -------------------------------------------------------------------

    def start_server(self, ex: Exchange) -> None:
        """The server span of `ex`, parented by the context its fields carry; kept on
        `ex.span` until dispatch's `finish` ends it (`ServerSpan.end`)."""
        request = ex.request
        parent = self.propagator.extract(request, getter=_GETTER)
        unsampled = self._unsampled(parent)
        if unsampled is not None:  # nothing to record: skip the SDK's span machinery
            ex.span = ServerSpan(self, unsampled, trace.set_span_in_context(unsampled, parent))
            return
        # ex.started_at is on perf_counter's clock: the span starts when the request did
        start = time.time_ns() - int((time.perf_counter() - ex.started_at) * 1e9)
        attributes: dict[str, Any] = {
            "http.request.method": request.method,
            "url.path": request.path,
            "url.scheme": request.scheme,
            "server.address": request.host,
            "network.peer.address": request.client_ip,
            "network.peer.port": request.client_port,
            "client.address": request.client_ip,
            "network.protocol.version": _VERSIONS.get(request.http_version, request.http_version),
            "entry_point": ex.entrypoint,
        }
        port = request.port
        if port and str(port).isdigit():  # the Host's port, as text
            attributes["server.port"] = int(port)
        # Traefik 3.7 records url.query always ("" without one), values redacted
        attributes["url.query"] = redact_query(
            _text(request.query), self.settings.safe_query_params
        )
        for name in self.settings.captured_request_headers:
            values = request.header_values(name)
            if values:
                attributes[f"http.request.header.{name}"] = list(values)
        span = self.tracer.start_span(
            request.method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
            start_time=start,
        )
        ex.span = ServerSpan(self, span, trace.set_span_in_context(span, parent))

    def _unsampled(self, parent: Context) -> trace.Span | None:
        """A non-recording span when the sampler's answer is known to be "drop" (Traefik's
        ParentBased(TraceIdRatioBased)): the parent is valid and not sampled, or there is no
        parent and the rate is 0. The SDK would make the same span at several times the cost
        (attributes, sampler, span object); the context still travels upstream, unsampled."""
        parent_context = trace.get_current_span(parent).get_span_context()
        ids = self.provider.id_generator
        if parent_context.is_valid:
            if parent_context.trace_flags.sampled:
                return None
            trace_id = parent_context.trace_id
            trace_state = parent_context.trace_state
        elif self.settings.sample_rate <= 0.0:
            trace_id = ids.generate_trace_id()
            trace_state = None
        else:
            return None
        return trace.NonRecordingSpan(
            trace.SpanContext(
                trace_id,
                ids.generate_span_id(),
                is_remote=False,
                trace_flags=trace.TraceFlags(trace.TraceFlags.DEFAULT),
                trace_state=trace_state,
            )
        )

    def middlewares(self, router: str) -> tuple[str, ...]:
        resolve = self.router_middlewares
        if resolve is None or not router:
            return ()
        names: tuple[str, ...] = resolve(router)
        return names

    # -- drops --------------------------------------------------------------------------

    def add_dropped(self, reason: str, count: int) -> None:
        with self._lock:
            self._dropped[reason] = self._dropped.get(reason, 0) + count

    def dropped(self) -> dict[str, int]:
        """Spans lost so far, by reason: `queue_full` (the processor's bounded queue refused
        them), `export_failed` (the collector did not take them)."""
        with self._lock:
            counts = dict(self._dropped)
        counts.setdefault("export_failed", 0)
        counts["queue_full"] = self._queue_full()
        return counts

    def _queue_full(self) -> int:
        data = self._reader.get_metrics_data()
        total = 0
        for resource_metrics in data.resource_metrics if data else ():
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != _PROCESSED_METRIC:
                        continue
                    for point in metric.data.data_points:
                        if (point.attributes or {}).get("error.type") == "queue_full":
                            total += int(getattr(point, "value", 0))
        return total

    def shutdown(self) -> None:
        """Export what is queued (bounded by the exporter's timeout) and stop the worker."""
        self.provider.shutdown()
        self._meters.shutdown()


class ServerSpan:
    """The server span of one exchange (`ex.span`) and the context its tries are made in."""

    __slots__ = ("context", "span", "tracing")

    def __init__(self, tracing: Tracing, span: trace.Span, context: Context) -> None:
        self.tracing = tracing
        self.span = span
        self.context = context

    def attempt(self, ex: Exchange, url: str, host: bytes) -> ClientSpan:
        """A client span for one try of `ex` at the server `url` (`host`: its host[:port]),
        its context injected into the request about to be sent. Never raises (a fault gives
        a span that records nothing)."""
        try:
            return self._attempt(ex, url, host)
        except Exception:
            log.exception("could not start the span of a try")
            return ClientSpan(trace.INVALID_SPAN)

    def _attempt(self, ex: Exchange, url: str, host: bytes) -> ClientSpan:
        request = ex.request
        if not self.span.is_recording():
            # Unsampled: no client span (it would record nothing); the upstream request
            # carries this request's context, sampled flag clear, as a child span's would.
            sent: dict[str, str] = {}
            self.tracing.propagator.inject(sent, context=self.context)
            for name, value in sent.items():
                request.set_header(name.lower().encode("latin-1"), value.encode("latin-1"))
            return _NO_SPAN
        span = self.tracing.tracer.start_span(
            CLIENT_SPAN, context=self.context, kind=SpanKind.CLIENT
        )
        if span.is_recording():
            address, _, port = _text(host).rpartition(":")
            attributes: dict[str, Any] = {
                "http.request.method": request.method,
                "url.full": _safe_url(url, _text(request.target), self.tracing.settings),
                "server.address": address or _text(host),
                "network.peer.address": address or _text(host),
                "traefik.service.name": ex.service,
            }
            if port.isdigit():
                attributes["server.port"] = int(port)
                attributes["network.peer.port"] = int(port)
            retries = getattr(ex, "retries", 0)  # tries before this one (access log's count)
            if retries:
                attributes["http.request.resend_count"] = retries
            span.set_attributes(attributes)
        carrier: dict[str, str] = {}
        self.tracing.propagator.inject(carrier, context=trace.set_span_in_context(span))
        for name, value in carrier.items():
            request.set_header(name.lower().encode("latin-1"), value.encode("latin-1"))
        return ClientSpan(span)

    def end(self, ex: Exchange, status: int) -> None:
        """The exchange is over with `status` (what the client got, 499 if it left). Never
        raises: a tracing fault must not become the request's."""
        try:
            self._record(ex, status)
        except Exception:
            log.exception("could not record the span of a request")
        self.span.end()

    def _record(self, ex: Exchange, status: int) -> None:
        span = self.span
        if span.is_recording():
            attributes: dict[str, Any] = {"http.response.status_code": status}
            if ex.router:
                attributes["traefik.router.name"] = ex.router
                middlewares = self.tracing.middlewares(ex.router)
                if middlewares:
                    attributes["traefik.middleware.names"] = list(middlewares)
            if ex.service:
                attributes["traefik.service.name"] = ex.service
            captured = self.tracing.settings.captured_response_headers
            fields = getattr(ex, "response_headers", None)
            if captured and fields:
                for name in captured:
                    wanted = name.encode("latin-1")
                    values = [_text(v) for n, v in field_list(fields) if n == wanted]
                    if values:
                        attributes[f"http.response.header.{name}"] = values
            why = getattr(ex, "why", "")
            if why:
                attributes["meshproxy.why"] = why
                attributes["error.type"] = why
            span.set_attributes(attributes)
            if status >= 500:  # semantic conventions: a server span fails on 5xx only
                span.set_status(Status(StatusCode.ERROR))


class ClientSpan:
    """One try at a server (`_Attempt.span` in balancer.http_services)."""

    __slots__ = ("span",)

    def __init__(self, span: trace.Span) -> None:
        self.span = span

    def end(self, ex: Exchange, status: int, exc: BaseException | None) -> None:
        """The try ended with `status` (the response's, or the status its failure maps to);
        a failure before a response gets its "why" code as `error.type`: the reason the
        retry that may follow was made."""
        try:
            self._record(status, exc)
        except Exception:  # tracing must never cost a request
            log.exception("could not record the span of a try")
        self.span.end()

    def _record(self, status: int, exc: BaseException | None) -> None:
        span = self.span
        if span.is_recording():
            span.set_attribute("http.response.status_code", status)
            why = _why(exc) if exc is not None else ""
            if why:
                span.set_attribute("error.type", why)
                span.set_status(Status(StatusCode.ERROR, str(exc) or why))
            elif status >= 400:  # semantic conventions: a client span fails on 4xx and 5xx
                span.set_status(Status(StatusCode.ERROR))


_NO_SPAN = ClientSpan(trace.INVALID_SPAN)


class TracedEntry:
    """An entrypoint handler that opens the server span, then hands the exchange on (the
    dispatcher, which ends the span in its `finish`). Placed inside the SNI check so a
    request answered 421 there makes no span that nothing would end."""

    __slots__ = ("handler", "tracing")

    def __init__(self, tracing: Tracing, handler: Any) -> None:
        self.tracing = tracing
        self.handler = handler

    def __call__(self, ex: Exchange) -> None:
        try:
            self.tracing.start_server(ex)
        except Exception:  # tracing must never cost a request
            log.exception("could not start the span of a request")
        self.handler(ex)


def _why(exc: BaseException) -> str:
    """The "why" code of a failed try: the access log's (runtime.dispatch.why_code)."""
    from meshproxy.runtime import dispatch

    why_code = getattr(dispatch, "why_code", None)
    if why_code is None:
        return type(exc).__name__
    code: str = why_code(exc)
    return code


def _text(value: bytes | str) -> str:
    return value if isinstance(value, str) else value.decode("latin-1")


REDACTED = "REDACTED"  # Traefik's placeholder for a query value or a URL's user info
_HEX = frozenset("0123456789abcdefABCDEF")


def redact_query(raw: str, safe: frozenset[str] = frozenset()) -> str:
    """The query string `raw` (without `?`) as Traefik 3.7 exports it in `url.query` and
    `url.full` (pkg/observability/tracing, `safeURL`): parsed as Go's `url.ParseQuery`,
    every parameter's value replaced by one `REDACTED` unless its name is in `safe`
    (case-sensitive; all its values kept), then re-encoded as Go's `url.Values.Encode`:
    names sorted, `name=value` joined by `&`, each part `QueryEscape`d (space as `+`).

    Go details kept, checked against the real binary: `;` separates pairs as `&` does
    (Traefik lets semicolons through as Go's `AllowQuerySemicolons`), empty pairs are
    dropped, a pair with a bad `%` escape is dropped (ParseQuery skips it), a name without
    `=` gets a value (`flag` -> `flag=REDACTED`). Hand-written: urllib's parse_qsl differs
    on the bad-escape and byte-level cases, and nothing in the standard library encodes as
    Go's Encode does."""
    if not raw:
        return ""
    values: dict[bytes, list[bytes]] = {}
    for pair in raw.replace(";", "&").split("&"):
        if not pair:
            continue
        name, _, value = pair.partition("=")
        key = _query_unescape(name)
        decoded = _query_unescape(value)
        if key is None or decoded is None:
            continue
        values.setdefault(key, []).append(decoded)
    parts: list[str] = []
    for key in sorted(values):
        escaped = urllib.parse.quote_plus(key, safe="")
        if key.decode("utf-8", "surrogateescape") in safe:
            parts.extend(f"{escaped}={urllib.parse.quote_plus(v, safe='')}" for v in values[key])
        else:
            parts.append(f"{escaped}={REDACTED}")
    return "&".join(parts)


def _query_unescape(text: str) -> bytes | None:
    """Go's QueryUnescape: `+` is a space, `%XX` a byte; None for a malformed `%` escape."""
    index = text.find("%")
    while index >= 0:
        if text[index + 1 : index + 2] not in _HEX or text[index + 2 : index + 3] not in _HEX:
            return None
        index = text.find("%", index + 3)
    # the request's bytes came in as latin-1 text: back to those bytes, not UTF-8 of them
    return urllib.parse.unquote_to_bytes(text.replace("+", " ").encode("latin-1", "replace"))


def _safe_url(base: str, target: str, settings: TracingSettings) -> str:
    """`url.full` of a try: the server URL `base` joined with the request target, its query
    redacted by `redact_query` and any user info of the server URL replaced by
    `REDACTED:REDACTED` (Traefik 3.7's safeURL). A `?` with nothing after it stays, as Go
    keeps it (ForceQuery)."""
    scheme, sep, rest = base.partition("://")
    if sep:
        authority, slash, tail = rest.partition("/")
        if "@" in authority:
            authority = f"{REDACTED}:{REDACTED}@" + authority.rpartition("@")[2]
            base = scheme + sep + authority + slash + tail
    path, mark, query = target.partition("?")
    full = base.rstrip("/") + path
    if mark:
        full += "?" + redact_query(query, settings.safe_query_params)
    return full


def settings_from_static(options: Any) -> TracingSettings:
    """TracingSettings from the static `tracing` section (config.static.Tracing)."""
    settings = TracingSettings(
        service_name=options.service_name,
        sample_rate=1.0 if options.sample_rate is None else float(options.sample_rate),
        captured_request_headers=tuple(h.lower() for h in options.captured_request_headers or ()),
        captured_response_headers=tuple(h.lower() for h in options.captured_response_headers or ()),
        safe_query_params=frozenset(options.safe_query_params or ()),
        resource_attributes={
            **(options.global_attributes or {}),
            **(options.resource_attributes or {}),
        },
    )
    otlp = options.otlp
    http = otlp.http if otlp is not None else None
    if http is not None:
        settings.endpoint = http.endpoint or None
        settings.headers = dict(http.headers or {})
        tls = http.tls
        if tls is not None:
            settings.tls_ca = tls.ca
            settings.tls_cert = tls.cert
            settings.tls_key = tls.key
    return settings


class DroppedSpansCollector:
    """`meshproxy_tracing_spans_dropped_total{reason}` for the metrics registry (a collector
    by duck typing, as RequestMetrics)."""

    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            "meshproxy_tracing_spans_dropped",
            "Spans lost before reaching the collector: queue_full (the bounded export queue "
            "was full), export_failed (the collector was down, slow or refused them).",
            labels=["reason"],
        )
        for reason, count in sorted(self.tracing.dropped().items()):
            family.add_metric([reason], count)
        yield family


class RouterMiddlewares:
    """The qualified middleware names of a router of the live config (`traefik.middleware.
    names` on server spans), computed once per router and config generation."""

    def __init__(self, snapshot: Callable[[], Any]) -> None:
        self.snapshot = snapshot
        self.generation = -1
        self.cache: dict[str, tuple[str, ...]] = {}

    def __call__(self, router: str) -> tuple[str, ...]:
        snapshot = self.snapshot()
        if snapshot.generation != self.generation:
            self.generation = snapshot.generation
            self.cache = {}
        names = self.cache.get(router)
        if names is None:
            name, _, provider = router.partition("@")
            config = snapshot.config.http.routers.get(name)
            listed = config.middlewares if config is not None else []
            names = tuple(m if "@" in m or not provider else f"{m}@{provider}" for m in listed)
            self.cache[router] = names
        return names


def from_static(options: Any, snapshot: Callable[[], Any]) -> Tracing:
    """The process's Tracing from the static `tracing` section (config.static.Tracing);
    `snapshot()` gives the live RuntimeSnapshot."""
    return Tracing(settings_from_static(options), RouterMiddlewares(snapshot))
