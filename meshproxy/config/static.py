"""Static configuration, Traefik style: a YAML file (`--configFile`) and/or dotted CLI flags
(`--entryPoints.web.address=:80`). Traefik options that meshproxy does not implement yet
(tracing, other providers...) are accepted with a warning, so Traefik Mesh's DaemonSet
arguments are accepted as they are; a key Traefik does not know either (a misspelling such as
`entryPoints.web.adress`) is an error naming it, as Traefik's own flag parser refuses it.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

import msgspec

from meshproxy.config.decode import ConfigDecodeError, ConfigError, convert, load_text, normalize
from meshproxy.config.durations import Duration


class _Base(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    pass


Raw = dict[str, Any]


class ForwardedHeaders(_Base):
    insecure: bool = False
    trusted_i_ps: list[str] = msgspec.field(default_factory=list, name="trustedIPs")
    connection: list[str] | None = None


class RespondingTimeouts(_Base):
    read_timeout: Duration | None = None
    write_timeout: Duration | None = None
    idle_timeout: Duration | None = None
    # meshproxy: an upgraded connection (WebSocket, ...) with no byte either way is closed
    # after this long (default 1 h, Envoy's stream idle default; 0: never).
    tunnel_idle_timeout: Duration | None = None


class LifeCycle(_Base):
    request_accept_grace_timeout: Duration | None = None
    grace_time_out: Duration | None = None


class EntryPointTransport(_Base):
    responding_timeouts: RespondingTimeouts | None = None
    life_cycle: LifeCycle | None = None
    keep_alive_max_requests: int | None = None
    keep_alive_max_time: Duration | None = None


class EntryPointHTTP2(_Base):
    """Traefik's entryPoints.X.http2 (docs/http2-server.md)."""

    max_concurrent_streams: int | None = None  # Traefik's default 250
    max_decoder_header_table_size: int | None = None  # HPACK, receiving; Traefik's 4096
    max_encoder_header_table_size: int | None = None  # HPACK, sending; Traefik's 4096
    # meshproxy: SETTINGS_INITIAL_WINDOW_SIZE per stream (256 KiB by default) and
    # SETTINGS_MAX_HEADER_LIST_SIZE (default: http.maxHeaderBytes); Traefik has no such keys.
    initial_window_size: int | None = None
    max_header_list_size: int | None = None


class EntryPointHTTPTLS(_Base):
    """Traefik's entryPoints.X.http.tls: every HTTP router of the entrypoint without a `tls`
    section of its own is a TLS router with these settings (Traefik's entrypoint "model",
    provider/traefik/internal.go; https://doc.traefik.io/traefik/routing/entrypoints/#tls).
    `--entryPoints.X.http.tls` or `=true` alone turns it on with the default options."""

    options: str | None = None  # a TLS options name of the dynamic config ("default" if unset)
    cert_resolver: str | None = None  # ACME: not implemented (warning)
    domains: list[Raw] | None = None  # ACME domains: not implemented (warning)


class EntryPointProxyProtocol(_Base):
    """Traefik's entryPoints.X.proxyProtocol: read an incoming PROXY protocol header (v1 or v2)
    from the addresses in `trustedIPs` (IPs or CIDRs), or from any address with `insecure`;
    from other addresses a header is read and its addresses ignored (go-proxyproto's IGNORE
    policy, as Traefik's pkg/server/server_entrypoint_tcp.go)."""

    insecure: bool | None = None
    trusted_i_ps: list[str] | None = msgspec.field(default=None, name="trustedIPs")


class EntryPointHTTP(_Base):
    max_header_bytes: int | None = None
    # meshproxy: the longest request-target served (414 past it); 16 KiB by default
    max_request_target_bytes: int | None = None
    sanitize_path: bool | None = None
    middlewares: list[str] | None = None
    redirections: Raw | None = None
    tls: EntryPointHTTPTLS | None = None
    encoded_characters: Raw | None = None
    encode_query_semicolons: bool | None = None


class EntryPointUDP(_Base):
    timeout: Duration | None = None  # idle session lifetime (Traefik: 3 s by default)
    # meshproxy: caps on sessions (one socket each) per entrypoint and per client IP; at a
    # cap the least recently active session is evicted (docs/udp.md)
    max_sessions: int | None = None
    max_sessions_per_source: int | None = None


class EntryPoint(_Base):
    address: str = ""
    as_default: bool | None = None
    reuse_port: bool | None = None
    forwarded_headers: ForwardedHeaders | None = None
    transport: EntryPointTransport | None = None
    http: EntryPointHTTP | None = None
    http2: EntryPointHTTP2 | None = None
    http3: Raw | None = None
    proxy_protocol: EntryPointProxyProtocol | None = None
    udp: EntryPointUDP | None = None
    observability: Raw | None = None
    allow_a_c_m_e_bypass: bool | None = msgspec.field(default=None, name="allowACMEByPass")


class HTTPProviderConfig(_Base):
    endpoint: str = ""
    poll_interval: Duration = Duration(5.0)
    poll_timeout: Duration = Duration(5.0)
    headers: dict[str, str] | None = None
    tls: Raw | None = None
    max_response_body_size: int | None = None


class FileProviderConfig(_Base):
    filename: str | None = None
    directory: str | None = None
    watch: bool = True
    debug_log_generated_template: bool | None = None


class Providers(_Base):
    http: HTTPProviderConfig | None = None
    file: FileProviderConfig | None = None
    providers_throttle_duration: Duration | None = None


class Ping(_Base):
    entry_point: str = "traefik"
    manual_routing: bool | None = None
    terminating_status_code: int | None = None


class API(_Base):
    insecure: bool = False
    dashboard: bool = True
    debug: bool | None = None
    base_path: str | None = None
    disable_dashboard_ad: bool | None = None


class Log(_Base):
    level: str = "ERROR"
    format: str = "common"
    file_path: str | None = None
    no_color: bool | None = None
    max_size: int | None = None
    max_age: int | None = None
    max_backups: int | None = None
    compress: bool | None = None


class Prometheus(_Base):
    buckets: list[float] | None = None
    add_entry_points_labels: bool = True
    add_routers_labels: bool = False
    add_services_labels: bool = True
    entry_point: str = "traefik"
    manual_routing: bool | None = None
    header_labels: dict[str, str] | None = None


class Metrics(_Base):
    prometheus: Prometheus | None = None
    add_internals: bool | None = None
    datadog: Raw | None = None
    influx_d_b2: Raw | None = msgspec.field(default=None, name="influxDB2")
    influx_d_b: Raw | None = msgspec.field(default=None, name="influxDB")
    statsd: Raw | None = None
    otlp: Raw | None = None


class AccessLogFilters(_Base):
    """Traefik's accessLog.filters: a line is kept if any filter set keeps it."""

    status_codes: list[str] | None = None  # "200", "300-302"
    retry_attempts: bool | None = None
    min_duration: Duration | None = None


class AccessLogHeaders(_Base):
    default_mode: str | None = None  # keep | drop | redact (Traefik's default: drop)
    names: dict[str, str] | None = None


class AccessLogFields(_Base):
    default_mode: str | None = None  # keep | drop (Traefik's default: keep)
    names: dict[str, str] | None = None
    headers: AccessLogHeaders | None = None


class AccessLog(_Base):
    """Traefik's static accessLog section (observability/access_log.py)."""

    file_path: str | None = None  # default: standard output
    format: str | None = None  # common | genericCLF | json
    buffering_size: int | None = None
    filters: AccessLogFilters | None = None
    fields: AccessLogFields | None = None
    add_internals: bool | None = None


class ForwardingTimeoutsStatic(_Base):
    dial_timeout: Duration | None = None
    response_header_timeout: Duration | None = None
    idle_conn_timeout: Duration | None = None
    read_idle_timeout: Duration | None = None
    ping_timeout: Duration | None = None


class ServersTransportStatic(_Base):
    insecure_skip_verify: bool | None = None
    root_c_as: list[str] | None = msgspec.field(default=None, name="rootCAs")
    max_idle_conns_per_host: int | None = None
    forwarding_timeouts: ForwardingTimeoutsStatic | None = None
    spiffe: Raw | None = None


class TCPServersTransportTLSStatic(_Base):
    insecure_skip_verify: bool | None = None
    root_c_as: list[str] | None = msgspec.field(default=None, name="rootCAs")
    spiffe: Raw | None = None


class TCPServersTransportStatic(_Base):
    """Traefik's static `tcpServersTransport`: the default transport of TCP services."""

    dial_keep_alive: Duration | None = None
    dial_timeout: Duration | None = None
    termination_delay: Duration | None = None
    tls: TCPServersTransportTLSStatic | None = None


class TracingOTLPTLS(_Base):
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    insecure_skip_verify: bool | None = None


class TracingOTLPHTTP(_Base):
    """Traefik's tracing.otlp.http: where spans go (OTLP/HTTP, protobuf)."""

    endpoint: str | None = None  # default: OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, else localhost
    tls: TracingOTLPTLS | None = None
    headers: dict[str, str] | None = None


class TracingOTLPGRPC(_Base):
    endpoint: str | None = None
    insecure: bool | None = None
    tls: TracingOTLPTLS | None = None
    headers: dict[str, str] | None = None


class TracingOTLP(_Base):
    http: TracingOTLPHTTP | None = None
    grpc: TracingOTLPGRPC | None = None


class Tracing(_Base):
    """Traefik v3's static `tracing` section (observability/tracing.py)."""

    service_name: str | None = None  # default: OTEL_SERVICE_NAME, else "traefik"
    resource_attributes: dict[str, str] | None = None
    global_attributes: dict[str, str] | None = None  # Traefik's deprecated name of the above
    captured_request_headers: list[str] | None = None
    captured_response_headers: list[str] | None = None
    safe_query_params: list[str] | None = None
    sample_rate: float | None = None  # head sampling, 0..1 (default 1)
    add_internals: bool | None = None
    otlp: TracingOTLP | None = None
    # Traefik v2's vendor backends (Traefik Mesh's DaemonSet passes --tracing.jaeger.*):
    # accepted so those arguments still start the proxy, with a warning; not acted on.
    jaeger: Raw | None = None
    zipkin: Raw | None = None
    datadog: Raw | None = None
    instana: Raw | None = None
    haystack: Raw | None = None
    elastic: Raw | None = None
    span_name_limit: int | None = None


class Core(_Base):
    default_rule_syntax: str | None = None


class StaticConfig(_Base):
    entry_points: dict[str, EntryPoint] = {}
    providers: Providers = msgspec.field(default_factory=Providers)
    ping: Ping | None = None
    api: API | None = None
    log: Log = msgspec.field(default_factory=Log)
    access_log: AccessLog | None = None
    metrics: Metrics | None = None
    tracing: Tracing | None = None
    servers_transport: ServersTransportStatic | None = None
    tcp_servers_transport: TCPServersTransportStatic | None = None
    global_: Raw | None = msgspec.field(default=None, name="global")
    core: Core | None = None
    experimental: Raw | None = None
    certificates_resolvers: Raw | None = None
    hub: Raw | None = None
    spiffe: Raw | None = None
    ocsp: Raw | None = None


# Sections we decode but do not act on: a warning says so, once.
_NOT_IMPLEMENTED = {
    "experimental": "experimental features are not implemented",
    "certificatesResolvers": "ACME certificate resolvers are not implemented",
    "hub": "Traefik Hub is not supported",
}


@dataclass(frozen=True)
class ListenAddress:
    host: str | None  # None = all interfaces
    port: int
    protocol: str  # "tcp" or "udp"


_ADDRESS = re.compile(
    r"^(?P<host>\[[^\]]*\]|[^:/\[\]]*)?:(?P<port>\d+)(?:/(?P<proto>tcp|udp))?$", re.IGNORECASE
)


def parse_address(address: str) -> ListenAddress:
    """':5000', '127.0.0.1:5000', '[::1]:5000', ':15000/udp'."""
    match = _ADDRESS.match(address.strip())
    if match is None:
        raise ValueError(f"invalid address {address!r}: expected [host]:port[/tcp|/udp]")
    host = match.group("host") or None
    if host and host.startswith("["):
        host = host[1:-1] or None
    port = int(match.group("port"))
    if port > 65535:
        raise ValueError(f"invalid address {address!r}: port out of range")
    return ListenAddress(host, port, (match.group("proto") or "tcp").lower())


def flags_to_tree(args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """`--a.b.c=v` / `--a.b` (true) into a nested dict; returns (tree, problems)."""
    tree: dict[str, Any] = {}
    problems: list[str] = []
    for arg in args:
        if not arg.startswith("--"):
            problems.append(f"unexpected argument {arg!r}: flags look like --name=value")
            continue
        key, sep, value = arg[2:].partition("=")
        if not key:
            problems.append(f"unexpected argument {arg!r}")
            continue
        parsed: Any = value if sep else "true"
        parts = key.split(".")
        node = tree
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {} if child in (None, "true") else {"": child}
                node[part] = child
            node = child
        last = parts[-1]
        if isinstance(node.get(last), dict) and parsed == "true":
            continue  # `--ping` after `--ping.entryPoint=x`: already enabled
        if "," in parsed and last.lower() in _LIST_KEYS:
            node[last] = [p.strip() for p in parsed.split(",") if p.strip()]
        elif last.lower() in _LIST_KEYS:
            node[last] = [parsed]
        else:
            node[last] = parsed
    return tree, problems


_LIST_KEYS = {
    "statuscodes",
    "trustedips",
    "buckets",
    "sourcerange",
    "rootcas",
    "middlewares",
    "connection",
    "capturedrequestheaders",
    "capturedresponseheaders",
    "safequeryparams",
}


def _enable_structs(value: Any, tp: Any) -> Any:
    """Traefik lets `--ping` or `--metrics.prometheus=true` enable a section with defaults."""
    import types
    import typing

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else tp
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        if value in (True, "true", "True", ""):
            return {}
        if value in (False, "false", "False"):
            return None
        if isinstance(value, dict):
            hints = typing.get_type_hints(tp)
            fields = {f.encode_name.lower(): hints[f.name] for f in msgspec.structs.fields(tp)}
            return {
                k: _enable_structs(v, fields.get(str(k).lower()))
                for k, v in value.items()
                if _enable_structs(v, fields.get(str(k).lower())) is not None or v is None
            }
        return value
    if tp == Raw and value in (True, "true", "True", ""):
        return {}  # `--ocsp`, `--entryPoints.X.http3`: a section enabled with its defaults
    if origin is dict and isinstance(value, dict):
        _, item_type = typing.get_args(tp) or (Any, Any)
        return {k: _enable_structs(v, item_type) for k, v in value.items()}
    return value


def _get_ci(data: Any, key: str) -> Any:
    """`data[key]` with the key matched case-insensitively (Traefik's keys are); None if
    absent or `data` is not a mapping."""
    if not isinstance(data, dict):
        return None
    lowered = key.lower()
    return next((v for k, v in data.items() if str(k).lower() == lowered), None)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        match = next((k for k in out if k.lower() == key.lower()), None)
        if match is not None and isinstance(out[match], dict) and isinstance(value, dict):
            out[match] = _merge(out[match], value)
        else:
            if match is not None:
                del out[match]
            out[key] = value
    return out


def build_static(file_data: bytes | str | None, flags: list[str]) -> tuple[StaticConfig, list[str]]:
    """File first, flags on top. Returns (config, warnings); raises ConfigDecodeError."""
    warnings: list[str] = []
    raw: dict[str, Any] = {}
    if file_data is not None:
        loaded = load_text(file_data)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigDecodeError([ConfigError("$", "expected an object")])
        raw = loaded or {}
    tree, problems = flags_to_tree(flags)
    if problems:
        raise ConfigDecodeError([ConfigError("", p) for p in problems])
    raw = _merge(raw, tree)
    raw = _enable_structs(raw, StaticConfig)
    notes: list[ConfigError] = []
    normalized = normalize(raw, StaticConfig, "", notes, strict=False)
    errors: list[ConfigError] = []
    for note in notes:
        if _traefik_knows(note.path):
            warnings.append(f"{note.path}: not implemented by meshproxy; option ignored")
        else:
            errors.append(ConfigError(note.path, "unknown option" + _suggestion(note.path)))
    if errors:
        raise ConfigDecodeError(errors)
    # Entrypoints one by one first, so that an error names the entrypoint (msgspec shows a
    # dict key as `[...]`): `--entryPoints.web.http.tls=maybe` -> entryPoints.web.http.tls.
    for ep_name, ep_value in (normalized.get("entryPoints") or {}).items():
        convert(ep_value, EntryPoint, f"entryPoints.{ep_name}", errors)
    # A key left empty in YAML (`tls:`) is null, which normalize drops: Traefik refuses to
    # start on it ("http cannot be a standalone element", checked on 3.7); read as "off" it
    # would serve in plaintext what the operator meant to be TLS-only, so it is an error here.
    for ep_name, ep_value in (_get_ci(raw, "entryPoints") or {}).items():
        for key, section in (
            ("http.tls", _get_ci(ep_value, "http")),
            ("proxyProtocol", ep_value),
        ):
            leaf = key.rpartition(".")[2]
            present = isinstance(section, dict) and leaf.lower() in {
                str(k).lower() for k in section
            }
            if present and _get_ci(section, leaf) is None:
                errors.append(
                    ConfigError(
                        f"entryPoints.{ep_name}.{key}",
                        "empty: write `{}` to enable it with the defaults, or remove it",
                    )
                )
    if errors:
        raise ConfigDecodeError(errors)
    config = convert(normalized, StaticConfig, "", errors)
    if errors or config is None:
        raise ConfigDecodeError(errors)
    for key, message in _NOT_IMPLEMENTED.items():
        if key in normalized:
            warnings.append(f"{key}: {message}; option ignored")
    tracing = config.tracing
    if tracing is not None and tracing.otlp is not None and tracing.otlp.grpc is not None:
        warnings.append("tracing.otlp.grpc: only OTLP/HTTP export is implemented; ignored")
    v2_backends = [
        name
        for name in ("jaeger", "zipkin", "datadog", "instana", "haystack", "elastic")
        if tracing is not None and getattr(tracing, name) is not None
    ]
    if tracing is not None and v2_backends:
        warnings.append(
            f"tracing: Traefik v2 backends ({', '.join(v2_backends)}) are not supported, "
            "only OpenTelemetry (tracing.otlp.http)"
            + ("; ignored" if tracing.otlp is not None else "; tracing stays off")
        )
        if tracing.otlp is None:  # a v2 setup: no OTLP exporter to localhost behind its back
            config.tracing = tracing = None
    if (
        tracing is not None
        and tracing.sample_rate is not None
        and not 0 <= tracing.sample_rate <= 1
    ):
        errors.append(ConfigError("tracing.sampleRate", "must be within 0..1"))
    if config.metrics is not None:
        for key in ("datadog", "influxDB", "influxDB2", "statsd", "otlp"):
            if normalized["metrics"].get(key) is not None:
                warnings.append(f"metrics.{key}: only Prometheus metrics are implemented; ignored")
    for name, entry in config.entry_points.items():
        try:
            parse_address(entry.address)
        except ValueError as exc:
            errors.append(ConfigError(f"entryPoints.{name}.address", str(exc)))
        limits = entry.http2
        if limits is not None:
            for key, value, low, high in (
                ("maxConcurrentStreams", limits.max_concurrent_streams, 1, 2**31 - 1),
                ("maxDecoderHeaderTableSize", limits.max_decoder_header_table_size, 0, 2**31 - 1),
                ("maxEncoderHeaderTableSize", limits.max_encoder_header_table_size, 0, 2**31 - 1),
                ("initialWindowSize", limits.initial_window_size, 1, 2**31 - 1),  # RFC 9113 §6.5.2
                ("maxHeaderListSize", limits.max_header_list_size, 1, 2**31 - 1),
            ):
                if value is not None and not low <= value <= high:
                    errors.append(
                        ConfigError(
                            f"entryPoints.{name}.http2.{key}", f"must be from {low} to {high}"
                        )
                    )
        pp = entry.proxy_protocol
        for trusted in (pp.trusted_i_ps or []) if pp is not None else []:
            try:
                ipaddress.ip_network(trusted.strip(), strict=False)
            except ValueError:
                errors.append(
                    ConfigError(
                        f"entryPoints.{name}.proxyProtocol.trustedIPs",
                        f"{trusted!r} is neither an IP address nor a CIDR",
                    )
                )
        tls = entry.http.tls if entry.http else None
        if tls is not None and tls.cert_resolver:
            warnings.append(
                f"entryPoints.{name}.http.tls.certResolver: ACME certificate resolvers are not "
                "implemented; the routers use the certificates of the dynamic config"
            )
        if tls is not None and tls.domains:
            warnings.append(
                f"entryPoints.{name}.http.tls.domains: ACME domains are not implemented; ignored"
            )
        if entry.http is not None and entry.http.middlewares:
            warnings.append(
                f"entryPoints.{name}.http.middlewares: entrypoint middlewares are not "
                "implemented; ignored"
            )
    warnings.extend(_unimplemented_raw(normalized, StaticConfig, ""))
    if errors:
        raise ConfigDecodeError(errors)
    return config, warnings


# Sections typed `Raw` (decoded, not modelled) that meshproxy does act on; every other `Raw`
# section that is set gets a start-up warning from `_unimplemented_raw` (lower case paths,
# `*` for an entrypoint's name). The top-level ones of _NOT_IMPLEMENTED and `metrics.*` have
# their own, more precise, warnings above.
_IMPLEMENTED_RAW = {
    "entrypoints.*.http.encodedcharacters",  # daemon.refused_encodings
    "experimental",
    "certificatesresolvers",
    "hub",
    "metrics.datadog",
    "metrics.influxdb",
    "metrics.influxdb2",
    "metrics.statsd",
    "metrics.otlp",
}


def _unimplemented_raw(data: Any, tp: Any, prefix: str) -> list[str]:
    """A warning for each `Raw` (accepted, not implemented) option set in `data` (the
    normalized static config of type `tp`), so that `--help`'s "accepted, not implemented
    (warning)" holds: an operator who sets one is told at start that it does nothing."""
    out: list[str] = []
    tp = _unwrap(tp)
    if not _is_struct(tp) or not isinstance(data, dict):
        return out
    hints = typing.get_type_hints(tp)
    for f in msgspec.structs.fields(tp):
        value = data.get(f.encode_name)
        if value is None:
            continue
        path = f"{prefix}{f.encode_name}"
        sub = _unwrap(hints[f.name])
        if sub is Raw or hints[f.name] == Raw | None:
            generic = re.sub(r"^entryPoints\.[^.]+\.", "entryPoints.*.", path).lower()
            # `global.checkNewVersion=false`, `global.sendAnonymousUsage=false`: what
            # meshproxy does anyway (it never calls home), so no warning for those
            quiet = generic == "global" and all(str(v).lower() == "false" for v in value.values())
            if generic not in _IMPLEMENTED_RAW and not quiet:
                out.append(f"{path}: not implemented by meshproxy; option ignored")
        elif _is_struct(sub):
            out.extend(_unimplemented_raw(value, sub, path + "."))
        elif typing.get_origin(sub) is dict and isinstance(value, dict):
            item = _unwrap(typing.get_args(sub)[1])
            if _is_struct(item):
                for key, child in value.items():
                    out.extend(_unimplemented_raw(child, item, f"{path}.{key}."))
    return out


# ------------------------------------------------------------------ unknown keys

# Traefik v3 static options that the structs above do not model: accepted with a warning.
# (lower case; a path matches when it equals one of these or lies under it)
_TRAEFIK_UNMODELLED = {
    "hostresolver",
    "pilot",
    "otlp",
    *(
        f"providers.{name}"
        for name in (
            "docker",
            "swarm",
            "kubernetesingress",
            "kubernetesingressnginx",
            "kubernetescrd",
            "kubernetesgateway",
            "rest",
            "consulcatalog",
            "nomad",
            "ecs",
            "consul",
            "etcd",
            "zookeeper",
            "redis",
            "plugin",
        )
    ),
}


def _traefik_knows(path: str) -> bool:
    lowered = path.lower()
    return any(lowered == k or lowered.startswith(k + ".") for k in _TRAEFIK_UNMODELLED)


def _suggestion(path: str) -> str:
    """`(did you mean entryPoints.web.address?)` when a known key at that level is close."""
    parent, _, last = path.rpartition(".")
    tp: Any = StaticConfig
    for part in parent.split(".") if parent else []:
        tp = _child_type(tp, part)
        if tp is None:
            return ""
    names = [f.encode_name for f in msgspec.structs.fields(tp)] if _is_struct(tp) else []
    close = difflib.get_close_matches(last, names, n=1, cutoff=0.6)
    if not close:
        lowered = {n.lower(): n for n in names}
        close = [lowered[m] for m in difflib.get_close_matches(last.lower(), list(lowered), n=1)]
    return f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""


def _unwrap(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _child_type(tp: Any, part: str) -> Any:
    """The type of `part` inside `tp` (a struct field, or a dict's values), or None."""
    tp = _unwrap(tp)
    if _is_struct(tp):
        hints = typing.get_type_hints(tp)
        for f in msgspec.structs.fields(tp):
            if f.encode_name.lower() == part.lower():
                return _unwrap(hints[f.name])
        return None
    if typing.get_origin(tp) is dict:
        return _unwrap(typing.get_args(tp)[1])
    return None


def flag_reference() -> list[tuple[str, str]]:
    """Every static option as a Traefik-style flag, with its type and default, for
    `meshproxy proxy --help`. Maps keyed by a name (entrypoints) show `<name>`."""
    out: list[tuple[str, str]] = []

    def describe(tp: Any) -> str:
        tp = _unwrap(tp)
        if tp is bool:
            return "bool"
        if tp is Duration:
            return "duration"
        if typing.get_origin(tp) is list:
            return "list"
        if typing.get_origin(tp) is dict:
            return "map"
        return getattr(tp, "__name__", str(tp)).lower()

    def walk(tp: Any, prefix: str) -> None:
        hints = typing.get_type_hints(tp)
        for f in msgspec.structs.fields(tp):
            name = f"{prefix}{f.encode_name}"
            sub = _unwrap(hints[f.name])
            if _is_struct(sub):
                out.append((f"--{name}", "section (bare flag enables it with defaults)"))
                walk(sub, name + ".")
            elif typing.get_origin(sub) is dict and _is_struct(_unwrap(typing.get_args(sub)[1])):
                walk(_unwrap(typing.get_args(sub)[1]), f"{name}.<name>.")
            elif sub is Raw or hints[f.name] == Raw | None:
                out.append((f"--{name}.*", "accepted, not implemented (warning)"))
            else:
                default = f.default
                text = describe(sub)
                if isinstance(default, Duration):
                    text += f" (default {float(default):g}s)"
                elif isinstance(default, bool):
                    text += f" (default {str(default).lower()})"
                elif default not in (None, "", msgspec.NODEFAULT) and not callable(default):
                    text += f" (default {default})"
                out.append((f"--{name}", text))

    walk(StaticConfig, "")
    return out


# ------------------------------------------------------------------ the mesh layout

CONTROLLER_URL = (
    "http://traefik-mesh-controller.traefik-mesh.svc.cluster.local:9000/api/configuration/current"
)


def mesh_layout_flags(http_ports: int = 10, tcp_ports: int = 25, udp_ports: int = 25) -> list[str]:
    """The arguments Traefik Mesh's DaemonSet passes, as our defaults."""
    flags = ["--entryPoints.readiness.address=:1081", "--entryPoints.liveness.address=:1082"]
    for port in range(5000, 5000 + http_ports):
        flags += [
            f"--entryPoints.http-{port}.address=:{port}",
            f"--entryPoints.http-{port}.forwardedHeaders.insecure=true",
        ]
    for port in range(10000, 10000 + tcp_ports):
        flags += [
            f"--entryPoints.tcp-{port}.address=:{port}",
            f"--entryPoints.tcp-{port}.forwardedHeaders.insecure=true",
        ]
    for port in range(15000, 15000 + udp_ports):
        flags.append(f"--entryPoints.udp-{port}.address=:{port}/udp")
    flags += [
        f"--providers.http.endpoint={CONTROLLER_URL}",
        "--providers.http.pollInterval=1s",
        "--providers.http.pollTimeout=1s",
        "--api.dashboard=false",
        "--api.insecure",
        "--ping",
        "--metrics.prometheus=true",
    ]
    return flags


def needs_mesh_layout(file_data: bytes | str | None, flags: list[str]) -> bool:
    """No entrypoints and no providers given anywhere: take Traefik Mesh's layout."""
    if file_data is not None:
        return False
    lowered = [f.lower() for f in flags]
    return not any(f.startswith(("--entrypoints.", "--providers.")) for f in lowered)
