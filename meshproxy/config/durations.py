"""Go-style durations ("1m30s", "100ms") or bare numbers of seconds, as Traefik accepts them."""

from __future__ import annotations

import re

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


class Duration(float):
    """Seconds as a float; decoded from a Go duration string or a number of seconds."""

    def __repr__(self) -> str:
        return f"Duration({format_duration(self)!r})"


def parse_duration(value: object) -> Duration:
    """Parse a Go duration string, or an int/float meaning seconds (Traefik's rule)."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, (int, float)):
        return Duration(float(value))
    if not isinstance(value, str):
        raise ValueError(f"invalid duration {value!r}: expected a string or a number")
    text = value.strip()
    if not text:
        raise ValueError("invalid duration '': empty")
    try:
        return Duration(float(int(text)))
    except ValueError:
        pass
    sign = 1.0
    body = text
    if body[0] in "+-":
        sign = -1.0 if body[0] == "-" else 1.0
        body = body[1:]
    if body == "0":
        return Duration(0.0)
    total = 0.0
    pos = 0
    while pos < len(body):
        match = _PART.match(body, pos)
        if match is None:
            raise ValueError(
                f"invalid duration {value!r}: expected e.g. '100ms', '1m30s' or seconds"
            )
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    return Duration(sign * total)


def format_duration(seconds: float) -> str:
    """Render seconds the way Go prints a time.Duration ("10s", "1m0s", "100ms")."""
    if seconds == 0:
        return "0s"
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds < 1:
        ms = seconds * 1000
        if ms >= 1:
            return f"{sign}{_trim(ms)}ms"
        us = seconds * 1e6
        if us >= 1:
            return f"{sign}{_trim(us)}µs"
        return f"{sign}{round(seconds * 1e9)}ns"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    out = ""
    if hours:
        out += f"{int(hours)}h"
    if hours or minutes:
        out += f"{int(minutes)}m"
    return f"{sign}{out}{_trim(secs)}s"


def _trim(number: float) -> str:
    text = f"{number:.9f}".rstrip("0").rstrip(".")
    return text or "0"
