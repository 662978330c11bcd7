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
_BOOL_TRUE = {"true", "1", "yes"}
_BOOL_FALSE = {"false", "0", "no"}


def parse_controller_flags(argv: list[str]) -> tuple[ControllerSettings, dict[str, Any]]:
    """Returns the settings and the logging options (`log_level`, `log_format`)."""
    settings = ControllerSettings()
    types = {f.name: f.type for f in fields(ControllerSettings)}
    extra: dict[str, Any] = {"log_level": "error", "log_format": "common"}
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if not arg.startswith("--"):
            raise FlagError(f"unexpected argument {arg!r}")
        name, sep, value = arg[2:].partition("=")
        lowered = name.lower()
        target = _FIELDS.get(lowered)
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
            extra["log_level" if lowered == "loglevel" else "log_format"] = value
            continue
        if lowered in _IGNORED:
            continue
        if target is None:
            raise FlagError(f"unknown flag --{name}")
        setattr(settings, target, _convert(name, value, str(types[target])))
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
