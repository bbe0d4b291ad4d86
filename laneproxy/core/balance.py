"""Endpoint choice: pickers, passive health (outlier ejection) and the choice of a healthy endpoint.

Owns load-balancing policy and passive health: consecutive 5xx (and local connect/reset failures,
as Envoy counts them by default) eject an endpoint for a while, never more than a share of a set
(but always at least one, so a lone broken canary can leave), and never the last healthy endpoint a
lane's requests have along their chain (core.fallback.ejection_leaves_a_way): a blip one hop down
must not take a whole lane out. A 5xx marked as a later hop's failure (`x-laneproxy-failed-hop`, see
FailedHops) counts neither way. A lane whose endpoints are all ejected falls back along its chain
(by default to the baseline) exactly as an empty lane does, and a partly ejected lane may spill
(core.fallback decides). When nothing is ejected the check is one truth test.

Pure: the clock and randomness are injected (callables), so tests are exact. Nothing here opens a
connection or counts a request; the data plane reports outcomes and asks for endpoints.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

from laneproxy.core.errors import NoHealthyUpstreamError
from laneproxy.core.fallback import choose_lane, ejection_leaves_a_way
from laneproxy.core.model import Endpoint, Route, ServiceRoutes

T = TypeVar("T")


class RandomPicker:
    """Uniform random choice; with an injected source of randomness it is deterministic in tests."""

    __slots__ = ("_random",)

    def __init__(self, random: Callable[[], float]) -> None:
        self._random = random

    def pick(self, endpoints: Sequence[T]) -> T:
        count = len(endpoints)
        if count == 1:
            return endpoints[0]
        return endpoints[int(self._random() * count) % count]


class RoundRobinPicker:
    """Each call takes the next endpoint; the cursor is shared across routes, which spreads load evenly enough."""

    __slots__ = ("_cursor",)

    def __init__(self, start: int = 0) -> None:
        self._cursor = start

    def pick(self, endpoints: Sequence[T]) -> T:
        cursor = self._cursor
        self._cursor = cursor + 1
        return endpoints[cursor % len(endpoints)]


class OutlierDetector:
    __slots__ = ("consecutive_5xx", "ejection_seconds", "max_ejection_percent", "_clock", "failures", "ejected",
                 "ejections_total", "ejections_by_endpoint", "ejections_refused", "failed_hop_responses")

    def __init__(self, *, clock: Callable[[], float], consecutive_5xx: int = 5, ejection_seconds: float = 30.0,
                 max_ejection_percent: int = 10) -> None:
        # `clock` first: mypyc's signature text refuses a keyword-only argument without a default after defaults.
        self.consecutive_5xx = consecutive_5xx
        self.ejection_seconds = ejection_seconds
        self.max_ejection_percent = max_ejection_percent
        self._clock = clock
        self.failures: dict[Endpoint, int] = {}
        self.ejected: dict[Endpoint, float] = {}  # endpoint -> time its ejection ends
        self.ejections_total = 0
        self.ejections_by_endpoint: dict[Endpoint, int] = {}  # for each cluster's outlier_detection.* stats
        self.ejections_refused = 0  # ejections due that would have left a lane's requests nowhere healthy to go
        self.failed_hop_responses = 0  # 5xx marked as a later hop's failure, counted against nobody

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

    def failure(self, endpoint: Endpoint, route: Route, routes: ServiceRoutes | None) -> None:
        """`endpoint` failed a request served by `route` (its lane's whole set are the peers)."""
        count = self.failures.get(endpoint, 0) + 1
        if count < self.consecutive_5xx:
            self.failures[endpoint] = count
            return
        self.failures.pop(endpoint, None)
        if endpoint in self.ejected:
            return
        peers = route.endpoints
        already = sum(1 for peer in peers if peer in self.ejected)
        allowed = max(1, len(peers) * self.max_ejection_percent // 100)
        if already >= allowed:
            return
        if not ejection_leaves_a_way(endpoint, route, routes, self.healthy):
            self.ejections_refused += 1  # the last way its lane's requests have: keep routing to it
            return
        self.ejected[endpoint] = self._clock() + self.ejection_seconds
        self.ejections_total += 1
        self.ejections_by_endpoint[endpoint] = self.ejections_by_endpoint.get(endpoint, 0) + 1


class EndpointSelector:
    """Picks a healthy endpoint of a route; when its lane is unhealthy, the lane's fallback chain decides.

    With nothing ejected the table's precomputed route stands (every lane fully healthy, so no chain
    and no spill applies): one truth test. Otherwise core.fallback.choose_lane takes the decision.
    """

    __slots__ = ("picker", "outliers", "random")

    def __init__(self, picker: RandomPicker, outliers: OutlierDetector | None, random: Callable[[], float]) -> None:
        self.picker = picker
        self.outliers = outliers
        self.random = random

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


class FailedHops:
    """Trace ids whose call out through this sidecar's outbound listener just ended in a 5xx, for a few seconds.

    The app in front of which this sidecar stands answers its caller 5xx when its own call to the
    next service failed (a local reply such as `no healthy upstream`, or a 5xx from there). Apps do
    not copy response headers, so this sidecar's inbound listener recognises such a 5xx by its trace
    id (the group's trace header, which apps forward) and marks it `x-laneproxy-failed-hop`; the
    caller's outlier detection then counts it against nobody: a hop does not pay for the hops behind
    it (Envoy's `consecutive_gateway_failure` idea). Bounded in entries and key length; a miss only
    means the 5xx counts as it always did. With `--workers N` the two listeners of one request may sit
    in different workers, and then it is a miss.
    """

    __slots__ = ("capacity", "ttl", "_clock", "_entries")

    MAX_KEY = 256

    def __init__(self, *, clock: Callable[[], float], capacity: int = 4096, ttl: float = 30.0) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self._clock = clock
        self._entries: dict[bytes, tuple[float, bytes]] = {}  # trace key -> (expiry, flags), oldest first

    def remember(self, key: bytes, flags: bytes) -> None:
        if len(key) > self.MAX_KEY:
            return
        entries = self._entries
        entries.pop(key, None)
        entries[key] = (self._clock() + self.ttl, flags)
        while len(entries) > self.capacity:
            del entries[next(iter(entries))]

    def recall(self, key: bytes) -> bytes | None:
        """The failure flags remembered for this trace, if its call failed within the last `ttl` seconds."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[key]
            return None
        return entry[1]

    def __len__(self) -> int:
        return len(self._entries)
