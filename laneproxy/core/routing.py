"""Routing decisions on a RouteTable: which lane and which endpoints a request goes to, and why.

Owns the rules of the gateway (rule-based and weighted ingress) and of the sidecar hops (lane asked ->
route with fallback, precomputed by build.py). Pure: randomness arrives as a number in [0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from laneproxy.core.errors import NoRouteError
from laneproxy.core.model import Route, RouteTable, RoutingStrategy, ServiceRoutes, SwimLaneGroup, host_matches


@dataclass(frozen=True, slots=True)
class IngressDecision:
    """The gateway's choice: the lane to write into the route header, the route, and the reason."""

    lane: str | None
    route: Route
    group: SwimLaneGroup
    reason: str  # "rule:<lane>/<rule>", "weighted", or "baseline"


def bare_host(host: str) -> str:
    """Lowercase host without the port (IPv6 literals keep their brackets)."""
    host = host.lower()
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def service_routes_for_host(table: RouteTable, host: bytes) -> ServiceRoutes:
    """The routes of the service a Host (or absolute-form authority) names; NoRouteError if none."""
    routes = table.hosts.get(host) or table.hosts.get(host.lower())
    if routes is None:
        raise NoRouteError(f"no service for host {host.decode('latin-1')!r}")
    return routes


def outbound_route(table: RouteTable, host: bytes, lane: bytes | None) -> Route:
    """The route of a sidecar hop: the lane's endpoints, or the precomputed fallback."""
    return service_routes_for_host(table, host).route_for(lane)


def choose_ingress(
    table: RouteTable, host: str, path: str, headers: Mapping[str, str], random_value: float
) -> IngressDecision:
    """Match a request at the gateway against every group's ingress configuration.

    Rule-based: the first online lane rule whose hosts, uri and headers match picks the lane. A
    request that matches some rule except for the route header goes to the group's fallback target
    lane, the baseline: no tag, a tag that is not a lane, or a lane whose own rules do not cover
    this host and path (only matching requests enter a lane, as in ASM). Weighted: a request matching the
    group's weightedRoutingRule is assigned a lane in proportion to the lanes' ingress weights.
    `headers` has lowercase names; `path` excludes the query string.
    """
    host = bare_host(host)
    for group in table.groups.values():
        if group.strategy is RoutingStrategy.WEIGHTED:
            decision = _weighted(table, group, host, path, headers, random_value)
        else:
            decision = _rule_based(table, group, host, path, headers)
        if decision is not None:
            return decision
    raise NoRouteError(f"no ingress rule matches {host}{path}")


def _rule_based(
    table: RouteTable, group: SwimLaneGroup, host: str, path: str, headers: Mapping[str, str]
) -> IngressDecision | None:
    rules = [rule for lane in group.lanes.values() for rule in lane.ingress_rules]
    for rule in rules:
        if host_matches(rule.hosts, host) and rule.match.matches(path, headers):
            route = table.routes[rule.destination].route_for(rule.lane.encode())
            return IngressDecision(rule.lane, route, group, f"rule:{rule.lane}/{rule.name}")
    if group.fallback_target is None:
        return None
    for rule in rules:
        if host_matches(rule.hosts, host) and rule.match.matches(path, headers, ignore_header=group.route_header):
            route = table.routes[rule.destination].route_for(group.fallback_target.encode())
            return IngressDecision(group.fallback_target, route, group, "baseline")
    return None


def _weighted(
    table: RouteTable, group: SwimLaneGroup, host: str, path: str, headers: Mapping[str, str], random_value: float
) -> IngressDecision | None:
    if not host_matches(group.weighted_hosts, host):
        return None
    if group.weighted_matches and not any(m.matches(path, headers) for m in group.weighted_matches):
        return None
    weighted = [lane for lane in group.lanes.values() if lane.weight > 0 and lane.weight_destination]
    total = sum(lane.weight for lane in weighted)
    if total == 0:
        return None
    point = random_value * total
    for lane in weighted:
        point -= lane.weight
        if point < 0:
            break
    assert lane.weight_destination is not None
    route = table.routes[lane.weight_destination].route_for(lane.name.encode())
    return IngressDecision(lane.name, route, group, "weighted")
