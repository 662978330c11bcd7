"""stripPrefix, stripPrefixRegex, addPrefix, replacePath, replacePathRegex: forward the request
to another path, as Traefik does (headers X-Forwarded-Prefix / X-Replaced-Path for the backend).

They edit the raw path (percent-encoding kept) and keep the query string.
"""

from __future__ import annotations

import re

from meshproxy.config.dynamic import (
    AddPrefix,
    ReplacePath,
    ReplacePathRegex,
    StripPrefix,
    StripPrefixRegex,
)
from meshproxy.http.errors import ProxyError
from meshproxy.http.exchange import Exchange
from meshproxy.middlewares.base import BuildContext, Finish, Handler, MiddlewareConfigError
from meshproxy.rules.regex import compile_go_regexp

FORWARDED_PREFIX = b"x-forwarded-prefix"
REPLACED_PATH = b"x-replaced-path"


class BadPath(ProxyError):
    status = 400
    body = b"Bad Request"


def _forward_to(ex: Exchange, raw_path: str, finish: Finish, next_handler: Handler) -> None:
    try:
        ex.request.set_raw_path(raw_path)
    except ValueError:
        finish(ex, BadPath("the rewritten path is not valid"))
        return
    next_handler(ex, finish)


def _strip(ex: Exchange, raw: str, prefix: str, finish: Finish, next_handler: Handler) -> None:
    """Forward without `prefix`, telling the backend what was removed (X-Forwarded-Prefix)."""
    ex.request.set_header(FORWARDED_PREFIX, prefix.encode("latin-1"))
    # "/api" stripped from "/api" leaves "" (sent as "/"); from "/apix" leaves "/x".
    rest = raw[len(prefix) :]
    _forward_to(ex, rest if rest.startswith("/") else "/" + rest, finish, next_handler)


def build_strip_prefix(options: StripPrefix, next_handler: Handler, ctx: BuildContext) -> Handler:
    prefixes = [p for p in options.prefixes if p]
    if not prefixes:
        raise MiddlewareConfigError("prefixes", "at least one prefix is required")

    def strip_prefix(ex: Exchange, finish: Finish) -> None:
        raw = ex.request.raw_path
        for prefix in prefixes:  # the first one in list order wins, no segment boundary
            if raw.startswith(prefix):
                _strip(ex, raw, prefix, finish, next_handler)
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
        for pattern in patterns:
            found = pattern.search(raw)
            if found is not None and found.group(0) and raw.startswith(found.group(0)):
                _strip(ex, raw, found.group(0), finish, next_handler)
                return
        next_handler(ex, finish)

    return strip_prefix_regex


def build_add_prefix(options: AddPrefix, next_handler: Handler, ctx: BuildContext) -> Handler:
    prefix = options.prefix or ""
    if not prefix:
        raise MiddlewareConfigError("prefix", "a prefix is required")
    if not prefix.startswith("/"):
        prefix = "/" + prefix

    def add_prefix(ex: Exchange, finish: Finish) -> None:
        _forward_to(ex, prefix + ex.request.raw_path, finish, next_handler)

    return add_prefix


def build_replace_path(options: ReplacePath, next_handler: Handler, ctx: BuildContext) -> Handler:
    if options.path is None:
        raise MiddlewareConfigError("path", "a path is required")
    path = options.path

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
    replacement = _go_replacement(options.replacement or "")

    def replace_path_regex(ex: Exchange, finish: Finish) -> None:
        raw = ex.request.raw_path
        if pattern.search(raw) is None:
            next_handler(ex, finish)
            return
        ex.request.set_header(REPLACED_PATH, raw.encode("latin-1"))
        _forward_to(ex, pattern.sub(replacement, raw), finish, next_handler)

    return replace_path_regex


def _compile(pattern: str, path: str) -> re.Pattern[str]:
    try:
        return compile_go_regexp(pattern)
    except re.error as exc:
        raise MiddlewareConfigError(
            path, f"invalid regular expression {pattern!r}: {exc}"
        ) from None


_GO_GROUP = re.compile(r"\$(\d+|\{\w+\}|\$)")


def _go_replacement(template: str) -> str:
    """Go's `$1`, `${1}`, `${name}` and `$$` in Python's re.sub syntax."""

    def convert(match: re.Match[str]) -> str:
        ref = match.group(1)
        if ref == "$":
            return "$"
        return "\\g<" + ref.strip("{}") + ">"

    return _GO_GROUP.sub(convert, template.replace("\\", "\\\\"))
