"""Dynamic configuration: a compatible subset of Traefik's (`http`/`tcp`/`udp` routers, services,
middlewares), with Traefik's exact key names. Decoding is strict (unknown keys are errors);
semantic checks happen later, per object, in the runtime compiler.
"""

from __future__ import annotations

from typing import Any

import msgspec

from meshproxy.config.decode import (
    ConfigDecodeError,
    ConfigError,
    check_shape,
    convert,
    join_path,
    load_text,
    normalize,
)
from meshproxy.config.durations import Duration


class _Base(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    pass


# ---------------------------------------------------------------- HTTP services


class Server(_Base):
    url: str
    weight: int | None = None
    preserve_path: bool | None = None


class HealthCheck(_Base):
    scheme: str | None = None
    mode: str | None = None
    path: str | None = None
    method: str | None = None
    status: int | None = None
    port: int | None = None
    interval: Duration | None = None
    unhealthy_interval: Duration | None = None
    timeout: Duration | None = None
    hostname: str | None = None
    follow_redirects: bool | None = None
    # Values are checked (and numbers/booleans taken as text, as Traefik) by
    # balancer/health.spec_from_config, so the error names the key: `headers.X-Id`.
    headers: dict[str, Any] | None = None


class PassiveHealthCheck(_Base):
    failure_window: Duration | None = None
    max_failed_attempts: int | None = None


class OutlierDetection(_Base):
    """meshproxy extension (Envoy's outlier detection): see balancer/outlier.py."""

    enabled: bool | None = None
    consecutive_failures: int | None = None
    consecutive_gateway_failures: int | None = None
    consecutive5xx: int | None = msgspec.field(default=None, name="consecutive5xx")
    base_ejection_time: Duration | None = None
    max_ejection_time: Duration | None = None
    max_ejection_percent: int | None = None


class Cookie(_Base):
    name: str | None = None
    secure: bool | None = None
    http_only: bool | None = None
    same_site: str | None = None
    max_age: int | None = None
    path: str | None = None
    domain: str | None = None


class Sticky(_Base):
    cookie: Cookie | None = None


class ResponseForwarding(_Base):
    flush_interval: Duration | None = None


class ServersLoadBalancer(_Base):
    servers: list[Server] = []
    strategy: str | None = None
    sticky: Sticky | None = None
    health_check: HealthCheck | None = None
    passive_health_check: PassiveHealthCheck | None = None
    outlier_detection: OutlierDetection | None = None  # meshproxy extension
    pass_host_header: bool | None = None
    response_forwarding: ResponseForwarding | None = None
    servers_transport: str | None = None


class WeightedService(_Base):
    name: str
    weight: int | None = None


class Weighted(_Base):
    services: list[WeightedService] = []
    sticky: Sticky | None = None
    health_check: dict[str, Any] | None = None


class MirrorService(_Base):
    name: str
    percent: int = 0


class Mirroring(_Base):
    service: str
    mirror_body: bool | None = None
    max_body_size: int | None = None
    mirrors: list[MirrorService] = []
    health_check: dict[str, Any] | None = None


class FailoverErrors(_Base):
    status: list[str] = []
    max_request_body_bytes: int | None = None


class Failover(_Base):
    service: str
    fallback: str
    health_check: dict[str, Any] | None = None
    errors: FailoverErrors | None = None


class Service(_Base):
    load_balancer: ServersLoadBalancer | None = None
    weighted: Weighted | None = None
    mirroring: Mirroring | None = None
    failover: Failover | None = None
    highest_random_weight: Weighted | None = None


# ---------------------------------------------------------------- HTTP routers


class Domain(_Base):
    main: str | None = None
    sans: list[str] | None = None


class RouterTLS(_Base):
    options: str | None = None
    cert_resolver: str | None = None
    domains: list[Domain] | None = None


class RouterObservability(_Base):
    access_logs: bool | None = None
    metrics: bool | None = None
    tracing: bool | None = None
    trace_verbosity: str | None = None


class Router(_Base):
    entry_points: list[str] = []
    middlewares: list[str] = []
    service: str = ""
    rule: str = ""
    rule_syntax: str | None = None
    priority: int | None = None
    tls: RouterTLS | None = None
    observability: RouterObservability | None = None


# ---------------------------------------------------------------- HTTP middlewares


class IPStrategy(_Base):
    depth: int | None = None
    excluded_i_ps: list[str] | None = msgspec.field(default=None, name="excludedIPs")
    ipv6_subnet: int | None = None


class IPAllowList(_Base):
    source_range: list[str] = []
    ip_strategy: IPStrategy | None = None
    reject_status_code: int | None = None


class SourceCriterion(_Base):
    ip_strategy: IPStrategy | None = None
    request_header_name: str | None = None
    request_host: bool | None = None


class RateLimit(_Base):
    average: int | None = None
    period: Duration | None = None
    burst: int | None = None
    source_criterion: SourceCriterion | None = None


class RetryBudget(_Base):
    """meshproxy extension (Linkerd's retry budget): retries may add at most `ratio` of the
    requests seen over `window`, plus `minRetriesPerSecond` so low traffic can still retry."""

    ratio: float | None = None
    min_retries_per_second: int | None = None
    window: Duration | None = None


class Retry(_Base):
    attempts: int | None = None
    budget: RetryBudget | None = None
    initial_interval: Duration | None = None
    timeout: Duration | None = None
    max_request_body_bytes: int | None = None
    status: list[str] | None = None
    disable_retry_on_network_error: bool | None = None
    retry_non_idempotent_method: bool | None = None


class CircuitBreaker(_Base):
    expression: str | None = None
    check_period: Duration | None = None
    fallback_duration: Duration | None = None
    recovery_duration: Duration | None = None
    response_code: int | None = None


class AddPrefix(_Base):
    prefix: str | None = None


class StripPrefix(_Base):
    prefixes: list[str] = []
    force_slash: bool | None = None


class StripPrefixRegex(_Base):
    regex: list[str] = []


class ReplacePath(_Base):
    path: str | None = None


class ReplacePathRegex(_Base):
    regex: str | None = None
    replacement: str | None = None


class Chain(_Base):
    middlewares: list[str] = []


class InFlightReq(_Base):
    amount: int | None = None
    source_criterion: SourceCriterion | None = None


class Buffering(_Base):
    max_request_body_bytes: int | None = None
    mem_request_body_bytes: int | None = None
    max_response_body_bytes: int | None = None
    mem_response_body_bytes: int | None = None
    retry_expression: str | None = None


class Headers(_Base):
    custom_request_headers: dict[str, str] | None = None
    custom_response_headers: dict[str, str] | None = None
    access_control_allow_credentials: bool | None = None
    access_control_allow_headers: list[str] | None = None
    access_control_allow_methods: list[str] | None = None
    access_control_allow_origin_list: list[str] | None = None
    access_control_allow_origin_list_regex: list[str] | None = None
    access_control_expose_headers: list[str] | None = None
    access_control_max_age: int | None = None
    add_vary_header: bool | None = None
    allowed_hosts: list[str] | None = None
    hosts_proxy_headers: list[str] | None = None
    ssl_redirect: bool | None = None
    ssl_temporary_redirect: bool | None = None
    ssl_host: str | None = None
    ssl_force_host: bool | None = None
    ssl_proxy_headers: dict[str, str] | None = None
    sts_seconds: int | None = None
    sts_include_subdomains: bool | None = None
    sts_preload: bool | None = None
    force_sts_header: bool | None = None
    frame_deny: bool | None = None
    custom_frame_options_value: str | None = None
    content_type_nosniff: bool | None = None
    browser_xss_filter: bool | None = None
    custom_browser_xss_value: str | None = msgspec.field(default=None, name="customBrowserXSSValue")
    content_security_policy: str | None = None
    content_security_policy_report_only: str | None = None
    public_key: str | None = None
    referrer_policy: str | None = None
    permissions_policy: str | None = None
    feature_policy: str | None = None
    is_development: bool | None = None


# Middleware kinds we decode but whose behaviour is not provided: kept raw so a payload that
# uses them still loads; routers that reference them are disabled with a clear error.
RawOptions = dict[str, Any]


class Middleware(_Base):
    add_prefix: AddPrefix | None = None
    strip_prefix: StripPrefix | None = None
    strip_prefix_regex: StripPrefixRegex | None = None
    replace_path: ReplacePath | None = None
    replace_path_regex: ReplacePathRegex | None = None
    chain: Chain | None = None
    ip_white_list: IPAllowList | None = None
    ip_allow_list: IPAllowList | None = None
    headers: Headers | None = None
    rate_limit: RateLimit | None = None
    in_flight_req: InFlightReq | None = None
    buffering: Buffering | None = None
    circuit_breaker: CircuitBreaker | None = None
    retry: Retry | None = None
    encoded_characters: RawOptions | None = None
    errors: RawOptions | None = None
    redirect_regex: RawOptions | None = None
    redirect_scheme: RawOptions | None = None
    basic_auth: RawOptions | None = None
    digest_auth: RawOptions | None = None
    forward_auth: RawOptions | None = None
    compress: RawOptions | None = None
    pass_tls_client_cert: RawOptions | None = msgspec.field(default=None, name="passTLSClientCert")
    content_type: RawOptions | None = None
    grpc_web: RawOptions | None = None
    plugin: RawOptions | None = None


class ForwardingTimeouts(_Base):
    dial_timeout: Duration | None = None
    response_header_timeout: Duration | None = None
    idle_conn_timeout: Duration | None = None
    read_idle_timeout: Duration | None = None
    ping_timeout: Duration | None = None


class ClientCertificate(_Base):
    """A client certificate for mTLS to the backend; each field is a file path or the PEM
    itself (Traefik's FileOrContent)."""

    cert_file: str = ""
    key_file: str = ""


class ServersTransport(_Base):
    server_name: str | None = None
    insecure_skip_verify: bool | None = None
    root_c_as: list[str] | None = msgspec.field(default=None, name="rootCAs")
    certificates: list[ClientCertificate] | None = None
    max_idle_conns_per_host: int | None = None
    disable_http2: bool | None = msgspec.field(default=None, name="disableHTTP2")
    forwarding_timeouts: ForwardingTimeouts | None = None
    peer_cert_uri: str | None = msgspec.field(default=None, name="peerCertURI")
    spiffe: RawOptions | None = None
    cipher_suites: list[str] | None = None
    min_version: str | None = None
    max_version: str | None = None


class HTTPConfig(_Base):
    routers: dict[str, Router] = {}
    services: dict[str, Service] = {}
    middlewares: dict[str, Middleware] = {}
    servers_transports: dict[str, ServersTransport] = {}


# ---------------------------------------------------------------- TCP and UDP


class TCPServer(_Base):
    address: str
    tls: bool | None = None
    weight: int | None = None


class ProxyProtocol(_Base):
    version: int | None = None


class TCPServersLoadBalancer(_Base):
    servers: list[TCPServer] = []
    servers_transport: str | None = None
    proxy_protocol: ProxyProtocol | None = None
    termination_delay: int | None = None  # milliseconds (deprecated in Traefik v3)
    health_check: dict[str, Any] | None = None


class TCPClientTLS(_Base):
    """TLS from the proxy to a TCP server (`tcp.serversTransports.<name>.tls`)."""

    server_name: str | None = None
    insecure_skip_verify: bool | None = None
    root_c_as: list[str] | None = msgspec.field(default=None, name="rootCAs")
    certificates: list[ClientCertificate] | None = None
    peer_cert_uri: str | None = msgspec.field(default=None, name="peerCertURI")
    spiffe: RawOptions | None = None


class TCPServersTransport(_Base):
    dial_keep_alive: Duration | None = None
    dial_timeout: Duration | None = None
    proxy_protocol: ProxyProtocol | None = None
    termination_delay: Duration | None = None
    tls: TCPClientTLS | None = None


class TCPService(_Base):
    load_balancer: TCPServersLoadBalancer | None = None
    weighted: Weighted | None = None


class TCPRouterTLS(_Base):
    passthrough: bool = False
    options: str | None = None
    cert_resolver: str | None = None
    domains: list[Domain] | None = None


class TCPRouter(_Base):
    entry_points: list[str] = []
    middlewares: list[str] = []
    service: str = ""
    rule: str = ""
    rule_syntax: str | None = None
    priority: int | None = None
    tls: TCPRouterTLS | None = None


class TCPInFlightConn(_Base):
    amount: int | None = None


class TCPMiddleware(_Base):
    ip_allow_list: IPAllowList | None = None
    ip_white_list: IPAllowList | None = None
    in_flight_conn: TCPInFlightConn | None = None


class TCPConfig(_Base):
    routers: dict[str, TCPRouter] = {}
    services: dict[str, TCPService] = {}
    middlewares: dict[str, TCPMiddleware] = {}
    servers_transports: dict[str, TCPServersTransport] = {}


class UDPServer(_Base):
    address: str


class UDPServersLoadBalancer(_Base):
    servers: list[UDPServer] = []


class UDPService(_Base):
    load_balancer: UDPServersLoadBalancer | None = None
    weighted: Weighted | None = None


class UDPRouter(_Base):
    entry_points: list[str] = []
    service: str = ""


class UDPConfig(_Base):
    routers: dict[str, UDPRouter] = {}
    services: dict[str, UDPService] = {}


# ---------------------------------------------------------------- TLS (meshproxy.l4.certificates)


class TLSCertificate(_Base):
    """`tls.certificates[]` and a store's `defaultCertificate`: `certFile`/`keyFile` are paths
    or the PEM text itself, as Traefik accepts."""

    cert_file: str = ""
    key_file: str = ""
    stores: list[str] = []


class TLSClientAuth(_Base):
    ca_files: list[str] = []
    client_auth_type: str | None = None


class TLSOptions(_Base):
    min_version: str | None = None
    max_version: str | None = None
    cipher_suites: list[str] | None = None
    curve_preferences: list[str] | None = None
    client_auth: TLSClientAuth | None = None
    sni_strict: bool | None = None
    alpn_protocols: list[str] | None = msgspec.field(default=None, name="alpnProtocols")
    disable_session_tickets: bool | None = None
    prefer_server_cipher_suites: bool | None = None


class TLSStore(_Base):
    default_certificate: TLSCertificate | None = None
    default_generated_cert: RawOptions | None = None


class TLSConfig(_Base):
    certificates: list[TLSCertificate] = []
    options: dict[str, TLSOptions] = {}
    stores: dict[str, TLSStore] = {}


class DynamicConfig(_Base):
    http: HTTPConfig = msgspec.field(default_factory=HTTPConfig)
    tcp: TCPConfig = msgspec.field(default_factory=TCPConfig)
    udp: UDPConfig = msgspec.field(default_factory=UDPConfig)
    tls: TLSConfig | None = None


_SECTIONS: dict[str, tuple[type[msgspec.Struct], dict[str, Any]]] = {
    "http": (
        HTTPConfig,
        {
            "routers": Router,
            "services": Service,
            "middlewares": Middleware,
            "serversTransports": ServersTransport,
        },
    ),
    "tcp": (
        TCPConfig,
        {
            "routers": TCPRouter,
            "services": TCPService,
            "middlewares": TCPMiddleware,
            "serversTransports": TCPServersTransport,
        },
    ),
    "udp": (UDPConfig, {"routers": UDPRouter, "services": UDPService}),
}


def decode_dynamic(data: bytes | str) -> DynamicConfig:
    """Decode a Traefik dynamic configuration (YAML or JSON).

    Every named object is decoded on its own so that all problems are reported at once,
    each with its JSON path. Any problem rejects the whole payload (as Traefik does): the
    caller keeps serving its last good configuration.
    """
    raw = load_text(data)
    return decode_dynamic_obj(raw)


def decode_dynamic_obj(raw: Any) -> DynamicConfig:
    errors: list[ConfigError] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigDecodeError([ConfigError("$", f"expected an object, got {type(raw).__name__}")])
    check_shape(raw)  # data that did not come through load_text (JSON, in-process callers)
    config = DynamicConfig()
    for key, section_raw in raw.items():
        name = str(key).lower()
        if name == "tls":
            if section_raw is not None and not isinstance(section_raw, dict):
                errors.append(ConfigError("tls", "expected an object"))
            elif section_raw is not None:
                normalized = normalize(section_raw, TLSConfig, "tls", errors)
                config.tls = convert(normalized, TLSConfig, "tls", errors)
            continue
        if name not in _SECTIONS:
            continue  # Traefik ignores unknown top-level keys
        if section_raw is None:
            continue
        _, kinds = _SECTIONS[name]
        if not isinstance(section_raw, dict):
            errors.append(
                ConfigError(name, f"expected an object, got {type(section_raw).__name__}")
            )
            continue
        section = getattr(config, name)
        lower_kinds = {k.lower(): (k, t) for k, t in kinds.items()}
        for kind_key, objects in section_raw.items():
            entry = lower_kinds.get(str(kind_key).lower())
            kind_path = join_path(name, kind_key)
            if entry is None:
                errors.append(ConfigError(kind_path, "field not found"))
                continue
            kind, obj_type = entry
            if objects is None:
                continue
            if not isinstance(objects, dict):
                errors.append(
                    ConfigError(kind_path, f"expected an object, got {type(objects).__name__}")
                )
                continue
            decoded: dict[str, Any] = {}
            for obj_name, obj_raw in objects.items():
                obj_path = join_path(join_path(name, kind), str(obj_name))
                if obj_raw is None:
                    obj_raw = {}
                normalized = normalize(obj_raw, obj_type, obj_path, errors)
                value = convert(normalized, obj_type, obj_path, errors)
                if value is not None:
                    decoded[str(obj_name)] = value
            attr = {"serversTransports": "servers_transports"}.get(kind, kind)
            setattr(section, attr, decoded)
    if errors:
        raise ConfigDecodeError(errors)
    return config


def encode_dynamic(config: DynamicConfig) -> dict[str, Any]:
    """JSON-ready form, Traefik key names."""
    return msgspec.to_builtins(config)
