"""core.balance with an injected clock: outlier ejection never empties a lane's way out; FailedHops' bounds."""

from __future__ import annotations

import pytest

from laneproxy.core.model import Endpoint, Route
from laneproxy.core.balance import FailedHops, OutlierDetector

ONE, TWO = Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def plain(*endpoints: Endpoint) -> Route:
    return Route("default/mocka", None, None, "outbound|80||mocka.default.svc.cluster.local", endpoints)


def fail(detector: OutlierDetector, endpoint: Endpoint, route: Route, times: int) -> None:
    for _ in range(times):
        detector.failure(endpoint, route, None)


def test_five_failures_of_a_services_only_endpoint_are_refused_as_an_ejection_and_counted():
    detector = OutlierDetector(clock=Clock())
    route = plain(ONE)
    fail(detector, ONE, route, 10)
    assert detector.healthy(route.endpoints) == (ONE,)
    assert (detector.ejections_total, detector.ejections_refused) == (0, 2)


def test_one_of_two_endpoints_is_ejected_and_the_other_then_never_is():
    clock = Clock()
    detector = OutlierDetector(clock=clock, max_ejection_percent=100)
    route = plain(ONE, TWO)
    fail(detector, ONE, route, 5)
    fail(detector, TWO, route, 5)
    assert detector.healthy(route.endpoints) == (TWO,)
    assert (detector.ejections_total, detector.ejections_refused) == (1, 1)
    clock.now += 30.0  # the ejection ends
    assert detector.healthy(route.endpoints) == (ONE, TWO)


@pytest.mark.parametrize(
    "steps, expected",
    [
        pytest.param([("remember", b"t1", b"UH"), ("recall", b"t1")], b"UH", id="remembered"),
        pytest.param([("recall", b"t1")], None, id="never_failed"),
        pytest.param([("remember", b"t1", b"UH"), ("advance", 31.0), ("recall", b"t1")], None, id="expired"),
        pytest.param([("remember", b"t1", b"UH"), ("remember", b"t1", b"URX,UF"), ("recall", b"t1")], b"URX,UF",
                     id="latest_failure_wins"),
        pytest.param([("remember", b"t1", b"UH"), ("remember", b"t2", b"UF"), ("remember", b"t3", b"UF"),
                      ("recall", b"t1")], None, id="oldest_dropped_beyond_capacity"),
        pytest.param([("remember", b"t" * 257, b"UH"), ("recall", b"t" * 257)], None, id="overlong_key_not_kept"),
    ],
)
def test_failed_hops_remember_a_traces_failure_briefly_and_within_bounds(steps, expected):
    clock = Clock()
    hops = FailedHops(clock=clock, capacity=2, ttl=30.0)
    answer = None
    for step in steps:
        if step[0] == "remember":
            hops.remember(step[1], step[2])
        elif step[0] == "advance":
            clock.now += step[1]
        else:
            answer = hops.recall(step[1])
    assert answer == expected
    assert len(hops) <= 2
