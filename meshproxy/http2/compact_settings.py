"""h2's per-connection settings store made small for long-lived connections.

Kept out of meshproxy.http2.server, which mypyc compiles: a compiled module cannot define a
subclass of `list`, and this one must be one (h2 calls list and deque methods on it).
"""

from __future__ import annotations

from typing import Any

import h2.settings


class _SettingValues(list):  # type: ignore[type-arg]
    """The values of one h2 setting, current first, then those sent and not yet acknowledged:
    what h2's `Settings` keeps in a `collections.deque`, 760 bytes each however short (a
    64-slot block), 15 of them per connection (~11 KB, the most of an idle HTTP/2
    connection's memory, bench/idle_connections.py --breakdown --kinds h2c). h2 uses only
    `[0]`, `len`, `append` and `popleft` on them: a list with `popleft` is 64 bytes."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


def compact_settings(settings: h2.settings.Settings) -> None:
    """Give `settings` (h2's) short lists instead of its deques; see `_SettingValues`."""
    values: Any = settings._settings  # h2 4.x's private store, pinned by the conversation tests
    for code, items in values.items():
        if type(items) is not _SettingValues:
            values[code] = _SettingValues(items)
