"""A worker process: `python -m meshproxy.node.worker --control-fd N --index I --listeners
JSON -- PROXY-ARGS` (started by meshproxy.node.supervisor, never by hand).

It builds the same static configuration as the supervisor from the same arguments, serves
traffic on the listening sockets it inherited (or its own SO_REUSEPORT ones), and applies
every configuration generation the supervisor sends, with the supervisor's generation number.
It runs no provider and no admin entrypoint. SIGTERM: graceful stop (the supervisor already
waited requestAcceptGraceTimeout); a second SIGTERM or the supervisor gone: stop at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from meshproxy.node.channel import encode, read_frame

log = logging.getLogger("meshproxy.worker")


def static_from_args(args: list[str]) -> Any:
    """The StaticConfig `meshproxy proxy ARGS` builds (the supervisor validated them)."""
    from meshproxy.cli import _read_file, _split_config_file
    from meshproxy.config.static import build_static, mesh_layout_flags, needs_mesh_layout

    config_file, flags = _split_config_file(args)
    file_data = _read_file(config_file, "static configuration") if config_file else None
    if needs_mesh_layout(file_data, flags):
        flags = mesh_layout_flags() + flags
    static, _warnings = build_static(file_data, flags)
    return static


class Worker:
    """One worker's event loop: the daemon in role "worker" and the control channel."""

    def __init__(self, static: Any, control: socket.socket, sockets: dict[str, socket.socket]):
        from meshproxy.daemon import ProxyDaemon

        self.daemon = ProxyDaemon(static, role="worker", inherited=sockets)
        self.control = control
        self.writer: asyncio.StreamWriter | None = None

    async def run(self) -> None:
        daemon = self.daemon
        loop = asyncio.get_running_loop()
        reader, self.writer = await asyncio.open_unix_connection(sock=self.control)
        # The first configuration before the first connection: a worker (re)started on a
        # shared listener must not answer 404 while the others route.
        first = await read_frame(reader)
        if first is None:
            return
        self._handle(*first)
        from meshproxy.daemon import StartupError

        try:
            await daemon.start()
        except StartupError as exc:  # the supervisor fails the start with this line
            self.writer.write(encode({"t": "fatal", "error": str(exc)}))
            await self.writer.drain()
            raise SystemExit(1) from None
        self.writer.write(encode({"t": "ready", "pid": os.getpid()}))
        terms = asyncio.Queue[int]()
        loop.add_signal_handler(signal.SIGTERM, terms.put_nowait, signal.SIGTERM)
        control = loop.create_task(self._control(reader))
        term = loop.create_task(terms.get())
        await asyncio.wait({control, term}, return_when=asyncio.FIRST_COMPLETED)
        _, grace = daemon.life_cycle()
        if control.done():  # the supervisor is gone: nobody restarts, nobody scrapes
            grace = min(grace, 1.0)
        daemon.terminating = True
        stopping = loop.create_task(daemon.stop(grace))
        second = loop.create_task(terms.get()) if term.done() else term
        await asyncio.wait({stopping, second}, return_when=asyncio.FIRST_COMPLETED)
        if not stopping.done():  # a second SIGTERM: at once
            stopping.cancel()
            for listener in daemon.listeners:
                listener.entry.close_all()
        control.cancel()
        second.cancel()

    async def _control(self, reader: asyncio.StreamReader) -> None:
        """Answer the supervisor until it closes the channel (EOF: it is gone).

        A request that fails (a bug in an admin answer, a metrics render) is logged with its
        traceback and answered as failed (the admin client gets a 500); it never ends the
        worker, which keeps serving traffic. Only EOF or a broken channel returns."""
        while True:
            try:
                frame = await read_frame(reader)
            except (ConnectionError, ValueError):
                log.exception("worker %d: control channel broken; stopping", os.getpid())
                return
            if frame is None:
                log.warning("worker %d: the supervisor closed the control channel", os.getpid())
                return
            header, body = frame
            try:
                self._handle(header, body)
            except Exception as exc:  # any bug in one answer, never the worker
                log.exception("worker %d: control request %r failed", os.getpid(), header)
                self._failed(header, exc)

    def _failed(self, header: dict[str, Any], exc: Exception) -> None:
        """Answer a request `_handle` raised on, so the supervisor's waiter ends now."""
        kind = header.get("t")
        if kind == "config":
            self._send({"t": "applied", "gen": header.get("gen"), "ok": False})
        elif kind in ("metrics", "admin"):
            reason = f"{type(exc).__name__}: {exc}"
            self._send({"t": kind, "id": header.get("id"), "failed": reason})

    def _handle(self, header: dict[str, Any], body: bytes) -> None:
        kind = header.get("t")
        if kind == "config":
            manager = self.daemon.manager
            generation = int(header["gen"])
            manager.generation = generation - 1  # apply() counts it up to the node's
            ok = manager.apply_bytes(body, str(header.get("source", "supervisor")))
            self._send({"t": "applied", "gen": generation, "ok": ok})
        elif kind == "metrics":
            self._send({"t": "metrics", "id": header.get("id")}, self.daemon.metrics.render())
        elif kind == "admin":  # the supervisor's admin API asks for this worker's live state
            from meshproxy.admin.workers import answer

            self._send({"t": "admin", "id": header.get("id")}, answer(self.daemon, body))

    def _send(self, header: dict[str, Any], body: bytes = b"") -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(encode(header, body))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshproxy.node.worker")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listeners", default="{}")
    parser.add_argument("--state-fd", type=int, default=-1)
    parser.add_argument("proxy_args", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    proxy_args = options.proxy_args
    if proxy_args and proxy_args[0] == "--":
        proxy_args = proxy_args[1:]
    # Ctrl-C reaches the whole process group: the supervisor decides, workers wait for it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    static = static_from_args(proxy_args)
    from meshproxy.cli import _setup_logging

    _setup_logging(static.log.level, static.log.format)
    if options.state_fd >= 0:
        # Rate limits, retry budgets and circuit breakers hold for the node: their state is
        # in the memory the workers share (meshproxy.node.shared_state, shared_windows).
        from meshproxy.middlewares import circuit_breaker, rate_limit, retry
        from meshproxy.node.shared_state import NodeState

        node = NodeState(options.state_fd, options.index)
        rate_limit.SHARED_STATE.append(node.limiter)
        retry.SHARED_STATE.append(node.budget)
        circuit_breaker.SHARED_STATE.append(node.breaker)
    control = socket.socket(fileno=options.control_fd)
    sockets = {name: socket.socket(fileno=fd) for name, fd in json.loads(options.listeners).items()}
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(Worker(static, control, sockets).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
