"""The parsed request as routing and forwarding see it (protocol-independent)."""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import Any, Final
from urllib.parse import parse_qs

# RFC 3986 §2.3: characters that never need percent-encoding. §6.2.2.2: a percent-encoded
# one is equivalent to the character itself, so normalisation decodes it.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX_DIGITS = "0123456789ABCDEF"
_HEX_VALUE: dict[str, int] = {c: int(c, 16) for c in "0123456789abcdefABCDEF"}


def normalize_path(raw_path: str, sanitize: bool = True) -> str:
    """The request path as Traefik (>= 3.3.6) forwards and routes it, still percent-encoded.

    1. RFC 3986 §6.2.2.1/§6.2.2.2 (Traefik's `normalizePath`, always on): a percent-encoded
       unreserved character is decoded (`%7E` -> `~`, `%2e` -> `.`), every other triplet
       gets upper-case hex (`%2f` -> `%2F`). Reserved characters stay encoded, so `%2F` is
       never a segment separator.
    2. When `sanitize` (the entrypoint's `http.sanitizePath`, default true): `clean_path`,
       which removes dot-segments (RFC 3986 §5.2.4) and merges empty segments, as Traefik
       does with Go's `url.URL.JoinPath()`. Step 1 comes first, so `/%2e%2e/` is a `..`.

    A backslash, which RFC 3986 does not allow in a path, is sent as `%5C` (as Go re-encodes
    it for Traefik), whatever `sanitize` says: backends that parse URLs as WHATWG does (browsers,
    Node's `new URL`) read a raw `\\` as `/`, so `/api/..\\admin` would resolve to `/admin`
    there. A path that is not absolute (`*`) is only percent-normalised. Raises ValueError when
    a `%` is not followed by two hex digits (Traefik and Go answer 400).
    """
    path = raw_path
    if "%" in path:
        path = _normalize_percent(path)
    if "\\" in path:
        path = path.replace("\\", "%5C")
    if sanitize and path[:1] == "/" and ("/." in path or "//" in path):
        path = clean_path(path)
    return path


def _normalize_percent(path: str) -> str:
    """RFC 3986 §6.2.2.1 (hex case) and §6.2.2.2 (unreserved decoded) on every triplet."""
    out: list[str] = []
    start = 0
    n = len(path)
    i = path.find("%")
    while i >= 0:
        if i + 3 > n:
            raise ValueError("invalid percent-encoding in path")
        hi = _HEX_VALUE.get(path[i + 1], -1)
        lo = _HEX_VALUE.get(path[i + 2], -1)
        if hi < 0 or lo < 0:
            raise ValueError("invalid percent-encoding in path")
        out.append(path[start:i])
        char = chr(hi * 16 + lo)
        if char in _UNRESERVED:
            out.append(char)
        else:
            out.append("%" + _HEX_DIGITS[hi] + _HEX_DIGITS[lo])
        start = i + 3
        i = path.find("%", start)
    out.append(path[start:])
    return "".join(out)


def clean_path(path: str) -> str:
    """An absolute path without dot-segments or empty segments: Traefik's sanitizePath.

    Traefik calls Go's `url.URL.JoinPath()`, i.e. `path.Clean` on the escaped path: `.`
    segments go, `..` removes the segment before it and never climbs above the root (RFC 3986
    §5.2.4 drops such a `..` too), `//` becomes `/`, and a trailing `/` is kept only when the
    path ended with one. So this is RFC 3986 §5.2.4 `remove_dot_segments` applied after
    merging slashes, except that a final `.` or `..` leaves no trailing slash (`/a/b/..` ->
    `/a`, where the RFC gives `/a/`); tests/unit/test_path_normalisation.py checks both.
    Percent-encoded text is opaque here: `%2F` is not a separator, `%2E` was decoded before.
    """
    segments: list[str] = []
    for segment in path.split("/"):
        if not segment or segment == ".":
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    if not segments:
        return "/"
    cleaned = "/" + "/".join(segments)
    return cleaned + "/" if path[-1] == "/" else cleaned


def is_clean_path(path: str) -> bool:
    """True when `clean_path` would not change `path` (which must be absolute)."""
    if "/." not in path and "//" not in path:
        return True
    return clean_path(path) == path


# Reserved characters Traefik keeps percent-encoded in the routing path (upper-case hex only).
_KEEP_ENCODED = frozenset(
    "%3A %2F %3F %23 %5B %5D %40 %21 %24 %26 %27 %28 %29 %2A %2B %2C %3B %3D %25".split()
)


def routing_path(raw_path: str) -> str:
    """Decode %XX except reserved ones, as Traefik's matchers see the path."""
    if "%" not in raw_path:
        return raw_path
    out: list[str] = []
    i = 0
    n = len(raw_path)
    pending = bytearray()
    while i < n:
        ch = raw_path[i]
        if ch == "%":
            triplet = raw_path[i : i + 3]
            if len(triplet) == 3 and _is_hex(triplet[1:]):
                if triplet in _KEEP_ENCODED:
                    if pending:
                        out.append(pending.decode("utf-8", "replace"))
                        pending.clear()
                    out.append(triplet)
                else:
                    pending.append(int(triplet[1:], 16))
                i += 3
                continue
            raise ValueError("invalid percent-encoding in path")
        if pending:
            out.append(pending.decode("utf-8", "replace"))
            pending.clear()
        out.append(ch)
        i += 1
    if pending:
        out.append(pending.decode("utf-8", "replace"))
    return "".join(out)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


def split_host_port(host: str) -> tuple[str, str]:
    """'Example.com:8080' -> ('example.com', '8080'); '[::1]:80' -> ('::1', '80');
    'example.com:' -> ('example.com', ''): an empty port is the scheme's default (RFC 3986
    §3.2.3, `port = *DIGIT`), so Host rules match the name (as Go's net.SplitHostPort in
    Traefik: a router must not be skipped for a trailing colon)."""
    if host.startswith("["):
        end = host.find("]")
        if end > 0:
            rest = host[end + 1 :]
            return host[1:end].lower(), rest[1:] if rest.startswith(":") else ""
    name, sep, port = host.rpartition(":")
    if sep and (port.isdigit() or not port) and name and ":" not in name:
        return name.lower(), port
    return host.lower(), ""


_HOST_CACHE: Final[dict[bytes, tuple[str, str]]] = {}


def host_parts(host_header: bytes) -> tuple[str, str]:
    """Routing host and port of a Host header, memoized: clients repeat the same few."""
    parts = _HOST_CACHE.get(host_header)
    if parts is None:
        host, port = split_host_port(host_header.decode("latin-1").strip())
        parts = (host.rstrip("."), port)
        if len(_HOST_CACHE) >= 4096:
            _HOST_CACHE.clear()
        _HOST_CACHE[host_header] = parts
    return parts


_NO_TOKENS: Final[frozenset[bytes]] = frozenset()
_CHECKPOINT_FIELDS = (
    "target",
    "path",
    "headers",
    "host_header",
    "forwarded_for",
    "append_client_ip",
    "content_length",
    "verbatim",
    "_header_map",
)
_read_checkpoint = attrgetter(*_CHECKPOINT_FIELDS)
_ATTRIBUTES = (
    "_header_map",
    "_query_map",
    "append_client_ip",
    "client_ip",
    "client_port",
    "connection_tokens",
    "content_length",
    "expect_continue",
    "forwarded_for",
    "headers",
    "host",
    "host_header",
    "http_version",
    "keep_alive",
    "method",
    "path",
    "port",
    "query",
    "scheme",
    "target",
    "te_trailers",
    "upgrade",
    "verbatim",
)


class Request:
    """One HTTP request. Header names are lower-cased on arrival (as Envoy does): one spelling
    for matching, forwarding and HTTP/2, and no per-request case folding later.

    The path is normalised on construction (`normalize_path`; `sanitize_path` is the
    entrypoint's `http.sanitizePath`): `target` is what is forwarded, `path` what the
    matchers see (`routing_path` of it). Raises ValueError for a target that cannot be
    normalised (broken percent-encoding): the server answers 400.
    """

    __slots__ = _ATTRIBUTES

    def __init__(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        host_header: bytes,
        client_ip: str,
        client_port: int,
        http_version: str = "1.1",
        scheme: str = "http",
        sanitize_path: bool = True,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.host_header = host_header
        self.client_ip = client_ip
        self.client_port = client_port
        self.http_version = http_version
        self.scheme = scheme
        self.content_length: int | None = None
        self.expect_continue = False
        self.forwarded_for = False  # an X-Forwarded-For header is present (trusted client)
        self.append_client_ip = True  # cleared by a headers middleware that blanks X-F-F
        self.keep_alive = True
        self.upgrade: bytes | None = None  # the protocol an upgrade request asks for
        self.te_trailers = False  # the client accepts trailers (TE: trailers, RFC 9110 §10.1.4)
        self.connection_tokens = _NO_TOKENS  # headers named by Connection
        self._header_map: dict[str, list[str]] | None = None
        self._query_map: dict[str, list[str]] | None = None
        # The header lines to forward, already serialized (see H1ServerConnection): set while
        # they are exactly the client's plus the entrypoint's X-Forwarded-* ones. Any edit of
        # the fields or of the Host clears it, so `headers` is edited only by the methods here.
        self.verbatim: bytes | None = None
        raw = target.decode("latin-1")
        if raw[:1] != "/" and raw.startswith(("http://", "https://")):
            # absolute-form: its authority wins over the Host header
            after = raw.split("://", 1)[1]
            authority, slash, rest = after.partition("/")
            if authority:
                self.host_header = authority.encode("latin-1")  # not the Host field's
            raw = slash + rest if slash else "/"
            self.target = raw.encode("latin-1")
        path, _, self.query = raw.partition("?")
        if "%" in path or "/." in path or "//" in path or "\\" in path:
            # Routing and forwarding see the same normalised path (`normalize_path`), so a
            # `/api/../admin` is routed, and reaches the backend, as `/admin`. The query is
            # kept byte for byte. Raises ValueError on broken percent-encoding (400).
            clean = normalize_path(path, sanitize_path)
            if clean != path:
                self.target = (clean + raw[len(path) :]).encode("latin-1")
            self.path = routing_path(clean) if "%" in clean else clean
        else:
            self.path = path  # the common case: nothing to decode, clean or escape
        self.host, self.port = _HOST_CACHE.get(self.host_header) or host_parts(self.host_header)

    def checkpoint(self) -> tuple[Any, ...]:
        """What middlewares may change, to put back before another try (see `restore`). Edits
        rebind `headers` rather than mutate it, so this is a handful of references."""
        return _read_checkpoint(self)

    def restore(self, checkpoint: tuple[Any, ...]) -> None:
        for name, value in zip(_CHECKPOINT_FIELDS, checkpoint, strict=True):
            setattr(self, name, value)

    def copy(self) -> Request:
        """An independent copy (own header list) for a mirrored request."""
        other = Request(
            self.method, self.target, [], self.host_header, self.client_ip, 0, sanitize_path=False
        )
        for name in _ATTRIBUTES:
            setattr(other, name, getattr(self, name))
        other.headers = list(self.headers)
        other._header_map = None
        return other

    # -- edits by middlewares ---------------------------------------------------------------

    @property
    def raw_path(self) -> str:
        """The path as sent (percent-encoding kept), without the query."""
        return self.target.partition(b"?")[0].decode("latin-1")

    def set_raw_path(self, raw_path: str) -> None:
        """Forward to another path (stripPrefix, replacePath, ...); the query is kept.

        `raw_path` is taken as the middleware made it (percent-encoded, absolute): like
        Traefik, no second normalisation after the entrypoint's. Raises ValueError on broken
        percent-encoding.
        """
        path = routing_path(raw_path)  # raises ValueError on broken percent-encoding
        query = self.target.partition(b"?")
        self.target = raw_path.encode("latin-1") + (b"?" + query[2] if query[1] else b"")
        self.path = path

    def set_host_header(self, value: bytes) -> None:
        """Forward with another Host (headers middleware); routing keeps the original."""
        self.host_header = value
        self.verbatim = None

    def set_header(self, name: bytes, value: bytes) -> None:
        """Replace all values of a header (name in lower case)."""
        self.verbatim = None
        self.headers = [(n, v) for n, v in self.headers if n != name]
        self.headers.append((name, value))
        if name == b"x-forwarded-for":
            self.forwarded_for = True
        self._header_map = None

    def remove_header(self, name: bytes) -> None:
        self.verbatim = None
        self.headers = [(n, v) for n, v in self.headers if n != name]
        if name == b"x-forwarded-for":
            self.forwarded_for = False
        self._header_map = None

    # -- matcher view -------------------------------------------------------------------

    def header_values(self, name: str) -> Sequence[str]:
        """All values of a header (name in lower case)."""
        header_map = self._header_map
        if header_map is None:
            header_map = {}
            for key, value in self.headers:
                header_map.setdefault(key.decode("latin-1"), []).append(value.decode("latin-1"))
            self._header_map = header_map
        return header_map.get(name, ())

    def query_values(self, key: str) -> Sequence[str] | None:
        query_map = self._query_map
        if query_map is None:
            query_map = parse_qs(self.query.replace(";", "&"), keep_blank_values=True)
            self._query_map = query_map
        return query_map.get(key)
