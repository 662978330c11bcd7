"""Is this IP address in these networks? One answer for every place that asks: the ClientIP
rule matcher, ipAllowList and its ipStrategy, TCP allow-lists and the entrypoint's trusted
forwarded-header sources.

An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, what a dual-stack listener reports for an IPv4
client) is read as its IPv4 address, as Go's net.IP.To4 does, so an IPv4 range matches it.
Answers are memoized per address string (bounded): a node's proxy sees the same few pods.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_MEMO_LIMIT = 4096


class NetworkSet:
    """An immutable set of IP networks; `contains(ip)` says whether an address is in one."""

    __slots__ = ("_memo", "networks")

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = tuple(networks)
        self._memo: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def contains(self, ip: str) -> bool:
        """Whether `ip` (text, as a peer address or an X-Forwarded-For entry) is in one of the
        networks; False for anything that is not an IP address."""
        known = self._memo.get(ip)
        if known is not None:
            return known
        address = parse_address(ip)
        found = address is not None and any(
            address.version == network.version and address in network for network in self.networks
        )
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        self._memo[ip] = found
        return found


def parse_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address `ip` names (IPv4-mapped IPv6 read as IPv4), or None if it names none. An
    IPv6 zone (`fe80::1%eth0`) is not an address here, as for Go's net.ParseIP."""
    if "%" in ip:
        return None
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
