"""The `h2` library's own ceiling: what one request costs in h2 alone, server side and client side.

No sockets and no proxy: a client H2Connection and a server H2Connection talk in memory, in
batches of `--concurrency` requests (h2load's -m: requests written together, answered together,
as on a busy connection). One lockstep run records every byte each side received; then each
side is replayed alone against a fresh connection with the clock running, so the time measured
is one side's work only (h2 is deterministic: the replayed side sends byte-for-byte what it sent
when recorded). The fields are those of the h2c benchmark (bench/h2c_throughput.py): h2load's
GET, a 13-byte answer, and on the upstream side the request as a proxy forwards it (with
X-Forwarded-*). Times are this process's CPU time (time.process_time), best of `--repeat`: on
a VM shared with other work, wall-clock time counts the neighbours too.

- server side (meshproxy's h2c front, meshproxy/http2/server.py): receive the request frames,
  check each field block (h2.utilities.validate_headers, as the server does per stream), send
  the response HEADERS and DATA, acknowledge nothing (no request body).
- client side (the h2c pool, meshproxy/http2/upstream.py): send each request, receive the
  response HEADERS and DATA, give the DATA's flow-control credit back.

The configurations are the ones the server and pool use (no header decoding to str, outbound
validation off). `--profile` prints where the time goes by package (h2, hpack, hyperframe,
the rest) and the top functions. A proxy doing h2c -> h1 pays the server side; h2c -> h2c pays
both: 1 / (sum of µs per request) is the best req/s one core can reach through h2 alone.

    python bench/h2_ceiling.py [--requests 100000] [--concurrency 10] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.utilities

REQUEST = [
    (b":method", b"GET"),
    (b":path", b"/h2c/bench"),
    (b":scheme", b"http"),
    (b":authority", b"bench.mesh.test"),
    (b"user-agent", b"h2load nghttp2/1.52.0"),
]
UPSTREAM_REQUEST = [
    *REQUEST,
    (b"x-forwarded-for", b"127.0.0.1"),
    (b"x-forwarded-host", b"bench.mesh.test"),
    (b"x-forwarded-port", b"34567"),
    (b"x-forwarded-proto", b"http"),
    (b"x-forwarded-server", b"meshproxy"),
    (b"x-real-ip", b"127.0.0.1"),
]
RESPONSE = [(b":status", b"200"), (b"content-length", b"13"), (b"content-type", b"text/plain")]
BODY = b"Hello, World!"
# What the server checks per stream (meshproxy/http2/server.py _REQUEST_FLAGS)
REQUEST_FLAGS = h2.utilities.HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)


def server_config() -> h2.config.H2Configuration:
    return h2.config.H2Configuration(
        client_side=False,
        header_encoding=None,
        validate_inbound_headers=False,
        normalize_inbound_headers=True,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )


def client_config() -> h2.config.H2Configuration:
    return h2.config.H2Configuration(
        client_side=True,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=True,
    )


MEMO = {"on": False}


def memoize(conn: h2.connection.H2Connection) -> None:
    """With --memo: the HPACK coders meshproxy's connections use (meshproxy/http2/hpack_memo.py)
    in place of hpack's own."""
    if MEMO["on"]:
        from meshproxy.http2.hpack_memo import MemoDecoder, MemoEncoder

        decoder = conn.decoder
        conn.encoder = MemoEncoder()
        conn.decoder = MemoDecoder(decoder.max_header_list_size, decoder.max_allowed_table_size)


class Server:
    """The server side's work per batch."""

    def __init__(self) -> None:
        self.conn = h2.connection.H2Connection(server_config())
        memoize(self.conn)
        self.conn.initiate_connection()

    def feed(self, data: bytes) -> bytes:
        conn = self.conn
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                list(h2.utilities.validate_headers(event.headers, REQUEST_FLAGS))
                conn.send_headers(event.stream_id, RESPONSE)
                conn.send_data(event.stream_id, BODY, end_stream=True)
        return conn.data_to_send()


class Client:
    """The client (upstream pool) side's work per batch."""

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.conn = h2.connection.H2Connection(client_config())
        memoize(self.conn)
        self.conn.initiate_connection()
        self.headers = headers

    def send(self, count: int) -> bytes:
        conn = self.conn
        for _ in range(count):
            conn.send_headers(conn.get_next_available_stream_id(), self.headers, end_stream=True)
        return conn.data_to_send()

    def feed(self, data: bytes) -> bytes:
        conn = self.conn
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        return conn.data_to_send()


def record(
    headers: list[tuple[bytes, bytes]], batches: int, concurrency: int
) -> tuple[list[bytes], list[bytes]]:
    """Lockstep run: per batch, what the server received and what the client received."""
    client, server = Client(headers), Server()
    to_server: list[bytes] = []
    to_client: list[bytes] = []
    pending = client.conn.data_to_send()
    greeting = server.conn.data_to_send()
    pending += client.feed(greeting)
    to_client.append(greeting)
    for _ in range(batches):
        pending += client.send(concurrency)
        to_server.append(pending)
        answer = server.feed(pending)
        to_client.append(answer)
        pending = client.feed(answer)
    return to_server, to_client


def time_server(to_server: list[bytes]) -> float:
    server = Server()
    server.conn.data_to_send()
    start = time.process_time()
    for data in to_server:
        server.feed(data)
    return time.process_time() - start


def time_client(
    headers: list[tuple[bytes, bytes]], to_client: list[bytes], concurrency: int
) -> float:
    client = Client(headers)
    client.conn.data_to_send()
    start = time.process_time()
    client.feed(to_client[0])
    for data in to_client[1:]:
        client.send(concurrency)
        client.feed(data)
    return time.process_time() - start


def by_package(profile: cProfile.Profile) -> dict[str, float]:
    """Own time (tottime) per package, as a share of the total."""
    stats = pstats.Stats(profile)
    shares: dict[str, float] = {}
    total = 0.0
    for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        package = "other"
        for name in ("h2", "hpack", "hyperframe"):
            if f"/{name}/" in filename:
                package = name
        if package == "h2":
            package = f"h2/{filename.rsplit('/', 1)[1]}"
        shares[package] = shares.get(package, 0.0) + tottime
        total += tottime
    return {k: round(v / total, 3) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}


def profiled(work: Callable[[], float]) -> dict[str, float]:
    profile = cProfile.Profile()
    profile.enable()
    work()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(12)
    return by_package(profile)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3, help="best of N timed replays")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--memo", action="store_true", help="with meshproxy's remembering HPACK coders"
    )
    args = parser.parse_args()
    MEMO["on"] = args.memo
    batches = args.requests // args.concurrency
    requests = batches * args.concurrency
    to_server, _ = record(REQUEST, batches, args.concurrency)
    _, to_client = record(UPSTREAM_REQUEST, batches, args.concurrency)
    server_s = min(time_server(to_server) for _ in range(args.repeat))
    client_s = min(
        time_client(UPSTREAM_REQUEST, to_client, args.concurrency) for _ in range(args.repeat)
    )
    server_us, client_us = server_s / requests * 1e6, client_s / requests * 1e6
    result: dict[str, Any] = {
        "requests": requests,
        "concurrency": args.concurrency,
        "server_us_per_request": round(server_us, 2),
        "client_us_per_request": round(client_us, 2),
        "ceiling_h2c_to_h1_rps": round(1e6 / server_us),
        "ceiling_h2c_to_h2c_rps": round(1e6 / (server_us + client_us)),
    }
    if args.profile:
        result["server_profile"] = profiled(lambda: time_server(to_server))
        result["client_profile"] = profiled(
            lambda: time_client(UPSTREAM_REQUEST, to_client, args.concurrency)
        )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
