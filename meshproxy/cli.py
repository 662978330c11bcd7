"""Command line: `meshproxy proxy | controller | cleanup | check | local | explain | version`.

Every command answers `--help` (or `-h`) with its flags and exit status 0, without starting
anything. A start-up failure (a file that cannot be read, a bad static configuration, an
unknown flag, an address already in use) is one line on stderr, `meshproxy: error: ...`,
naming the file, option or address, and exit status 1 (2 for a command-line usage error), as
Traefik's own start-up errors are one log line; no traceback (`MESHPROXY_DEBUG=1` shows it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
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


class StartupError(Exception):
    """A failure before the service runs: printed as one line, exit status `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _wants_help(args: list[str]) -> bool:
    return any(a in ("-h", "--help", "-help") for a in args)


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (not usage + error)."""

    def error(self, message: str) -> typing.NoReturn:
        raise StartupError(f"{self.prog}: {message} (see --help)", 2)


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
            if config_file is None or config_file.startswith("--"):
                raise StartupError("--configFile needs a file name", 2)
        else:
            rest.append(arg)
    if config_file == "":
        raise StartupError("--configFile needs a file name", 2)
    return config_file, rest


def proxy_help() -> str:
    from meshproxy.config.static import flag_reference

    rows = "\n".join(f"  {flag:<62} {text}" for flag, text in flag_reference())
    return f"""usage: meshproxy proxy [--configFile=FILE] [--dotted.flag=value]...

Runs the data plane. Static configuration as Traefik's: a file (--configFile, YAML or JSON)
and/or dotted flags on top of it (case-insensitive keys; `--ping` alone enables a section).
With neither entrypoints nor providers given, Traefik Mesh's DaemonSet layout is used:
http-5000..5009, tcp-10000..10024, udp-15000..15024, readiness :1081, liveness :1082,
admin :8080, configuration polled from the in-cluster controller.

  --configFile=FILE                                              static configuration file
  --workers=N                                                    worker processes (default: the
                                                                 CPUs of the cgroup quota; 1: one
                                                                 process, see docs/workers.md)
  --workers.listen=inherit|reuseport                             listening sockets bound once and
                                                                 shared (default), or one each
{rows}
"""


def _read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _check_file_provider(static: typing.Any) -> None:
    """A dynamic configuration file (or directory) that cannot be read at start is a start-up
    failure, not a proxy that runs with no routes."""
    file = static.providers.file
    if file is None:
        return
    if file.filename:
        path = Path(file.filename)
        if path.is_dir():
            raise StartupError(f"providers.file.filename: {path} is a directory (use .directory)")
        _read_file(file.filename, "providers.file.filename")
    elif file.directory:
        if not Path(file.directory).is_dir():
            raise StartupError(f"providers.file.directory: {file.directory} is not a directory")
        if not os.access(file.directory, os.R_OK | os.X_OK):
            raise StartupError(f"providers.file.directory: cannot read {file.directory}")


def _split_workers(args: list[str]) -> tuple[int | None, str, list[str]]:
    """`--workers=N` / `--workers N` and `--workers.listen=MODE` (not static configuration:
    how many processes run it), and the other arguments."""
    count: str | None = None
    mode = "inherit"
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg.partition("=")
        if key.lower() in ("--workers", "--workers.listen"):
            if not eq:
                if i + 1 >= len(args):
                    raise StartupError(f"{key} needs a value", 2)
                value = args[i + 1]
                i += 1
            if key.lower() == "--workers":
                count = value
            elif value not in ("inherit", "reuseport"):
                raise StartupError(f"--workers.listen: {value!r} is not inherit or reuseport", 2)
            else:
                mode = value
        else:
            rest.append(arg)
        i += 1
    if count is None:
        return None, mode, rest
    try:
        workers = int(count)
    except ValueError:
        raise StartupError(f"--workers: {count!r} is not a number", 2) from None
    if workers < 1:
        raise StartupError(f"--workers: {workers} is less than 1", 2)
    return workers, mode, rest


def cmd_proxy(args: list[str]) -> int:
    if _wants_help(args):
        print(proxy_help(), end="")
        return 0
    workers, listen_mode, args = _split_workers(args)
    config_file, flags = _split_config_file(args)
    file_data = _read_file(config_file, "static configuration") if config_file else None
    if needs_mesh_layout(file_data, flags):
        flags = mesh_layout_flags() + flags
    try:
        static, warnings = build_static(file_data, flags)
    except ConfigDecodeError as exc:
        source = " and ".join(([config_file] if config_file else []) + (["flags"] if flags else []))
        errors = "; ".join(str(e) for e in exc.errors)
        raise StartupError(f"invalid static configuration ({source}): {errors}") from None
    _check_file_provider(static)
    _setup_logging(static.log.level, static.log.format)
    log = logging.getLogger("meshproxy")
    for warning in warnings:
        log.warning("%s", warning)
        if not log.isEnabledFor(logging.WARNING):
            print(f"warning: {warning}", file=sys.stderr)

    import uvloop

    from meshproxy.build_info import hot_path_state
    from meshproxy.daemon import ProxyDaemon
    from meshproxy.daemon import StartupError as DaemonStartupError

    if hot_path_state() == "stale":
        log.warning("the compiled hot path is older than its sources: run `make setup` again")
    from meshproxy.http2 import cython_build

    if cython_build.status() in ("stale", "partial"):
        log.warning(
            "h2/hpack/hyperframe: compiled modules do not match the installed versions: "
            "run `python -m meshproxy.http2.cython_build` (or --remove)"
        )

    from meshproxy.node.cpus import available_cpus

    cpus = available_cpus()
    if workers is None:
        workers = cpus
    from meshproxy.node.supervisor import run_node, worker_count_warning

    too_many = worker_count_warning(workers, cpus)
    if too_many:
        log.warning("%s", too_many)

    async def run() -> None:
        if workers == 1:  # today's single process: no supervisor hop, no control channel
            await ProxyDaemon(static).run_forever()
        else:
            await run_node(static, args, workers, listen_mode)

    try:
        uvloop.run(run())
    except DaemonStartupError as exc:
        raise StartupError(str(exc)) from None
    return 0


def cmd_check(argv: list[str]) -> int:
    parser = _Parser(
        prog="meshproxy check", description="validate a dynamic or static configuration file"
    )
    parser.add_argument("file")
    parser.add_argument("--kind", choices=["auto", "dynamic", "static"], default="auto")
    args = parser.parse_args(argv)
    data = _read_file(args.file, "configuration")
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
    # no static config here: every UDP entrypoint a UDP router names is taken to exist
    udp_entrypoints = sorted({ep for r in config.udp.routers.values() for ep in r.entry_points})
    ctx = CompileContext(
        "file",
        entrypoints or ["web"],
        udp_entrypoints,
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


def _split_local_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """`local`'s own flags (--http-port..., --log-level) apart from the controller's."""
    own_names = {f"--{name}-port" for name in _LOCAL_PORTS} | {"--log-level"}
    own: list[str] = []
    rest: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        name = arg.split("=", 1)[0]
        if name in own_names:
            own.append(arg)
            if "=" not in arg and index + 1 < len(argv):
                own.append(argv[index + 1])
                index += 1
        else:
            rest.append(arg)
        index += 1
    return own, rest


def cmd_local(argv: list[str]) -> int:
    from meshproxy.controller.flags import FlagError, help_text, parse_controller_flags
    from meshproxy.local import LocalPorts

    defaults = LocalPorts()
    parser = _Parser(
        prog="meshproxy local",
        description="run controller, proxy and demo backends on loopback, from manifests",
        add_help=False,
    )
    for name in _LOCAL_PORTS:
        parser.add_argument(f"--{name}-port", type=int, default=getattr(defaults, name))
    parser.add_argument("--log-level", default=None)
    if _wants_help(argv):
        port_lines = "\n".join(
            f"  --{name}-port{'':<{13 - len(name)}}first port (default {getattr(defaults, name)})"
            for name in _LOCAL_PORTS
        )
        print(
            "usage: meshproxy local [--http-port=N ...] [controller flags]\n"
            "Runs the controller, a proxy and the demo backends on 127.0.0.1, from manifests\n"
            "(--manifests, default config/local-mesh); mesh names (svc.ns.traefik.mesh:PORT)\n"
            "are dialled at this proxy's entrypoints.\n"
            f"{port_lines}\n  --log-level=LEVEL      log level (default INFO)\n\n"
            + help_text("local").split("\n", 1)[1]
        )
        return 0
    own, rest = _split_local_flags(argv)
    args = parser.parse_args(own)
    try:
        settings, extra = parse_controller_flags(rest)
    except FlagError as exc:
        raise StartupError(f"meshproxy local: {exc} (see --help)", 2) from None
    level = args.log_level or (extra["log_level"] if "log_level" in extra["given"] else "INFO")
    _setup_logging(level, extra["log_format"])

    import uvloop

    from meshproxy.controller.runner import ControllerStartupError
    from meshproxy.daemon import StartupError as DaemonStartupError
    from meshproxy.local import run_local

    ports = LocalPorts(**{name: getattr(args, f"{name}_port") for name in _LOCAL_PORTS})
    manifests = Path(settings.manifests) if settings.manifests else None
    try:
        uvloop.run(run_local(ports, manifests, settings, extra["given"]))
    except (ControllerStartupError, DaemonStartupError) as exc:
        raise StartupError(str(exc)) from None
    return 0


def _run_controller_command(argv: list[str], cleanup: bool) -> int:
    """`controller` and `cleanup` share Traefik Mesh's flags."""
    from meshproxy.controller.flags import FlagError, help_text, parse_controller_flags

    command = "cleanup" if cleanup else "controller"
    if _wants_help(argv):
        print(help_text(command), end="")
        return 0
    try:
        settings, extra = parse_controller_flags(argv)
    except FlagError as exc:
        raise StartupError(f"meshproxy {command}: {exc} (see --help)", 2) from None
    _setup_logging(extra["log_level"], extra["log_format"])

    import uvloop

    if cleanup:
        from meshproxy.controller.cluster_effects import cleanup as remove_changes

        try:
            return uvloop.run(remove_changes(settings))
        except Exception as exc:  # credentials: the same one-line failure as the controller
            raise StartupError(f"cleanup: cannot reach the Kubernetes API: {exc}") from None
    from meshproxy.controller.runner import ControllerStartupError, run_controller

    try:
        uvloop.run(run_controller(settings))
    except ControllerStartupError as exc:
        raise StartupError(str(exc)) from None
    return 0


USAGE = "usage: meshproxy {proxy,controller,cleanup,check,local,explain,version} [options]"
COMMANDS = """  proxy       run the data plane (Traefik-style flags: --entryPoints.web.address=:80)
  controller  build the mesh config from Kubernetes (or --manifests DIR), serve :9000
  cleanup     remove the shadow services and DNS changes the controller made
  check       validate a dynamic or static configuration file
  explain     ask a running proxy which router, middlewares and server a request gets
  local       run controller, proxy and demo backends on loopback
  version     print the version
`meshproxy COMMAND --help` lists the flags of a command."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except StartupError as exc:
        print(f"meshproxy: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("MESHPROXY_DEBUG"):
            raise
        print(
            f"meshproxy: error: {type(exc).__name__}: {exc} (MESHPROXY_DEBUG=1 shows where)",
            file=sys.stderr,
        )
        return 1


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        print(COMMANDS)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "version":
        if _wants_help(rest):
            print("usage: meshproxy version\nprints the version and which hot path runs")
            return 0
        from meshproxy.build_info import hot_path_state
        from meshproxy.http2 import cython_build

        print(
            f"meshproxy {__version__} (hot path: {hot_path_state()}, h2: {cython_build.status()})"
        )
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
    if command == "explain":
        from meshproxy.admin.explain import cmd_explain

        return cmd_explain(rest)
    raise StartupError(f"unknown command {command!r}; {USAGE}", 2)
