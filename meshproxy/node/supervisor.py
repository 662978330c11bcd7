"""The supervisor of `meshproxy proxy --workers N` (N > 1): one process that fetches each
configuration once for the node, serves the admin entrypoint (/ping, /api, /metrics) for the
node, and keeps N worker processes (meshproxy.node.worker) serving the traffic listeners.

Listeners: in the default "inherit" mode the supervisor binds each TCP entrypoint once (with
SO_REUSEPORT, so a new proxy started for a rollout shares the port) and every worker accepts
on that same socket; in "reuseport" mode each worker binds its own. UDP entrypoints always
bind one SO_REUSEPORT socket per worker so a client's datagrams keep meeting the worker that
holds its session. docs/workers.md says which balances better, measured.

Configurations: the providers run here on a DistributingManager; every payload the
supervisor accepts goes to every worker with its generation number, and to each worker (re)
started later. A worker that exits is restarted; one that keeps exiting within
CRASH_WINDOW seconds of its start waits BACKOFF_START * 2^k seconds (at most BACKOFF_MAX)
first, visible in /api/rawdata (meshproxy.workers) and /metrics (meshproxy_worker_restarts_total,
meshproxy_worker_up).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from meshproxy.balancer.health import HealthKey, HealthRegistry
from meshproxy.config.static import parse_address
from meshproxy.node.channel import encode, read_frame
from meshproxy.node.metrics import merge
from meshproxy.node.shared_state import state_fd
from meshproxy.runtime.manager import ConfigManager

log = logging.getLogger("meshproxy.supervisor")

CRASH_WINDOW = 10.0  # s: a worker that exits sooner after its start is crash looping
BACKOFF_START = 0.5  # s
BACKOFF_MAX = 30.0  # s
SCRAPE_TIMEOUT = 2.0  # s: a worker slower than this is left out of one /metrics answer


class DistributingManager(ConfigManager):
    """The supervisor's ConfigManager: it compiles each payload too (for the admin API and to
    reject a bad one once, keeping the last good one everywhere), then hands the accepted
    bytes to the workers."""

    def __init__(self, base: ConfigManager, supervisor: Supervisor) -> None:
        super().__init__(base.context_factory)
        self.supervisor = supervisor
        self.payload: tuple[int, bytes, str] | None = None  # the last accepted generation

    def apply_bytes(self, data: bytes, source: str) -> bool:
        if not super().apply_bytes(data, source):
            return False
        self.payload = (self.generation, data, source)
        self.supervisor.broadcast(self.payload)
        return True


class PassiveHealthRegistry(HealthRegistry):
    """The supervisor's health checkers: kept for what the services want (their settings are
    described by the admin API) but never started. The supervisor serves no traffic, so its
    probes would only add one more probe per interval to every server (N+1 with N workers);
    the workers probe, and the admin API and /metrics merge their views."""

    def retain(self, wanted: dict[HealthKey, list[Any]]) -> None:
        for key in [k for k in self.checkers if k not in wanted]:
            self.checkers.pop(key).stop()
        for key, services in wanted.items():
            self.get(key).listeners = services


class WorkerRequestFailed(RuntimeError):
    """A worker raised while answering a control request (it logged the traceback and keeps
    serving); the admin API answers 500."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"worker {index}: {reason}")
        self.index = index
        self.reason = reason


@dataclass
class WorkerSlot:
    """One worker position (index), across the processes that held it."""

    index: int
    process: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    generation: int = 0
    started_at: float = 0.0
    restarts: int = 0
    quick_exits: int = 0  # consecutive exits within CRASH_WINDOW of the start
    backoff_until: float = 0.0  # time.time() before which it is not restarted
    last_exit: str | None = None
    ready: bool = False  # applied the first configuration and accepts on the listeners
    waiting: dict[int, asyncio.Future[bytes]] = field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        alive = self.process is not None and self.process.returncode is None
        now = time.time()
        state = "running" if alive else ("backoff" if self.backoff_until > now else "starting")
        return {
            "index": self.index,
            "pid": self.process.pid if alive and self.process else None,
            "state": state,
            "generation": self.generation,
            "ready": alive and self.ready,
            "restarts": self.restarts,
            "lastExit": self.last_exit,
            "backoffSeconds": round(max(0.0, self.backoff_until - now), 3),
        }


class Supervisor:
    def __init__(self, daemon: Any, proxy_args: list[str], count: int, mode: str = "inherit"):
        self.daemon = daemon
        self.proxy_args = proxy_args
        self.count = count
        self.mode = mode
        self.slots = [WorkerSlot(i) for i in range(count)]
        self.sockets: dict[str, socket.socket] = {}
        self.stopping = False
        self.manager = DistributingManager(daemon.manager, self)
        daemon.manager = self.manager
        daemon.node = self
        daemon.state.health = PassiveHealthRegistry()  # the workers probe, not the supervisor
        self._ids = itertools.count(1)
        # A worker's start-up error (an option only a worker meets, as a bad trustedIPs):
        # the node fails its start with that one line, as the single process does.
        self.fatal: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.state_fd: int | None = None  # the node's shared token buckets (no path)
        self._tasks: list[asyncio.Task[Any]] = []

    # -- start ----------------------------------------------------------------------------

    def bind(self) -> None:
        """Bind every TCP entrypoint once ("inherit" mode). Raises StartupError."""
        from meshproxy.daemon import StartupError, _reason

        if self.mode != "inherit":
            return
        for name, entry in self.daemon.http_entrypoints.items():
            address = parse_address(entry.address)
            try:
                self.sockets[name] = listen_socket(address.host, address.port)
            except OSError as exc:
                raise StartupError(
                    f"entrypoint {name}: cannot listen on {entry.address}: {_reason(exc)}"
                ) from None
            log.info("entrypoint %s listening on %s", name, entry.address)

    async def start(self) -> None:
        """Bind the listeners now (an address in use fails the start), but listen and start
        the workers once the first configuration is accepted: until then a connection would
        only get 404, and during a rollout the old proxy still serves the port."""
        self.bind()
        self._tasks.append(asyncio.get_running_loop().create_task(self._start_workers()))

    async def _start_workers(self) -> None:
        await self.manager.applied.wait()
        if self.stopping:
            return
        # No listen() here: the first worker to serve calls it (asyncio's create_server on
        # the inherited socket), after applying the first configuration. Until then the
        # port refuses connections rather than queueing them for seconds while the workers
        # import, and a rollout's old proxy keeps the whole SO_REUSEPORT group's traffic.
        self.state_fd = state_fd()  # made now: a start that fails leaves none behind
        loop = asyncio.get_running_loop()
        for slot in self.slots:
            self._tasks.append(loop.create_task(self._keep(slot)))

    async def _keep(self, slot: WorkerSlot) -> None:
        """Run the worker of `slot`, restart it when it exits, back off a crash loop."""
        while not self.stopping:
            delay = slot.backoff_until - time.time()
            if delay > 0:
                await asyncio.sleep(delay)  # the backoff deadline, not a wait for a state
                if self.stopping:
                    return
            try:
                await self._spawn(slot)
            except OSError as exc:
                slot.last_exit = f"could not start: {exc}"
                returncode: int | None = None
            else:
                assert slot.process is not None
                returncode = await slot.process.wait()
                slot.last_exit = _describe_exit(returncode)
            for waiter in slot.waiting.values():
                if not waiter.done():
                    waiter.set_result(b"")
            slot.waiting.clear()
            slot.writer = None
            slot.ready = False
            if self.stopping:
                return
            slot.restarts += 1
            if time.time() - slot.started_at < CRASH_WINDOW:
                slot.quick_exits += 1
            else:
                slot.quick_exits = 0
            backoff = (
                min(BACKOFF_MAX, BACKOFF_START * 2 ** (slot.quick_exits - 1))
                if slot.quick_exits
                else 0.0
            )
            slot.backoff_until = time.time() + backoff
            log.error(
                "worker %d (pid %s) %s; restarting in %.1fs",
                slot.index,
                slot.process.pid if slot.process else "-",
                slot.last_exit,
                backoff,
            )

    async def _spawn(self, slot: WorkerSlot) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = {name: sock.fileno() for name, sock in self.sockets.items()}
        shared = [] if self.state_fd is None else [self.state_fd]
        try:
            slot.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "meshproxy.node.worker",
                "--control-fd",
                str(child.fileno()),
                "--index",
                str(slot.index),
                "--listeners",
                json.dumps(fds),
                "--state-fd",
                str(self.state_fd if self.state_fd is not None else -1),
                "--",
                *self.proxy_args,
                pass_fds=[child.fileno(), *fds.values(), *shared],
            )
        finally:
            child.close()
        slot.started_at = time.time()
        slot.generation = 0
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        slot.writer = writer
        payload = self.manager.payload
        if payload is not None:
            self._send_config(slot, payload)
        self._tasks.append(asyncio.get_running_loop().create_task(self._listen(slot, reader)))

    async def _listen(self, slot: WorkerSlot, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ValueError, ConnectionError):
            while True:
                frame = await read_frame(reader)
                if frame is None:
                    return
                header, body = frame
                kind = header.get("t")
                if kind == "fatal" and not self.fatal.done():
                    self.fatal.set_result(str(header.get("error")))
                elif kind == "ready":  # started after applying the first configuration
                    slot.ready = True
                elif kind == "applied" and header.get("ok"):
                    slot.generation = int(header["gen"])
                elif kind in ("metrics", "admin"):  # answers to render_metrics, admin.workers
                    waiter = slot.waiting.pop(int(header.get("id") or 0), None)
                    if waiter is None or waiter.done():
                        continue
                    if header.get("failed"):  # the worker logged the traceback
                        waiter.set_exception(WorkerRequestFailed(slot.index, header["failed"]))
                    else:
                        waiter.set_result(body)

    # -- configurations -------------------------------------------------------------------

    def broadcast(self, payload: tuple[int, bytes, str]) -> None:
        for slot in self.slots:
            self._send_config(slot, payload)

    def _send_config(self, slot: WorkerSlot, payload: tuple[int, bytes, str]) -> None:
        generation, data, source = payload
        if slot.writer is not None and not slot.writer.is_closing():
            slot.writer.write(encode({"t": "config", "gen": generation, "source": source}, data))

    # -- the admin entrypoint -------------------------------------------------------------

    @property
    def serving(self) -> bool:
        """At least one worker applied the first configuration and accepts connections: the
        node's readiness (/ping). One is enough: in "inherit" mode every worker accepts on
        the same sockets, so a connection waits for no particular worker; in "reuseport"
        mode a worker's socket exists only once that worker serves."""
        return any(
            slot.ready and slot.process is not None and slot.process.returncode is None
            for slot in self.slots
        )

    def workers_view(self) -> list[dict[str, Any]]:
        return [slot.view() for slot in self.slots]

    async def render_metrics(self) -> bytes:
        """The workers' expositions summed (meshproxy.node.metrics), with the supervisor's
        configuration families and the workers' own health. A worker being restarted or
        slower than SCRAPE_TIMEOUT is left out of this answer (its counters come back with
        the next scrape: Prometheus' rate() handles a counter that drops as a reset)."""
        loop = asyncio.get_running_loop()
        waits: list[asyncio.Future[bytes]] = []
        for slot in self.slots:
            if slot.writer is None or slot.writer.is_closing():
                continue
            ident = next(self._ids)
            waiter: asyncio.Future[bytes] = loop.create_future()
            slot.waiting[ident] = waiter
            slot.writer.write(encode({"t": "metrics", "id": ident}))
            waits.append(waiter)
        texts: list[str] = []
        if waits:
            done, pending = await asyncio.wait(waits, timeout=SCRAPE_TIMEOUT)
            for fut in pending:
                fut.cancel()
            # a worker whose render failed is left out, as a slow one
            texts = [f.result().decode() for f in done if f.exception() is None and f.result()]
        own = self.daemon.metrics.render().decode() + self._own_families()
        return merge(texts, own)

    def _own_families(self) -> str:
        lines = [
            "# HELP meshproxy_worker_restarts_total Worker processes restarted after exiting.",
            "# TYPE meshproxy_worker_restarts_total counter",
        ]
        lines += [
            f'meshproxy_worker_restarts_total{{worker="{s.index}"}} {s.restarts}.0'
            for s in self.slots
        ]
        lines += [
            "# HELP meshproxy_worker_up 1 when the worker process runs, 0 while restarting.",
            "# TYPE meshproxy_worker_up gauge",
        ]
        for s in self.slots:
            up = s.process is not None and s.process.returncode is None
            lines.append(f'meshproxy_worker_up{{worker="{s.index}"}} {1.0 if up else 0.0}')
        return "\n".join(lines) + "\n"

    # -- stop -----------------------------------------------------------------------------

    async def stop(self, grace: float) -> None:
        """SIGTERM every worker (each stops gracefully within `grace`), wait for them, then
        SIGKILL what is left; the supervisor's copies of the listening sockets close first so
        the kernel stops queueing connections once the workers close theirs."""
        self.stopping = True
        for sock in self.sockets.values():
            sock.close()
        for slot in self.slots:
            _signal(slot, signal.SIGTERM)
        deadline = grace + 5.0
        procs = [s.process for s in self.slots if s.process and s.process.returncode is None]
        if procs:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in procs], timeout=deadline
            )
            if pending:
                self.kill_all()
        for task in self._tasks:
            task.cancel()
        self._remove_state_file()

    def kill_all(self) -> None:
        self.stopping = True
        for slot in self.slots:
            _signal(slot, signal.SIGKILL)
        self._remove_state_file()  # the workers' mappings stay valid

    def _remove_state_file(self) -> None:
        """Close the supervisor's descriptor: the memory goes with the last worker."""
        if self.state_fd is not None:
            os.close(self.state_fd)
            self.state_fd = None


def _signal(slot: WorkerSlot, sig: int) -> None:
    if slot.process is not None and slot.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            slot.process.send_signal(sig)


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def listen_socket(host: str | None, port: int) -> socket.socket:
    """A bound TCP socket with SO_REUSEPORT (a rollout's new proxy joins it) that the
    workers inherit. No host: IPv6 and IPv4 on one dual-stack socket, as Go's listener, or
    IPv4 alone where IPv6 is off."""
    candidates: list[tuple[int, str]]
    if host:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        candidates = [(family, host.strip("[]"))]
    else:
        candidates = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]
    error: OSError | None = None
    for family, bind_host in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and not host:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((bind_host, port))  # listen() once the first configuration is there
            sock.setblocking(False)
            sock.set_inheritable(True)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    assert error is not None
    raise error


def worker_count_warning(requested: int, available: int) -> str | None:
    """`--workers` above the CPUs the container may use: accepted, with this warning."""
    if requested > available:
        return (
            f"--workers={requested} is more than the {available} CPU(s) this container may use "
            "(cgroup quota, affinity): the workers will share CPUs"
        )
    return None


async def run_node(static: Any, proxy_args: list[str], count: int, mode: str) -> None:
    """`meshproxy proxy --workers N`: the supervisor's whole life."""
    from meshproxy.daemon import ProxyDaemon

    daemon = ProxyDaemon(static, role="supervisor")
    supervisor = Supervisor(daemon, proxy_args, count, mode)
    await supervisor.start()
    log.info("%d workers (%s listeners), supervisor pid %d", count, mode, os.getpid())
    serving = asyncio.ensure_future(daemon.run_forever())
    await asyncio.wait({serving, supervisor.fatal}, return_when=asyncio.FIRST_COMPLETED)
    if supervisor.fatal.done():
        from meshproxy.daemon import StartupError

        serving.cancel()
        supervisor.kill_all()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await serving
        raise StartupError(supervisor.fatal.result())
    supervisor.fatal.cancel()
    if serving.exception() is not None:  # the admin entrypoint could not listen...
        supervisor.kill_all()
        for task in supervisor._tasks:
            task.cancel()
        serving.result()
