"""Lane propagation along the call chain: where a hop's lane comes from, and the trace-id -> lane table.

Owns the resolution order of the outbound hop (route header, then the trace table, then W3C baggage,
then the baseline), what a valid W3C traceparent is, and the bounded LRU+TTL table that remembers a
trace's lane between the inbound request of a service and the outbound calls it makes. The table is
bounded three ways: entries, bytes, and the length of one trace key. The clock is injected; nothing
here does I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Callable

from mypy_extensions import mypyc_attr

from laneproxy.core import headers

_HEX = frozenset(b"0123456789abcdef")

# Longer trace keys are not remembered: a trace id is an identifier (a UUID is 36 bytes, a W3C trace-id
# 32), and a client must not be able to spend the table's memory on a few huge ones.
MAX_TRACE_KEY_BYTES = 256
# What one entry costs beyond its key and lane bytes on CPython 3.11 (the two bytes objects' headers,
# the (lane, expiry) tuple and float, the ordered dict's slot and link), measured with tracemalloc:
# about 293 bytes for a 36-byte key and a 6-byte lane.
ENTRY_OVERHEAD_BYTES = 250
# 100,000 entries (the default capacity) of UUID keys cost about 29 MiB: the default byte budget lets
# them all in, and binds only when the keys are long.
DEFAULT_MAX_BYTES = 32 * 1024 * 1024


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


def valid_traceparent(value: bytes) -> bool:
    """A W3C traceparent a vendor must accept: lowercase hex fields, no all-zero ids, version not ff.

    Version 00 has exactly four fields; a later version may append fields after the flags.
    """
    parts = value.split(b"-")
    if len(parts) < 4:
        return False
    version, trace_id, parent_id, flags = parts[:4]
    if len(version) != 2 or version == b"ff" or (version == b"00" and len(parts) != 4):
        return False
    if len(trace_id) != 32 or len(parent_id) != 16 or len(flags) != 2:
        return False
    if not set(version + trace_id + parent_id + flags) <= _HEX:
        return False
    return trace_id != b"0" * 32 and parent_id != b"0" * 16


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
    rejected_long_ids: int = 0


def entry_bytes(key: bytes, lane: bytes) -> int:
    """What the byte budget charges for one entry: its key and lane, plus the fixed per-entry overhead."""
    return len(key) + len(lane) + ENTRY_OVERHEAD_BYTES


# Compiled with the hot path; the workers' shared table (laneproxy/workers.py) is an interpreted subclass.
@mypyc_attr(allow_interpreted_subclasses=True)
class TraceLaneTable:
    """Trace key -> lane, least recently used first out, entries expiring `ttl` seconds after their last write.

    Bounded by `capacity` entries and by `max_bytes` (see `entry_bytes`); a key longer than
    `max_key_bytes` is not remembered and is counted. Every get is a hit or a miss and every forced
    removal an eviction. The entry just written is never evicted by its own write, so a table always
    keeps the latest trace even when one entry alone is over the budget.
    A write replaces the lane of a live key (the last writer wins; see README, "Trace ids at the edge").
    """

    __slots__ = ("capacity", "ttl", "max_bytes", "max_key_bytes", "_clock", "_entries", "_bytes", "counters")

    def __init__(self, capacity: int, ttl: float, clock: Callable[[], float], *, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_key_bytes: int = MAX_TRACE_KEY_BYTES) -> None:
        if capacity < 1 or ttl <= 0 or max_bytes < 1 or max_key_bytes < 1:
            raise ValueError("trace table capacity, ttl, byte budget and key length must be positive")
        self.capacity = capacity
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.max_key_bytes = max_key_bytes
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0
        self.counters = TraceTableCounters()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        """What the entries held now cost, as the byte budget counts it."""
        return self._bytes

    def remember(self, key: bytes, lane: bytes) -> bool:
        """Remember `key`'s lane; False (and counted) when the key is too long to be remembered."""
        if len(key) > self.max_key_bytes:
            self.counters.rejected_long_ids += 1
            return False
        entries = self._entries
        previous = entries.get(key)
        if previous is not None:
            self._bytes -= entry_bytes(key, previous[0])
        entries[key] = (lane, self._clock() + self.ttl)
        entries.move_to_end(key)
        self._bytes += entry_bytes(key, lane)
        while len(entries) > 1 and (len(entries) > self.capacity or self._bytes > self.max_bytes):
            old_key, (old_lane, _) = entries.popitem(last=False)
            self._bytes -= entry_bytes(old_key, old_lane)
            self.counters.evictions += 1
        return True

    def lookup(self, key: bytes) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            self.counters.misses += 1
            return None
        lane, expires = entry
        if expires <= self._clock():
            del self._entries[key]
            self._bytes -= entry_bytes(key, lane)
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
    key = trace_key(trace_header, trace_value) if trace_value and trace_header is not None else None
    return lane_in_order(route_value, key, baggage_value, route_header, traces)


def lane_in_order(route_value: bytes | None, key: bytes | None, baggage_value: bytes | None, route_header: bytes,
                  traces: TraceLaneTable | None) -> tuple[bytes | None, LaneSource]:
    """The permissive order once the trace key is known: route header, trace table, baggage; else the baseline."""
    if route_value:
        return route_value, LaneSource.ROUTE_HEADER
    if key is not None and traces is not None:
        lane = traces.lookup(key)
        if lane is not None:
            return lane, LaneSource.TRACE_TABLE
    if baggage_value:
        lane = lane_from_baggage(baggage_value, route_header)
        if lane is not None:
            return lane, LaneSource.BAGGAGE
    return None, LaneSource.BASELINE
