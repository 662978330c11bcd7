"""Rate-limited error lines for failures that happen per request or per connection.

Traefik logs a failing backend at error level on every request (a TLS verification failure:
`ERR 500 Internal Server Error error="tls: failed to verify certificate..."`; a TCP dial:
`ERR Error while dialing backend`). meshproxy logs the same causes at ERROR, the default level
as in Traefik, so an operator sees why a request failed; but a dead backend under load would
then write a line per request. `LogLimit.allow(cause, target)` lets one line through per
(cause, target) per `interval` seconds and counts the ones it held back, which the next line
reports ("N more like it since"). It costs a clock read and a dict lookup, and only on
failures.
"""

from __future__ import annotations

import time
from collections.abc import Hashable

DEFAULT_INTERVAL = 10.0  # seconds between two lines about the same (cause, target)
MAX_KEYS = 4096  # distinct (cause, target) remembered; beyond it the table starts over


class LogLimit:
    """At most one line per key per `interval` seconds (monotonic clock)."""

    __slots__ = ("interval", "last", "suppressed")

    def __init__(self, interval: float = DEFAULT_INTERVAL) -> None:
        self.interval = interval
        self.last: dict[Hashable, float] = {}
        self.suppressed: dict[Hashable, int] = {}

    def allow(self, cause: str, target: Hashable) -> int | None:
        """None when a line about (cause, target) was let through less than `interval` ago
        (this one is counted as held back); else the number held back since that line (0 for
        the first), and the caller logs."""
        key = (cause, target)
        now = time.monotonic()
        last = self.last.get(key)
        if last is not None and now - last < self.interval:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            return None
        if last is None and len(self.last) >= MAX_KEYS:
            # A flood of distinct targets (every client port...) must not grow this table:
            # forgetting merely lets one more line through per key.
            self.last.clear()
            self.suppressed.clear()
        self.last[key] = now
        return self.suppressed.pop(key, 0)


def held_back(count: int) -> str:
    """The suffix a line gives for the lines held back before it ("" when none)."""
    return f" ({count} more like it since the last line)" if count else ""


# One limit for the whole process: the keys name their cause and target.
LIMIT = LogLimit()
