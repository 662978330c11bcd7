"""Command line: `meshproxy proxy | controller | cleanup | check | local | version`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from meshproxy import __version__
from meshproxy.config.decode import ConfigDecodeError, load_text
from meshproxy.config.static import build_static, mesh_layout_flags, needs_mesh_layout

_LEVELS = {
    "TRACE": logging.DEBUG,
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "FATAL": logging.CRITICAL,
    "PANIC": logging.CRITICAL,
}


def _setup_logging(level: str, fmt: str) -> None:
    if fmt == "json":
        pattern = (
            '{"time":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}'
        )
    else:
        pattern = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(
        level=_LEVELS.get(level.upper(), logging.ERROR), format=pattern, stream=sys.stderr
    )


def _split_config_file(args: list[str]) -> tuple[str | None, list[str]]:
    config_file = None
    rest = []
    iterator = iter(args)
    for arg in iterator:
        lowered = arg.lower()
        if lowered.startswith("--configfile="):
            config_file = arg.split("=", 1)[1]
        elif lowered == "--configfile":
            config_file = next(iterator, None)
        else:
            rest.append(arg)
    return config_file, rest


def cmd_proxy(args: list[str]) -> int:
    config_file, flags = _split_config_file(args)
    file_data = Path(config_file).read_bytes() if config_file else None
    if needs_mesh_layout(file_data, flags):
        flags = mesh_layout_flags() + flags
    try:
        static, warnings = build_static(file_data, flags)
    except ConfigDecodeError as exc:
        for error in exc.errors:
            print(f"error: {error}", file=sys.stderr)
        return 2
    _setup_logging(static.log.level, static.log.format)
    log = logging.getLogger("meshproxy")
    for warning in warnings:
        log.warning("%s", warning)
        if not log.isEnabledFor(logging.WARNING):
            print(f"warning: {warning}", file=sys.stderr)

    import uvloop

    from meshproxy.build_info import hot_path_state
    from meshproxy.daemon import ProxyDaemon

    if hot_path_state() == "stale":
        log.warning("the compiled hot path is older than its sources: run `make setup` again")

    async def run() -> None:
        await ProxyDaemon(static).run_forever()

    uvloop.run(run())
    return 0


def cmd_check(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="meshproxy check", description="validate a dynamic or static configuration"
    )
    parser.add_argument("file")
    parser.add_argument("--kind", choices=["auto", "dynamic", "static"], default="auto")
    args = parser.parse_args(argv)
    data = Path(args.file).read_bytes()
    kind = args.kind
    try:
        if kind == "auto":
            raw = load_text(data)
            keys = {str(k).lower() for k in (raw or {})} if isinstance(raw, dict) else set()
            kind = (
                "static" if keys & {"entrypoints", "providers", "api", "ping", "log"} else "dynamic"
            )
        if kind == "static":
            _, warnings = build_static(data, [])
            for warning in warnings:
                print(f"warning: {warning}")
            print(f"{args.file}: static configuration OK")
            return 0
        return _check_dynamic(args.file, data)
    except ConfigDecodeError as exc:
        for error in exc.errors:
            print(f"error: {error}")
        print(f"{args.file}: {len(exc.errors)} error(s)")
        return 1


def _check_dynamic(name: str, data: bytes) -> int:
    from meshproxy.config.dynamic import decode_dynamic
    from meshproxy.http.upstream import TransportSettings
    from meshproxy.observability.metrics import RequestMetrics
    from meshproxy.runtime.compiler import CompileContext, compile_snapshot
    from meshproxy.runtime.state import RuntimeState

    config = decode_dynamic(data)
    entrypoints = sorted({ep for r in config.http.routers.values() for ep in r.entry_points})
    ctx = CompileContext(
        "file",
        entrypoints or ["web"],
        [],
        entrypoints or ["web"],
        TransportSettings(),
        RequestMetrics(),
        RuntimeState(),
    )
    snapshot = compile_snapshot(config, ctx)
    ctx.state.close()
    errors = 0
    for kind, table in (
        ("http.routers", snapshot.routers),
        ("http.services", snapshot.services),
        ("http.middlewares", snapshot.middlewares),
        ("tcp.routers", snapshot.tcp_routers),
        ("tcp.services", snapshot.tcp_services),
        ("udp.routers", snapshot.udp_routers),
        ("udp.services", snapshot.udp_services),
    ):
        for qualified, status in sorted(table.items()):
            plain = qualified.rpartition("@")[0]
            for message in status.errors:
                label = "error" if status.status == "disabled" else "warning"
                errors += label == "error"
                print(f"{label}: {kind}.{plain}: {message}")
    if errors:
        print(f"{name}: {errors} error(s)")
        return 1
    print(f"{name}: dynamic configuration OK")
    return 0


_LOCAL_PORTS = ("http", "tcp", "udp", "admin", "api", "readiness", "liveness")


def cmd_local(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="meshproxy local",
        description="run controller, proxy and demo backends on loopback, from manifests",
    )
    from meshproxy.local import LocalPorts

    defaults = LocalPorts()
    for name in _LOCAL_PORTS:
        parser.add_argument(f"--{name}-port", type=int, default=getattr(defaults, name))
    parser.add_argument("--manifests", help="directory of manifests (default: config/local-mesh)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    _setup_logging(args.log_level, "common")

    import uvloop

    from meshproxy.local import run_local

    ports = LocalPorts(**{name: getattr(args, f"{name}_port") for name in _LOCAL_PORTS})
    uvloop.run(run_local(ports, Path(args.manifests) if args.manifests else None))
    return 0


def _run_controller_command(argv: list[str], cleanup: bool) -> int:
    """`controller` and `cleanup` share Traefik Mesh's flags."""
    from meshproxy.controller.flags import FlagError, parse_controller_flags

    try:
        settings, extra = parse_controller_flags(argv)
    except FlagError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _setup_logging(extra["log_level"], extra["log_format"])

    import uvloop

    if cleanup:
        from meshproxy.controller.cluster_effects import cleanup as remove_changes

        return uvloop.run(remove_changes(settings))
    from meshproxy.controller.runner import run_controller

    uvloop.run(run_controller(settings))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: meshproxy {proxy,controller,cleanup,check,local,version} [options]"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        print("  proxy    run the data plane (Traefik-style flags: --entryPoints.web.address=:80)")
        print(
            "  controller  build the mesh config from Kubernetes (or --manifests DIR), serve :9000"
        )
        print("  cleanup  remove the shadow services and DNS changes the controller made")
        print("  check    validate a dynamic or static configuration file")
        print("  local    run the proxy with demo backends on loopback")
        print("  version  print the version")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "version":
        from meshproxy.build_info import hot_path_state

        print(f"meshproxy {__version__} (hot path: {hot_path_state()})")
        return 0
    if command == "proxy":
        return cmd_proxy(rest)
    if command == "controller":
        return _run_controller_command(rest, cleanup=False)
    if command == "cleanup":
        return _run_controller_command(rest, cleanup=True)
    if command == "check":
        return cmd_check(rest)
    if command == "local":
        return cmd_local(rest)
    print(f"unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2
