"""TCP services' pure parts (meshproxy.tcp.services): failover order, which transport a
loadBalancer gets (Traefik 3.7's TCPDialerManager.Build precedence), and the inFlightConn
counter's admit/release bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from meshproxy.config.dynamic import decode_dynamic_obj
from meshproxy.http.transports import TransportError
from meshproxy.tcp.services import (
    InFlightConn,
    TCPService,
    TCPTransport,
    admit,
    load_balancer_transport,
    make_server,
    transport_from_dynamic,
)


def servers(*names: str) -> list:
    return [make_server(n, n, 1, False, TCPTransport()) for n in names]


def test_candidates_start_at_the_pick_and_wrap_around_the_load_balancer():
    """Failover order: the balancer's pick first, then the servers after it, wrapping; the
    pick itself rotates per connection (round robin)."""
    a, b, c = servers("a", "b", "c")
    service = TCPService("s", [(a, 1), (b, 1), (c, 1)])
    orders = [[s.address for s in service.candidates()] for _ in range(3)]
    assert sorted(order[0] for order in orders) == ["a", "b", "c"]
    for order in orders:
        start = ["a", "b", "c"].index(order[0])
        assert order == (["a", "b", "c"] * 2)[start : start + 3]


def test_weighted_candidates_fall_back_to_the_other_children_without_moving_them():
    """A weighted service tries its picked child's servers, then the other children's, each
    server once; the other children's own round robin is not advanced by the fallback."""
    a1, a2, b1 = servers("a1", "a2", "b1")
    child_a = TCPService("a", [(a1, 1), (a2, 1)])
    child_b = TCPService("b", [(b1, 1)])
    parent = TCPService("p", [(child_a, 3), (child_b, 1)])
    orders = [[s.address for s in parent.candidates()] for _ in range(4)]
    assert all(sorted(order) == ["a1", "a2", "b1"] for order in orders)
    assert [order[0][0] for order in orders].count("a") == 3  # 3:1 as the weights say
    assert [child_a.pick().address, child_a.pick().address] != ["a1", "a1"]


def test_zero_weight_servers_are_never_candidates():
    a, b = servers("a", "b")
    assert [s.address for s in TCPService("s", [(a, 0), (b, 1)]).candidates()] == ["b"]
    assert TCPService("empty", []).candidates() == []


def decode_lb(options: dict) -> object:
    config = decode_dynamic_obj(
        {"tcp": {"services": {"s": {"loadBalancer": {"servers": [], **options}}}}}
    )
    return config.tcp.services["s"].load_balancer


def test_a_named_transport_replaces_the_load_balancer_s_deprecated_options():
    """Traefik 3.7: with `serversTransport` set, its proxyProtocol and terminationDelay are
    used (the loadBalancer's deprecated ones ignored); without one, the loadBalancer's apply
    on top of the default transport, terminationDelay in milliseconds."""
    lb = decode_lb({"proxyProtocol": {"version": 1}, "terminationDelay": 250})
    default = TCPTransport(dial_timeout=7.0)
    plain = load_balancer_transport(lb, None, default)
    assert (plain.proxy_protocol, plain.termination_delay, plain.dial_timeout) == (1, 0.25, 7.0)
    named = TCPTransport(proxy_protocol=2)
    assert load_balancer_transport(lb, named, default) is named
    lasting = load_balancer_transport(decode_lb({"terminationDelay": -1}), None, default)
    assert lasting.termination_delay is None  # negative: no deadline


def test_dynamic_transport_options_and_errors_with_their_path():
    config = decode_dynamic_obj(
        {
            "tcp": {
                "serversTransports": {
                    "ok": {"dialTimeout": "2s", "proxyProtocol": {}, "terminationDelay": "50ms"},
                    "bad": {"proxyProtocol": {"version": 3}},
                    "ca": {"tls": {"rootCAs": ["/no/such/file.pem"]}},
                }
            }
        }
    )
    transports = config.tcp.servers_transports
    ok = transport_from_dynamic(transports["ok"], "tcp.serversTransports.ok")
    assert (ok.dial_timeout, ok.proxy_protocol, ok.termination_delay) == (2.0, 2, 0.05)
    with pytest.raises(TransportError, match=r"bad\.proxyProtocol\.version: unknown"):
        transport_from_dynamic(transports["bad"], "tcp.serversTransports.bad")
    with pytest.raises(TransportError, match=r"ca\.tls\.rootCAs\[0\]"):
        transport_from_dynamic(transports["ca"], "tcp.serversTransports.ca")


@dataclass
class View:
    client_ip: str


def test_admit_gives_back_counts_when_a_later_check_refuses():
    """Middlewares run in the router's order: an inFlightConn before a refusing allow list
    has its count given back at once (as Traefik's deferred decrement does)."""
    limit = InFlightConn(1)
    assert admit([limit, lambda view: False], View("10.0.0.1")) is None
    assert limit.counts == {}
    held = admit([limit, lambda view: True], View("10.0.0.1"))
    assert held == [limit]
    assert admit([limit], View("10.0.0.1")) is None  # the limit, per IP
    assert admit([limit], View("10.0.0.2")) == [limit]
    limit.release(View("10.0.0.1"))
    assert admit([limit], View("10.0.0.1")) == [limit]


def test_compiled_services_report_transport_errors_and_ignored_health_checks():
    """Through the compiler: a TCP loadBalancer's healthCheck (Traefik v3.6+) is accepted with
    a warning (not implemented), a reference to a missing serversTransport disables the
    service, `default@internal` is the static transport, and an inFlightConn counter is kept
    across a reload while its amount is unchanged."""
    from meshproxy.runtime.standalone import standalone

    config = {
        "tcp": {
            "routers": {
                "r": {
                    "entryPoints": ["web"],
                    "rule": "HostSNI(`*`)",
                    "service": "hc",
                    "middlewares": ["limit"],
                }
            },
            "middlewares": {"limit": {"inFlightConn": {"amount": 3}}},
            "services": {
                "hc": {"loadBalancer": {"servers": [{"address": "10.0.0.1:1"}], "healthCheck": {}}},
                "missing": {"loadBalancer": {"servers": [], "serversTransport": "nope"}},
                "internal": {
                    "loadBalancer": {"servers": [], "serversTransport": "default@internal"}
                },
            },
        }
    }
    built = standalone(config)
    snapshot = built.manager.snapshot
    hc = snapshot.tcp_services["hc@file"]
    assert hc.status == "warning" and "healthCheck" in hc.errors[0]
    assert snapshot.tcp_services["missing@file"].errors
    assert "nope" in snapshot.tcp_services["missing@file"].errors[0]
    assert not snapshot.tcp_services["internal@file"].errors
    counter = snapshot.tcp_tables["web"][0].checks[0]
    assert isinstance(counter, InFlightConn) and counter.amount == 3
    built.manager.apply(decode_dynamic_obj(config), "reload")
    assert built.manager.snapshot.tcp_tables["web"][0].checks[0] is counter
