"""TCP rules (HostSNI, HostSNIRegexp, ClientIP, ALPN), validated and compiled once per config.

The connection view offers `sni` (lower-case, "" when absent), `client_ip` and `alpn` (list).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshproxy.rules.ast import And, Call, Node, Not, Or, calls
from meshproxy.rules.http import Matcher, client_ip_matcher, parse_network, resolve_syntax
from meshproxy.rules.parser import RuleError, parse_rule
from meshproxy.rules.regex import GoRegexpError, compile_go_regexp

KNOWN_TCP = {n.lower(): n for n in ("HostSNI", "HostSNIRegexp", "ClientIP", "ALPN")}
# Traefik 3.7's check on HostSNI values; Go's [[:word:]] is ASCII only, hence re.ASCII.
_SNI_VALUE = re.compile(r"^(\*\.)?[\w.\-:]+$", re.ASCII)


@dataclass(frozen=True)
class CompiledTCPRule:
    text: str
    matcher: Matcher
    catch_all: bool  # exactly HostSNI(`*`)
    needs_sni: bool  # uses a HostSNI other than `*`


def tcp_default_priority(rule: str, catch_all: bool) -> int:
    return -1 if catch_all else len(rule.encode())


def compile_tcp_rule(
    rule: str, syntax: str | None = None, default_syntax: str | None = None
) -> CompiledTCPRule:
    """Parse, validate and compile a TCP rule; raises RuleError pointing at the problem.

    v2 syntax (explicit, default, or detected from a multi-argument call when neither is set,
    see `resolve_syntax`) allows several values per matcher (OR); v3 exactly one.
    """
    node = parse_rule(rule, KNOWN_TCP)
    chosen = resolve_syntax(syntax, default_syntax)
    multi = chosen == "v2" or (chosen is None and any(len(c.args) > 1 for c in calls(node)))
    compiler = _TCPCompiler(rule, multi)
    matcher = compiler.compile(node)
    catch_all = isinstance(node, Call) and node.name == "HostSNI" and node.args == ("*",)
    needs_sni = any(c.name == "HostSNI" and c.args != ("*",) for c in calls(node))
    return CompiledTCPRule(rule, matcher, catch_all, needs_sni)


class _TCPCompiler:
    def __init__(self, rule: str, multi: bool) -> None:
        self.rule = rule
        self.multi = multi

    def compile(self, node: Node) -> Matcher:
        if isinstance(node, Not):
            inner = self.compile(node.operand)
            return lambda c: not inner(c)
        if isinstance(node, And):
            left, right = self.compile(node.left), self.compile(node.right)
            return lambda c: left(c) and right(c)
        if isinstance(node, Or):
            left, right = self.compile(node.left), self.compile(node.right)
            return lambda c: left(c) or right(c)
        assert isinstance(node, Call)
        if len(node.args) > 1 and not self.multi:
            raise RuleError(
                self.rule, node.pos, f"{node.name} takes 1 argument, got {len(node.args)}"
            )
        matchers = [self.one(node, arg) for arg in node.args]
        if len(matchers) == 1:
            return matchers[0]
        return lambda c: any(m(c) for m in matchers)

    def one(self, call: Call, arg: str) -> Matcher:
        if call.name == "HostSNI":
            if arg == "*":
                return lambda c: True
            if not _SNI_VALUE.match(arg):
                raise RuleError(self.rule, call.pos, f"invalid HostSNI value {arg!r}")
            host = arg.lower().rstrip(".")
            if host.startswith("*."):
                suffix = host[1:]
                return lambda c: (
                    c.sni.endswith(suffix)
                    and "." not in c.sni[: -len(suffix)]
                    and len(c.sni) > len(suffix)
                )
            return lambda c: c.sni == host
        if call.name == "HostSNIRegexp":
            if not arg.isascii():
                raise RuleError(self.rule, call.pos, "HostSNIRegexp value must be ASCII")
            try:
                search = compile_go_regexp(arg)
            except GoRegexpError as exc:
                raise RuleError(self.rule, call.pos, f"invalid regular expression: {exc}") from None
            return lambda c: search(c.sni)
        if call.name == "ALPN":
            if arg == "acme-tls/1":
                raise RuleError(self.rule, call.pos, "ALPN value acme-tls/1 is reserved")
            return lambda c: arg in c.alpn
        return client_ip_matcher([parse_network(self.rule, call, arg)])
