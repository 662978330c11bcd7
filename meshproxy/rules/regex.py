"""Go (RE2) regular expressions for the rule matchers, and gorilla/mux templates (v2 syntax).

Traefik compiles `HostRegexp`, `PathRegexp`, `HeaderRegexp`, `QueryRegexp` and
`HostSNIRegexp` values with Go's `regexp` package: RE2 syntax, unanchored, matched in time
linear in the input. Python's `re` reads several patterns differently (`$` also matches before
a final newline, `\\Z`, `\\u0041`, lookarounds and back-references are accepted, `\\x{41}`,
`\\pL`, `\\Q..\\E` and `[[:alpha:]]` are not) and backtracks, so one pathological pattern
(`(a+)+$`) against a long path would hold the event loop for minutes (ReDoS).

So the patterns are compiled with RE2 itself (the `google-re2` binding): the same syntax as
Go's, accepted and rejected alike (Go rejects one thing C++ RE2 accepts, `\\C`, checked here),
and linear-time matching, which is how a hostile pattern or request is bounded. When the
binding is missing, Python's `re` is the fallback, with a translation of the common
differences and a guard against nested quantifiers (see `_python_fallback`); docs/rules.md
tells when that happens.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

try:  # the RE2 engine: Go's syntax and its linear-time guarantee
    import re2 as _re2
except ImportError:  # pragma: no cover - exercised only where google-re2 is not installed
    _re2 = None

HAVE_RE2 = _re2 is not None

# Longest pattern accepted, in characters. Go has no such limit, but it bounds the RE2
# program's size (and the compile time) for a config an attacker might feed; Traefik users'
# patterns are a few dozen characters.
MAX_PATTERN_LENGTH = 4096

SearchFn = Callable[[str], bool]  # True when the pattern matches somewhere in the value


class GoRegexpError(ValueError):
    """A pattern Go's `regexp.Compile` rejects; the message is RE2's reason."""


def _options() -> Any:
    assert _re2 is not None
    options = _re2.Options()
    options.log_errors = False  # RE2 would print every rejected pattern to stderr
    options.never_capture = True  # rules only ask "does it match": no submatch tracking
    return options


_OPTIONS = _options() if _re2 is not None else None
# The binding's low-level object: `re2.compile(...).search` builds a match object and maps
# byte offsets back to characters on every call (12 us for a short path); `RE2.Match` on the
# encoded value answers in under 2 us.
_RE2 = _re2._re2.RE2 if _re2 is not None else None
_UNANCHORED = _re2._re2.RE2.Anchor.UNANCHORED if _re2 is not None else None


def _utf8(value: str) -> bytes:
    """The bytes Go would match: UTF-8, with surrogate-escaped bytes restored as they came."""
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that was not an escaped byte
        return value.encode("utf-8", "replace")


def _go_only_rejections(pattern: str) -> None:
    """Reject what Go's regexp/syntax refuses although C++ RE2 accepts it."""
    i = 0
    n = len(pattern)
    in_quote = False
    while i < n:
        if in_quote:
            if pattern.startswith(r"\E", i):
                in_quote = False
                i += 2
            else:
                i += 1
            continue
        if pattern[i] == "\\" and i + 1 < n:
            nxt = pattern[i + 1]
            if nxt == "Q":
                in_quote = True
            elif nxt == "C":  # any byte: C++ RE2 only (Go: "invalid escape sequence")
                raise GoRegexpError(r"invalid escape sequence: `\C`")
            i += 2
            continue
        i += 1


def compile_go_regexp(pattern: str) -> SearchFn:
    """Compile an RE2 pattern as Go's `regexp.Compile` would; return its unanchored `search`.

    Raises GoRegexpError with Go's reason when Go would reject the pattern.
    """
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise GoRegexpError(f"pattern longer than {MAX_PATTERN_LENGTH} characters")
    _go_only_rejections(pattern)
    if _RE2 is None:
        return _python_fallback(pattern)
    try:
        compiled = _RE2(pattern.encode("utf-8"), _OPTIONS)
    except UnicodeEncodeError as exc:  # a lone surrogate in the pattern
        raise GoRegexpError(f"error parsing regexp: {exc}") from None
    if not compiled.ok():
        reason = compiled.error()
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise GoRegexpError(f"error parsing regexp: {reason}")
    match = compiled.Match
    unanchored = _UNANCHORED

    def go_search(value: str) -> bool:
        data = _utf8(value)
        return match(unanchored, data, 0, len(data))[0][0] >= 0

    return go_search


# Nested unbounded quantifiers, e.g. `(a+)+`, `(a*)*`, `(?:x|y+)*`: the shape behind
# catastrophic backtracking in Python's `re`. Only used without RE2.
_NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*[+*}](?:[^()\\]|\\.)*\)\s*[+*{]")


def _python_fallback(pattern: str) -> SearchFn:
    """Python `re` stand-in when RE2 is not installed: translated, and ReDoS-shaped patterns
    refused (a documented divergence: Go would accept them)."""
    if _NESTED_QUANTIFIER.search(pattern):
        raise GoRegexpError("nested quantifiers need the RE2 engine (pip install google-re2)")
    translated = pattern.replace(r"\z", r"\Z")
    if re.search(r"(?<!\\)\$", translated):
        translated = re.sub(r"(?<!\\)\$", r"\\Z", translated)
    try:
        search = re.compile(translated).search
    except (re.error, RecursionError, OverflowError) as exc:
        raise GoRegexpError(f"error parsing regexp: {exc}") from None
    return lambda value: search(value) is not None


_META = frozenset("\\.+*?()|[]{}^$")


def quote_meta(text: str) -> str:
    """Go's `regexp.QuoteMeta`: escape exactly the RE2 metacharacters (Python's `re.escape`
    also escapes spaces and `-`, which RE2 reads as invalid escapes)."""
    return "".join("\\" + ch if ch in _META else ch for ch in text)


def template_to_regex(template: str, default_part: str) -> str:
    """Turn a gorilla/mux template (`/{path:api/x}`, `{sub}.example.com`) into a regex body.

    Literal text is escaped; `{name}` becomes `default_part`; `{name:re}` becomes `(?:re)`.
    Braces inside the variable's regex are balanced, as in gorilla/mux. Used for v2 rules.
    Raises ValueError on unbalanced braces or an empty variable.
    """
    out: list[str] = []
    i = 0
    n = len(template)
    while i < n:
        ch = template[i]
        if ch != "{":
            if ch == "}":
                raise ValueError(f"unbalanced '}}' in {template!r}")
            out.append(quote_meta(ch))
            i += 1
            continue
        depth = 1
        j = i + 1
        while j < n and depth:
            if template[j] == "{":
                depth += 1
            elif template[j] == "}":
                depth -= 1
            j += 1
        if depth:
            raise ValueError(f"unbalanced '{{' in {template!r}")
        inner = template[i + 1 : j - 1]
        name, sep, expr = inner.partition(":")
        if not name.strip() and not sep:
            raise ValueError(f"empty variable in {template!r}")
        out.append(f"(?:{expr})" if sep else default_part)
        i = j
    return "".join(out)


_TEMPLATE_VAR = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*(?::[^{}]*(?:\{[^{}]*\}[^{}]*)*)?\}")


def has_template(value: str) -> bool:
    """True when a value contains a gorilla/mux variable such as `{path:api}` or `{id}`."""
    return _TEMPLATE_VAR.search(value) is not None
