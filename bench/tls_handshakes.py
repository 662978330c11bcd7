"""TLS handshakes per second terminated at meshproxy, HAProxy and real Traefik 3.7 (each on one
core), in the same run (issue 12: meshproxy >= 0.5x HAProxy).

Certificates are made at start with trustme (an ECDSA P-256 CA and server certificate, the
proxies' default certificate). Each target gets a fixed number of new connections
(`--handshakes`), opened by `--clients` client processes (Python's `ssl`, OpenSSL underneath,
pinned with the echo backend to CPU 0; the proxy alone on CPU 1). Every connection is a full
handshake: a new TCP connection, no session offered (no ticket, no session id: the clients
never keep one), TLS 1.3 unless `--tls12`; then one byte is sent and its echo read back, so
the proxy has dialled its backend and relayed through the terminated connection, and the
connection is closed. The clients do not verify the certificate (one verified handshake per
target at start checks each proxy presents the trustme certificate): the clients' CPU, on one
core, would otherwise bound the rate before the proxies do.

Reported per target: handshakes/s (total connections / wall time of all clients), the
per-round ratio to HAProxy, and the proxy's CPU time per handshake (its user + system time
over the measurement / handshakes): the proxies' capacity per core, steadier than the rate
on a shared machine (HAProxy's rate is often bounded by the clients' core).

    python bench/tls_handshakes.py [--rounds 3] [--handshakes 2000] [--clients 4]
                                   [--tls12] [--no-pin] [--no-traefik]

Results: bench/results/tls.md and bench/results/tls_handshakes-<when>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    LOAD_CPU,
    PINNING,
    cpu_seconds,
    free_port,
    pinned,
    start_haproxy_tcp,
    start_meshproxy_l4,
    start_traefik_l4,
    stop_all,
    timestamp,
    wait_routers,
)
from bench.l4_common import paired, run_tcp_echo, save_section, spread

SERVER_NAME = "bench.mesh.test"


def client_context(tls12: bool, ca: str | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(ca)
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def one_connection(context: ssl.SSLContext, port: int, server_name: str | None = None) -> str:
    """A new TCP connection, a full handshake, one byte echoed, close; returns the version."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with raw, context.wrap_socket(raw, server_hostname=server_name) as tls:
        tls.sendall(b"x")
        if tls.recv(1) != b"x":
            raise ConnectionError("no echo")
        if tls.session_reused:
            raise RuntimeError("session resumed: not a full handshake")
        return tls.version() or ""


def run_clients(port: int, count: int, tls12: bool, deadline_s: float) -> None:
    """Prints {"ok", "errors", "start", "end"} (time.time() seconds) for `count` connections."""
    context = client_context(tls12)
    ok = errors = 0
    start = time.time()
    stop = time.monotonic() + deadline_s
    for _ in range(count):
        if time.monotonic() > stop:
            break
        try:
            one_connection(context, port)
            ok += 1
        except (OSError, ConnectionError):
            errors += 1
    print(json.dumps({"ok": ok, "errors": errors, "start": start, "end": time.time()}))


def role(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--role", *args]


def measure_s_time(port: int, args: argparse.Namespace, pid: int | None) -> dict[str, float]:
    """`--clients` `openssl s_time -new` processes for `--duration` seconds (time-bounded:
    s_time has no count); each connection is a full handshake, then closed (no byte sent)."""
    command = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new"]
    command += ["-time", str(args.duration), "-tls1_2" if args.tls12 else "-tls1_3"]
    before = cpu_seconds(pid) if pid else 0.0
    began = time.perf_counter()
    children = [
        subprocess.Popen(pinned(command, LOAD_CPU), stdout=subprocess.PIPE, text=True)
        for _ in range(args.clients)
    ]
    outs = [child.communicate(timeout=args.duration + 30)[0] for child in children]
    seconds = time.perf_counter() - began
    cpu = cpu_seconds(pid) - before if pid else 0.0
    counts = [re.search(r"(\d+) connections in [\d.]+ real seconds", out) for out in outs]
    ok = sum(int(c.group(1)) for c in counts if c)
    result = {
        "handshakes_per_s": ok / seconds,
        "ok": float(ok),
        # a client that failed (connect error, handshake failure) prints no count
        "errors": float(
            sum(1 for c, child in zip(counts, children, strict=True) if not c or child.returncode)
        ),
    }
    if pid:
        result["cpu_us_per_handshake"] = cpu / max(1, ok) * 1e6
    return result


def measure(port: int, args: argparse.Namespace, pid: int | None) -> dict[str, float]:
    if args.client == "openssl":
        return measure_s_time(port, args, pid)
    share = args.handshakes // args.clients
    before = cpu_seconds(pid) if pid else 0.0
    command = role("clients", str(port), str(share), str(int(args.tls12)), str(args.timeout))
    children = [
        subprocess.Popen(pinned(command, LOAD_CPU), stdout=subprocess.PIPE, text=True)
        for _ in range(args.clients)
    ]
    outs = [json.loads(child.communicate(timeout=args.timeout + 30)[0]) for child in children]
    cpu = cpu_seconds(pid) - before if pid else 0.0
    ok = sum(o["ok"] for o in outs)
    seconds = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    result = {
        "handshakes_per_s": ok / seconds,
        "ok": float(ok),
        "errors": float(sum(o["errors"] for o in outs)),
    }
    if pid:
        result["cpu_us_per_handshake"] = cpu / max(1, ok) * 1e6
    return result


def tls_dynamic(backend: int, cert: Path, key: Path) -> str:
    """A TCP router terminating TLS (``HostSNI(`*`)``, `tls: {}`) on entrypoint `tls` to the
    echo `backend`; the trustme certificate is the default store's certificate."""
    return json.dumps(
        {
            "tcp": {
                "routers": {
                    "bench": {
                        "entryPoints": ["tls"],
                        "rule": "HostSNI(`*`)",
                        "service": "app",
                        "tls": {},
                    }
                },
                "services": {
                    "app": {"loadBalancer": {"servers": [{"address": f"127.0.0.1:{backend}"}]}}
                },
            },
            "tls": {
                "stores": {
                    "default": {"defaultCertificate": {"certFile": str(cert), "keyFile": str(key)}}
                }
            },
        }
    )


def check_target(name: str, port: int, ca: str, tls12: bool, timeout: float = 30.0) -> str:
    """One verified connection (the trustme CA, the certificate's name), retried until the
    target answers; returns the TLS version negotiated."""
    deadline = time.monotonic() + timeout
    context = client_context(tls12, ca)
    while True:
        try:
            return one_connection(context, port, SERVER_NAME)
        except (OSError, ConnectionError) as error:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} on port {port}: {error}") from error
            time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--client",
        choices=("openssl", "python"),
        default="openssl",
        help="openssl s_time (time-bounded) or Python ssl clients (a fixed count)",
    )
    parser.add_argument("--duration", type=int, default=5, help="s_time seconds per target")
    parser.add_argument("--handshakes", type=int, default=2000, help="python: per target/round")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per measurement")
    parser.add_argument("--tls12", action="store_true", help="TLS 1.2 instead of 1.3")
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    parser.add_argument("--no-traefik", action="store_true")
    args = parser.parse_args()
    PINNING["on"] = args.pin
    import trustme

    from meshproxy.build_info import hot_path_state

    backend, haproxy, mesh, admin = (free_port() for _ in range(4))
    procs: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="tls-bench-") as tmp:
        workdir = Path(tmp)
        ca = trustme.CA()
        leaf = ca.issue_cert(SERVER_NAME)
        cert, key, both, ca_pem = (
            workdir / "server.crt",
            workdir / "server.key",
            workdir / "server.pem",
            workdir / "ca.pem",
        )
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        leaf.private_key_and_cert_chain_pem.write_to_path(str(both))
        ca.cert_pem.write_to_path(str(ca_pem))
        try:
            procs.append(subprocess.Popen(pinned(role("echo", str(backend)), LOAD_CPU)))
            dynamic = tls_dynamic(backend, cert, key)
            ha = start_haproxy_tcp(workdir, haproxy, backend, f"ssl crt {both}")
            mp = start_meshproxy_l4(workdir, {"tls": f"127.0.0.1:{mesh}"}, admin, dynamic)
            procs += [ha, mp]
            targets: dict[str, tuple[int, int]] = {"haproxy": (haproxy, ha.pid)}
            wait_routers(admin, "tcp", {"bench"})
            targets["meshproxy"] = (mesh, mp.pid)
            if not args.no_traefik:
                traefik, api = free_port(), free_port()
                tr = start_traefik_l4(workdir, {"tls": f"127.0.0.1:{traefik}"}, api, dynamic)
                procs.append(tr)
                wait_routers(api, "tcp", {"bench"})
                targets["traefik 3.7"] = (traefik, tr.pid)
            versions = {
                name: check_target(name, port, str(ca_pem), args.tls12)
                for name, (port, _) in targets.items()
            }
            print("verified handshakes:", versions, flush=True)
            warm = argparse.Namespace(
                **{**vars(args), "handshakes": 50 * args.clients, "duration": 1}
            )
            for port, pid in targets.values():
                measure(port, warm, pid)
            rounds: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            for index in range(args.rounds):
                for name, (port, pid) in targets.items():
                    result = measure(port, args, pid)
                    rounds[name].append(result)
                    print(
                        f"round {index + 1} {name:12s} {result['handshakes_per_s']:7.0f} "
                        f"handshakes/s {result['errors']:.0f} errors  "
                        f"{result['cpu_us_per_handshake']:.0f} CPU us/handshake",
                        flush=True,
                    )
        finally:
            stop_all(procs)
    stamp = timestamp()
    report: dict[str, Any] = {
        "when": stamp,
        "setup": {
            **vars(args),
            "certificate": "trustme ECDSA P-256, no chain beyond the leaf",
            "tls_versions": versions,
            "cpus": PINNING["on"] and "proxy on CPU 1, clients and echo backend on CPU 0",
            "meshproxy_hot_path": hot_path_state(),
            "haproxy_threads": 1,
            "traefik_gomaxprocs": 1,
        },
        "rounds": rounds,
        "x_haproxy_per_round": {
            n: paired(r, rounds["haproxy"], "handshakes_per_s") for n, r in rounds.items()
        },
        # capacity per core: HAProxy's CPU per handshake over the target's, paired per round
        "cpu_x_haproxy_per_round": {
            n: paired(rounds["haproxy"], r, "cpu_us_per_handshake") for n, r in rounds.items()
        },
    }
    version = versions.get("haproxy", "")
    lines = [
        f"# TLS handshakes per second ({stamp}, hot path {hot_path_state()})",
        "",
        (
            f"`openssl s_time -new` x {args.clients} processes for {args.duration} s per target "
            f"per round ({version}, full handshakes, ECDSA P-256 certificate from trustme, "
            "close after the handshake), "
            if args.client == "openssl"
            else f"{args.handshakes} new connections per target per round ({version}, full "
            "handshakes, ECDSA P-256 certificate from trustme, one byte echoed through the "
            f"backend, close) from {args.clients} client processes (Python ssl), "
        )
        + f"{args.rounds} rounds, targets back to back in each round; "
        + (
            "proxies pinned to CPU 1, clients and echo backend to CPU 0. "
            if args.pin
            else "unpinned. "
        )
        + "Medians over rounds; ratios are medians of per-round ratios (min-max in brackets). "
        "`CPU x HAProxy` = HAProxy's CPU per handshake / the target's: handshakes per "
        "CPU-second relative to HAProxy.",
        "",
        "| target | handshakes/s | x HAProxy (same round) | errors | proxy CPU us / handshake "
        "| CPU x HAProxy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, results in rounds.items():
        rate = statistics.median(r["handshakes_per_s"] for r in results)
        cpu = statistics.median(r["cpu_us_per_handshake"] for r in results)
        errors = sum(r["errors"] for r in results)
        lines.append(
            f"| {name} | {rate:.0f} | {spread(report['x_haproxy_per_round'][name])} | "
            f"{errors:.0f} | {cpu:.0f} | {spread(report['cpu_x_haproxy_per_round'][name])} |"
        )
    save_section("tls", "tls_handshakes", report, lines)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--role":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "echo":
            run_tcp_echo(int(rest[0]))
        else:
            run_clients(int(rest[0]), int(rest[1]), rest[2] == "1", float(rest[3]))
    else:
        raise SystemExit(main())
