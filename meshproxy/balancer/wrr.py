"""Smooth weighted round robin (nginx's algorithm): weights 5:1:1 give a,a,b,a,c,a,a rather
than bursts, and the order is deterministic so tests and operators can reason about it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class SmoothWeightedRoundRobin(Generic[T]):
    """Picks among children by weight; children marked down are skipped."""

    __slots__ = ("_current", "_down", "_items", "_single", "_total", "_weights")

    def __init__(self, items: Sequence[tuple[T, int]]) -> None:
        kept = [(item, weight) for item, weight in items if weight > 0]
        self._items: list[T] = [item for item, _ in kept]
        self._weights: list[int] = [weight for _, weight in kept]
        self._current: list[int] = [0] * len(kept)
        self._total = sum(self._weights)
        self._down: set[int] = set()
        self._single = self._items[0] if len(self._items) == 1 else None

    @property
    def items(self) -> list[T]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def set_up(self, item: T, up: bool) -> None:
        index = self._items.index(item)
        if up:
            self._down.discard(index)
        else:
            self._down.add(index)

    def is_up(self, item: T) -> bool:
        return self._items.index(item) not in self._down

    def pick(self) -> T | None:
        """Next child, or None when no child is available."""
        if self._single is not None and not self._down:
            return self._single
        best = -1
        best_value = 0
        current = self._current
        weights = self._weights
        total = 0
        down = self._down
        for i in range(len(current)):
            if i in down:
                continue
            current[i] += weights[i]
            total += weights[i]
            if best < 0 or current[i] > best_value:
                best = i
                best_value = current[i]
        if best < 0:
            return None
        current[best] -= total
        return self._items[best]

    def adopt_position(self, previous: SmoothWeightedRoundRobin[T]) -> None:
        """Keep the rotation across a reload when the children did not change."""
        if previous._weights == self._weights:
            self._current = list(previous._current)
            self._down = set(previous._down)
