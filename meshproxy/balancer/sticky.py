"""Sticky sessions: Traefik's `sticky.cookie` on `loadBalancer` and `weighted` services.

As Traefik 3 (pkg/server/service/loadbalancer/sticky.go, pkg/server/cookie/cookie.go):

- the cookie's name is the configured `name` with every character outside RFC 2616's token
  set turned into `_`, or, when unset, `_` + the first 5 hex digits of
  sha1("_TRAEFIK_BACKEND_" + the qualified service name) (`whoami@file` -> `_9a7bd`);
- its value is the first 16 hex digits of sha256(child name), the child name being the
  server's `url` as written in the config (loadBalancer) or the child service's `name` as
  written (weighted); older Traefik values (the raw name, its 64-bit FNV-1 in hex, and the
  FNV of that) are still accepted, and answered with a fresh cookie in the current form;
- a request whose cookie names a child that is up goes to that child and gets no cookie back;
  any other request is balanced as usual, and its response carries `Set-Cookie` for the child
  picked (Path `/` unless `path` is set; `Max-Age` only when `maxAge` > 0, `Max-Age=0` when
  < 0; `Domain`, `HttpOnly`, `Secure`, `SameSite` when set), as Go's http.SetCookie writes it.

A pinned child that is down, or no longer configured (a stale hash), falls back to the
balancer, which picks among the children that are up and re-pins the client.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from meshproxy.config.dynamic import Cookie

if TYPE_CHECKING:
    from meshproxy.http.exchange import Exchange

_TOKEN_EXTRA = set("!#$%&'*+-.^`|~")
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3


def cookie_name(configured: str | None, service: str) -> str:
    """Traefik's cookie.GetName: the sanitised configured name, or one derived from the
    qualified service name."""
    if configured:
        return "".join(
            c if c.isascii() and (c.isalnum() or c in _TOKEN_EXTRA) else "_" for c in configured
        )
    return ("_" + hashlib.sha1(("_TRAEFIK_BACKEND_" + service).encode()).hexdigest())[:6]


def sticky_value(child: str) -> str:
    """The cookie value pinning `child`: sha256 truncated to 16 hex digits (Traefik 3)."""
    return hashlib.sha256(child.encode()).hexdigest()[:16]


def fnv_hash(text: str) -> str:
    """Go's hash/fnv New64 (FNV-1, not 1a) as lower-case hex without leading zeros: the value
    older Traefik versions wrote, still accepted."""
    value = _FNV_OFFSET
    for byte in text.encode():
        value = (value * _FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
        value ^= byte
    return format(value, "x")


def set_cookie_line(name: str, value: str, cookie: Cookie) -> bytes:
    """The Set-Cookie value as Go's net/http writes it (Cookie.String): attributes in Go's
    order; an invalid domain is left out as Go does (here: one with characters outside a
    host name's)."""
    parts = [f"{name}={value}"]
    path = "/" if cookie.path is None else cookie.path
    if path:
        parts.append(f"Path={path}")
    domain = (cookie.domain or "").lstrip(".")
    if domain and all(c.isascii() and (c.isalnum() or c in "-.") for c in domain):
        parts.append(f"Domain={domain}")
    max_age = cookie.max_age or 0
    if max_age > 0:
        parts.append(f"Max-Age={max_age}")
    elif max_age < 0:
        parts.append("Max-Age=0")
    if cookie.http_only:
        parts.append("HttpOnly")
    if cookie.secure:
        parts.append("Secure")
    same_site = (cookie.same_site or "").lower()
    if same_site in ("lax", "strict", "none"):
        parts.append("SameSite=" + same_site.capitalize())
    return "; ".join(parts).encode()


class _SetCookie:
    """A response hook adding one precomputed Set-Cookie field. One per child, made when the
    service is built and reused by every request (no object per request)."""

    __slots__ = ("field",)

    def __init__(self, line: bytes) -> None:
        self.field = (b"set-cookie", line)

    def add(
        self, ex: Exchange, status: int, headers: list[tuple[bytes, bytes]]
    ) -> list[tuple[bytes, bytes]]:
        headers.append(self.field)
        return headers


class Sticky:
    """The sticky cookie of one service over its children (servers or child services), by
    index in the service's own list."""

    __slots__ = ("_hooks", "_legacy", "_values", "name", "name_bytes", "rewrite")

    def __init__(self, cookie: Cookie, service: str, children: Sequence[str]) -> None:
        self.name = cookie_name(cookie.name, service)
        self.name_bytes = self.name.encode()
        self._values: dict[bytes, int] = {}
        self._legacy: dict[bytes, int] = {}
        hooks = []
        for index, child in enumerate(children):
            value = sticky_value(child)
            self._values.setdefault(value.encode(), index)
            once = fnv_hash(child)
            for legacy in (child, once, fnv_hash(once)):
                self._legacy.setdefault(legacy.encode(), index)
            hooks.append(_SetCookie(set_cookie_line(self.name, value, cookie)).add)
        self._hooks = hooks
        self.rewrite = False  # the last `pinned` cookie was in a legacy form

    def pinned(self, ex: Exchange) -> int:
        """The index of the child the request's cookie names, or -1 (no cookie, unknown
        value). Sets `rewrite` when the value was a legacy one (see `keep`)."""
        self.rewrite = False
        value = self._cookie_value(ex)
        if value is None:
            return -1
        index = self._values.get(value)
        if index is not None:
            return index
        index = self._legacy.get(value)
        if index is None:
            return -1
        self.rewrite = True
        return index

    def keep(self, ex: Exchange, index: int) -> None:
        """The pinned child is up and serves the request: re-pin a legacy cookie."""
        if self.rewrite:
            self.stick(ex, index)

    def stick(self, ex: Exchange, index: int) -> None:
        """Pin the client to child `index` with the response's Set-Cookie."""
        hooks = ex.response_hooks
        if hooks is None:
            ex.response_hooks = [self._hooks[index]]
        else:
            hooks.append(self._hooks[index])

    def child_for(self, headers: Iterable[tuple[bytes, bytes]]) -> int:
        """The index of the child a request with these header fields is pinned to (any form
        of the value, legacy ones included), or -1; changes nothing (the explain view)."""
        value = self.cookie_in(headers)
        if value is None:
            return -1
        index = self._values.get(value)
        if index is None:
            index = self._legacy.get(value)
        return -1 if index is None else index

    def _cookie_value(self, ex: Exchange) -> bytes | None:
        return self.cookie_in(ex.request.headers)

    def cookie_in(self, headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
        """The first cookie of our name in the Cookie fields (RFC 6265 §5.4: pairs split on
        `;`; Go's readCookies also strips one pair of double quotes)."""
        name = self.name_bytes
        for field, line in headers:
            if field != b"cookie" or name not in line:
                continue
            for pair in line.split(b";"):
                key, sep, value = pair.strip().partition(b"=")
                if sep and key == name:
                    if len(value) > 1 and value[:1] == b'"' and value[-1:] == b'"':
                        value = value[1:-1]
                    return value
        return None
