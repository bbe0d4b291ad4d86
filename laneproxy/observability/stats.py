"""The proxy's counters, kept as plain integers on slotted objects so the hot path pays an attribute add.

Owns what is counted and the Envoy name and tags each number is reported under
(`cluster.<name>.upstream_rq_total` with tag `envoy.cluster_name`, `http.<prefix>.downstream_rq_2xx`
with `envoy.response_code_class`, ...): `*.records()` turn the numbers into StatRecords, which every
exporter (admin /stats text and JSON, /stats/prometheus, /clusters) reads, so they cannot disagree.
Nothing in here formats output for a particular endpoint, and nothing here is global: one
ProxyStats per process, created by the app.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from laneproxy.core.model import Endpoint

# Envoy's default histogram bucket bounds (milliseconds), as its /stats/prometheus reports them.
HISTOGRAM_BOUNDS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000,
)
# The quantiles Envoy's text and JSON /stats print for every histogram.
QUANTILES: tuple[float, ...] = (0, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 100)


class StatKind(str, Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"
    TEXT = "text"  # Envoy's text readout


@dataclass(frozen=True, slots=True)
class StatRecord:
    """One reported number: its Envoy name, kind, value, and the Prometheus family and tags it maps to.

    `used` follows Envoy's `usedonly`: a counter that was ever incremented, a gauge that was ever set.
    `family` is the name after Envoy's tag extraction with the `envoy_` prefix
    (`cluster.X.upstream_rq_200` -> `envoy_cluster_upstream_rq` with envoy_response_code=200 and
    envoy_cluster_name=X); laneproxy's own stats use a `laneproxy_` family.
    """

    name: str
    kind: StatKind
    value: int | float | str | Histogram
    used: bool
    family: str
    tags: tuple[tuple[str, str], ...] = ()


class Histogram:
    """Values in fixed buckets (Envoy's default bounds in milliseconds unless given): counts, a sum and a count."""

    __slots__ = ("counts", "sum", "count", "low", "high", "bounds")

    def __init__(self, bounds: tuple[float, ...] = HISTOGRAM_BOUNDS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0
        self.low = float("inf")  # the smallest and largest values seen bound the quantile estimates
        self.high = 0.0

    def record(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1
        if value < self.low:
            self.low = value
        if value > self.high:
            self.high = value

    def cumulative(self) -> list[int]:
        """Counts of values <= each bound, then the total (the +Inf bucket)."""
        running, out = 0, []
        for count in self.counts:
            running += count
            out.append(running)
        return out

    def quantile(self, percent: float) -> float | None:
        """An estimate from the buckets (linear inside a bucket, within the values seen); None when empty."""
        if self.count == 0:
            return None
        bounds = self.bounds
        rank = self.count * percent / 100.0
        running = 0
        for index, count in enumerate(self.counts):
            if count and running + count >= rank:
                low = max(bounds[index - 1] if index > 0 else 0.0, self.low)
                high = min(bounds[index] if index < len(bounds) else self.high, self.high)
                return low + (high - low) * max(0.0, rank - running) / count
            running += count
        return self.high


def _class_counts(by_code: Counter[int]) -> dict[int, int]:
    classes: dict[int, int] = {}
    for code, count in by_code.items():
        if code:
            classes[code // 100] = classes.get(code // 100, 0) + count
    return classes


class HostStats:
    """Counters of one endpoint inside one cluster, as Envoy's /clusters reports them per host."""

    __slots__ = ("address", "rq_total", "rq_success", "rq_error", "rq_timeout", "rq_active", "cx_connect_fail")

    def __init__(self, address: str) -> None:
        self.address = address
        self.rq_total = self.rq_success = self.rq_error = self.rq_timeout = self.rq_active = self.cx_connect_fail = 0

    def reset_counters(self) -> None:
        self.rq_total = self.rq_success = self.rq_error = self.rq_timeout = self.cx_connect_fail = 0


class ClusterStats:
    """Counters of one upstream cluster (`outbound|<port>|<lane>|<host>` or `inbound|<port>||`)."""

    __slots__ = ("name", "rq_total", "rq_by_code", "rq_active", "cx_total", "cx_active", "cx_connect_fail",
                 "cx_none_healthy", "rq_timeout", "rq_reset", "rq_time_ms_sum", "rq_time_count", "rq_time", "hosts",
                 "rq_retry", "rq_overflow")

    def __init__(self, name: str) -> None:
        self.name = name
        self.rq_total = self.rq_active = self.cx_total = self.cx_active = 0
        self.cx_connect_fail = self.cx_none_healthy = self.rq_timeout = self.rq_reset = 0
        self.rq_retry = self.rq_overflow = 0  # upstream_rq_retry; upstream_rq_pending_overflow (circuit breakers)
        self.rq_time_ms_sum = 0.0
        self.rq_time_count = 0
        self.rq_by_code: Counter[int] = Counter()
        self.rq_time = Histogram()  # upstream_rq_time: requests an upstream answered
        self.hosts: dict[Endpoint, HostStats] = {}

    def host(self, endpoint: Endpoint) -> HostStats:
        stats = self.hosts.get(endpoint)
        if stats is None:
            stats = self.hosts[endpoint] = HostStats(endpoint.address)
        return stats

    def reset_counters(self) -> None:
        self.rq_total = self.cx_total = self.cx_connect_fail = self.cx_none_healthy = 0
        self.rq_timeout = self.rq_reset = self.rq_retry = self.rq_overflow = 0
        self.rq_by_code.clear()
        for host in self.hosts.values():
            host.reset_counters()

    def records(self, *, membership_total: int, membership_healthy: int) -> Iterator[StatRecord]:
        """Every stat of this cluster; membership comes from the running table, not from traffic."""
        yield from cluster_records(self.name, self, membership_total=membership_total,
                                   membership_healthy=membership_healthy)


@dataclass(frozen=True, slots=True)
class TransportNumbers:
    """What a cluster's endpoints' connection pools and the outlier detector say, gathered at scrape time."""

    cx_active: int = 0
    rq_pending_active: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    destroy_local: int = 0
    destroy_remote: int = 0
    ejections_active: int = 0
    ejections_enforced: int = 0


NO_TRANSPORT = TransportNumbers()


def cluster_records(name: str, stats: ClusterStats | None, *, membership_total: int,
                    membership_healthy: int, transport: TransportNumbers = NO_TRANSPORT) -> Iterator[StatRecord]:
    """The stats of cluster `name`; `stats` None means the cluster is configured but saw no traffic."""
    prefix = f"cluster.{name}."
    cluster_tag = (("envoy_cluster_name", name),)

    def counter(stat: str, value: int) -> StatRecord:
        return StatRecord(prefix + stat, StatKind.COUNTER, value, value > 0, "envoy_cluster_" + stat.replace(".", "_"),
                          cluster_tag)

    def gauge(stat: str, value: int, used: bool) -> StatRecord:
        return StatRecord(prefix + stat, StatKind.GAUGE, value, used, "envoy_cluster_" + stat.replace(".", "_"),
                          cluster_tag)

    yield gauge("membership_total", membership_total, True)
    yield gauge("membership_healthy", membership_healthy, True)
    # Connection-level stats dashboards expect, from the endpoints' pools. Envoy sets these gauges when the
    # cluster first opens a connection: one that only ever answered "no healthy upstream" has not.
    connected = (stats is not None and stats.cx_total > 0) or transport.cx_active > 0
    yield gauge("upstream_cx_active", transport.cx_active, connected)
    yield gauge("upstream_rq_pending_active", transport.rq_pending_active, connected)
    yield counter("upstream_cx_rx_bytes_total", transport.rx_bytes)
    yield counter("upstream_cx_tx_bytes_total", transport.tx_bytes)
    yield counter("upstream_cx_destroy", transport.destroy_local + transport.destroy_remote)
    yield counter("upstream_cx_destroy_local", transport.destroy_local)
    yield counter("upstream_cx_destroy_remote", transport.destroy_remote)
    # Envoy sets this gauge at the first ejection, not before (usedonly hides it until then).
    yield gauge("outlier_detection.ejections_active", transport.ejections_active,
                transport.ejections_enforced > 0 or transport.ejections_active > 0)
    yield counter("outlier_detection.ejections_enforced_total", transport.ejections_enforced)
    yield counter("outlier_detection.ejections_enforced_consecutive_5xx", transport.ejections_enforced)
    if stats is None:
        for stat in ("upstream_rq_total", "upstream_rq_completed", "upstream_cx_total", "upstream_cx_connect_fail",
                     "upstream_cx_none_healthy", "upstream_rq_timeout", "upstream_rq_rx_reset", "upstream_rq_retry",
                     "upstream_rq_pending_overflow"):
            yield counter(stat, 0)
        yield gauge("upstream_rq_active", 0, False)
        yield StatRecord(prefix + "upstream_rq_time", StatKind.HISTOGRAM, Histogram(), False,
                         "envoy_cluster_upstream_rq_time", cluster_tag)
        return
    by_code = stats.rq_by_code
    yield counter("upstream_rq_total", stats.rq_total)
    yield counter("upstream_rq_completed", sum(count for code, count in by_code.items() if code))
    for code, count in sorted(by_code.items()):
        if code:
            yield StatRecord(f"{prefix}upstream_rq_{code}", StatKind.COUNTER, count, True, "envoy_cluster_upstream_rq",
                             (("envoy_response_code", str(code)), *cluster_tag))
    for klass, count in sorted(_class_counts(by_code).items()):
        yield StatRecord(f"{prefix}upstream_rq_{klass}xx", StatKind.COUNTER, count, True,
                         "envoy_cluster_upstream_rq_xx", (("envoy_response_code_class", str(klass)), *cluster_tag))
    yield counter("upstream_cx_total", stats.cx_total)
    yield counter("upstream_cx_connect_fail", stats.cx_connect_fail)
    yield counter("upstream_cx_none_healthy", stats.cx_none_healthy)
    yield counter("upstream_rq_timeout", stats.rq_timeout)
    yield counter("upstream_rq_rx_reset", stats.rq_reset)
    yield counter("upstream_rq_retry", stats.rq_retry)
    yield counter("upstream_rq_pending_overflow", stats.rq_overflow)
    # Envoy sets this gauge when a request is bound to an upstream connection; a cluster that only ever
    # answered "no healthy upstream" has not.
    yield gauge("upstream_rq_active", stats.rq_active, stats.rq_total > 0 or stats.rq_active > 0)
    yield StatRecord(prefix + "upstream_rq_time", StatKind.HISTOGRAM, stats.rq_time, stats.rq_time.count > 0,
                     "envoy_cluster_upstream_rq_time", cluster_tag)


class Http2Stats:
    """Envoy's `http2.*` codec counters of one listener's HTTP/2 clients: resets, GOAWAYs, floods, bombs."""

    __slots__ = ("rx_reset", "tx_reset", "goaway_sent", "header_overflow", "too_many_streams", "rx_messaging_error",
                 "premature_reset", "outbound_control_flood")

    def __init__(self) -> None:
        self.rx_reset = self.tx_reset = self.goaway_sent = self.header_overflow = self.too_many_streams = 0
        self.rx_messaging_error = self.premature_reset = self.outbound_control_flood = 0

    def reset_counters(self) -> None:
        self.rx_reset = self.tx_reset = self.goaway_sent = self.header_overflow = self.too_many_streams = 0
        self.rx_messaging_error = self.premature_reset = self.outbound_control_flood = 0

    def counters(self) -> tuple[tuple[str, int], ...]:
        """(Envoy's stat name after `http2.`, value) of every counter, in a fixed order.

        Spelled out rather than read from `__slots__`: a compiled class has no such attribute to walk."""
        return (("rx_reset", self.rx_reset), ("tx_reset", self.tx_reset), ("goaway_sent", self.goaway_sent),
                ("header_overflow", self.header_overflow), ("too_many_streams", self.too_many_streams),
                ("rx_messaging_error", self.rx_messaging_error), ("premature_reset", self.premature_reset),
                ("outbound_control_flood", self.outbound_control_flood))


class ListenerStats:
    """Downstream counters of one listener, reported as `http.<prefix>.*` (the HTTP connection manager's)."""

    __slots__ = ("prefix", "rq_total", "rq_by_class", "cx_total", "cx_active", "rq_active", "cx_protocol_error",
                 "no_route", "rq_time", "rq_http2", "cx_http2", "cx_http2_active", "http2", "upgrades_total",
                 "upgrades_active")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.rq_total = self.cx_total = self.cx_active = self.rq_active = self.cx_protocol_error = 0
        self.no_route = self.rq_http2 = self.cx_http2 = self.cx_http2_active = 0
        self.upgrades_total = self.upgrades_active = 0  # WebSocket and CONNECT tunnels (downstream_cx_upgrades_*)
        self.rq_by_class: Counter[int] = Counter()
        self.rq_time = Histogram()  # downstream_rq_time: first request byte to last response byte
        self.http2 = Http2Stats()

    def reset_counters(self) -> None:
        self.rq_total = self.cx_total = self.cx_protocol_error = self.no_route = self.rq_http2 = self.cx_http2 = 0
        self.upgrades_total = 0
        self.rq_by_class.clear()
        self.http2.reset_counters()

    def records(self) -> Iterator[StatRecord]:
        prefix = f"http.{self.prefix}."
        tag = (("envoy_http_conn_manager_prefix", self.prefix),)
        used = self.cx_total > 0

        def counter(stat: str, value: int) -> StatRecord:
            return StatRecord(prefix + stat, StatKind.COUNTER, value, value > 0, "envoy_http_" + stat, tag)

        yield counter("downstream_rq_total", self.rq_total)
        yield counter("downstream_rq_completed", self.rq_total)
        yield counter("downstream_rq_http1_total", self.rq_total - self.rq_http2)
        yield counter("downstream_rq_http2_total", self.rq_http2)
        for klass in range(1, 6):
            count = self.rq_by_class[klass]
            yield StatRecord(f"{prefix}downstream_rq_{klass}xx", StatKind.COUNTER, count, count > 0,
                             "envoy_http_downstream_rq_xx", (("envoy_response_code_class", str(klass)), *tag))
        yield counter("downstream_cx_total", self.cx_total)
        yield counter("downstream_cx_http1_total", self.cx_total - self.cx_http2)
        yield counter("downstream_cx_http2_total", self.cx_http2)
        for name, value in self.http2.counters():
            yield StatRecord(f"{prefix}http2.{name}", StatKind.COUNTER, value, value > 0, f"envoy_http_http2_{name}", tag)
        yield counter("downstream_cx_protocol_error", self.cx_protocol_error)
        yield counter("downstream_cx_upgrades_total", self.upgrades_total)
        yield counter("no_route", self.no_route)
        yield counter("rq_total", self.rq_total)  # the router's count: every request reaches routing here
        yield StatRecord(prefix + "downstream_cx_active", StatKind.GAUGE, self.cx_active, used,
                         "envoy_http_downstream_cx_active", tag)
        yield StatRecord(prefix + "downstream_cx_http1_active", StatKind.GAUGE, self.cx_active - self.cx_http2_active,
                         used, "envoy_http_downstream_cx_http1_active", tag)
        yield StatRecord(prefix + "downstream_cx_http2_active", StatKind.GAUGE, self.cx_http2_active,
                         self.cx_http2 > 0, "envoy_http_downstream_cx_http2_active", tag)
        yield StatRecord(prefix + "downstream_rq_active", StatKind.GAUGE, self.rq_active, used,
                         "envoy_http_downstream_rq_active", tag)
        # Envoy first sets this gauge at the first upgrade: usedonly hides it until then.
        yield StatRecord(prefix + "downstream_cx_upgrades_active", StatKind.GAUGE, self.upgrades_active,
                         self.upgrades_total > 0 or self.upgrades_active > 0,
                         "envoy_http_downstream_cx_upgrades_active", tag)
        yield StatRecord(prefix + "downstream_rq_time", StatKind.HISTOGRAM, self.rq_time, self.rq_time.count > 0,
                         "envoy_http_downstream_rq_time", tag)


class TcpStats:
    """Counters of connections passed through as TCP, reported as Envoy's TCP proxy reports them (`tcp.<prefix>.*`)."""

    __slots__ = ("prefix", "cx_total", "cx_active", "rx_bytes", "tx_bytes", "idle_timeout")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.cx_total = self.cx_active = self.rx_bytes = self.tx_bytes = self.idle_timeout = 0

    def reset_counters(self) -> None:
        self.cx_total = self.rx_bytes = self.tx_bytes = self.idle_timeout = 0

    def records(self) -> Iterator[StatRecord]:
        prefix = f"tcp.{self.prefix}."
        tag = (("envoy_tcp_prefix", self.prefix),)
        for stat, value in (("downstream_cx_total", self.cx_total), ("downstream_cx_rx_bytes_total", self.rx_bytes),
                            ("downstream_cx_tx_bytes_total", self.tx_bytes), ("idle_timeout", self.idle_timeout)):
            yield StatRecord(prefix + stat, StatKind.COUNTER, value, value > 0, "envoy_tcp_" + stat, tag)
        # Not one of Envoy's TCP proxy stats (it has none for open connections); laneproxy's own gauge.
        yield StatRecord(prefix + "downstream_cx_active", StatKind.GAUGE, self.cx_active, self.cx_total > 0,
                         "laneproxy_tcp_downstream_cx_active", tag)


class LaneStats:
    """laneproxy's own lane counters: requests per lane used, fallbacks per (service, from lane, to lane).

    A spill (a share of a partly healthy lane sent down its fallback chain) counts as a fallback and,
    in `spills`, once more as a spill, so the share of fallbacks caused by partial health is visible.
    """

    __slots__ = ("requests", "fallbacks", "spills", "lane_sources")

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.fallbacks: Counter[tuple[str, str, str]] = Counter()
        self.spills: Counter[tuple[str, str, str]] = Counter()
        self.lane_sources: Counter[str] = Counter()

    def reset_counters(self) -> None:
        self.requests.clear()
        self.fallbacks.clear()
        self.spills.clear()
        self.lane_sources.clear()

    def records(self) -> Iterator[StatRecord]:
        for lane, count in sorted(self.requests.items()):
            yield StatRecord(f"laneproxy.lane.{lane}.rq_total", StatKind.COUNTER, count, count > 0,
                             "laneproxy_lane_rq_total", (("lane", lane),))
        for (service, from_lane, to_lane), count in sorted(self.fallbacks.items()):
            yield StatRecord(f"laneproxy.fallback.{service}.{from_lane}.{to_lane}", StatKind.COUNTER, count, count > 0,
                             "laneproxy_fallback_rq_total",
                             (("service", service), ("from_lane", from_lane), ("to_lane", to_lane)))
        for (service, from_lane, to_lane), count in sorted(self.spills.items()):
            yield StatRecord(f"laneproxy.spill.{service}.{from_lane}.{to_lane}", StatKind.COUNTER, count, count > 0,
                             "laneproxy_spill_rq_total",
                             (("service", service), ("from_lane", from_lane), ("to_lane", to_lane)))
        for source, count in sorted(self.lane_sources.items()):
            yield StatRecord(f"laneproxy.lane_source.{source}", StatKind.COUNTER, count, count > 0,
                             "laneproxy_lane_source_rq_total", (("source", source),))


class ProxyStats:
    """Every counter of one proxy process."""

    __slots__ = ("clusters", "listeners", "lanes", "tcp_proxies")

    def __init__(self) -> None:
        self.clusters: dict[str, ClusterStats] = {}
        self.listeners: dict[str, ListenerStats] = {}
        self.lanes = LaneStats()
        self.tcp_proxies: dict[str, TcpStats] = {}

    def tcp(self, prefix: str) -> TcpStats:
        stats = self.tcp_proxies.get(prefix)
        if stats is None:
            stats = self.tcp_proxies[prefix] = TcpStats(prefix)
        return stats

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

    def reset_counters(self) -> None:
        """Envoy's /reset_counters: counters to zero; gauges and histograms keep their values."""
        for cluster in self.clusters.values():
            cluster.reset_counters()
        for listener in self.listeners.values():
            listener.reset_counters()
        for tcp in self.tcp_proxies.values():
            tcp.reset_counters()
        self.lanes.reset_counters()
