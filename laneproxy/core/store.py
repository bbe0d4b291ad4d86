"""The one object shared by the control plane and the data plane: the store of the current RouteTable.

Owns publication. A source builds a complete table and publishes it; readers take `store.current`
once per request and keep that object to the end of the request. No locks: replacing one attribute
reference is atomic, and a published table is never edited. Rejections are counted here so every
source reports them the same way.
"""

from __future__ import annotations

from typing import Callable

from laneproxy.core.errors import ConfigInvalidError
from laneproxy.core.model import EMPTY_TABLE, RouteTable


class RouteTableStore:
    __slots__ = ("current", "accepted", "rejected", "last_error", "_listeners", "ready")

    def __init__(self) -> None:
        self.current: RouteTable = EMPTY_TABLE
        self.accepted = 0
        self.rejected = 0
        self.last_error: ConfigInvalidError | None = None
        self.ready = False  # true once a first complete table was published
        self._listeners: list[Callable[[RouteTable], None]] = []

    def publish(self, table: RouteTable) -> None:
        self.current = table
        self.accepted += 1
        self.last_error = None  # the running table is good again
        self.ready = True
        for listener in self._listeners:
            listener(table)

    def reject(self, error: ConfigInvalidError) -> None:
        self.rejected += 1
        self.last_error = error

    def subscribe(self, listener: Callable[[RouteTable], None]) -> None:
        self._listeners.append(listener)
