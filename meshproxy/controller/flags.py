"""`meshproxy controller` flags: Traefik Mesh's names and defaults (`--acl`, `--defaultMode`,
`--namespace`, `--apiPort`, `--limitHTTPPort`, ...), case-insensitive, `--flag=value` or
`--flag value`, plus meshproxy's own (`--manifests DIR`, ...)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from meshproxy.controller.settings import ControllerSettings


class FlagError(ValueError):
    pass


# flag (lower case) -> settings field; "smi" is Traefik Mesh's deprecated alias of "acl"
_FIELDS = {
    "acl": "acl",
    "smi": "acl",
    "defaultmode": "default_mode",
    "namespace": "namespace",
    "watchnamespaces": "watch_namespaces",
    "ignorenamespaces": "ignore_namespaces",
    "apihost": "api_host",
    "apiport": "api_port",
    "limithttpport": "limit_http_port",
    "limittcpport": "limit_tcp_port",
    "limitudpport": "limit_udp_port",
    "clusterdomain": "cluster_domain",
    "manifests": "manifests",
    "portstatefile": "port_state_file",
    "kubeconfig": "kubeconfig",
    "masterurl": "master_url",
    "resync": "resync_seconds",
    "localtrafficpolicy": "local_traffic_policy",
    "indirectfromproxiesonly": "indirect_from_proxies_only",
}
_IGNORED = {"loglevel", "logformat", "debug", "configfile"}  # handled by the caller

# flag as documented -> what it does (for --help); Traefik Mesh's first, then meshproxy's
DESCRIPTIONS = {
    "acl": "enable ACL mode: SMI TrafficTargets decide who may call whom",
    "defaultMode": "traffic type of services without the traffic-type annotation (http|tcp|udp)",
    "namespace": "the mesh's own namespace (proxy pods, shadow services)",
    "watchNamespaces": "only these namespaces (comma-separated; default all)",
    "ignoreNamespaces": "skip these namespaces (comma-separated)",
    "apiHost": "address the API binds (default all interfaces)",
    "apiPort": "port of the API",
    "limitHTTPPort": "number of HTTP entrypoints of the proxies",
    "limitTCPPort": "number of TCP entrypoints of the proxies",
    "limitUDPPort": "number of UDP entrypoints of the proxies",
    "clusterDomain": "the cluster's DNS domain",
    "logLevel": "log level (error, warn, info, debug)",
    "logFormat": "log format (common or json)",
    "manifests": "read cluster state from this directory of YAML manifests, not the API",
    "portStateFile": "keep the TCP/UDP port table in this file (manifest mode)",
    "kubeconfig": "kubeconfig file (default: in-cluster credentials, else $KUBECONFIG)",
    "masterURL": "Kubernetes API URL without credentials (tests)",
    "resync": "full re-list period (duration)",
    "localTrafficPolicy": "shadow services with internalTrafficPolicy: Local",
    "indirectFromProxiesOnly": "X-Forwarded-For allowlists also require a mesh proxy as peer",
}


def help_text(command: str) -> str:
    """The flag list of `meshproxy controller|cleanup|local --help`, with defaults."""
    defaults = ControllerSettings()
    lines = []
    for flag, text in DESCRIPTIONS.items():
        target = _FIELDS.get(flag.lower())
        default: Any = None
        if target is not None:
            default = getattr(defaults, target)
        elif flag == "logLevel":
            default = "error"
        elif flag == "logFormat":
            default = "common"
        shown = "" if default in (None, [], "") else f" (default {str(default).lower()})"
        lines.append(f"  --{flag:<26}{text}{shown}")
    return (
        f"usage: meshproxy {command} [--flag=value | --flag value]...\n"
        "Traefik Mesh's controller flags (case-insensitive; --smi is an alias of --acl):\n"
        + "\n".join(lines)
        + "\n"
    )


_BOOL_TRUE = {"true", "1", "yes"}
_BOOL_FALSE = {"false", "0", "no"}


def parse_controller_flags(argv: list[str]) -> tuple[ControllerSettings, dict[str, Any]]:
    """Returns the settings and the logging options (`log_level`, `log_format`)."""
    settings = ControllerSettings()
    types = {f.name: f.type for f in fields(ControllerSettings)}
    # "given": the settings fields set explicitly (a caller may have other defaults)
    extra: dict[str, Any] = {"log_level": "error", "log_format": "common", "given": set()}
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if not arg.startswith("--"):
            raise FlagError(f"unexpected argument {arg!r}")
        name, sep, value = arg[2:].partition("=")
        lowered = name.lower()
        target = _FIELDS.get(lowered)
        if target is None and lowered not in _IGNORED:
            raise FlagError(f"unknown flag --{name}")
        is_bool = target is not None and types[target] == "bool"
        if not sep:
            if is_bool:
                value = "true"
            elif index < len(argv):
                value = argv[index]
                index += 1
            else:
                raise FlagError(f"--{name} needs a value")
        if lowered in ("loglevel", "logformat"):
            field = "log_level" if lowered == "loglevel" else "log_format"
            extra[field] = value
            extra["given"].add(field)
            continue
        if lowered in _IGNORED:
            continue
        if target is None:
            raise FlagError(f"unknown flag --{name}")
        setattr(settings, target, _convert(name, value, str(types[target])))
        extra["given"].add(target)
    if settings.default_mode not in ("http", "tcp", "udp"):
        raise FlagError(f"--defaultMode must be http, tcp or udp, got {settings.default_mode!r}")
    for limit in ("limit_http_port", "limit_tcp_port", "limit_udp_port", "api_port"):
        if getattr(settings, limit) <= 0:
            raise FlagError(f"--{limit.replace('_', '')} must be > 0")
    return settings, extra


def _bool(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in _BOOL_TRUE:
        return True
    if lowered in _BOOL_FALSE:
        return False
    raise FlagError(f"--{name} expects true or false, got {value!r}")


def _convert(name: str, value: str, kind: str) -> Any:
    if kind == "bool":
        return _bool(name, value)
    if kind == "int":
        try:
            return int(value)
        except ValueError:
            raise FlagError(f"--{name} expects an integer, got {value!r}") from None
    if kind == "float":
        from meshproxy.config.durations import parse_duration

        return float(parse_duration(value))
    if kind.startswith("list"):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value
