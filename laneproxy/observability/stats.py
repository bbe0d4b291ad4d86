"""The proxy's counters, kept as plain integers on slotted objects so the hot path pays an attribute add.

Owns what is counted and the Envoy names it is reported under (`cluster.<name>.upstream_rq_total`,
`http.<prefix>.downstream_rq_total`, ...). Exporters (admin /stats, Prometheus) read from here;
nothing in here formats output for a particular endpoint. One instance per process, never global.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterator


class ClusterStats:
    """Counters of one upstream cluster (`outbound|<port>|<lane>|<host>` or `inbound|<port>||`)."""

    __slots__ = ("name", "rq_total", "rq_by_code", "rq_active", "cx_total", "cx_active", "cx_connect_fail",
                 "rq_timeout", "rq_reset", "rq_time_ms_sum", "rq_time_count")

    def __init__(self, name: str) -> None:
        self.name = name
        self.rq_total = self.rq_active = self.cx_total = self.cx_active = 0
        self.cx_connect_fail = self.rq_timeout = self.rq_reset = 0
        self.rq_time_ms_sum = 0.0
        self.rq_time_count = 0
        self.rq_by_code: Counter[int] = Counter()

    def counters(self) -> Iterator[tuple[str, int]]:
        prefix = f"cluster.{self.name}."
        yield prefix + "upstream_rq_total", self.rq_total
        classes: Counter[int] = Counter()
        for code, count in sorted(self.rq_by_code.items()):
            yield prefix + f"upstream_rq_{code}", count
            classes[code // 100] += count
        for klass in sorted(classes):
            yield prefix + f"upstream_rq_{klass}xx", classes[klass]
        yield prefix + "upstream_cx_total", self.cx_total
        yield prefix + "upstream_cx_connect_fail", self.cx_connect_fail
        yield prefix + "upstream_rq_timeout", self.rq_timeout
        yield prefix + "upstream_rq_rx_reset", self.rq_reset

    def gauges(self) -> Iterator[tuple[str, int]]:
        prefix = f"cluster.{self.name}."
        yield prefix + "upstream_rq_active", self.rq_active
        yield prefix + "upstream_cx_active", self.cx_active


class ListenerStats:
    """Downstream counters of one listener, reported as `http.<prefix>.*`."""

    __slots__ = ("prefix", "rq_total", "rq_by_class", "cx_total", "cx_active", "rq_active", "cx_protocol_error")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.rq_total = self.cx_total = self.cx_active = self.rq_active = self.cx_protocol_error = 0
        self.rq_by_class: Counter[int] = Counter()

    def counters(self) -> Iterator[tuple[str, int]]:
        prefix = f"http.{self.prefix}."
        yield prefix + "downstream_rq_total", self.rq_total
        for klass in range(1, 6):
            yield prefix + f"downstream_rq_{klass}xx", self.rq_by_class[klass]
        yield prefix + "downstream_cx_total", self.cx_total
        yield prefix + "downstream_cx_protocol_error", self.cx_protocol_error

    def gauges(self) -> Iterator[tuple[str, int]]:
        prefix = f"http.{self.prefix}."
        yield prefix + "downstream_cx_active", self.cx_active
        yield prefix + "downstream_rq_active", self.rq_active


class LaneStats:
    """laneproxy's own lane counters: requests per lane used, fallbacks per (service, from lane, to lane)."""

    __slots__ = ("requests", "fallbacks", "lane_sources")

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.fallbacks: Counter[tuple[str, str, str]] = Counter()
        self.lane_sources: Counter[str] = Counter()

    def counters(self) -> Iterator[tuple[str, int]]:
        for lane, count in sorted(self.requests.items()):
            yield f"laneproxy.lane.{lane}.rq_total", count
        for (service, from_lane, to_lane), count in sorted(self.fallbacks.items()):
            yield f"laneproxy.fallback.{service}.{from_lane}.{to_lane}", count
        for source, count in sorted(self.lane_sources.items()):
            yield f"laneproxy.lane_source.{source}", count


class ProxyStats:
    """Every counter of one proxy process."""

    __slots__ = ("clusters", "listeners", "lanes")

    def __init__(self) -> None:
        self.clusters: dict[str, ClusterStats] = {}
        self.listeners: dict[str, ListenerStats] = {}
        self.lanes = LaneStats()

    def cluster(self, name: str) -> ClusterStats:
        stats = self.clusters.get(name)
        if stats is None:
            stats = self.clusters[name] = ClusterStats(name)
        return stats

    def listener(self, prefix: str) -> ListenerStats:
        stats = self.listeners.get(prefix)
        if stats is None:
            stats = self.listeners[prefix] = ListenerStats(prefix)
        return stats
