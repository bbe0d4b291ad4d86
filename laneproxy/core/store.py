"""The one object shared by the control plane and the data plane: the store of the current RouteTable.

Owns publication. A source builds a complete table and publishes it; readers take `store.current`
once per request and keep that object to the end of the request. No locks: replacing one attribute
reference is atomic, and a published table is never edited. Rejections are counted here so every
source reports them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

from laneproxy.core.errors import ConfigInvalidError, ConfigProblem
from laneproxy.core.model import EMPTY_TABLE, RouteTable

NO_SKIPS: Mapping[str, tuple[ConfigProblem, ...]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class SourceNumber:
    """One number a source reports about itself (`laneproxy.config.<name>`), e.g. an xDS type's last update."""

    name: str  # dotted, e.g. "xds.seconds_since_update"
    value: float
    counter: bool = False  # a count that only grows; else a gauge
    tags: tuple[tuple[str, str], ...] = ()  # e.g. (("type", "Cluster"),): part of the stat name, labels in Prometheus


@dataclass(frozen=True, slots=True)
class SourceHealth:
    """What a source says about how current the served table is, for stats."""

    table_age_seconds: float | None  # how far behind its source the table may be; None before the first table
    stale: bool  # older than the source's threshold
    resources: tuple[tuple[str, str], ...] = ()  # (collection, sync state), e.g. ("Pod in default", "watching")
    numbers: tuple[SourceNumber, ...] = ()


UNKNOWN_HEALTH = SourceHealth(None, False)


class RouteTableStore:
    __slots__ = ("current", "accepted", "rejected", "last_error", "_listeners", "ready", "skipped", "objects_rejected",
                 "health")

    def __init__(self) -> None:
        self.current: RouteTable = EMPTY_TABLE
        self.accepted = 0
        self.rejected = 0
        self.last_error: ConfigInvalidError | None = None
        self.ready = False  # true once a first complete table was published
        # Inputs the current table was built without (a bad object, a bad file), with why; and a counter
        # of every input newly left out (or left out for a new reason), so a dashboard sees each one once.
        self.skipped: Mapping[str, tuple[ConfigProblem, ...]] = NO_SKIPS
        self.objects_rejected = 0
        # The publishing source's view of how current the table is, asked by stats (a source sets it).
        self.health: Callable[[], SourceHealth] = lambda: UNKNOWN_HEALTH
        self._listeners: list[Callable[[RouteTable], None]] = []

    def publish(self, table: RouteTable, skipped: Mapping[str, tuple[ConfigProblem, ...]] = NO_SKIPS) -> None:
        self.objects_rejected += sum(1 for source, problems in skipped.items() if self.skipped.get(source) != problems)
        self.skipped = skipped
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
