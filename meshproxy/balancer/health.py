"""Active health checks: Traefik's `loadBalancer.healthCheck`.

As Traefik 3 (pkg/healthcheck/healthcheck.go): every server starts UP; a probe runs every
`interval` (30 s) while the server is up and every `unhealthyInterval` (defaults to
`interval`) while it is down, the first one an interval after the check starts; each probe
has `timeout` (5 s). An HTTP probe sends `method` (GET) for `path` resolved against the
server's URL, with `scheme`, `port`, `hostname` (the Host field) and `headers` overriding,
following redirects unless `followRedirects: false`; the server is UP when the status is in
[200, 400), or equals `status` when set. `mode: grpc` asks the gRPC health-checking protocol
(grpc.health.v1.Health/Check, empty service name) and wants SERVING.

Where we differ, on purpose:

- one checker per (server URL, check definition, transport) for the whole process, shared by
  every service that lists the server with the same check (Traefik runs one per service and
  restarts them all, every server UP again, on each reload); a checker and its verdict
  survive reloads while it is still wanted, and stops when no service wants it;
- each checker is one asyncio task; its sleeps are jittered to 90-100% of the interval so
  checkers started together do not probe in lockstep, and a dead server still leaves within
  one interval (plus the probe's timeout);
- a probe reads the body too, up to `MAX_BODY_BYTES` (1 MiB): a larger answer (a 2 GB body)
  makes the server DOWN, as issue 13 asks ("bounded by the timeout and a read cap, counted
  as unhealthy"), where Traefik closes the body unread and trusts the status; the head is
  bounded by aiohttp's limits, and the whole probe, redirects included (at most 10, as Go's
  client), by `timeout`.

Schemes: http and https through aiohttp (https with the service's serversTransport: its
CAs, client certificate, TLS versions, `insecureSkipVerify` and `serverName`, through
meshproxy.http.transports, as Traefik's checks use the service's transport); h2c through a
small HTTP/2 client on the `h2` library (prior knowledge, one stream; redirects are not
followed over h2c); gRPC through grpcio. The
gRPC messages are two protobuf fields, encoded by hand below rather than pulling in the
`grpcio-health-checking` package for them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import aiohttp

from meshproxy.config.dynamic import HealthCheck
from meshproxy.http.upstream import TransportSettings
from meshproxy.upstream_address import resolve

if TYPE_CHECKING:
    from meshproxy.balancer.http_services import LoadBalancerService

log = logging.getLogger("meshproxy.healthcheck")

DEFAULT_INTERVAL = 30.0  # seconds (Traefik's dynamic.DefaultHealthCheckInterval)
DEFAULT_TIMEOUT = 5.0  # seconds (Traefik's dynamic.DefaultHealthCheckTimeout)
MAX_REDIRECTS = 10  # Go's http.Client stops after 10
MAX_BODY_BYTES = 1 << 20  # a health answer's body, at most: larger is DOWN (bad input)
JITTER = 0.1  # sleeps last 90-100% of the interval
LOG_EVERY = 60.0  # seconds between two log lines about a checker's unexpected errors
_METHOD_CHARS = set("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


class HealthCheckConfigError(ValueError):
    """An invalid `healthCheck`: `errors` lists every fault, each starting with the key at
    fault (`port: ...`, `headers.X-Id: ...`)."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


@dataclass(frozen=True)
class HealthCheckSpec:
    """One validated `healthCheck` (durations in seconds)."""

    mode: str = "http"  # http | grpc
    scheme: str = ""  # "" = the server's
    path: str = ""
    method: str = "GET"
    status: int = 0  # 0: any of [200, 400)
    port: int = 0  # 0: the server's
    interval: float = DEFAULT_INTERVAL
    unhealthy_interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    hostname: str = ""
    follow_redirects: bool = True
    headers: tuple[tuple[str, str], ...] = ()


def spec_from_config(hc: HealthCheck, warnings: list[str] | None = None) -> HealthCheckSpec:
    """Validate a decoded `healthCheck`. Raises HealthCheckConfigError, listing every fault
    (not only the first), for values Traefik could not use either: an unknown mode or scheme,
    a port or status out of range, a method or header name that is not a token, a path that
    is an absolute URL, a `hostname` or header value holding a control character (Go's
    http.Client refuses such a field value: "invalid header field value"), a header value
    that is not a scalar. A non-positive interval, unhealthy interval or timeout falls back
    to its default with a warning, as Traefik logs it.

    Header values given as YAML numbers or booleans (`X-Id: 1`) are taken as their string
    form, as Traefik's decoder (paerser) reads every value of a map[string]string as text."""
    warn = warnings if warnings is not None else []
    errors: list[str] = []
    mode = (hc.mode or "http").lower()
    if mode not in ("http", "grpc"):
        errors.append(f"mode: {hc.mode!r} is not supported (http, grpc)")
    scheme = (hc.scheme or "").lower()
    if scheme not in ("", "http", "https", "h2c"):
        errors.append(f"scheme: {hc.scheme!r} is not supported (http, https, h2c)")
    path = hc.path or ""
    parts = urlsplit(path)
    if parts.scheme or parts.netloc:
        errors.append(f"path: {path!r} must be a path, not a URL")
    elif _has_control(path):
        errors.append(f"path: {path!r} holds a control character")
    method = (hc.method or "GET").upper() if mode == "http" else "POST"
    if not set(method) <= _METHOD_CHARS:
        errors.append(f"method: {hc.method!r} is not an HTTP method")
    port = hc.port or 0
    if not 0 <= port <= 65535:
        errors.append(f"port: {port} is not a TCP port")
    status = hc.status or 0
    if status and not 100 <= status <= 599:
        errors.append(f"status: {status} is not an HTTP status code")
    hostname = hc.hostname or ""
    if _has_control(hostname) or " " in hostname:
        errors.append(f"hostname: {hostname!r} is not a valid Host (control character or space)")
    headers: list[tuple[str, str]] = []
    for name, raw in (hc.headers or {}).items():
        value = _header_text(raw)
        if not name or not set(name) <= _METHOD_CHARS:
            errors.append(f"headers.{name}: {name!r} is not a valid field name")
        elif value is None:
            errors.append(f"headers.{name}: expected a string, got {type(raw).__name__}")
        elif _has_control(value):
            errors.append(f"headers.{name}: the value {value!r} holds a control character")
        else:
            headers.append((name, value))
    if errors:
        raise HealthCheckConfigError(errors)
    interval = DEFAULT_INTERVAL if hc.interval is None else float(hc.interval)
    if interval <= 0:
        warn.append("healthCheck.interval must be > 0: the default (30s) is used")
        interval = DEFAULT_INTERVAL
    unhealthy = interval if hc.unhealthy_interval is None else float(hc.unhealthy_interval)
    if unhealthy <= 0:
        warn.append("healthCheck.unhealthyInterval must be > 0: the default (30s) is used")
        unhealthy = DEFAULT_INTERVAL
    timeout = DEFAULT_TIMEOUT if hc.timeout is None else float(hc.timeout)
    if timeout <= 0:
        warn.append("healthCheck.timeout must be > 0: the default (5s) is used")
        timeout = DEFAULT_TIMEOUT
    return HealthCheckSpec(
        mode=mode,
        scheme=scheme,
        path=path,
        method=method,
        status=status,
        port=port,
        interval=interval,
        unhealthy_interval=unhealthy,
        timeout=timeout,
        hostname=hostname,
        follow_redirects=hc.follow_redirects is not False,
        headers=tuple(sorted(headers)),
    )


def _has_control(text: str) -> bool:
    """True if `text` holds a C0 control other than HTAB, or DEL (RFC 9110 §5.5: a field
    value is VCHAR, SP and HTAB; CR, LF and NUL are never allowed)."""
    return any((ord(c) < 0x20 and c != "\t") or c == "\x7f" for c in text)


def _header_text(value: object) -> str | None:
    """A header value as text: a string as is, a YAML number or boolean in its string form
    (booleans as Go prints them, `true`/`false`); None for anything else (a list, a map)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return None


def probe_url(server_url: str, spec: HealthCheckSpec) -> str:
    """The URL a probe asks: `path` resolved against the server's URL (as Traefik's
    `target.Parse(path)`, Go's RFC 3986 §5.2 reference resolution, which works for any
    scheme), then `scheme` and `port` replaced when set.

    Python's urljoin only resolves for the schemes in its `uses_relative`/`uses_netloc`
    lists (`urljoin("h2c://h:1", "/health") == "/health"`), so the join is made on the
    URL with an http scheme and the server's scheme is put back."""
    server = urlsplit(server_url)
    if spec.path:
        base = urlunsplit(("http", server.netloc, server.path, server.query, ""))
        joined = urlsplit(urljoin(base, spec.path))
        path, query = joined.path, joined.query
    else:
        path, query = server.path, server.query
    scheme = spec.scheme or server.scheme
    netloc = server.netloc.rpartition("@")[2]
    if spec.port:
        host = server.hostname or ""
        netloc = f"[{host}]:{spec.port}" if ":" in host else f"{host}:{spec.port}"
    return urlunsplit((scheme, netloc, path or "/", query, ""))


class HealthChecker:
    """Probes one server with one check, for every service that wants it."""

    def __init__(self, url: str, spec: HealthCheckSpec, transport: TransportSettings) -> None:
        self.url = url
        self.spec = spec
        self.transport = transport
        self.healthy = True
        self.last_error = ""
        self.probes = 0
        self.listeners: list[LoadBalancerService] = []
        self.task: asyncio.Task[None] | None = None
        self.rng = random.Random()
        self._ssl: ssl.SSLContext | None = None
        self._logged = -LOG_EVERY  # monotonic time of the last unexpected-error log line

    # -- the loop ------------------------------------------------------------------------

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.run())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None

    async def run(self) -> None:
        """Probe forever. An unexpected exception in a probe (a bug, or input no check
        foresaw) counts as a failed probe, the server DOWN with the error as `lastError`,
        and is logged at most once per LOG_EVERY seconds: a checker that died would leave
        its server's state frozen (issue 13: bad input is counted as unhealthy)."""
        spec = self.spec
        while True:
            interval = spec.interval if self.healthy else spec.unhealthy_interval
            await asyncio.sleep(interval * (1.0 - JITTER * self.rng.random()))
            try:
                error = await self.probe()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any bug must not stop the checker
                error = f"probe error: {type(exc).__name__}: {exc}"
                now = time.monotonic()
                if now - self._logged >= LOG_EVERY:
                    self._logged = now
                    log.error("health check of %s: unexpected %s", self.url, error, exc_info=True)
            self.set_verdict(error is None, error or "")

    def set_verdict(self, healthy: bool, error: str) -> None:
        """Record a probe's outcome and tell every service holding the server on a change."""
        self.probes += 1
        self.last_error = error
        if healthy == self.healthy:
            return
        self.healthy = healthy
        if healthy:
            log.warning("health check of %s: UP again", self.url)
        else:
            log.warning("health check of %s failed, server DOWN: %s", self.url, error)
        for service in self.listeners:
            service.set_healthy(self.url, healthy)

    # -- probes --------------------------------------------------------------------------

    async def probe(self) -> str | None:
        """One probe within `timeout`: None when healthy, else why not."""
        spec = self.spec
        try:
            async with asyncio.timeout(spec.timeout):
                if spec.mode == "grpc":
                    return await self._probe_grpc()
                url, headers = dialled(probe_url(self.url, spec), self._headers())
                if url.startswith("h2c:"):
                    status = await h2c_status(url, spec.method, headers, MAX_H2C_READ_BYTES)
                else:
                    status = await self._probe_http(url, headers)
        except TimeoutError:
            return f"no answer within {spec.timeout:g}s"
        except aiohttp.TooManyRedirects:
            return f"more than {MAX_REDIRECTS} redirects"
        except (OSError, aiohttp.ClientError, ssl.SSLError) as exc:
            return f"HTTP request failed: {exc or type(exc).__name__}"
        except ProbeError as exc:
            return str(exc)
        if spec.status:
            if status != spec.status:
                return f"received status {status}, expected {spec.status}"
        elif not 200 <= status < 400:
            return f"received error status code: {status}"
        return None

    def _headers(self) -> dict[str, str]:
        headers = dict(self.spec.headers)
        if self.spec.hostname:
            headers["Host"] = self.spec.hostname
        return headers

    def _ssl_context(self) -> ssl.SSLContext:
        """The serversTransport's own client context (CAs, client certificate, versions,
        insecureSkipVerify), as Traefik's checks use the service's transport."""
        if self._ssl is None:
            from meshproxy.http.transports import client_context

            self._ssl = client_context(self.transport)
        return self._ssl

    async def _probe_http(self, url: str, headers: dict[str, str]) -> int:
        spec = self.spec
        # A fresh connection per probe: a probe must see whether the server accepts
        # connections now, not reuse one opened before it died.
        connector = aiohttp.TCPConnector(force_close=True, ssl=self._ssl_context())
        async with (
            aiohttp.ClientSession(connector=connector, auto_decompress=False) as session,
            session.request(
                spec.method,
                url,
                headers=headers,
                allow_redirects=spec.follow_redirects,
                max_redirects=MAX_REDIRECTS,
                server_hostname=self.transport.server_name or None,
            ) as response,
        ):
            declared = response.content_length
            if declared is not None and declared > MAX_BODY_BYTES:
                raise ProbeError(f"body of {declared} bytes, more than {MAX_BODY_BYTES}")
            read = 0
            async for chunk in response.content.iter_chunked(65536):
                read += len(chunk)
                if read > MAX_BODY_BYTES:
                    raise ProbeError(f"body larger than {MAX_BODY_BYTES} bytes")
            return response.status

    async def _probe_grpc(self) -> str | None:
        import grpc  # imported when a gRPC check exists: grpcio is heavy to load

        parts = urlsplit(self.url)
        host = parts.hostname or ""
        port = self.spec.port or parts.port or (443 if parts.scheme == "https" else 80)
        host, port = resolve(host, port)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        scheme = self.spec.scheme or parts.scheme
        if scheme == "https":
            channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials())
        else:
            channel = grpc.aio.insecure_channel(target)
        try:
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=_identity,
                response_deserializer=_identity,
            )
            try:
                answer = await check(b"", timeout=self.spec.timeout)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    return "gRPC server does not implement the health protocol"
                return f"gRPC health check failed: {code.name} {exc.details() or ''}".strip()
        finally:
            await channel.close()
        status = grpc_serving_status(answer)
        if status != SERVING:
            return f"received gRPC status {GRPC_STATUS_NAMES.get(status, status)}"
        return None


def dialled(url: str, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
    """`url` with its host replaced by where it is dialled (meshproxy.upstream_address: under
    `meshproxy local`, mesh names go to the local proxy), the original authority kept as the
    Host field unless `hostname` set one, so the probe reaches what the data path reaches."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    default = 443 if parts.scheme == "https" else 80
    port = parts.port or default
    to_host, to_port = resolve(host, port)
    if (to_host, to_port) == (host, port):
        return url, headers
    netloc = f"[{to_host}]:{to_port}" if ":" in to_host else f"{to_host}:{to_port}"
    headers = {"Host": parts.netloc, **headers}
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")), headers


class ProbeError(Exception):
    """A probe got an answer that is not HTTP (h2c: the peer broke the protocol)."""


def _identity(data: bytes) -> bytes:
    return data


# grpc.health.v1.HealthCheckResponse.ServingStatus
SERVING = 1
GRPC_STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def grpc_serving_status(message: bytes) -> int:
    """The `status` (field 1, varint) of a HealthCheckResponse; 0 (UNKNOWN) when absent.
    Other fields are skipped by their wire type (protobuf encoding, varint and
    length-delimited only: the message has no others)."""
    status = 0
    pos = 0
    while pos < len(message):
        key, pos = _varint(message, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(message, pos)
            if field == 1:
                status = value
        elif wire == 2:
            length, pos = _varint(message, pos)
            pos += length
        else:
            break
    return status


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while pos < len(data):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return value, pos


MAX_H2C_READ_BYTES = 1 << 20  # what an h2c probe reads before the response head, at most


async def h2c_status(
    url: str, method: str, headers: dict[str, str], max_bytes: int = MAX_H2C_READ_BYTES
) -> int:
    """The status of one HTTP/2 request over cleartext with prior knowledge (RFC 9113 §3.3),
    made with the `h2` library; the connection is closed once the head is in."""
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions

    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or 80
    reader, writer = await asyncio.open_connection(host, port)
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        authority = headers.pop("Host", parts.netloc)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        fields = [
            (":method", method),
            (":scheme", "http"),
            (":authority", authority),
            (":path", path),
            *((name.lower(), value) for name, value in headers.items()),
        ]
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, fields, end_stream=True)
        writer.write(conn.data_to_send())
        read = 0
        while read < max_bytes:
            data = await reader.read(65536)
            if not data:
                raise ProbeError("h2c: connection closed before a response")
            read += len(data)
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                    for name, value in event.headers:
                        if name == b":status":
                            return int(value)
                if isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    raise ProbeError(f"h2c: {type(event).__name__}")
            writer.write(conn.data_to_send())
        raise ProbeError("h2c: no response head within the read cap")
    except h2.exceptions.ProtocolError as exc:
        raise ProbeError(f"h2c: protocol error: {exc}") from None
    finally:
        writer.close()


HealthKey = tuple[str, HealthCheckSpec, TransportSettings]


class HealthRegistry:
    """Every health checker of the process, by (server URL, check, transport)."""

    def __init__(self) -> None:
        self.checkers: dict[HealthKey, HealthChecker] = {}

    def get(self, key: HealthKey) -> HealthChecker:
        """The checker for `key`, made (not started) if new."""
        checker = self.checkers.get(key)
        if checker is None:
            checker = self.checkers[key] = HealthChecker(*key)
        return checker

    def retain(self, wanted: dict[HealthKey, list[LoadBalancerService]]) -> None:
        """After a reload: stop checkers no service wants, point the others at the new
        services, and start the new ones (when a loop runs; else at the next retain)."""
        for key in [k for k in self.checkers if k not in wanted]:
            self.checkers.pop(key).stop()
        try:
            asyncio.get_running_loop()
            running = True
        except RuntimeError:
            running = False
        for key, services in wanted.items():
            checker = self.get(key)
            checker.listeners = services
            if running:
                checker.start()

    def stop(self) -> None:
        for checker in self.checkers.values():
            checker.stop()
        self.checkers.clear()

    def for_url(self, url: str) -> Iterable[HealthChecker]:
        return [c for (u, _, _), c in self.checkers.items() if u == url]


def describe_service(service: Any) -> dict[str, Any]:
    """The admin API's view of a loadBalancer service's servers: Traefik's `serverStatus`
    (url -> UP/DOWN) and meshproxy's details (why a server is out, in-flight requests...)."""
    states = getattr(service, "states", None)
    if states is None:
        return _describe_parent(service)
    checkers = getattr(service, "checkers", None) or [None] * len(states)
    outlier = getattr(service, "outlier", None)
    status: dict[str, str] = {}
    details = []
    for state, checker in zip(states, checkers, strict=False):
        status[state.url] = "UP" if state.available else "DOWN"
        entry: dict[str, Any] = {
            "url": state.url,
            "up": state.available,
            "inFlight": state.in_flight,
            "latencyEstimateMs": round(state.rtt * 1000.0, 3) if state.stamp >= 0 else None,
            "healthy": state.healthy,
        }
        if checker is not None:
            entry["healthCheck"] = {"probes": checker.probes, "lastError": checker.last_error}
        if outlier is not None:
            entry["outlier"] = outlier.describe(state)
        reasons = []
        if not state.healthy and checker is not None:
            reasons.append(f"health check failed: {checker.last_error}")
        if state.ejected:
            reasons.append("ejected by outlier detection")
        if reasons:
            entry["why"] = "; ".join(reasons)
        details.append(entry)
    out: dict[str, Any] = {"serverStatus": status, "meshproxyServers": details}
    if states and not any(s.available for s in states):
        out["meshproxyWhy"] = "no server available: every server is down (see meshproxyServers)"
    return out


def _describe_parent(service: Any) -> dict[str, Any]:
    """`meshproxyWhy` for a `weighted` or `mirroring` service with `healthCheck` that is down
    (Traefik's status propagation: it answers 503 `no available server`): which children
    are down, from the status they last reported."""
    if not getattr(service, "health_check", False) or getattr(service, "up", True):
        return {}
    names = getattr(service, "child_names", None)
    if names:
        down = [
            name
            for name, up, weight in zip(
                names, service.children_up, service.weights_key, strict=False
            )
            if not up and weight > 0
        ]
        why = (
            f"no available child: every child service with a weight is down ({', '.join(down)})"
            if down
            else "no available child: no child service has a weight above 0"
        )
        return {"meshproxyWhy": why}
    main = getattr(service, "main_name", "")
    if main:
        return {"meshproxyWhy": f"main service {main} is down (no server available)"}
    return {}
