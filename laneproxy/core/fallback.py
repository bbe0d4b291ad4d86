"""Which lane serves a hop when endpoints are unhealthy: fallback chains and partial-health spill.

Owns the one decision taken per request once some endpoint is ejected: walk the lane asked and
then its chain (`Route.chain`), in order, skipping lanes with no healthy endpoint; a lane whose
healthy fraction is below its `spill_below` keeps only `fraction / spill_below` of the traffic and
lets the rest go on down the chain, as Envoy's priority levels spill by an overprovisioning factor.
Spill never sends traffic to a lane with nothing healthy: what passes the last healthy lane stays
there. It also decides whether an ejection is allowed at all: never when it would leave a lane's
requests with no healthy endpoint anywhere along their chain (outlier detection must not turn one
service's blip into a lane outage). Pure: health arrives as a function, randomness as a number in [0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from laneproxy.core.model import Endpoint, Route, ServiceRoutes

Healthy = Callable[[tuple[Endpoint, ...]], tuple[Endpoint, ...]]


@dataclass(frozen=True, slots=True)
class LaneChoice:
    """The route served (lane asked kept, lane used, all that lane's endpoints) and its healthy endpoints."""

    route: Route
    healthy: tuple[Endpoint, ...]
    spilled: bool  # a lane with healthy endpoints passed this request on because of its spill threshold


def own_route(routes: ServiceRoutes, lane: str) -> Route | None:
    """The lane's own route for the service (not a fallback), or None when the lane has no endpoints."""
    route = routes.by_lane.get(lane.encode())
    if route is None or route.lane_used != lane or not route.endpoints:
        return None
    return route


def healthy_fraction(route: Route, healthy: Healthy) -> float:
    return len(healthy(route.endpoints)) / len(route.endpoints) if route.endpoints else 0.0


def choose_lane(route: Route, routes: ServiceRoutes | None, healthy: Healthy, random_value: float) -> LaneChoice | None:
    """The lane that serves `route` now, given endpoint health; None when no lane of its chain has a healthy endpoint."""
    if routes is None or routes.group is None or route.lane_asked is None:
        endpoints = healthy(route.endpoints)
        return LaneChoice(route, endpoints, False) if endpoints else None
    lanes = routes.group.lanes
    draw = random_value
    spilled = False
    last: LaneChoice | None = None
    for lane in (route.lane_asked, *route.chain):
        own = own_route(routes, lane)
        if own is None:
            continue
        alive = healthy(own.endpoints)
        if not alive:
            continue
        served = own if lane == route.lane_asked else Route(route.service, route.lane_asked, lane, own.cluster,
                                                              own.endpoints, route.chain, own.protocol)
        last = LaneChoice(served, alive, spilled)
        threshold = lanes[lane].spill_below if lane in lanes else 0.0
        keep = 1.0 if threshold <= 0.0 else min(1.0, len(alive) / len(own.endpoints) / threshold)
        if draw < keep:
            return last
        # Reuse the one draw for the next lane: the part above `keep`, stretched back to [0, 1).
        draw = (draw - keep) / (1.0 - keep)
        spilled = True
    return last


def ejection_leaves_a_way(endpoint: Endpoint, route: Route, routes: ServiceRoutes | None, healthy: Healthy) -> bool:
    """Whether requests served by `route` would still find a healthy endpoint, in their lane or down its
    chain, once `endpoint` is ejected too. A lone broken canary may leave (its requests fall back to the
    baseline); the baseline's last healthy endpoint, or a service's without lanes, may not."""

    def without(endpoints: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
        return tuple(candidate for candidate in healthy(endpoints) if candidate != endpoint)

    # Draw 0.0: no spill, so the answer is whether any lane of the chain keeps a healthy endpoint.
    return choose_lane(route, routes, without, 0.0) is not None
