"""Lane propagation along the call chain: where a hop's lane comes from, and the trace-id -> lane table.

Owns the resolution order of the outbound hop (route header, then the trace table, then W3C baggage,
then the baseline) and the bounded LRU+TTL table that remembers a trace's lane between the inbound
request of a service and the outbound calls it makes. The clock is injected; nothing here does I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Callable

from laneproxy.core import headers

_HEX = frozenset(b"0123456789abcdef")


class LaneSource(str, Enum):
    """Where the lane of a request came from; reported in the access log and the `where` answer."""

    ROUTE_HEADER = "route-header"
    TRACE_TABLE = "trace-table"
    BAGGAGE = "baggage"
    OWN_LANE = "own-lane"
    BASELINE = "baseline"


def trace_key(trace_header: bytes, value: bytes) -> bytes | None:
    """The key a trace is remembered by: the header value, or only the trace-id of a traceparent."""
    if trace_header != headers.TRACEPARENT:
        return value or None
    # version "-" trace-id(32 hex) "-" parent-id(16 hex) "-" flags(2 hex)
    parts = value.strip().lower().split(b"-")
    if len(parts) < 4 or len(parts[1]) != 32 or not set(parts[1]) <= _HEX or parts[1] == b"0" * 32:
        return None
    return parts[1]


def lane_from_baggage(value: bytes, key: bytes) -> bytes | None:
    """The value of member `key` in a W3C baggage header (`k1=v1;prop,k2=v2`), if present."""
    for member in value.split(b","):
        name, sep, rest = member.partition(b"=")
        if sep and name.strip().lower() == key:
            lane = rest.split(b";", 1)[0].strip()
            return lane or None
    return None


@dataclass(slots=True)
class TraceTableCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    expirations: int = 0


class TraceLaneTable:
    """Trace key -> lane, least recently used first out, entries expiring `ttl` seconds after their last write.

    Bounded by `capacity`; every get is a hit or a miss and every forced removal an eviction.
    """

    __slots__ = ("capacity", "ttl", "_clock", "_entries", "counters")

    def __init__(self, capacity: int, ttl: float, clock: Callable[[], float]) -> None:
        if capacity < 1 or ttl <= 0:
            raise ValueError("trace table capacity and ttl must be positive")
        self.capacity = capacity
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()
        self.counters = TraceTableCounters()

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, key: bytes, lane: bytes) -> None:
        entries = self._entries
        entries[key] = (lane, self._clock() + self.ttl)
        entries.move_to_end(key)
        if len(entries) > self.capacity:
            entries.popitem(last=False)
            self.counters.evictions += 1

    def lookup(self, key: bytes) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            self.counters.misses += 1
            return None
        lane, expires = entry
        if expires <= self._clock():
            del self._entries[key]
            self.counters.expirations += 1
            self.counters.misses += 1
            return None
        self._entries.move_to_end(key)
        self.counters.hits += 1
        return lane


def resolve_lane(
    route_value: bytes | None,
    trace_value: bytes | None,
    baggage_value: bytes | None,
    *,
    trace_header: bytes | None,
    route_header: bytes,
    traces: TraceLaneTable,
) -> tuple[bytes | None, LaneSource]:
    """The lane of an outbound hop in permissive mode, in order: route header, trace table, baggage.

    A None lane means the baseline. Values are not checked against configured lanes here: an unknown
    lane routes like no lane because the route table has no entry for it.
    """
    if route_value:
        return route_value, LaneSource.ROUTE_HEADER
    if trace_value and trace_header is not None:
        key = trace_key(trace_header, trace_value)
        if key is not None:
            lane = traces.lookup(key)
            if lane is not None:
                return lane, LaneSource.TRACE_TABLE
    if baggage_value:
        lane = lane_from_baggage(baggage_value, route_header)
        if lane is not None:
            return lane, LaneSource.BAGGAGE
    return None, LaneSource.BASELINE
