"""What every middleware builder receives and returns.

A builder turns one middleware's options into a `Handler` wrapping the next one. It runs once
per router that uses the middleware (each router gets its own instance, as in Traefik) and once
per config snapshot; state that must outlive a reload (token buckets, breaker windows) is asked
for through `BuildContext.keep`, which hands back the previous object when the middleware's
definition did not change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from meshproxy.http.exchange import Finish, Handler

__all__ = ["BuildContext", "Finish", "Handler", "MiddlewareBuilder", "MiddlewareConfigError"]

T = TypeVar("T")


class MiddlewareConfigError(ValueError):
    """An invalid middleware option; `path` is relative to the middleware object."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


@dataclass
class MiddlewareState:
    """State objects of all middleware instances, keyed by (router, middleware)."""

    objects: dict[tuple[str, str], tuple[bytes, Any]] = field(default_factory=dict)


@dataclass
class BuildContext:
    """What a middleware may need besides its options."""

    router: str
    name: str
    metrics: Any
    fingerprint: bytes  # the middleware's definition, serialized
    previous: MiddlewareState  # from the snapshot being replaced
    current: MiddlewareState  # filled while compiling the new one

    def keep(self, factory: Callable[[], T]) -> T:
        """This instance's state: the previous object if the definition is unchanged, else new.
        A previous object replaced is retired first (see `retire`), so a node-wide one frees
        its shared slot before its successor takes one."""
        key = (self.router, self.name)
        old = self.previous.objects.get(key)
        if old is not None and old[0] == self.fingerprint:
            obj = old[1]
        else:
            if old is not None:
                retire(old[1])
            obj = factory()
        self.current.objects[key] = (self.fingerprint, obj)
        return obj


def retire(obj: Any) -> None:
    """Tell a state object the config no longer uses it, if it wants to know (a `retire()`
    method: node-wide breakers and retry budgets free their entry in the node's shared
    memory). Retiring twice is harmless."""
    method = getattr(obj, "retire", None)
    if method is not None:
        method()


def retire_dropped(previous: MiddlewareState, current: MiddlewareState) -> None:
    """Retire the objects of `previous` that `current` (the snapshot replacing it) no longer
    holds: their router or middleware is gone, or their definition changed."""
    kept = {id(entry[1]) for entry in current.objects.values()}
    for _, obj in previous.objects.values():
        if id(obj) not in kept:
            retire(obj)


MiddlewareBuilder = Callable[[Any, Handler, BuildContext], Handler]
