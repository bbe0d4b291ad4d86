"""Everything one process reports, as StatRecords: live counters joined with the running route table.

Owns which clusters exist (every route of the running table, plus each sidecar's inbound cluster, plus
any cluster that served traffic under an earlier table), their membership gauges, and the `server.*`,
`cluster_manager.*` and `laneproxy.*` process stats. The admin server builds a ProcessView from the
app and reads records from here; it never assembles stat names itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

from laneproxy.observability.stats import StatKind, StatRecord, cluster_records

if TYPE_CHECKING:
    from laneproxy.core.model import Endpoint, Route, RouteTable
    from laneproxy.core.propagation import TraceTableCounters
    from laneproxy.observability.stats import ProxyStats

# Envoy's ServerInfo.State numbers, as its `server.state` gauge reports them.
SERVER_STATE_NUMBERS = {"LIVE": 0, "DRAINING": 1, "PRE_INITIALIZING": 2, "INITIALIZING": 3}


@dataclass(frozen=True, slots=True)
class ProcessView:
    """What the inventory reads from one running process, gathered by the caller at one instant."""

    stats: ProxyStats
    table: RouteTable
    state: str
    uptime_seconds: int
    static_routes: tuple[Route, ...] = ()  # routes not in the table, e.g. a sidecar's inbound app
    trace_counters: TraceTableCounters | None = None
    trace_table_size: int = 0
    config_accepted: int = 0
    config_rejected: int = 0


def cluster_members(table: RouteTable, static_routes: Iterable[Route] = ()) -> dict[str, tuple[Endpoint, ...]]:
    """Every cluster the proxy can send to, by name, with its endpoints (lanes share none)."""
    clusters: dict[str, tuple[Endpoint, ...]] = {}
    for route in static_routes:
        clusters.setdefault(route.cluster, route.endpoints)
    for routes in table.routes.values():
        for route in (routes.default, *routes.by_lane.values()):
            clusters.setdefault(route.cluster, route.endpoints)
    return clusters


def all_records(view: ProcessView) -> Iterator[StatRecord]:
    stats = view.stats
    members = cluster_members(view.table, view.static_routes)
    for name in sorted(set(members) | set(stats.clusters)):
        endpoints = members.get(name, ())
        # Without active health checking every endpoint the table lists counts as healthy, as in Envoy.
        yield from cluster_records(name, stats.clusters.get(name), membership_total=len(endpoints),
                                   membership_healthy=len(endpoints))
    for listener in stats.listeners.values():
        yield from listener.records()
    yield from stats.lanes.records()
    yield from _process_records(view, active_clusters=len(members))


def _process_records(view: ProcessView, *, active_clusters: int) -> Iterator[StatRecord]:
    def gauge(name: str, value: int, family: str) -> StatRecord:
        return StatRecord(name, StatKind.GAUGE, value, True, family)

    def counter(name: str, value: int, family: str, tags: tuple[tuple[str, str], ...] = ()) -> StatRecord:
        return StatRecord(name, StatKind.COUNTER, value, value > 0, family, tags)

    yield gauge("server.live", 1 if view.state == "LIVE" else 0, "envoy_server_live")
    yield gauge("server.state", SERVER_STATE_NUMBERS.get(view.state, 2), "envoy_server_state")
    yield gauge("server.uptime", view.uptime_seconds, "envoy_server_uptime")
    yield gauge("server.concurrency", 1, "envoy_server_concurrency")
    yield gauge("server.total_connections", sum(s.cx_active for s in view.stats.listeners.values()),
                "envoy_server_total_connections")
    yield gauge("cluster_manager.active_clusters", active_clusters, "envoy_cluster_manager_active_clusters")
    traces = view.trace_counters
    if traces is not None:
        yield counter("laneproxy.trace_table.hits", traces.hits, "laneproxy_trace_table_hits")
        yield counter("laneproxy.trace_table.misses", traces.misses, "laneproxy_trace_table_misses")
        yield counter("laneproxy.trace_table.evictions", traces.evictions, "laneproxy_trace_table_evictions")
        yield counter("laneproxy.trace_table.expirations", traces.expirations, "laneproxy_trace_table_expirations")
        yield gauge("laneproxy.trace_table.size", view.trace_table_size, "laneproxy_trace_table_size")
    yield counter("laneproxy.config.update_success", view.config_accepted, "laneproxy_config_update_success")
    yield counter("laneproxy.config.update_rejected", view.config_rejected, "laneproxy_config_update_rejected")
    version = view.table.version
    yield StatRecord("laneproxy.config.version", StatKind.TEXT, version, bool(version), "laneproxy_config_info",
                     (("version", version),))
