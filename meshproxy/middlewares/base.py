"""What every middleware builder receives and returns."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from meshproxy.http.exchange import Exchange

Handler = Callable[[Exchange], Awaitable[None]]


class MiddlewareConfigError(ValueError):
    """An invalid middleware option; `path` is relative to the middleware object."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


@dataclass
class BuildContext:
    """What a middleware may need besides its options."""

    router: str
    name: str
    metrics: Any
    state: Any  # runtime.state.RuntimeState: per-name state kept across reloads


MiddlewareBuilder = Callable[[Any, Handler, BuildContext], Handler]
