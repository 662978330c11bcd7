"""Rules and priorities as Traefik Mesh writes them (v2 rule syntax, which proxies detect)."""

from __future__ import annotations

import ipaddress

from meshproxy.controller.topology import HTTPMatch, Service, TrafficTargetRule

SERVICE, TARGET_DIRECT, TARGET_INDIRECT, SPLIT = 1, 2, 3, 4
XFF_RULE = "HeadersRegexp(`X-Forwarded-For`, `.+`)"


def host_rule(service: Service) -> str:
    hosts = [
        f"Host(`{service.name}.{service.namespace}.traefik.mesh`)",
        f"Host(`{service.name}.{service.namespace}.maesh`)",
    ]
    if _is_ip(service.cluster_ip):  # not for headless ("None") or unallocated services
        hosts.append(f"Host(`{service.cluster_ip}`)")
    return " || ".join(hosts)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def match_rule(match: HTTPMatch) -> str:
    parts = []
    if match.path_regex:
        parts.append(f"PathPrefix(`/{{path:{match.path_regex.lstrip('/')}}}`)")
    if match.methods and "*" not in match.methods:
        parts.append("Method(" + ",".join(f"`{m}`" for m in match.methods) + ")")
    for name, regex in sorted(match.headers):
        parts.append(f"HeadersRegexp(`{name}`, `{regex}`)")
    rule = " && ".join(parts)
    return f"({rule})" if len(parts) > 1 else rule


def service_rule(service: Service, rules: list[TrafficTargetRule]) -> str:
    host = host_rule(service)
    matches = [match_rule(m) for rule in rules for m in rule.http_matches]
    matches = [m for m in matches if m]
    if not matches:
        return host
    return f"({host}) && ({' || '.join(matches)})"


def priority(base: int, rule: str) -> int:
    return base * 1000 + rule.count("&&") + rule.count("||")
