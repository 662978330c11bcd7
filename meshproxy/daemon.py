"""The proxy daemon: listeners for every entrypoint, the admin API, the providers, and the
housekeeping loop, wired around one ConfigManager."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from meshproxy.admin.api import build_admin_app
from meshproxy.admin.traefik_api import AdminContext
from meshproxy.config.dynamic import RouterTLS
from meshproxy.config.static import EntryPointHTTP2, StaticConfig, parse_address
from meshproxy.http.server import (
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_TARGET_BYTES,
    EntryPointSettings,
    HTTPEntryPoint,
)
from meshproxy.http.transports import TransportError, default_transport
from meshproxy.http.upstream import TransportSettings
from meshproxy.l4.tls import L4Entry, SNICheck, https_key
from meshproxy.l4.udp import UDPEntryPoint, fd_budget_warning, udp_settings
from meshproxy.networks import NetworkSet
from meshproxy.observability.access_log import AccessLog, build_access_log
from meshproxy.observability.metrics import DEFAULT_BUCKETS, RequestMetrics
from meshproxy.observability.runtime_metrics import RuntimeCollector
from meshproxy.providers.file import FileProvider
from meshproxy.providers.http_poll import HTTPProvider
from meshproxy.runtime.compiler import CompileContext
from meshproxy.runtime.dispatch import make_dispatcher
from meshproxy.runtime.manager import ConfigManager
from meshproxy.runtime.state import RuntimeState
from meshproxy.tcp import proxy as tcp_relays
from meshproxy.tcp.proxy import pipe_settings
from meshproxy.tcp.proxy_protocol import ProxyHeaderReader, ProxyProtocolPolicy
from meshproxy.tcp.services import transport_from_static

log = logging.getLogger("meshproxy")

ADMIN_ENTRYPOINT = "traefik"


class StartupError(Exception):
    """The proxy cannot start; the message is one line naming the address or option."""


@dataclass
class Listener:
    name: str
    entry: HTTPEntryPoint
    server: asyncio.AbstractServer


@dataclass
class ProxyDaemon:
    static: StaticConfig
    metrics: RequestMetrics = field(init=False)
    state: RuntimeState = field(default_factory=RuntimeState)
    listeners: list[Listener] = field(default_factory=list)
    udp_listeners: list[UDPEntryPoint] = field(default_factory=list)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    admin_runner: web.AppRunner | None = None
    # Worker processes (meshproxy.node): "single" is the whole proxy in this process;
    # "supervisor" runs the providers and the admin entrypoint, no traffic listener; "worker"
    # serves traffic on `inherited` sockets (entrypoint name -> listening socket bound by the
    # supervisor) or its own SO_REUSEPORT ones, fed configurations by the supervisor.
    role: str = "single"
    inherited: dict[str, socket.socket] = field(default_factory=dict)
    node: Any = None  # the supervisor's view of its workers (meshproxy.node.supervisor)
    # SIGTERM received: /ping answers ping.terminatingStatusCode (readiness goes false first)
    terminating: bool = False

    def __post_init__(self) -> None:
        prometheus = self.static.metrics.prometheus if self.static.metrics else None
        if prometheus is not None:
            self.metrics = RequestMetrics(
                prometheus.buckets or DEFAULT_BUCKETS,
                entrypoint_labels=prometheus.add_entry_points_labels,
                router_labels=prometheus.add_routers_labels,
                service_labels=prometheus.add_services_labels,
            )
        else:
            self.metrics = RequestMetrics()
        try:
            self.access_log: AccessLog | None = build_access_log(
                self.static.access_log, self.metrics
            )
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        self.tracing: Any = None  # observability.tracing.Tracing, with a `tracing` section
        if self.static.tracing is not None:
            from meshproxy.observability.tracing import DroppedSpansCollector, from_static

            self.tracing = from_static(self.static.tracing, lambda: self.manager.snapshot)
            dropped = DroppedSpansCollector(self.tracing)
            self.metrics.registry.register(dropped)  # type: ignore[arg-type]
        self.http_entrypoints: dict[str, Any] = {}
        self.udp_entrypoints: list[str] = []
        for name, entry in self.static.entry_points.items():
            if name == ADMIN_ENTRYPOINT:
                continue
            address = parse_address(entry.address)
            if address.protocol == "udp":
                self.udp_entrypoints.append(name)
            else:
                self.http_entrypoints[name] = entry
        explicit_default = [n for n, e in self.http_entrypoints.items() if e.as_default]
        self.default_entrypoints = sorted(explicit_default or self.http_entrypoints)
        # entryPoints.X.http.tls: the TLS of the HTTP routers there without one of their own
        self.entrypoint_tls = {
            n: RouterTLS(options=e.http.tls.options)
            for n, e in self.http_entrypoints.items()
            if e.http is not None and e.http.tls is not None
        }
        self.transport = self._transport_settings()
        try:
            self.tcp_transport = transport_from_static(self.static.tcp_servers_transport)
        except TransportError as exc:
            raise StartupError(str(exc)) from None
        provider = (
            "http" if self.static.providers.http and self.static.providers.http.endpoint else "file"
        )
        self.manager = ConfigManager(self._context_factory(provider))
        # Scrape-time gauges over the live state: certificate expiry, breakers, pools...
        runtime = RuntimeCollector(lambda: self.manager.snapshot, self.state)
        self.metrics.registry.register(runtime)  # type: ignore[arg-type]

    def _transport_settings(self) -> TransportSettings:
        """The static `serversTransport.*` options: the default transport (transports.py)."""
        try:
            return default_transport(self.static.servers_transport)
        except TransportError as exc:
            raise StartupError(str(exc)) from None

    def _context_factory(self, provider: str) -> Any:
        def factory(generation: int) -> CompileContext:
            return CompileContext(
                provider=provider,
                http_entrypoints=list(self.http_entrypoints),
                udp_entrypoints=list(self.udp_entrypoints),
                default_entrypoints=self.default_entrypoints,
                transport=self.transport,
                metrics=self.metrics,
                state=self.state,
                generation=generation,
                default_rule_syntax=self.static.core.default_rule_syntax
                if self.static.core
                else None,
                tcp_transport=self.tcp_transport,
                entrypoint_tls=self.entrypoint_tls,
            )

        return factory

    # -- startup ------------------------------------------------------------------------

    async def start(self) -> None:
        raise_open_file_limit()
        loop = asyncio.get_running_loop()
        if self.role != "supervisor":
            await self._start_traffic()
        if self.role != "worker":
            await self._start_admin()
            self._start_providers()
        self.tasks.append(loop.create_task(self._housekeeping()))

    async def _start_traffic(self) -> None:
        loop = asyncio.get_running_loop()
        for name, entry in self.http_entrypoints.items():
            address = parse_address(entry.address)
            fwd = entry.forwarded_headers
            timeouts = entry.transport.responding_timeouts if entry.transport else None
            settings = EntryPointSettings(
                name=name,
                port=address.port,
                trusted_networks=_networks(name, fwd.trusted_i_ps if fwd else []),
                insecure_forwarded=bool(fwd and fwd.insecure),
                # <= 0 means the default, as Go's server reads maxHeaderBytes
                max_header_bytes=(
                    entry.http.max_header_bytes
                    if entry.http
                    and entry.http.max_header_bytes
                    and entry.http.max_header_bytes > 0
                    else DEFAULT_MAX_HEADER_BYTES
                ),
                max_target_bytes=(
                    entry.http.max_request_target_bytes
                    if entry.http
                    and entry.http.max_request_target_bytes
                    and entry.http.max_request_target_bytes > 0
                    else DEFAULT_MAX_TARGET_BYTES
                ),
                idle_timeout=float(timeouts.idle_timeout)
                if timeouts and timeouts.idle_timeout is not None
                else 180.0,
                tunnel_idle_timeout=float(timeouts.tunnel_idle_timeout)
                if timeouts and timeouts.tunnel_idle_timeout is not None
                else 3600.0,
                read_timeout=float(timeouts.read_timeout)
                if timeouts and timeouts.read_timeout is not None
                else 60.0,
                # Traefik's http.sanitizePath: true unless explicitly false
                sanitize_path=not (entry.http and entry.http.sanitize_path is False),
                refused_encodings=refused_encodings(
                    entry.http.encoded_characters if entry.http else None
                ),
            )
            apply_http2_limits(settings, entry.http2)
            http_entry = HTTPEntryPoint(
                settings,
                make_dispatcher(name, self.manager, self.metrics, self.access_log),
                on_open=lambda delta, n=name: self.metrics.connection_delta(n, "TCP", delta),
                on_protocol_error=lambda status, n=name: self.metrics.add_protocol_error(n, status),
            )
            # Requests the proxy decrypted (meshproxy.l4.tls): the entrypoint's HTTPS routers,
            # behind Traefik's SNI check (domain fronting: 421).
            manager = self.manager
            https_entry = HTTPEntryPoint(
                dataclasses.replace(settings, tls=True),
                SNICheck(
                    name,
                    lambda m=manager: m.snapshot,  # type: ignore[misc]
                    make_dispatcher(https_key(name), manager, self.metrics, self.access_log),
                    self.metrics,
                ),
                on_open=http_entry.on_open,
                on_protocol_error=http_entry.on_protocol_error,
            )
            if self.tracing is not None:  # the server span opens before routing, as Traefik's
                from meshproxy.observability.tracing import TracedEntry

                http_entry.handler = TracedEntry(self.tracing, http_entry.handler)
                sni_check = https_entry.handler
                assert isinstance(sni_check, SNICheck)
                sni_check.next_handler = TracedEntry(self.tracing, sni_check.next_handler)
            inherited = self.inherited.get(name)
            try:
                if inherited is not None:  # bound once by the supervisor (meshproxy.node)
                    server = await loop.create_server(
                        self._protocol_factory(name, http_entry, https_entry),
                        sock=inherited,
                        backlog=4096,
                    )
                else:
                    server = await loop.create_server(
                        self._protocol_factory(name, http_entry, https_entry),
                        address.host,
                        address.port,
                        reuse_port=bool(entry.reuse_port) or self.role == "worker",
                        backlog=4096,
                    )
            except OSError as exc:
                raise StartupError(
                    f"entrypoint {name}: cannot listen on {entry.address}: {_reason(exc)}"
                ) from None
            self.listeners.append(Listener(name, http_entry, server))
            # Swept, drained and closed with the others; same server (closing it is idempotent).
            self.listeners.append(Listener(https_key(name), https_entry, server))
            log.info("entrypoint %s listening on %s", name, entry.address)
        for name in self.udp_entrypoints:
            await self._start_udp(name)
        budget = fd_budget_warning({u.name: u.settings for u in self.udp_listeners})
        if budget:
            log.warning("%s", budget)

    async def _start_udp(self, name: str) -> None:
        """A UDP entrypoint (`:15000/udp`): its sessions go where the live snapshot's UDP
        router for it says (meshproxy/l4/udp.py). No host: all interfaces, IPv6 and IPv4 on
        one dual-stack socket as Go's listener, or IPv4 alone where IPv6 is off."""
        entry = self.static.entry_points[name]
        address = parse_address(entry.address)
        try:
            settings = udp_settings(entry)
        except ValueError as exc:
            raise StartupError(f"entryPoints.{name}.udp: {exc}") from None
        manager = self.manager
        udp_entry = UDPEntryPoint(
            name,
            lambda: manager.snapshot.udp_routes.get(name),
            settings,
            self.metrics.udp_counters(name),
        )
        loop = asyncio.get_running_loop()
        hosts = [address.host] if address.host else ["::", "0.0.0.0"]
        for host in hosts:
            try:
                await loop.create_datagram_endpoint(
                    lambda: udp_entry,
                    local_addr=(host, address.port),
                    # Workers: one socket each, so a client's datagrams (hashed by address)
                    # always meet the worker that holds its session.
                    reuse_port=bool(entry.reuse_port) or self.role == "worker" or None,
                )
                break
            except OSError as exc:
                if host != hosts[-1]:
                    continue
                raise StartupError(
                    f"entrypoint {name}: cannot listen on {entry.address}: {_reason(exc)}"
                ) from None
        self.udp_listeners.append(udp_entry)
        log.info("entrypoint %s listening on %s", name, entry.address)

    def _protocol_factory(
        self, name: str, http_entry: HTTPEntryPoint, https_entry: HTTPEntryPoint
    ) -> Any:
        """Per connection, from the live config (meshproxy.l4.tls): TCP relaying at once when
        the entrypoint's TCP routers are all non-TLS (as Traefik, so server-speaks-first
        protocols work), else the sniffer: TLS to SNI routing (passthrough or termination),
        non-TLS to a matching TCP router or HTTP."""
        manager = self.manager
        entry = L4Entry(
            name,
            lambda: manager.snapshot,
            http_entry,
            http_entry.on_open,
            pipe_settings(self.http_entrypoints[name]),
            https_entry,
        )
        entry.on_tcp_closed = self.metrics.tcp_counters(name).closed
        incoming = self.http_entrypoints[name].proxy_protocol
        if incoming is None:
            return entry.connection_factory
        # Traefik's proxyProtocol: the PROXY header is read before anything else (sniffing,
        # immediate TCP routing), so every layer sees the header's client address.
        policy = ProxyProtocolPolicy(
            NetworkSet(_networks(name, incoming.trusted_i_ps or [], "proxyProtocol")),
            bool(incoming.insecure),
            entry.peek_timeout,
        )
        on_open = http_entry.on_open

        def reader() -> ProxyHeaderReader:
            return ProxyHeaderReader(policy, entry.connection_factory, on_open)

        return reader

    async def _start_admin(self) -> None:
        static = self.static
        wants_admin = (
            static.api is not None
            or static.ping is not None
            or (static.metrics is not None and static.metrics.prometheus is not None)
        )
        admin = static.entry_points.get(ADMIN_ENTRYPOINT)
        if not wants_admin and admin is None:
            return
        address = parse_address(admin.address if admin else ":8080")
        app = build_admin_app(
            self.manager,
            self.metrics if static.metrics and static.metrics.prometheus else None,
            ping=static.ping is not None,
            api=static.api is not None,
            context=AdminContext(
                self.manager,
                static,
                time.time(),
                access_log=self.access_log is not None,
                metrics=self.metrics,
                state=self.state,
            ),
            node=self,
        )
        self.admin_runner = web.AppRunner(app, access_log=None)
        await self.admin_runner.setup()
        site = web.TCPSite(self.admin_runner, address.host, address.port, backlog=256)
        try:
            await site.start()
        except OSError as exc:
            shown = admin.address if admin else ":8080"
            raise StartupError(
                f"entrypoint {ADMIN_ENTRYPOINT}: cannot listen on {shown}: {_reason(exc)}"
            ) from None
        log.info(
            "admin entrypoint %s listening on %s",
            ADMIN_ENTRYPOINT,
            admin.address if admin else ":8080",
        )

    def _start_providers(self) -> None:
        loop = asyncio.get_running_loop()
        providers = self.static.providers
        if providers.http is not None and providers.http.endpoint:
            http = providers.http
            poller = HTTPProvider(
                http.endpoint,
                self.manager,
                float(http.poll_interval),
                float(http.poll_timeout),
                http.headers,
                http.max_response_body_size,
            )
            self.tasks.append(loop.create_task(poller.run()))
        if providers.file is not None and (providers.file.filename or providers.file.directory):
            path = providers.file.filename or providers.file.directory or ""
            file_provider = FileProvider(path, self.manager, providers.file.watch)
            self.tasks.append(loop.create_task(file_provider.run()))
        if not self.tasks:
            log.warning("no provider configured: every request will get 404")

    async def _housekeeping(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            now = loop.time()
            for listener in self.listeners:
                listener.entry.sweep()
            self.state.sweep(now)

    # -- the admin entrypoint's view of the node ------------------------------------------

    @property
    def terminating_status(self) -> int:
        """What /ping answers once SIGTERM arrived (Traefik's ping.terminatingStatusCode)."""
        ping = self.static.ping
        return ping.terminating_status_code if ping and ping.terminating_status_code else 503

    @property
    def ready(self) -> bool:
        """/ping's readiness: one process is ready once it answers (Traefik's ping); a
        supervisor once a worker serves (meshproxy.node.supervisor.Supervisor.serving)."""
        return self.node.serving if self.node is not None else True

    def admin_workers(self) -> list[dict[str, Any]] | None:
        """Each worker process and the configuration generation it runs (meshproxy.node)."""
        return self.node.workers_view() if self.node is not None else None

    async def admin_metrics(self) -> bytes:
        """/metrics: this process's, or the sum over the workers (meshproxy.node.metrics)."""
        if self.node is not None:
            result: bytes = await self.node.render_metrics()
            return result
        return self.metrics.render()

    def life_cycle(self) -> tuple[float, float]:
        """(requestAcceptGraceTimeout, graceTimeOut) in seconds: Traefik's per-entrypoint
        `transport.lifeCycle` (defaults 0 s and 10 s), the longest over the entrypoints since
        the whole process stops at once."""
        accept, graces = 0.0, []
        for entry in self.static.entry_points.values():
            life = entry.transport.life_cycle if entry.transport else None
            if life is None:
                continue
            if life.request_accept_grace_timeout is not None:
                accept = max(accept, float(life.request_accept_grace_timeout))
            if life.grace_time_out is not None:
                graces.append(float(life.grace_time_out))
        return accept, max(graces) if graces else 10.0

    # -- shutdown -----------------------------------------------------------------------

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish (up to `grace`), then close. UDP
        entrypoints stop at once: a datagram has nothing in flight to wait for. HTTP/1.1
        connections end at a request boundary (`Connection: close`, idle ones closed),
        HTTP/2 ones get GOAWAY, WebSockets a 1001 Close, TCP pipes get up to `grace`."""
        for udp_entry in self.udp_listeners:
            udp_entry.close()
        for listener in self.listeners:
            listener.server.close()
            listener.entry.close_tunnels()  # WebSockets: Close 1001 to both sides
            listener.entry.shutdown_http2()  # GOAWAY(NO_ERROR): accepted streams finish
            listener.entry.drain()  # HTTP/1.1: Connection: close, idle connections closed
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # A connection accepted just before the listener closed may not have shown its first
        # bytes yet (the sniffer waits for them): its request is on the way, closing it would
        # fail a request no client may retry. Waited for a short while, not the whole grace
        # period (a client that connects and sends nothing is not in flight).
        first_bytes = loop.time() + min(grace, 2.0)

        def busy() -> bool:
            return any(
                lst.entry.tunnels
                or any(c.current is not None for c in lst.entry.connections)
                or any(c.current is not None for c in lst.entry.h2_connections)
                or (lst.entry.sniffing and loop.time() < first_bytes)
                for lst in self.listeners
            ) or bool(tcp_relays.LIVE)  # TCP routes and passthrough: up to the grace too

        while loop.time() < deadline and busy():
            await asyncio.sleep(0.05)
        for listener in self.listeners:
            listener.entry.close_all()
        tcp_relays.close_relays()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
        if self.access_log is not None:
            await asyncio.to_thread(self.access_log.close)  # the lines still queued
        if self.tracing is not None:  # export what is queued, bounded by the exporter's timeout
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.to_thread(self.tracing.shutdown), 5.0)
        self.state.close()

    async def run_forever(self) -> None:
        """Serve until SIGTERM/SIGINT, then stop gracefully as Traefik does: /ping (readiness)
        answers 503 at once, listeners keep accepting for requestAcceptGraceTimeout (so
        endpoints drop the pod first), then `stop(graceTimeOut)`. A second signal during
        that ends the process at once."""
        await self.start()
        signals = asyncio.Queue[int]()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, signals.put_nowait, sig)
        await signals.get()
        self.terminating = True
        accept_grace, grace = self.life_cycle()
        log.info(
            "shutting down: accepting for %.1fs more, then %.1fs for in-flight requests",
            accept_grace,
            grace,
        )
        graceful = loop.create_task(self._graceful_stop(accept_grace, grace))
        second = loop.create_task(signals.get())
        await asyncio.wait({graceful, second}, return_when=asyncio.FIRST_COMPLETED)
        if not graceful.done():
            log.warning("second signal: stopping at once")
            graceful.cancel()
            for listener in self.listeners:
                listener.server.close()
                listener.entry.close_all()
            if self.node is not None:
                self.node.kill_all()
        second.cancel()

    async def _graceful_stop(self, accept_grace: float, grace: float) -> None:
        if accept_grace > 0:
            await asyncio.sleep(accept_grace)  # a deadline to honour, not a wait for a state
        if self.node is not None:
            await self.node.stop(grace)
        await self.stop(grace)


# Traefik's entryPoints.X.http.encodedCharacters options (all true by default) and what each
# lets through in a request path.
_ENCODED_CHARACTERS = {
    "allowencodedslash": (b"%2F",),
    "allowencodedbackslash": (b"%5C",),
    "allowencodednullcharacter": (b"%00",),
    "allowencodedsemicolon": (b"%3B",),
    "allowencodedpercent": (b"%25",),
    "allowencodedquestionmark": (b"%3F",),
    "allowencodedhash": (b"%23",),
}


def apply_http2_limits(settings: EntryPointSettings, limits: EntryPointHTTP2 | None) -> None:
    """The HTTP/2 limits given in entryPoints.X.http2 (docs/http2-server.md); the others keep
    their defaults."""
    if limits is None:
        return
    if limits.max_concurrent_streams is not None:
        settings.h2_max_concurrent_streams = limits.max_concurrent_streams
    if limits.max_decoder_header_table_size is not None:
        settings.h2_max_decoder_table_size = limits.max_decoder_header_table_size
    if limits.max_encoder_header_table_size is not None:
        settings.h2_max_encoder_table_size = limits.max_encoder_header_table_size
    if limits.initial_window_size is not None:
        settings.h2_initial_window_size = limits.initial_window_size
    if limits.max_header_list_size is not None:
        settings.h2_max_header_list_size = limits.max_header_list_size


def refused_encodings(options: dict[str, Any] | None) -> tuple[bytes, ...]:
    """The percent-encodings an entrypoint refuses in paths: those whose allowEncoded* option
    is false (keys matched case-insensitively, values as booleans or flag strings)."""
    refused: list[bytes] = []
    for key, value in (options or {}).items():
        allowed = value if isinstance(value, bool) else str(value).strip().lower() != "false"
        encodings = _ENCODED_CHARACTERS.get(key.lower())
        if encodings is None:
            log.warning("entrypoint option encodedCharacters.%s is not known; ignored", key)
        elif not allowed:
            refused.extend(encodings)
    return tuple(refused)


def _networks(entrypoint: str, values: list[str], section: str = "forwardedHeaders") -> list[Any]:
    try:
        return [ipaddress.ip_network(t.strip(), strict=False) for t in values]
    except ValueError as exc:
        raise StartupError(f"entryPoints.{entrypoint}.{section}.trustedIPs: {exc}") from None


def raise_open_file_limit() -> None:
    """Raise the soft open-file limit to the hard one, as Go's runtime does at start (so
    Traefik runs with it): every connection and every UDP session holds a descriptor, and
    the soft default (often 1024) is far below what a node proxy needs."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _reason(exc: OSError) -> str:
    """`Address already in use`, not uvloop's long wrapper text around it."""
    if exc.errno and exc.errno > 0:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)  # resolver errors (socket.gaierror) have negative codes
