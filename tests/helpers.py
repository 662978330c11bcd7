"""Test helpers: a real proxy process, real backends, an h11 client over real sockets."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import yaml

# The project's shared/ folder sits beside the repository (also in CI's fresh clone).
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "traefik-mesh"


# Ports handed to processes the tests start (a proxy's entrypoints) come from below the
# kernel's ephemeral range (32768-60999 by default), one slice per xdist worker: a port taken
# from the ephemeral range could become some other test's outgoing source port before the
# proxy binds it ("Address already in use" under `pytest -n`).
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_SLICE = 10000 + 5500 * (_WORKER % 4)
_PORTS = itertools.cycle(range(_SLICE, _SLICE + 5500))


def free_port() -> int:
    """A loopback TCP port no one listens on, for a process to bind soon after."""
    for _ in range(5500):
        port = next(_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free test port left in this worker's slice")


def free_port_pair(kind: int = socket.SOCK_STREAM) -> int:
    """A port p of this worker's slice such that p and p + 1 are both free on loopback (TCP
    or, with SOCK_DGRAM, UDP): for a process that binds both soon after."""
    for _ in range(5500):
        port = next(_PORTS)
        if port + 1 >= _SLICE + 5500:
            continue  # port + 1 would be the next worker's
        with (
            socket.socket(socket.AF_INET, kind) as first,
            socket.socket(socket.AF_INET, kind) as second,
        ):
            try:
                first.bind(("127.0.0.1", port))
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            next(_PORTS)  # port + 1 is taken too: never handed out again by this worker soon
            return port
    raise RuntimeError("no two consecutive free test ports left in this worker's slice")


async def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll `condition` (sync or async) until truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.02)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    reason: str = ""


async def request(
    port: int,
    method: str = "GET",
    target: str = "/",
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    body: bytes = b"",
    host: str = "example.test",
    timeout: float = 10.0,
    address: str = "127.0.0.1",
) -> Response:
    """One request on a new connection, parsed with h11 (an independent HTTP implementation)."""
    reader, writer = await asyncio.open_connection(address, port)
    try:
        conn = h11.Connection(h11.CLIENT)
        hdrs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        if not any(k.lower() == "host" for k, _ in hdrs):
            hdrs.insert(0, ("Host", host))
        if body and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in hdrs):
            hdrs.append(("Content-Length", str(len(body))))
        writer.write(conn.send(h11.Request(method=method, target=target, headers=hdrs)))
        if body:
            writer.write(conn.send(h11.Data(data=body)))
        writer.write(conn.send(h11.EndOfMessage()))
        return await asyncio.wait_for(read_response(conn, reader), timeout)
    finally:
        writer.close()


async def read_response(conn: h11.Connection, reader: asyncio.StreamReader) -> Response:
    status = 0
    reason = b""
    headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            reason = event.reason
            headers = list(event.headers)
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            break
    return Response(
        status,
        {k.decode(): v.decode() for k, v in headers},
        b"".join(chunks),
        headers,
        reason.decode(),
    )


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the proxy closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()


# ---------------------------------------------------------------- backends


class Backend:
    """A real HTTP/1.1 backend (httptools-based whoami) that counts connections and requests."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.server: asyncio.AbstractServer | None = None
        self.connections = 0
        self.requests: list[dict[str, Any]] = []

    async def start(self, port: int = 0) -> Backend:
        from meshproxy.demo.backend import WhoamiProtocol

        backend = self

        class Counting(WhoamiProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                backend.connections += 1
                super().connection_made(transport)

            def on_message_complete(self) -> None:
                backend.requests.append(
                    {
                        "method": self.parser.get_method().decode(),
                        "url": self.url.decode(),
                        "headers": [(n.decode().lower(), v.decode()) for n, v in self.headers],
                        "body": b"".join(self.body),
                    }
                )
                super().on_message_complete()

        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: Counting(self.name), "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class ScriptedBackend:
    """A backend that fails on command: each request is answered by the current `mode`.

    ok            200 with the backend's name as body
    status:N      N with a short body
    reset         read the request, then close the connection without answering
    hold          keep the request until `release()` (for in-flight limits)
    """

    def __init__(self, name: str = "scripted") -> None:
        self.name = name
        self.mode = "ok"
        self.requests: list[dict[str, Any]] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.released = asyncio.Event()
        self.holding = 0

    async def start(self) -> ScriptedBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def release(self) -> None:
        self.released.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = [
                    (n.strip().lower(), v.strip())
                    for n, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
                ]
                fields = dict(headers)
                body = b""
                if "content-length" in fields:
                    body = await reader.readexactly(int(fields["content-length"]))
                elif fields.get("transfer-encoding") == "chunked":
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                        chunk = await reader.readexactly(size + 2)
                        if size == 0:
                            break
                        body += chunk[:-2]
                self.requests.append(
                    {"method": method, "url": target, "headers": headers, "body": body}
                )
                mode = self.mode
                if mode == "reset":
                    writer.transport.abort()
                    return
                if mode == "hold":
                    self.holding += 1
                    await self.released.wait()
                    self.holding -= 1
                status = int(mode.split(":")[1]) if mode.startswith("status:") else 200
                payload = self.name.encode() if status == 200 else b"failure %d" % status
                writer.write(
                    b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n\r\n%s"
                    % (status, len(payload), payload)
                )
                await writer.drain()
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def refused_url() -> str:
    """A loopback URL where nothing listens: connecting is refused at once."""
    return f"http://127.0.0.1:{free_port()}"


async def start_raw_backend(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.AbstractServer, int]:
    """A backend scripted at the byte level (for resets, slowness, odd framing)."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def read_request_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


# ---------------------------------------------------------------- the proxy process


class ProxyProcess:
    """`meshproxy proxy` in a subprocess, fed by a dynamic config file we rewrite."""

    def __init__(
        self,
        tmp_path: Path,
        dynamic: dict[str, Any] | None = None,
        entrypoints: dict[str, str] | None = None,
        extra_flags: list[str] | None = None,
        provider: str = "file",
    ) -> None:
        self.tmp_path = tmp_path
        self.config_file = tmp_path / "dynamic.yaml"
        self.admin_port = free_port()
        self.entrypoints = entrypoints or {"web": f"127.0.0.1:{free_port()}"}
        self.extra_flags = extra_flags or []
        self.provider = provider
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = tmp_path / "proxy.log"
        if dynamic is not None:
            self.write(dynamic)

    @property
    def port(self) -> int:
        return self.port_of("web")

    def port_of(self, entrypoint: str) -> int:
        return int(self.entrypoints[entrypoint].rsplit(":", 1)[1].split("/")[0])

    def write(self, dynamic: dict[str, Any] | str) -> None:
        text = dynamic if isinstance(dynamic, str) else yaml.safe_dump(dynamic)
        tmp = self.config_file.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_file)

    def flags(self) -> list[str]:
        flags = [f"--entryPoints.{n}.address={a}" for n, a in self.entrypoints.items()]
        flags += [
            f"--entryPoints.traefik.address=127.0.0.1:{self.admin_port}",
            "--api.insecure",
            "--ping",
            "--metrics.prometheus=true",
            "--log.level=INFO",
            # One process, as before worker processes existed (tests of workers add
            # --workers=N, which wins as the later flag).
            "--workers=1",
        ]
        if self.provider == "file":
            flags.append(f"--providers.file.filename={self.config_file}")
        return flags + self.extra_flags

    async def start(self, wait_config: bool = True) -> ProxyProcess:
        self.log = open(self.log_path, "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meshproxy", "proxy", *self.flags()],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        # /ping is ready once a worker serves (--workers N): interpreted workers importing on
        # a loaded 2-core machine take seconds
        await wait_for(self.admin_up, 45, "proxy admin /ping")
        if wait_config:
            await wait_for(lambda: self.generation() >= 1, 10, "first config applied")
        return self

    def admin_get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.admin_port}{path}", timeout=2
            ) as r:
                return r.read()
        except OSError:
            return None

    def admin_up(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"proxy exited: {self.log_path.read_text()}")
        return self.admin_get("/ping") == b"OK"

    def rawdata(self) -> dict[str, Any]:
        data = self.admin_get("/api/rawdata")
        assert data is not None
        return json.loads(data)

    def generation(self) -> int:
        data = self.admin_get("/api/rawdata")
        return json.loads(data)["meshproxy"]["generation"] if data else 0

    def metrics(self) -> str:
        return (self.admin_get("/metrics") or b"").decode()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if hasattr(self, "log"):
            self.log.close()


def lb(*urls: str, **options: Any) -> dict[str, Any]:
    return {"loadBalancer": {"servers": [{"url": u} for u in urls], **options}}


def router(rule: str, service: str, **options: Any) -> dict[str, Any]:
    return {"rule": rule, "service": service, "entryPoints": ["web"], **options}


def catch_all(url: str, **options: Any) -> dict[str, Any]:
    """A dynamic config sending every request on `web` to one server."""
    return {
        "http": {
            "routers": {"r": router("PathPrefix(`/`)", "s")},
            "services": {"s": lb(url, **options)},
        }
    }


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets process `pid` holds (proc(5): its /proc/PID/fd entries that link
    to `socket:[N]`), to match against /proc/PID/net/tcp. Raises OSError once it exited."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes
