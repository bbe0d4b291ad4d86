"""Everything one process reports, as StatRecords: live counters joined with the running route table.

Owns which clusters exist (every route of the running table, plus each sidecar's inbound cluster, plus
any cluster that served traffic under an earlier table), their membership gauges, and the `server.*`,
`cluster_manager.*` and `laneproxy.*` process stats. The admin server builds a ProcessView from the
app and reads records from here; it never assembles stat names itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

from laneproxy.core.store import UNKNOWN_HEALTH, SourceHealth
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
    trace_table_bytes: int = 0
    config_accepted: int = 0
    config_rejected: int = 0
    config_skipped: int = 0  # inputs the current table was built without
    config_objects_rejected: int = 0  # inputs ever left out (each once per reason)
    config_health: SourceHealth = UNKNOWN_HEALTH
    outlier_ejections: int = 0
    outlier_ejections_refused: int = 0  # due, but the endpoint was the last healthy way for its lane's requests
    outlier_failed_hop_responses: int = 0  # 5xx marked x-laneproxy-failed-hop, counted against nobody


def cluster_members(table: RouteTable, static_routes: Iterable[Route] = ()) -> dict[str, tuple[Endpoint, ...]]:
    """Every cluster the proxy can send to, by name, with its endpoints (lanes share none)."""
    clusters: dict[str, tuple[Endpoint, ...]] = {}
    for route in static_routes:
        clusters.setdefault(route.cluster, route.endpoints)
    for routes in (*table.routes.values(), *table.other_ports):
        for route in (routes.default, *routes.by_lane.values()):
            clusters.setdefault(route.cluster, route.endpoints)
    return clusters


class ClusterCatalog:
    """The clusters of one running table (plus the static routes), sorted by name, with their endpoints.

    Built once per published table and reused by every scrape until the next publication: a table is
    immutable, so its cluster list is too. `prefix_free` says no cluster name is a prefix of another,
    which is what lets an exporter emit the stats of one cluster after another and still be in the
    order of a sort by full stat name (`cluster.<name>.<stat>`).
    """

    __slots__ = ("table", "static_routes", "members", "names", "prefix_free")

    def __init__(self, table: RouteTable, static_routes: tuple[Route, ...] = ()) -> None:
        self.table = table
        self.static_routes = static_routes
        self.members = cluster_members(table, static_routes)
        self.names: tuple[str, ...] = tuple(sorted(self.members))
        self.prefix_free = names_are_prefix_free(self.names)

    def serves(self, table: RouteTable, static_routes: tuple[Route, ...]) -> bool:
        return table is self.table and static_routes == self.static_routes


def names_are_prefix_free(names: Iterable[str]) -> bool:
    """Whether no name of a sorted sequence is a prefix of another (adjacent pairs suffice once sorted)."""
    previous = None
    for name in names:
        if previous is not None and name.startswith(previous):
            return False
        previous = name
    return True


class CatalogCache:
    """The catalog of the running table, kept until a new table is published (one per admin server)."""

    __slots__ = ("_catalog", "builds")

    def __init__(self) -> None:
        self._catalog: ClusterCatalog | None = None
        self.builds = 0

    def catalog(self, table: RouteTable, static_routes: tuple[Route, ...] = ()) -> ClusterCatalog:
        catalog = self._catalog
        if catalog is None or not catalog.serves(table, static_routes):
            catalog = self._catalog = ClusterCatalog(table, static_routes)
            self.builds += 1
        return catalog

    def invalidate(self, table: RouteTable | None = None) -> None:
        """Forget the catalog (a store subscriber: called with the table just published)."""
        self._catalog = None


def all_records(view: ProcessView, catalog: ClusterCatalog | None = None) -> Iterator[StatRecord]:
    stats = view.stats
    if catalog is None:
        catalog = ClusterCatalog(view.table, view.static_routes)
    members = catalog.members
    for name in sorted(set(members) | set(stats.clusters)):
        endpoints = members.get(name, ())
        # Without active health checking every endpoint the table lists counts as healthy, as in Envoy.
        yield from cluster_records(name, stats.clusters.get(name), membership_total=len(endpoints),
                                   membership_healthy=len(endpoints))
    yield from other_records(view, active_clusters=len(members))


def other_records(view: ProcessView, *, active_clusters: int) -> Iterator[StatRecord]:
    """Every record that is not a cluster's: listeners, lanes, server and config (few, whatever the table)."""
    stats = view.stats
    for listener in stats.listeners.values():
        yield from listener.records()
    yield from stats.lanes.records()
    yield from _process_records(view, active_clusters=active_clusters)


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
        yield counter("laneproxy.trace_table.rejected_long_ids", traces.rejected_long_ids,
                      "laneproxy_trace_table_rejected_long_ids")
        yield gauge("laneproxy.trace_table.size", view.trace_table_size, "laneproxy_trace_table_size")
        yield gauge("laneproxy.trace_table.bytes", view.trace_table_bytes, "laneproxy_trace_table_bytes")
    yield counter("laneproxy.outlier.ejections", view.outlier_ejections, "laneproxy_outlier_ejections")
    yield counter("laneproxy.outlier.ejections_refused", view.outlier_ejections_refused,
                  "laneproxy_outlier_ejections_refused")
    yield counter("laneproxy.outlier.failed_hop_responses", view.outlier_failed_hop_responses,
                  "laneproxy_outlier_failed_hop_responses")
    yield counter("laneproxy.config.update_success", view.config_accepted, "laneproxy_config_update_success")
    yield counter("laneproxy.config.update_rejected", view.config_rejected, "laneproxy_config_update_rejected")
    yield gauge("laneproxy.config.skipped_objects", view.config_skipped, "laneproxy_config_skipped_objects")
    yield counter("laneproxy.config.object_rejected", view.config_objects_rejected, "laneproxy_config_object_rejected")
    health = view.config_health
    if health.table_age_seconds is not None:
        yield gauge("laneproxy.config.table_age_seconds", int(health.table_age_seconds),
                    "laneproxy_config_table_age_seconds")
    # The red light: the table is older than the source's threshold (not /ready: see README, "Table age").
    yield gauge("laneproxy.config.table_stale", int(health.stale), "laneproxy_config_table_stale")
    for resource, state in health.resources:
        yield StatRecord(f"laneproxy.config.sync.{resource}", StatKind.TEXT, state, True, "laneproxy_config_sync_info",
                         (("resource", resource), ("state", state)))
    version = view.table.version
    yield StatRecord("laneproxy.config.version", StatKind.TEXT, version, bool(version), "laneproxy_config_info",
                     (("version", version),))
