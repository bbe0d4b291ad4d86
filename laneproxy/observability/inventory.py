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
from laneproxy.observability.stats import NO_TRANSPORT, StatKind, StatRecord, TransportNumbers, cluster_records

if TYPE_CHECKING:
    from laneproxy.core.model import Endpoint, Route, RouteTable
    from laneproxy.core.propagation import TraceTableCounters
    from laneproxy.observability.istio import IstioMetrics
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
    istio: IstioMetrics | None = None
    pools: object | None = None  # the data plane's UpstreamPools (find(host, port) -> pool or None)
    outliers: object | None = None  # the OutlierDetector (ejected, ejections_by_endpoint)
    listener_addresses: tuple[tuple[str, str], ...] = ()  # (listener name, Envoy's address tag `0.0.0.0_8080`)
    memory: tuple[int, int] | None = None  # (allocated, heap size) bytes, read at scrape time
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


def transport_numbers(view: ProcessView, endpoints: Iterable[Endpoint]) -> TransportNumbers:
    """The connection and outlier numbers of a cluster, summed over its endpoints' pools."""
    pools, outliers = view.pools, view.outliers
    if pools is None and outliers is None:
        return NO_TRANSPORT
    active = pending = rx = tx = local = remote = ejected = enforced = 0
    for endpoint in endpoints:
        pool = pools.find(endpoint.host, endpoint.port) if pools is not None else None  # type: ignore[attr-defined]
        if pool is not None:
            active += pool.open_count
            pending += pool.pending
            rx += pool.rx_bytes
            tx += pool.tx_bytes
            local += pool.destroyed_local
            remote += pool.destroyed_remote
        if outliers is not None:
            ejected += endpoint in outliers.ejected  # type: ignore[attr-defined]
            enforced += outliers.ejections_by_endpoint.get(endpoint, 0)  # type: ignore[attr-defined]
    return TransportNumbers(active, pending, rx, tx, local, remote, ejected, enforced)


def all_records(view: ProcessView, catalog: ClusterCatalog | None = None) -> Iterator[StatRecord]:
    stats = view.stats
    if catalog is None:
        catalog = ClusterCatalog(view.table, view.static_routes)
    members = catalog.members
    for name in sorted(set(members) | set(stats.clusters)):
        endpoints = members.get(name, ())
        # Without active health checking every endpoint the table lists counts as healthy, as in Envoy.
        busy = stats.clusters.get(name)
        yield from cluster_records(name, busy, membership_total=len(endpoints), membership_healthy=len(endpoints),
                                   transport=transport_numbers(view, endpoints) if busy is not None else NO_TRANSPORT)
    yield from other_records(view, active_clusters=len(members))


def other_records(view: ProcessView, *, active_clusters: int) -> Iterator[StatRecord]:
    """Every record that is not a cluster's: listeners, lanes, server and config (few, whatever the table)."""
    stats = view.stats
    for listener in stats.listeners.values():
        yield from listener.records()
    for tcp in stats.tcp_proxies.values():
        yield from tcp.records()
    yield from stats.lanes.records()
    yield from lane_info_records(view.table)
    if view.istio is not None:
        yield from view.istio.records()
    yield from _process_records(view, active_clusters=active_clusters)


def process_memory() -> tuple[int, int] | None:
    """(allocated, heap size) in bytes, as Envoy's server.memory_* report tcmalloc's: here the process's
    resident memory not shared with others, and all of its resident memory (Linux /proc); None elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            fields = statm.read().split()
    except OSError:
        return None
    import os

    page = os.sysconf("SC_PAGE_SIZE")
    resident, shared = int(fields[1]) * page, int(fields[2]) * page
    return resident - shared, resident


def lane_info_records(table: RouteTable) -> Iterator[StatRecord]:
    """One info gauge per lane of the running table, with its group and fallback target.

    What `laneproxy verdict` asks Prometheus for to find a lane's baseline; bounded by the configuration.
    """
    for group in sorted(table.groups.values(), key=lambda g: g.name):
        for lane in sorted(group.lanes):
            target = group.fallback_target or ""
            yield StatRecord(f"laneproxy.lane_info.{group.name}.{lane}", StatKind.GAUGE, 1, True, "laneproxy_lane_info",
                             (("group", group.name), ("lane", lane), ("fallback_target", target)))


def _process_records(view: ProcessView, *, active_clusters: int) -> Iterator[StatRecord]:
    def gauge(name: str, value: int, family: str) -> StatRecord:
        return StatRecord(name, StatKind.GAUGE, value, True, family)

    def counter(name: str, value: int, family: str, tags: tuple[tuple[str, str], ...] = ()) -> StatRecord:
        return StatRecord(name, StatKind.COUNTER, value, value > 0, family, tags)

    for name, address in view.listener_addresses:
        listener = view.stats.listeners.get(name)
        if listener is None:
            continue
        tag = (("envoy_listener_address", address),)
        prefix = f"listener.{address}."
        yield StatRecord(prefix + "downstream_cx_total", StatKind.COUNTER, listener.cx_total, listener.cx_total > 0,
                         "envoy_listener_downstream_cx_total", tag)
        closed = listener.cx_total - listener.cx_active
        yield StatRecord(prefix + "downstream_cx_destroy", StatKind.COUNTER, closed, closed > 0,
                         "envoy_listener_downstream_cx_destroy", tag)
        yield StatRecord(prefix + "downstream_cx_active", StatKind.GAUGE, listener.cx_active, True,
                         "envoy_listener_downstream_cx_active", tag)
    if view.memory is not None:
        allocated, heap = view.memory
        yield gauge("server.memory_allocated", allocated, "envoy_server_memory_allocated")
        yield gauge("server.memory_heap_size", heap, "envoy_server_memory_heap_size")
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
    for number in health.numbers:
        name = ".".join(("laneproxy.config", number.name, *(value for _, value in number.tags)))
        family = "laneproxy_config_" + number.name.replace(".", "_")
        if number.counter:
            yield counter(name, int(number.value), family, number.tags)
        else:
            yield StatRecord(name, StatKind.GAUGE, int(number.value), True, family, number.tags)
    version = view.table.version
    yield StatRecord("laneproxy.config.version", StatKind.TEXT, version, bool(version), "laneproxy_config_info",
                     (("version", version),))
