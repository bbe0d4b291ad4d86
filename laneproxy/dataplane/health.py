"""Endpoint health on the hot path: outlier detection and the choice of a healthy endpoint, with lane fallback.

Owns passive health: consecutive 5xx (and local connect/reset failures, as Envoy counts them by
default) eject an endpoint for a while, never more than a share of a set (but always at least one,
so a lone broken canary can leave). A lane whose endpoints are all ejected falls back along its
chain (by default to the baseline) exactly as an empty lane does, and a partly ejected lane may
spill (core.fallback decides). When nothing is ejected the check is one truth test.
"""

from __future__ import annotations

import random as _random
from typing import Callable

from laneproxy.core.balance import RandomPicker
from laneproxy.core.errors import NoHealthyUpstreamError
from laneproxy.core.fallback import choose_lane
from laneproxy.core.model import Endpoint, Route, ServiceRoutes


class OutlierDetector:
    __slots__ = ("consecutive_5xx", "ejection_seconds", "max_ejection_percent", "_clock", "failures", "ejected",
                 "ejections_total", "ejections_by_endpoint")

    def __init__(self, *, consecutive_5xx: int = 5, ejection_seconds: float = 30.0, max_ejection_percent: int = 10,
                 clock: Callable[[], float]) -> None:
        self.consecutive_5xx = consecutive_5xx
        self.ejection_seconds = ejection_seconds
        self.max_ejection_percent = max_ejection_percent
        self._clock = clock
        self.failures: dict[Endpoint, int] = {}
        self.ejected: dict[Endpoint, float] = {}  # endpoint -> time its ejection ends
        self.ejections_total = 0
        self.ejections_by_endpoint: dict[Endpoint, int] = {}  # for each cluster's outlier_detection.* stats

    def healthy(self, endpoints: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
        if not self.ejected:
            return endpoints
        now = self._clock()
        for endpoint, until in list(self.ejected.items()):
            if until <= now:
                del self.ejected[endpoint]
        return tuple(endpoint for endpoint in endpoints if endpoint not in self.ejected)

    def success(self, endpoint: Endpoint) -> None:
        if self.failures:
            self.failures.pop(endpoint, None)

    def failure(self, endpoint: Endpoint, peers: tuple[Endpoint, ...]) -> None:
        count = self.failures.get(endpoint, 0) + 1
        if count < self.consecutive_5xx:
            self.failures[endpoint] = count
            return
        self.failures.pop(endpoint, None)
        if endpoint in self.ejected:
            return
        already = sum(1 for peer in peers if peer in self.ejected)
        allowed = max(1, len(peers) * self.max_ejection_percent // 100)
        if already < allowed:
            self.ejected[endpoint] = self._clock() + self.ejection_seconds
            self.ejections_total += 1
            self.ejections_by_endpoint[endpoint] = self.ejections_by_endpoint.get(endpoint, 0) + 1


class EndpointSelector:
    """Picks a healthy endpoint of a route; when its lane is unhealthy, the lane's fallback chain decides.

    With nothing ejected the table's precomputed route stands (every lane fully healthy, so no chain
    and no spill applies): one truth test. Otherwise core.fallback.choose_lane takes the decision.
    """

    __slots__ = ("picker", "outliers", "random")

    def __init__(self, picker: RandomPicker, outliers: OutlierDetector | None,
                 random: Callable[[], float] | None = None) -> None:
        self.picker = picker
        self.outliers = outliers
        self.random = random or _random.random

    def select(self, route: Route, routes: ServiceRoutes | None) -> tuple[Endpoint, Route]:
        endpoint, route, _ = self.choose(route, routes)
        return endpoint, route

    def choose(self, route: Route, routes: ServiceRoutes | None) -> tuple[Endpoint, Route, bool]:
        """(endpoint, the route served, whether the request spilled past a partly healthy lane)."""
        outliers = self.outliers
        if outliers is None or not outliers.ejected:
            if not route.endpoints:
                raise NoHealthyUpstreamError(f"no healthy endpoints for {route.cluster}")
            return self.picker.pick(route.endpoints), route, False
        # A retry passes the route it was served (maybe a fallback): the chain starts again from the lane asked.
        choice = choose_lane(route, routes, outliers.healthy, self.random())
        if choice is None:
            raise NoHealthyUpstreamError(f"no healthy endpoints for {route.cluster}")
        return self.picker.pick(choice.healthy), choice.route, choice.spilled
