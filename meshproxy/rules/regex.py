"""Go (RE2) regular expressions and gorilla/mux templates, translated to Python `re`."""

from __future__ import annotations

import re


def compile_go_regexp(pattern: str, flags: int = 0) -> re.Pattern[str]:
    """Compile an RE2 pattern with Python's `re` (they agree on the syntax Traefik users write)."""
    translated = pattern.replace(r"\z", r"\Z")
    return re.compile(translated, flags)


def template_to_regex(template: str, default_part: str) -> str:
    """Turn a gorilla/mux template (`/{path:api/x}`, `{sub}.example.com`) into a regex body.

    Literal text is escaped; `{name}` becomes `default_part`; `{name:re}` becomes `(?:re)`.
    Braces inside the variable's regex are balanced, as in gorilla/mux.
    """
    out: list[str] = []
    i = 0
    n = len(template)
    while i < n:
        ch = template[i]
        if ch != "{":
            if ch == "}":
                raise ValueError(f"unbalanced '}}' in {template!r}")
            out.append(re.escape(ch))
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
