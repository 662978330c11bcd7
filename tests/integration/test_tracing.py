"""Tracing through a real proxy process to a real OTLP/HTTP receiver.

The receiver is an aiohttp server in the test that decodes each `POST /v1/traces` body as an
OTLP `ExportTraceServiceRequest` (opentelemetry-proto), as a collector does (OTLP
specification, "OTLP/HTTP": binary protobuf, `Content-Type: application/x-protobuf`). It can
also answer 500 or hang, and a port where nothing listens stands for a collector that is down.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.helpers import free_port, lb, refused_url, request, router, wait_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind


class Receiver:
    """An OTLP/HTTP trace receiver: `mode` is "ok", "fail" (500) or "hang" (never answers
    until the test ends). `spans` holds every span received, as dicts."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.spans: list[dict[str, Any]] = []
        self.posts = 0
        self.released = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self.traces)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    async def traces(self, req: web.Request) -> web.Response:
        self.posts += 1
        body = await req.read()
        if self.mode == "fail":
            return web.Response(status=500, text="collector broken")
        if self.mode == "hang":
            await self.released.wait()
            return web.Response(status=503)
        assert req.content_type == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        for resource_spans in message.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append(
                        {
                            "name": span.name,
                            "kind": span.kind,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "attributes": _attributes(span.attributes),
                            "status": span.status.code,
                            "start": span.start_time_unix_nano,
                            "resource": resource,
                        }
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def close(self) -> None:
        self.released.set()
        if self.runner is not None:
            await self.runner.cleanup()

    def of_trace(self, trace_id: str) -> list[dict[str, Any]]:
        return [s for s in self.spans if s["trace_id"] == trace_id]


def _attributes(pairs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in pairs:
        value = kv.value
        kind = value.WhichOneof("value")
        if kind == "array_value":
            out[kv.key] = [getattr(v, v.WhichOneof("value")) for v in value.array_value.values]
        else:
            out[kv.key] = getattr(value, kind) if kind else None
    return out


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = await Receiver().start()
    yield rec
    await rec.close()


@pytest.fixture
def fast_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxy inherits the environment: export batches every 50 ms (not 5 s)."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")


def _config(*urls: str, retry: bool = False) -> dict[str, Any]:
    options: dict[str, Any] = {"middlewares": ["again"]} if retry else {}
    return {
        "http": {
            "routers": {"r": router("PathPrefix(`/`)", "s", **options)},
            "middlewares": {"again": {"retry": {"attempts": 2}}},
            "services": {"s": lb(*urls)},
        }
    }


def _header(backend_request: dict[str, Any], name: str) -> str | None:
    for key, value in backend_request["headers"]:
        if key == name:
            return value
    return None


async def test_server_span_and_sibling_client_spans_per_try_with_w3c_context_sent_upstream(
    proxy_factory: Any, backends: Any, receiver: Receiver, fast_export: None
) -> None:
    """Traefik v3 tracing (pkg/middlewares/observability): the incoming W3C `traceparent`
    (W3C Trace Context §3.2) parents a SERVER span named after the method; each try at a
    server is a CLIENT span under it (a retry after a refused connection is a sibling, with
    `http.request.resend_count` and the failed try's `error.type`); the context of the try
    that reached the backend is what the backend receives, with `tracestate` and `baggage`
    (W3C Baggage) carried on. Attributes follow the HTTP semantic conventions, captured
    fields included (`http.request.header.<name>`)."""
    backend = await backends("b")
    # A refused server first in the round robin: the first request is retried on the second.
    proxy = await proxy_factory(
        _config(refused_url(), backend.url, retry=True),
        extra_flags=[
            f"--tracing.otlp.http.endpoint={receiver.endpoint}",
            "--tracing.capturedRequestHeaders=X-Tenant",
            "--tracing.capturedResponseHeaders=Content-Type",
        ],
    )
    response = await request(
        proxy.port,
        target="/orders/7?x=1",
        host="shop.test",
        headers={
            "traceparent": TRACEPARENT,
            "tracestate": "vendor=opaque",
            "baggage": "tenant=blue",
            "X-Tenant": "blue",
        },
    )
    assert response.status == 200
    spans = await wait_for(
        lambda: len(receiver.of_trace(TRACE_ID)) >= 3 and receiver.of_trace(TRACE_ID),
        10,
        "three spans of the trace",
    )
    (server,) = [s for s in spans if s["kind"] == SERVER]
    tries = sorted((s for s in spans if s["kind"] == CLIENT), key=lambda s: s["start"])
    assert len(tries) == 2
    assert server["name"] == "GET" and server["parent"] == PARENT_ID
    attrs = server["attributes"]
    assert attrs["http.request.method"] == "GET"
    assert attrs["url.path"] == "/orders/7"
    assert attrs["url.query"] == "x=REDACTED"  # Traefik 3.7 safeURL: values redacted
    assert attrs["server.address"] == "shop.test"
    assert attrs["network.peer.address"] == "127.0.0.1"
    assert attrs["http.response.status_code"] == 200
    assert attrs["entry_point"] == "web"
    assert attrs["traefik.router.name"] == "r@file"
    assert attrs["traefik.service.name"] == "s@file"
    assert attrs["traefik.middleware.names"] == ["again@file"]
    assert server["resource"]["service.name"] == "traefik"
    # Traefik's capturedRequestHeaders / capturedResponseHeaders, semconv attribute names
    assert attrs["http.request.header.x-tenant"] == ["blue"]
    assert attrs["http.response.header.content-type"][0].startswith("text/")
    first, second = tries
    assert first["parent"] == second["parent"] == server["span_id"]  # siblings
    assert first["name"] == "ReverseProxy"
    assert first["attributes"]["http.response.status_code"] == 502
    # why the retry happened: the access log's "why" code (runtime.dispatch.why_code)
    assert first["attributes"]["error.type"] == "upstream_connect_failure"
    assert "http.request.resend_count" not in first["attributes"]
    assert second["attributes"]["http.request.resend_count"] == 1
    assert second["attributes"]["http.response.status_code"] == 200
    assert second["attributes"]["server.port"] == backend.port
    assert second["attributes"]["url.full"] == f"{backend.url}/orders/7?x=REDACTED"
    (seen,) = backend.requests
    assert _header(seen, "traceparent") == f"00-{TRACE_ID}-{second['span_id']}-01"
    assert _header(seen, "tracestate") == "vendor=opaque"
    assert _header(seen, "baggage") == "tenant=blue"


async def test_b3_multi_selected_by_otel_propagators(
    proxy_factory: Any,
    backends: Any,
    receiver: Receiver,
    fast_export: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`OTEL_PROPAGATORS=b3multi` (OpenTelemetry SDK environment variables; Traefik's
    autoprop honours the same variable): the X-B3-* fields of the request parent the
    server span, and the upstream request carries X-B3-* with the client span's id."""
    monkeypatch.setenv("OTEL_PROPAGATORS", "b3multi")
    backend = await backends("b")
    proxy = await proxy_factory(
        _config(backend.url),
        extra_flags=[f"--tracing.otlp.http.endpoint={receiver.endpoint}"],
    )
    response = await request(
        proxy.port,
        headers={"X-B3-TraceId": TRACE_ID, "X-B3-SpanId": PARENT_ID, "X-B3-Sampled": "1"},
    )
    assert response.status == 200
    spans = await wait_for(
        lambda: len(receiver.of_trace(TRACE_ID)) >= 2 and receiver.of_trace(TRACE_ID), 10
    )
    (client,) = [s for s in spans if s["kind"] == CLIENT]
    (seen,) = backend.requests
    assert _header(seen, "x-b3-traceid") == TRACE_ID
    assert _header(seen, "x-b3-spanid") == client["span_id"]
    assert _header(seen, "traceparent") is None


async def test_sample_rate_zero_exports_nothing_but_still_propagates(
    proxy_factory: Any, backends: Any, receiver: Receiver, fast_export: None
) -> None:
    """Head sampling (`--tracing.sampleRate`, Traefik's ParentBased(TraceIDRatioBased)):
    at 0 a request without a parent is not recorded, yet the upstream request still gets a
    `traceparent` (sampled flag clear) so the decision travels with the request."""
    backend = await backends("b")
    proxy = await proxy_factory(
        _config(backend.url),
        extra_flags=[
            f"--tracing.otlp.http.endpoint={receiver.endpoint}",
            "--tracing.sampleRate=0",
        ],
    )
    for _ in range(5):
        assert (await request(proxy.port)).status == 200
    # A sampled parent is followed even at rate 0 (ParentBased): its spans prove the exporter
    # works, so the absence of the others is not an exporter that never ran.
    assert (await request(proxy.port, headers={"traceparent": TRACEPARENT})).status == 200
    await wait_for(lambda: receiver.of_trace(TRACE_ID), 10, "the parented trace")
    assert {s["trace_id"] for s in receiver.spans} == {TRACE_ID}
    unsampled = [_header(r, "traceparent") for r in backend.requests[:5]]
    # the sampled bit (0x01) clear; 0x02 is Trace Context Level 2's "random trace id" flag
    assert all(v is not None and not int(v.rsplit("-", 1)[1], 16) & 1 for v in unsampled)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_http2_exchange_traced_alike(
    proxy_factory: Any, backends: Any, receiver: Receiver, fast_export: None
) -> None:
    """The exchange is protocol-neutral: an HTTP/2 request (RFC 9113, prior knowledge) gets
    the same server and client spans and the same upstream `traceparent` as HTTP/1.1."""
    backend = await backends("b")
    proxy = await proxy_factory(
        _config(backend.url),
        extra_flags=[f"--tracing.otlp.http.endpoint={receiver.endpoint}"],
    )
    curl = await asyncio.create_subprocess_exec(
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{http_version}",
        "--http2-prior-knowledge",
        "-H",
        f"traceparent: {TRACEPARENT}",
        f"http://127.0.0.1:{proxy.port}/h2",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(curl.communicate(), 10)
    assert out.decode() == "200 2"
    spans = await wait_for(
        lambda: len(receiver.of_trace(TRACE_ID)) >= 2 and receiver.of_trace(TRACE_ID), 10
    )
    (server,) = [s for s in spans if s["kind"] == SERVER]
    (client,) = [s for s in spans if s["kind"] == CLIENT]
    assert server["attributes"]["network.protocol.version"] == "2"
    assert server["attributes"]["url.path"] == "/h2"
    (seen,) = backend.requests
    assert _header(seen, "traceparent") == f"00-{TRACE_ID}-{client['span_id']}-01"


def _dropped(metrics_text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("meshproxy_tracing_spans_dropped_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.parametrize("collector", ["down", "fail", "hang"])
async def test_collector_down_failing_or_hanging_never_slows_traffic_and_drops_are_counted(
    proxy_factory: Any,
    backends: Any,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    collector: str,
) -> None:
    """Issue 14, bad input: a tracing backend that is down (connection refused), answers 500
    or never answers must not slow or break traffic. Spans wait in the SDK's bounded queue
    (OTEL_BSP_MAX_QUEUE_SIZE, here 8) and are exported by its worker thread; what the queue
    cannot take, or the collector did not accept, is counted in
    `meshproxy_tracing_spans_dropped_total`. Every request is answered 200 well under the
    exporter's own timeout (2 s), which is what a request blocked on an export would take."""
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "8")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "2")
    receiver.mode = "ok" if collector == "down" else collector
    endpoint = f"http://127.0.0.1:{free_port()}/v1/traces" if collector == "down" else None
    backend = await backends("b")
    proxy = await proxy_factory(
        _config(backend.url),
        extra_flags=[f"--tracing.otlp.http.endpoint={endpoint or receiver.endpoint}"],
    )
    slowest = 0.0
    for _ in range(60):  # 120 spans against a queue of 8
        started = time.perf_counter()
        response = await request(proxy.port, timeout=5)
        slowest = max(slowest, time.perf_counter() - started)
        assert response.status == 200
    assert slowest < 1.0, slowest
    # Refused or 500: each export fails at once (export_failed). Hanging: the worker waits
    # out its timeout while requests keep coming, so the queue overflows (queue_full).
    reason = "queue_full" if collector == "hang" else "export_failed"
    await wait_for(
        lambda: _dropped(proxy.metrics()).get(reason, 0) > 0, 15, f"{reason} drops counted"
    )
    if collector != "down":
        assert receiver.posts > 0
    assert not receiver.spans


# Queries whose exported form Traefik 3.7 normalises in some way: several values, a safe name,
# case of a safe name, `+` and `%20`, `;` as separator, a name without `=`, an empty name, a
# bad escape, a percent-encoded UTF-8 name, a trailing `&`, a bare `?`.
_REDACTION_QUERIES = [
    "token=s3cr3t",
    "b=2&a=1&a=3&safe=x%20y&safe=z",
    "flag",
    "a=%20b&",
    "x=1;y=2",
    "keep=v&Keep=w",
    "k=a+b&safe=a+b%2B",
    "=v",
    "%C3%A9=1",
    "a=%zz&b=1",
    "",
]


async def test_query_values_redacted_as_traefik_unless_safe_query_params(
    proxy_factory: Any, backends: Any, receiver: Receiver, fast_export: None, tmp_path: Any
) -> None:
    """Traefik 3.7 never exports query values (pkg/observability/tracing `safeURL`, docs
    "tracing.safeQueryParams"): `url.query` of the server span and `url.full` of the client
    span carry `name=REDACTED`, names re-encoded as Go's `url.Values.Encode` (sorted), except
    the names listed in `safeQueryParams` (case-sensitive), whose values are kept. The same
    requests go through the real Traefik binary and through meshproxy, both exporting to this
    receiver, and the exported attributes must be equal request by request; no secret value
    may reach the receiver from either."""
    from tests.differential.harness import TraefikProcess, TraefikUnavailable, traefik_binary

    try:
        traefik_binary()
    except TraefikUnavailable as exc:
        pytest.skip(str(exc))
    backend = await backends("b")
    flags = [
        f"--tracing.otlp.http.endpoint={receiver.endpoint}",
        "--tracing.safeQueryParams=safe,Keep",
    ]
    dynamic = _config(backend.url)
    dynamic["http"]["routers"]["r"]["entryPoints"] = ["web"]
    traefik = TraefikProcess(tmp_path, dynamic, static_flags=flags)
    await asyncio.to_thread(traefik.start)
    try:
        proxy = await proxy_factory(_config(backend.url), extra_flags=flags)
        traces: dict[tuple[str, int], str] = {}
        for side, port in (("traefik", traefik.port), ("meshproxy", proxy.port)):
            for index, query in enumerate(_REDACTION_QUERIES):
                trace_id = f"{(1 if side == 'traefik' else 2):02x}{index:030x}"
                target = "/p?" + query if query else "/p?"
                response = await request(
                    port, target=target, headers={"traceparent": f"00-{trace_id}-{PARENT_ID}-01"}
                )
                assert response.status == 200, (side, query, response.status)
                traces[side, index] = trace_id

        def exported(side: str, index: int) -> tuple[Any, Any] | None:
            spans = receiver.of_trace(traces[side, index])
            server = [s for s in spans if s["kind"] == SERVER]
            client = [s for s in spans if s["kind"] == CLIENT]
            if not server or not client:
                return None
            return (server[0]["attributes"].get("url.query"), client[0]["attributes"]["url.full"])

        for index, query in enumerate(_REDACTION_QUERIES):
            theirs = await wait_for(lambda i=index: exported("traefik", i), 15, "traefik's spans")
            ours = await wait_for(lambda i=index: exported("meshproxy", i), 15, "meshproxy's spans")
            assert ours == theirs, (query, ours, theirs)
        everything = repr([s["attributes"] for s in receiver.spans])
        for secret in ("s3cr3t", "=v&", "a=1", "keep=v"):
            assert secret not in everything
        assert "safe=x+y&safe=z" in everything and "Keep=w" in everything
    finally:
        await asyncio.to_thread(traefik.stop)
