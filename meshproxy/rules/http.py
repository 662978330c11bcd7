"""HTTP rules: validate a parsed rule for its syntax version and compile it to a matcher.

A compiled matcher is a plain function `match(request) -> bool`; the request object offers
`method`, `host` (lower-case, port stripped), `path` (routing path), `client_ip`,
`header_values(lower_name)` and `query_values(key)`. Compilation happens once per config,
never per request.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from meshproxy.networks import NetworkSet
from meshproxy.rules.ast import And, Call, Node, Not, Or, calls
from meshproxy.rules.parser import RuleError, parse_rule
from meshproxy.rules.regex import GoRegexpError, compile_go_regexp, has_template, template_to_regex


class HTTPRequestView(Protocol):
    method: str
    host: str
    path: str
    client_ip: str

    def header_values(self, name: str) -> Sequence[str]: ...

    def query_values(self, key: str) -> Sequence[str] | None: ...


Matcher = Callable[[Any], bool]

# canonical name -> (min args, max args) per syntax; None = unlimited
_V3_ARITY: dict[str, tuple[int, int | None]] = {
    "Host": (1, 1),
    "HostRegexp": (1, 1),
    "Path": (1, 1),
    "PathPrefix": (1, 1),
    "PathRegexp": (1, 1),
    "Method": (1, 1),
    "Header": (2, 2),
    "HeaderRegexp": (2, 2),
    "Query": (1, 2),
    "QueryRegexp": (1, 2),
    "ClientIP": (1, 1),
}
_V2_ARITY: dict[str, tuple[int, int | None]] = {
    "Host": (1, None),
    "HostHeader": (1, None),
    "HostRegexp": (1, None),
    "Path": (1, None),
    "PathPrefix": (1, None),
    "Method": (1, None),
    "Headers": (2, 2),
    "HeadersRegexp": (2, 2),
    "Query": (1, None),
    "ClientIP": (1, None),
}
_V2_ONLY = {"HostHeader", "Headers", "HeadersRegexp"}
KNOWN_HTTP = {name.lower(): name for name in (*_V3_ARITY, *_V2_ARITY)}


@dataclass(frozen=True)
class CompiledRule:
    """A rule ready for routing."""

    text: str
    syntax: str  # "v2" or "v3"
    matcher: Matcher
    hosts: frozenset[str] | None  # every match has its host in this set (None: any host)
    # What is left to check once the request's host is known to be in `hosts` (the router
    # table finds routes by exact host): `Host(a) && PathPrefix(p)` leaves the prefix test,
    # `Host(a)` leaves nothing (None).
    within_hosts: Matcher | None = None


def detect_syntax(node: Node) -> str:
    """Traefik Mesh's controller emits v2 rules; recognise them when `ruleSyntax` is unset."""
    for call in calls(node):
        if call.name in _V2_ONLY:
            return "v2"
        _, high = _V3_ARITY.get(call.name, (0, 0))
        if high is not None and len(call.args) > high:
            return "v2"
        if call.name in ("Path", "PathPrefix", "HostRegexp") and any(map(has_template, call.args)):
            return "v2"
    return "v3"


def resolve_syntax(syntax: str | None, default_syntax: str | None = None) -> str | None:
    """The syntax a router's rule is read with, or None for "detect it".

    Traefik reads a router's `ruleSyntax`, else the static `core.defaultRuleSyntax`, and parses
    any value other than `v2` (even an unknown one) with the v3 parser. When neither is set
    Traefik uses v3; meshproxy detects Traefik Mesh's v2 rules instead (`detect_syntax`),
    since Traefik Mesh serves them without `ruleSyntax`. docs/rules.md explains the choice.
    """
    for value in (syntax, default_syntax):
        if value:
            return "v2" if value == "v2" else "v3"
    return None


def compile_http_rule(
    rule: str, syntax: str | None = None, default_syntax: str | None = None
) -> CompiledRule:
    """Parse, validate and compile; raises RuleError pointing at the problem.

    `syntax` is the router's `ruleSyntax`, `default_syntax` the static
    `core.defaultRuleSyntax`; see `resolve_syntax`.
    """
    node = parse_rule(rule, KNOWN_HTTP)
    chosen = resolve_syntax(syntax, default_syntax) or detect_syntax(node)
    arity = _V3_ARITY if chosen == "v3" else _V2_ARITY
    compiler = _Compiler(rule, chosen, arity)
    matcher = compiler.compile(node)
    hosts = _required_hosts(node, chosen)
    within: Matcher | None = matcher
    if hosts is not None:
        within = _within_hosts(compiler, node, hosts, matcher)
    return CompiledRule(rule, chosen, matcher, hosts, within)


def _within_hosts(
    compiler: _Compiler, node: Node, hosts: frozenset[str], matcher: Matcher
) -> Matcher | None:
    """The residual test of a rule whose hosts are `hosts`, for a request whose host is in
    them: nothing for a plain host list, the other side for `hosts && X` or `X && hosts`."""
    if _is_host_list(node) and _required_hosts(node, compiler.syntax) == hosts:
        return None
    if isinstance(node, And):
        for side, other in ((node.left, node.right), (node.right, node.left)):
            if _is_host_list(side) and _required_hosts(side, compiler.syntax) == hosts:
                return compiler.compile(other)
    return matcher


def _is_host_list(node: Node) -> bool:
    """`Host(a, b)` or `Host(a) || Host(b)`: true exactly when the host is one of them."""
    if isinstance(node, Or):
        return _is_host_list(node.left) and _is_host_list(node.right)
    return isinstance(node, Call) and node.name in ("Host", "HostHeader")


def default_priority(rule: str) -> int:
    """Traefik's default: the rule's length in bytes."""
    return len(rule.encode())


# ------------------------------------------------------------------ host index support


def _normalize_host(value: str) -> str:
    return value.lower().rstrip(".")


def _required_hosts(node: Node, syntax: str) -> frozenset[str] | None:
    if isinstance(node, Call):
        if node.name in ("Host", "HostHeader") and not any("*" in a for a in node.args):
            return frozenset(_normalize_host(a) for a in node.args)
        return None
    if isinstance(node, And):
        left = _required_hosts(node.left, syntax)
        right = _required_hosts(node.right, syntax)
        if left is None:
            return right
        if right is None:
            return left
        return left & right
    if isinstance(node, Or):
        left = _required_hosts(node.left, syntax)
        right = _required_hosts(node.right, syntax)
        if left is None or right is None:
            return None
        return left | right
    return None


# ------------------------------------------------------------------ compilation


class _Compiler:
    def __init__(self, rule: str, syntax: str, arity: dict[str, tuple[int, int | None]]) -> None:
        self.rule = rule
        self.syntax = syntax
        self.arity = arity

    def fail(self, call: Call, message: str) -> RuleError:
        return RuleError(self.rule, call.pos, message)

    def compile(self, node: Node) -> Matcher:
        if isinstance(node, Not):
            inner = self.compile(node.operand)
            return lambda r: not inner(r)
        if isinstance(node, And):
            left, right = self.compile(node.left), self.compile(node.right)
            return lambda r: left(r) and right(r)
        if isinstance(node, Or):
            parts = _flatten_or(node)
            exact_hosts = self._exact_host_set(parts)
            if exact_hosts is not None:
                # a trailing dot on the request host is tolerated, as by Host() itself
                return lambda r: (
                    r.host in exact_hosts
                    or (r.host[-1:] == "." and r.host.rstrip(".") in exact_hosts)
                )
            left, right = self.compile(node.left), self.compile(node.right)
            return lambda r: left(r) or right(r)
        return self.compile_call(node)

    def _exact_host_set(self, parts: list[Node]) -> frozenset[str] | None:
        hosts: set[str] = set()
        for part in parts:
            if not isinstance(part, Call) or part.name not in ("Host", "HostHeader"):
                return None
            self.check_arity(part)
            for arg in part.args:
                if "*" in arg:
                    return None
                self.check_ascii(part, arg)
                hosts.add(_normalize_host(arg))
        return frozenset(hosts)

    def check_arity(self, call: Call) -> None:
        bounds = self.arity.get(call.name)
        if bounds is None:
            other = "v2" if self.syntax == "v3" else "v3"
            raise self.fail(
                call,
                f"matcher {call.name} does not exist in rule syntax "
                f"{self.syntax} (it is {other} syntax)",
            )
        low, high = bounds
        count = len(call.args)
        if count < low or (high is not None and count > high):
            expected = (
                str(low) if low == high else (f"{low} or {high}" if high else f"at least {low}")
            )
            raise self.fail(
                call,
                f"{call.name} takes {expected} argument(s) in rule syntax "
                f"{self.syntax}, got {count}",
            )

    def check_ascii(self, call: Call, value: str) -> None:
        if not value.isascii():
            raise self.fail(call, f"{call.name} value {value!r} must be ASCII (use punycode)")

    def compile_call(self, call: Call) -> Matcher:
        self.check_arity(call)
        handler = getattr(self, f"m_{call.name}")
        matchers = handler(call)
        return matchers

    # -- matchers ---------------------------------------------------------------------------

    def _any(self, matchers: list[Matcher]) -> Matcher:
        if len(matchers) == 1:
            return matchers[0]
        return lambda r: any(m(r) for m in matchers)

    def m_Host(self, call: Call) -> Matcher:
        return self._any([self._host(call, arg) for arg in call.args])

    m_HostHeader = m_Host

    def _host(self, call: Call, arg: str) -> Matcher:
        # Host values take no template in either syntax: Traefik v2 took templates in
        # HostRegexp only (`Host(`{sub}.a.test`)` matches that text, i.e. nothing).
        self.check_ascii(call, arg)
        host = _normalize_host(arg)
        if self.syntax == "v2":  # no wildcards either: Traefik 3.7 added them to v3 only
            return lambda r: r.host == host or r.host.rstrip(".") == host
        if host == "*":
            return lambda r: True
        if host.startswith("*."):
            suffix = host[1:]
            return lambda r: _one_label_under(r.host, suffix)
        return lambda r: r.host == host or r.host.rstrip(".") == host

    def _regex(self, call: Call, pattern: str) -> Callable[[str], Any]:
        try:
            return compile_go_regexp(pattern)
        except GoRegexpError as exc:
            raise self.fail(call, f"invalid regular expression {pattern!r}: {exc}") from None

    def _host_regex(self, call: Call, pattern: str) -> Matcher:
        # The request host is already lower-cased and port-stripped (Traefik's
        # requestdecorator), and v3 matches the pattern as written: `HostRegexp(`^A`)` never
        # matches. gorilla/mux (v2) compared host templates case-insensitively.
        search = self._regex(call, "(?i)" + pattern if self.syntax == "v2" else pattern)
        return lambda r: search(r.host)

    def m_HostRegexp(self, call: Call) -> Matcher:
        matchers = []
        for arg in call.args:
            self.check_ascii(call, arg)
            if self.syntax == "v2":
                try:
                    pattern = "^" + template_to_regex(arg, "[^.]+") + "$"
                except ValueError as exc:
                    raise self.fail(call, str(exc)) from None
            else:
                pattern = arg
            matchers.append(self._host_regex(call, pattern))
        return self._any(matchers)

    def _check_path(self, call: Call, arg: str) -> None:
        if not arg.startswith("/"):
            raise self.fail(call, f"{call.name} value {arg!r} must start with '/'")

    def m_Path(self, call: Call) -> Matcher:
        matchers = []
        for arg in call.args:
            self._check_path(call, arg)
            if self.syntax == "v2" and has_template(arg):
                matchers.append(self._path_regex(call, "^" + template_to_regex(arg, "[^/]+") + "$"))
            else:
                matchers.append(lambda r, p=arg: r.path == p)
        return self._any(matchers)

    def m_PathPrefix(self, call: Call) -> Matcher:
        matchers = []
        for arg in call.args:
            self._check_path(call, arg)
            if self.syntax == "v2" and has_template(arg):
                matchers.append(self._path_regex(call, "^" + template_to_regex(arg, "[^/]+")))
            else:
                matchers.append(lambda r, p=arg: r.path.startswith(p))
        return self._any(matchers)

    def _path_regex(self, call: Call, pattern: str) -> Matcher:
        search = self._regex(call, pattern)
        return lambda r: search(r.path)

    def m_PathRegexp(self, call: Call) -> Matcher:
        return self._path_regex(call, call.args[0])

    def m_Method(self, call: Call) -> Matcher:
        methods = frozenset(a.upper() for a in call.args)
        return lambda r: r.method in methods

    def m_Header(self, call: Call) -> Matcher:
        name, value = call.args[0].lower(), call.args[1]
        return lambda r: value in r.header_values(name)

    def _header_regex(self, call: Call) -> Matcher:
        name = call.args[0].lower()
        search = self._regex(call, call.args[1])
        return lambda r: any(search(v) for v in r.header_values(name))

    m_HeaderRegexp = _header_regex

    def m_Headers(self, call: Call) -> Matcher:
        return self.m_Header(call)

    def m_HeadersRegexp(self, call: Call) -> Matcher:
        if self.syntax == "v2":
            # v2 (gorilla/mux) anchors nothing but matches the whole value list like v3
            return self._header_regex(call)
        return self._header_regex(call)

    def m_Query(self, call: Call) -> Matcher:
        if self.syntax == "v2":
            # Traefik v2 splits each value at its first "=" and hands the flattened list to
            # gorilla/mux's Queries(key, value, ...): it must pair up, and an empty value
            # only asks for the key to be present.
            flat: list[str] = []
            for arg in call.args:
                flat.extend(arg.split("=", 1))
            if len(flat) % 2:
                raise self.fail(
                    call, f"Query: number of parameters must be multiple of 2, got {flat}"
                )
            pairs = list(zip(flat[::2], flat[1::2], strict=True))

            def match_all(r: Any) -> bool:
                for key, value in pairs:
                    values = r.query_values(key)
                    if values is None or (value != "" and value not in values):
                        return False
                return True

            return match_all
        key = call.args[0]
        value = call.args[1] if len(call.args) == 2 else ""

        def match_query(r: Any) -> bool:
            values = r.query_values(key)
            return values is not None and value in values

        return match_query

    def m_QueryRegexp(self, call: Call) -> Matcher:
        key = call.args[0]
        if len(call.args) == 1:
            return self.m_Query(call)
        search = self._regex(call, call.args[1])

        def match_query(r: Any) -> bool:
            values = r.query_values(key)
            return values is not None and any(search(v) for v in values)

        return match_query

    def m_ClientIP(self, call: Call) -> Matcher:
        networks = [parse_network(self.rule, call, arg) for arg in call.args]
        return client_ip_matcher(networks)


def parse_network(
    rule: str, call: Call, value: str
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IP or CIDR as Go's net.ParseIP / net.ParseCIDR read it: no surrounding spaces, no
    IPv6 zone (`fe80::1%eth0`), no leading zeros; a host address becomes a /32 or /128."""
    if "%" in value:
        raise RuleError(rule, call.pos, f"{call.name} value {value!r} is not an IP or CIDR")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise RuleError(
            rule, call.pos, f"{call.name} value {value!r} is not an IP or CIDR"
        ) from None


def client_ip_matcher(networks: list[Any]) -> Matcher:
    allowed = NetworkSet(networks)

    def match(r: Any) -> bool:
        return allowed.contains(r.client_ip)

    return match


def _one_label_under(host: str, suffix: str) -> bool:
    """`*.example.com` (Traefik v3.7): exactly one label before `suffix` (".example.com");
    a trailing dot on the request host is tolerated."""
    if host[-1:] == ".":
        host = host.rstrip(".")
    return host.endswith(suffix) and len(host) > len(suffix) and "." not in host[: -len(suffix)]


def _flatten_or(node: Node) -> list[Node]:
    if isinstance(node, Or):
        return _flatten_or(node.left) + _flatten_or(node.right)
    return [node]
