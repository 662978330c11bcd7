"""stripPrefix, stripPrefixRegex, addPrefix, replacePath, replacePathRegex: forward the request
to another path, as Traefik 3.7 does (headers X-Forwarded-Prefix / X-Replaced-Path for the
backend). docs/middlewares.md lists the behaviour and the few deliberate differences.

They work on the raw path, which the entrypoint has already normalised
(`meshproxy.http.request.normalize_path`: percent-encoded unreserved characters decoded, upper
hex, dot-segments removed unless `sanitizePath` is false), and keep the query string.

- stripPrefix and stripPrefixRegex match on the *decoded* path, as Traefik does on Go's
  `URL.Path` (so prefix `/foo bar` matches `/foo%20bar/baz`), cut the matched prefix from the
  raw path by its encoded length and keep the rest exactly as received (`/baz`, and `%2F`,
  `%20`... stay encoded). X-Forwarded-Prefix carries the decoded prefix.
- replacePathRegex matches and rewrites the raw (encoded) path, as Traefik does.
- A path that a client's input shaped (the two strips, replacePathRegex) must come out clean:
  no `.`/`..` segment and no `//`, else 400 (Traefik's check since 3.3.6). Without it,
  `/api/../admin` on an entrypoint with sanitizePath=false would be stripped to `/../admin`
  and reach a backend that resolves it to `/admin`, past the router that protects `/admin`.
- Paths from the configuration (addPrefix, replacePath) and replacement results are
  percent-encoded where a request-target may not carry the character raw (a space, `"`,
  non-ASCII...), as Go's `URL.EscapedPath()` does for Traefik, and get a leading `/`.
"""

from __future__ import annotations

import re
from typing import Any

from meshproxy.config.dynamic import (
    AddPrefix,
    ReplacePath,
    ReplacePathRegex,
    StripPrefix,
    StripPrefixRegex,
)
from meshproxy.http.errors import ProxyError
from meshproxy.http.exchange import Exchange
from meshproxy.http.request import is_clean_path
from meshproxy.middlewares.base import BuildContext, Finish, Handler, MiddlewareConfigError
from meshproxy.rules.regex import compile_go_regexp

try:  # the RE2 engine, with capture groups (the rule matchers compile theirs without)
    import re2 as _re2
except ImportError:  # pragma: no cover - only where google-re2 is not installed
    _re2 = None

FORWARDED_PREFIX = b"x-forwarded-prefix"
REPLACED_PATH = b"x-replaced-path"


class BadPath(ProxyError):
    """The rewritten path is not clean, or the prefix cannot be sent in a header: 400."""

    status = 400
    body = b"Bad Request\n"  # Traefik's http.Error text, newline included


class BadReplacement(ProxyError):
    """replacePathRegex produced broken percent-encoding: a configuration fault, 500 as in
    Traefik (`invalid URL escape`)."""

    status = 500
    body = b"Internal Server Error"


# -- path text --------------------------------------------------------------------------

_HEX = "0123456789ABCDEFabcdef"
# What a path may carry unencoded: RFC 3986 §3.3 pchar (unreserved, sub-delims, ":", "@") and
# "/", plus "[" "]" which Go's `validEncoded` also leaves alone; "%" starts a triplet.
_PATH_SAFE = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/[]"
)


def encode_path(path: str) -> str:
    """`path` with every character a path may not carry raw percent-encoded (UTF-8, upper
    hex); valid `%XX` triplets are kept as written. Raises ValueError on a `%` that does not
    start a triplet (Go's `url.PathUnescape` error)."""
    out: list[str] = []
    i = 0
    n = len(path)
    while i < n:
        ch = path[i]
        if ch in _PATH_SAFE:
            out.append(ch)
        elif ch == "%":
            if i + 2 >= n or path[i + 1] not in _HEX or path[i + 2] not in _HEX:
                raise ValueError(f"invalid URL escape {path[i : i + 3]!r}")
            out.append(path[i : i + 3])
            i += 3
            continue
        else:
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogateescape")))
        i += 1
    return "".join(out)


def _absolute(path: str) -> str:
    """A request-target in origin-form starts with "/" (RFC 9112 §3.2.1)."""
    return path if path.startswith("/") else "/" + path


def decode_path(raw_path: str) -> str:
    """The fully decoded path (Go's `URL.Path`): every `%XX` decoded, `%2F` too. Bytes that
    are not UTF-8 become lone surrogates, so the text encodes back to the exact bytes."""
    if "%" not in raw_path:
        return raw_path
    data = bytearray()
    i = 0
    n = len(raw_path)
    while i < n:
        ch = raw_path[i]
        if ch == "%" and i + 2 < n:
            data.append(int(raw_path[i + 1 : i + 3], 16))
            i += 3
        else:
            data += ch.encode("latin-1")
            i += 1
    return data.decode("utf-8", "surrogateescape")


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # the surrogates decode_path uses for such bytes


def decoded_prefix_end(raw_path: str, prefix: bytes) -> int:
    """Where `prefix` (decoded bytes) ends in `raw_path` when the decoded path starts with
    it, else -1. One `%XX` counts as one byte, so the cut falls on the encoded length."""
    i = 0
    n = len(raw_path)
    for byte in prefix:
        if i >= n:
            return -1
        ch = raw_path[i]
        if ch == "%":
            try:
                value = int(raw_path[i + 1 : i + 3], 16)
            except ValueError:
                return -1
            i += 3
        else:
            value = ord(ch)
            i += 1
        if value != byte:
            return -1
    return i


def _clean_decoded(raw_path: str) -> bool:
    """No dot-segment in `raw_path` fully decoded (`%2F` as `/`). A strip that ends inside an
    encoded separator (`/api%2F..%2Fadmin` off `/api`) leaves a rest Traefik 3.7 reads decoded,
    and refuses with 400 when it climbs (`/../admin`): a backend that decodes before resolving
    dot-segments would serve /admin."""
    decoded = decode_path(raw_path)
    return "/." not in decoded or not any(s in (".", "..") for s in decoded.split("/"))


def _header_safe(value: bytes) -> bool:
    """RFC 9110 §5.5: a field value has no CTL other than HTAB (no CR, LF, NUL, DEL)."""
    return not any((b < 0x20 and b != 0x09) or b == 0x7F for b in value)


# -- the strip --------------------------------------------------------------------------


def _strip(
    ex: Exchange, raw: str, end: int, prefix: bytes, finish: Finish, next_handler: Handler
) -> None:
    """Forward `raw[end:]`, telling the backend what was removed (X-Forwarded-Prefix)."""
    rest = raw[end:]
    encoded_start = False
    if not rest.startswith("/"):
        # "/api" off "/api" leaves "" (sent as "/"), off "/apix" leaves "/x". Off "/api%2Fx"
        # the decoded rest "/x" starts at the encoded slash, which becomes that "/".
        encoded_start = rest[:3] in ("%2F", "%2f")
        rest = "/" + (rest[3:] if encoded_start else rest)
    if not is_clean_path(rest) or (encoded_start and not _clean_decoded(rest)):
        finish(ex, BadPath("the stripped path is not clean"))
        return
    if not _header_safe(prefix):
        finish(ex, BadPath("the stripped prefix cannot be sent in X-Forwarded-Prefix"))
        return
    ex.request.set_header(FORWARDED_PREFIX, prefix)
    _forward_to(ex, rest, finish, next_handler)


def _forward_to(ex: Exchange, raw_path: str, finish: Finish, next_handler: Handler) -> None:
    try:
        ex.request.set_raw_path(raw_path)
    except ValueError:
        finish(ex, BadPath("the rewritten path is not valid"))
        return
    next_handler(ex, finish)


def build_strip_prefix(options: StripPrefix, next_handler: Handler, ctx: BuildContext) -> Handler:
    prefixes = [(p, p.encode("utf-8"), p.isascii()) for p in options.prefixes if p]
    if not prefixes:
        raise MiddlewareConfigError("prefixes", "at least one prefix is required")
    for index, (_, data, _) in enumerate(prefixes):
        if not _header_safe(data):
            raise MiddlewareConfigError(
                f"prefixes[{index}]", "a control character cannot go in X-Forwarded-Prefix"
            )

    def strip_prefix(ex: Exchange, finish: Finish) -> None:
        raw = ex.request.raw_path
        plain = "%" not in raw
        for text, data, ascii_only in prefixes:  # the first in list order, no segment boundary
            if plain and ascii_only:  # the decoded path is the raw one
                end = len(text) if raw.startswith(text) else -1
            else:
                end = decoded_prefix_end(raw, data)
            if end >= 0:
                _strip(ex, raw, end, data, finish, next_handler)
                return
        next_handler(ex, finish)

    return strip_prefix


def build_strip_prefix_regex(
    options: StripPrefixRegex, next_handler: Handler, ctx: BuildContext
) -> Handler:
    if not options.regex:
        raise MiddlewareConfigError("regex", "at least one regular expression is required")
    patterns = [_compile(p, f"regex[{i}]") for i, p in enumerate(options.regex)]

    def strip_prefix_regex(ex: Exchange, finish: Finish) -> None:
        raw = ex.request.raw_path
        decoded = decode_path(raw)
        # Go matches a byte that is not UTF-8 as U+FFFD, one character per byte: the same
        # positions as the surrogates that stand for those bytes here.
        subject = _NOT_UTF8.sub("\ufffd", decoded) if "%" in raw else decoded
        for pattern in patterns:
            found = pattern.search(subject)
            if found is None:
                continue
            matched = found.group(0)
            # Traefik strips the leftmost match only when the path starts with its text.
            if matched and subject.startswith(matched):
                data = decoded[: len(matched)].encode("utf-8", "surrogateescape")
                end = decoded_prefix_end(raw, data)
                if end >= 0:
                    _strip(ex, raw, end, data, finish, next_handler)
                    return
        next_handler(ex, finish)

    return strip_prefix_regex


# -- prefix and replacement -------------------------------------------------------------


def _config_path(value: str, where: str) -> str:
    try:
        return _absolute(encode_path(value))
    except ValueError as exc:
        raise MiddlewareConfigError(where, str(exc)) from None


def build_add_prefix(options: AddPrefix, next_handler: Handler, ctx: BuildContext) -> Handler:
    if not options.prefix:
        raise MiddlewareConfigError("prefix", "a prefix is required")
    prefix = _config_path(options.prefix, "prefix")

    def add_prefix(ex: Exchange, finish: Finish) -> None:
        _forward_to(ex, prefix + ex.request.raw_path, finish, next_handler)

    return add_prefix


def build_replace_path(options: ReplacePath, next_handler: Handler, ctx: BuildContext) -> Handler:
    if options.path is None:
        raise MiddlewareConfigError("path", "a path is required")
    path = _config_path(options.path, "path")

    def replace_path(ex: Exchange, finish: Finish) -> None:
        ex.request.set_header(REPLACED_PATH, ex.request.raw_path.encode("latin-1"))
        _forward_to(ex, path, finish, next_handler)

    return replace_path


def build_replace_path_regex(
    options: ReplacePathRegex, next_handler: Handler, ctx: BuildContext
) -> Handler:
    if not options.regex:
        raise MiddlewareConfigError("regex", "a regular expression is required")
    pattern = _compile(options.regex, "regex")
    template = parse_go_template(options.replacement or "")

    def replace_path_regex(ex: Exchange, finish: Finish) -> None:
        raw = ex.request.raw_path
        if pattern.search(raw) is None:
            next_handler(ex, finish)
            return
        ex.request.set_header(REPLACED_PATH, raw.encode("latin-1"))
        try:
            new_path = _absolute(encode_path(go_replace_all(pattern, raw, template)))
        except ValueError:
            finish(ex, BadReplacement("the replacement is not a valid path"))
            return
        if not is_clean_path(new_path):
            finish(ex, BadPath("the replaced path is not clean"))
            return
        _forward_to(ex, new_path, finish, next_handler)

    return replace_path_regex


def _compile(pattern: str, where: str) -> Any:
    """A Go (RE2) regexp with capture groups: Go's acceptance rules and messages from the
    rule engine's `compile_go_regexp`, then RE2 itself (linear time), or Python's `re`."""
    try:
        compile_go_regexp(pattern)
        if _re2 is not None:
            options = _re2.Options()
            options.log_errors = False
            return _re2.compile(pattern, options)
        return re.compile(pattern.replace(r"\z", r"\Z"))
    except Exception as exc:  # GoRegexpError (a ValueError), re2's or re's own error
        raise MiddlewareConfigError(
            where, f"invalid regular expression {pattern!r}: {exc}"
        ) from None


# A parsed Go replacement template: literal text, or a group by number (int) or name (str).
Template = list[tuple[bool, str | int]]


def parse_go_template(template: str) -> Template:
    """Go's `Regexp.Expand` syntax: `$$` is `$`; `$name` / `${name}` name a group, where
    name is the longest run of letters, digits and `_` (so `$1x` is group "1x", which does
    not exist and expands to nothing); a number is an index (no leading zero); any other
    `$` is literal. Returns (is_literal, value) parts."""
    parts: Template = []
    literal: list[str] = []
    i = 0
    n = len(template)
    while i < n:
        ch = template[i]
        if ch != "$":
            literal.append(ch)
            i += 1
            continue
        if template.startswith("$$", i):
            literal.append("$")
            i += 2
            continue
        j = i + 1
        brace = j < n and template[j] == "{"
        if brace:
            j += 1
        k = j
        while k < n and (template[k].isalnum() or template[k] == "_"):
            k += 1
        name = template[j:k]
        if not name or (brace and (k >= n or template[k] != "}")):
            literal.append("$")  # malformed: the "$" is text
            i += 1
            continue
        end = k + 1 if brace else k
        if literal:
            parts.append((True, "".join(literal)))
            literal = []
        numeric = name.isascii() and name.isdigit() and (name == "0" or name[0] != "0")
        parts.append((False, int(name) if numeric else name))
        i = end
    if literal:
        parts.append((True, "".join(literal)))
    return parts


def _group(found: Any, ref: str | int) -> str:
    try:
        value = found.group(ref)
    except (IndexError, KeyError, ValueError):  # no such group: nothing, as in Go
        return ""
    return value or ""


def go_replace_all(pattern: Any, text: str, template: Template) -> str:
    """Go's `Regexp.ReplaceAllString`: every non-overlapping match replaced by the expanded
    template, except an empty match right after a previous match (Go skips those)."""
    out: list[str] = []
    last_end = 0
    for found in pattern.finditer(text):
        start, end = found.start(), found.end()
        out.append(text[last_end:start])
        if end > last_end or start == 0:
            for literal, value in template:
                out.append(str(value) if literal else _group(found, value))
        last_end = end
    out.append(text[last_end:])
    return "".join(out)
