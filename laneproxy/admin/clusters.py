"""/clusters: every upstream cluster and its hosts, as Envoy's `cluster::host:port::stat::value` lines or JSON.

Owns the per-host view runbooks read: request outcomes (rq_total, rq_success, rq_error, rq_timeout),
connections (cx_active, cx_connect_fail), health flags (`healthy`, or `/failed_outlier_check` while
outlier detection has the host ejected) and the default-priority circuit-breaker thresholds. A lane
is its own cluster (`outbound|<port>|<lane>|<fqdn>`), so the lanes of a service show one per cluster.
Not reported, because laneproxy does not keep them: per-host cx_total, rq_pending_active,
success-rate outlier data and high-priority thresholds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from laneproxy.admin import web
from laneproxy.admin.endpoint import AdminEndpoint, context, envoy_headers, text
from laneproxy.admin.exposition import Pacer, indented_json, cluster_order
from laneproxy.observability.inventory import cluster_members

if TYPE_CHECKING:
    from laneproxy.admin.proxy import RunningProxy
    from laneproxy.core.model import Endpoint
    from laneproxy.observability.stats import ClusterStats


@dataclass(frozen=True, slots=True)
class HostView:
    endpoint: Endpoint
    counters: dict[str, int]  # name -> value, Envoy's per-host counters
    gauges: dict[str, int]
    ejected: bool


@dataclass(frozen=True, slots=True)
class ClusterView:
    name: str
    hosts: tuple[HostView, ...]


def cluster_views(proxy: RunningProxy, pattern: re.Pattern[str] | None = None) -> list[ClusterView]:
    static = tuple(route for listener in proxy.listeners for route in listener.role.static_routes())
    members = cluster_members(proxy.store.current, static)
    stats = proxy.stats.clusters
    return [cluster_view(proxy, name, members.get(name, ()), stats.get(name))
            for name in sorted(set(members) | set(stats)) if pattern is None or pattern.search(name) is not None]


def cluster_view(proxy: RunningProxy, name: str, members: tuple[Endpoint, ...],
                 cluster: ClusterStats | None) -> ClusterView:
    """One cluster: the endpoints the table lists, then any other host that served traffic."""
    ejected = proxy.outliers.ejected
    pools = proxy.pools
    hosts = []
    endpoints = list(members)
    if cluster is not None:
        endpoints += [endpoint for endpoint in cluster.hosts if endpoint not in endpoints]
    for endpoint in endpoints:
        host = cluster.hosts.get(endpoint) if cluster is not None else None
        pool = pools.find(endpoint.host, endpoint.port)  # HTTP/1.1 and HTTP/2 connections; never creates a pool
        open_now = pool.open_count if pool is not None else 0
        counters = {"cx_connect_fail": 0, "rq_error": 0, "rq_success": 0, "rq_timeout": 0, "rq_total": 0}
        gauges = {"cx_active": open_now, "rq_active": 0}
        if host is not None:
            counters.update(cx_connect_fail=host.cx_connect_fail, rq_error=host.rq_error,
                            rq_success=host.rq_success, rq_timeout=host.rq_timeout, rq_total=host.rq_total)
            gauges["rq_active"] = host.rq_active
        hosts.append(HostView(endpoint, counters, gauges, endpoint in ejected))
    return ClusterView(name, tuple(hosts))


def _thresholds(proxy: RunningProxy) -> dict[str, int]:
    breakers, retries = proxy.settings.circuit_breakers, proxy.settings.retries
    return {"max_connections": breakers.max_connections, "max_pending_requests": breakers.max_pending_requests,
            "max_requests": breakers.max_requests, "max_retries": retries.max_retries}


def format_text(views: list[ClusterView], thresholds: dict[str, int], added_via_api: bool) -> str:
    lines = []
    for view in views:
        name = view.name
        lines.append(f"{name}::observability_name::{name}")
        lines.extend(f"{name}::default_priority::{key}::{value}" for key, value in thresholds.items())
        lines.append(f"{name}::added_via_api::{str(added_via_api).lower()}")
        for host in view.hosts:
            prefix = f"{name}::{host.endpoint.address}::"
            for stat, value in sorted({**host.counters, **host.gauges}.items()):
                lines.append(f"{prefix}{stat}::{value}")
            lines += [f"{prefix}hostname::", f"{prefix}health_flags::{'/failed_outlier_check' if host.ejected else 'healthy'}",
                      f"{prefix}weight::1", f"{prefix}region::", f"{prefix}zone::", f"{prefix}sub_zone::",
                      f"{prefix}canary::false", f"{prefix}priority::0", f"{prefix}success_rate::-1",
                      f"{prefix}local_origin_success_rate::-1"]
    return "".join(line + "\n" for line in lines)


def format_json(views: list[ClusterView], thresholds: dict[str, int], added_via_api: bool) -> dict:
    statuses = []
    for view in views:
        hosts = []
        for host in view.hosts:
            # Envoy's JSON: uint64 counters as strings, zero values omitted, gauges typed.
            stats = [{"name": stat, **({"value": str(value)} if value else {})}
                     for stat, value in sorted(host.counters.items())]
            stats += [{"type": "GAUGE", "name": stat, **({"value": str(value)} if value else {})}
                      for stat, value in sorted(host.gauges.items())]
            health = {"eds_health_status": "HEALTHY", **({"failed_outlier_check": True} if host.ejected else {})}
            hosts.append({"address": {"socket_address": {"address": host.endpoint.host,
                                                         "port_value": host.endpoint.port}},
                          "stats": stats, "health_status": health, "weight": 1, "locality": {}})
        status = {"name": view.name, "host_statuses": hosts, "observability_name": view.name}
        if thresholds:
            status["circuit_breakers"] = {"thresholds": [thresholds]}
        if added_via_api:
            status["added_via_api"] = True
        statuses.append(status)
    return {"cluster_statuses": statuses}


async def clusters_handler(request: web.Request) -> web.StreamResponse:
    """The clusters one at a time, in slices that yield to the loop (a big table has tens of thousands)."""
    admin = context(request)
    proxy = admin.proxy
    pattern = request.query.get("filter")
    try:
        regex = re.compile(pattern) if pattern else None
    except re.error as exc:
        return text(f"Invalid re2 regex: {exc}", status=400)
    thresholds = _thresholds(proxy)
    added_via_api = proxy.settings.source != "files"
    as_json = request.query.get("format") == "json"
    static = tuple(route for listener in proxy.listeners for route in listener.role.static_routes())
    catalog = admin.catalogs.catalog(proxy.store.current, static)
    stats = dict(proxy.stats.clusters)
    response = web.StreamResponse(headers=envoy_headers(proxy.settings.server_name))
    response.content_type = "application/json" if as_json else "text/plain"
    response.charset = "utf-8" if as_json else "UTF-8"
    await response.prepare(request)
    pacer = Pacer(response)
    pacer.write('{\n "cluster_statuses": [' if as_json else "")
    written = 0
    for name in cluster_order(catalog, stats):
        if regex is None or regex.search(name) is not None:
            view = [cluster_view(proxy, name, catalog.members.get(name, ()), stats.get(name))]
            if as_json:
                status = format_json(view, thresholds, added_via_api)["cluster_statuses"][0]
                pacer.write(("\n" if not written else ",\n") + indented_json(status, 2))
            else:
                pacer.write(format_text(view, thresholds, added_via_api))
            written += 1
        await pacer.tick()
    if as_json:
        pacer.write("\n ]\n}" if written else "]\n}")
    await pacer.flush()
    await response.write_eof()
    return response


ENDPOINTS = (
    AdminEndpoint("/clusters", "upstream cluster status", clusters_handler, params=(
        ("format", "File format to use; One of (text, json)"),
        ("filter", "Regular expression (Python re, standing in for Google re2) for filtering clusters by name"),
    )),
)
