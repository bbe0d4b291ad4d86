"""Endpoint pickers: which endpoint of a route serves the next request.

Owns load-balancing policy only. Randomness is injected (a callable returning [0, 1)), so tests
are exact; no health state lives here (the data plane filters endpoints before picking).
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


class RandomPicker:
    """Uniform random choice; with an injected source of randomness it is deterministic in tests."""

    __slots__ = ("_random",)

    def __init__(self, random: Callable[[], float]) -> None:
        self._random = random

    def pick(self, endpoints: Sequence[T]) -> T:
        count = len(endpoints)
        if count == 1:
            return endpoints[0]
        return endpoints[int(self._random() * count) % count]


class RoundRobinPicker:
    """Each call takes the next endpoint; the cursor is shared across routes, which spreads load evenly enough."""

    __slots__ = ("_cursor",)

    def __init__(self, start: int = 0) -> None:
        self._cursor = start

    def pick(self, endpoints: Sequence[T]) -> T:
        cursor = self._cursor
        self._cursor = cursor + 1
        return endpoints[cursor % len(endpoints)]
