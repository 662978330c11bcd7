"""Which IP is "the client" for a middleware: the peer, or an X-Forwarded-For entry."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from meshproxy.config.dynamic import IPStrategy
from meshproxy.middlewares.base import MiddlewareConfigError
from meshproxy.networks import NetworkSet, parse_address


def parse_ranges(ranges: list[str], path: str) -> list[Any]:
    networks = []
    for i, value in enumerate(ranges):
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise MiddlewareConfigError(f"{path}[{i}]", f"invalid IP or CIDR {value!r}") from None
    return networks


def client_ip_getter(strategy: IPStrategy | None, path: str) -> Callable[[Any], str]:
    """Traefik's ipStrategy: depth from the right of X-Forwarded-For, or skip excludedIPs;
    `ipv6Subnet` turns an IPv6 address into its network (one key per /64, say)."""
    getter = _base_getter(strategy, path)
    subnet = strategy.ipv6_subnet if strategy is not None else None
    if subnet is None:
        return getter
    if not 1 <= subnet <= 128:
        raise MiddlewareConfigError(f"{path}.ipv6Subnet", "must be within 1..128")

    def masked(request: Any) -> str:
        ip = getter(request)
        if ":" not in ip:
            return ip
        try:
            network = ipaddress.ip_network(f"{ip}/{subnet}", strict=False)
        except ValueError:
            return ip
        return str(network.network_address)

    return masked


def _base_getter(strategy: IPStrategy | None, path: str) -> Callable[[Any], str]:
    if strategy is None:
        return lambda request: request.client_ip
    depth = strategy.depth or 0
    if depth < 0:
        raise MiddlewareConfigError(f"{path}.depth", "must be >= 0")
    if depth > 0:

        def by_depth(request: Any) -> str:
            values = request.header_values("x-forwarded-for")
            if not values:
                return ""
            items = [v.strip() for v in values[0].split(",")]
            return items[-depth] if len(items) >= depth else ""

        return by_depth
    if strategy.excluded_i_ps:
        excluded = NetworkSet(parse_ranges(strategy.excluded_i_ps, f"{path}.excludedIPs"))

        def by_exclusion(request: Any) -> str:
            values = request.header_values("x-forwarded-for")
            if not values:
                return ""
            for item in reversed(values[0].split(",")):
                item = item.strip()
                if parse_address(item) is None or not excluded.contains(item):
                    return item
            return ""

        return by_exclusion
    return lambda request: request.client_ip
