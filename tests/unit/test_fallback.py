"""Fallback chains and partial-health spill: the annotations as build.py reads them, and core.fallback's decision."""

from __future__ import annotations

import pytest

from laneproxy.core.build import FALLBACK_CHAIN_ANNOTATION, SPILL_BELOW_ANNOTATION
from laneproxy.core.fallback import choose_lane, ejection_leaves_a_way
from laneproxy.core.model import Endpoint, Route

from .manifests import build, documents, endpoints_body, lane_body, problems, seed_bodies

MOCKB = "default/mockb"


def three_lanes(*, s3: dict[str, str] | None = None, s2: dict[str, str] | None = None,
                endpoints: dict[str, list[str]] | None = None, permissive: bool = True) -> dict:
    """The seed group with lanes s2 and s3 added (annotations as given) and mockb's endpoints per lane."""
    bodies = seed_bodies()
    bodies["group"]["spec"]["isPermissive"] = permissive
    for name, lane_annotations in (("s2", s2), ("s3", s3)):
        body = lane_body(name, services=("mocka", "mockb", "mockc"))
        if lane_annotations:
            body["metadata"]["annotations"] = dict(lane_annotations)
        bodies[name] = body
    lanes = endpoints if endpoints is not None else {
        "base": ["10.0.0.1:80", "10.0.0.2:80"], "s2": ["10.0.2.1:80", "10.0.2.2:80"],
        "s3": ["10.0.3.1:80", "10.0.3.2:80", "10.0.3.3:80", "10.0.3.4:80"]}
    bodies["endpoints"] = endpoints_body({MOCKB: lanes, "default/mocka": {"base": ["10.0.1.1:80"]}})
    return bodies


CHAIN = {FALLBACK_CHAIN_ANNOTATION: "s2 -> base"}


@pytest.mark.parametrize(
    "annotations, expected",
    [
        pytest.param({FALLBACK_CHAIN_ANNOTATION: "s2 -> gold"}, "unknown lane 'gold' in s3 -> s2 -> gold",
                     id="unknown_lane"),
        pytest.param({FALLBACK_CHAIN_ANNOTATION: "s2 -> s3 -> base"}, "cycle in s3 -> s2 -> s3 -> base",
                     id="chain_back_to_its_own_lane"),
        pytest.param({FALLBACK_CHAIN_ANNOTATION: "s2 -> base -> s2"}, "cycle in s3 -> s2 -> base -> s2",
                     id="lane_named_twice"),
        pytest.param({FALLBACK_CHAIN_ANNOTATION: "s2 -> -> base"}, "expected 'lane -> lane ...', got 's2 -> -> base'",
                     id="empty_link"),
        pytest.param({FALLBACK_CHAIN_ANNOTATION: "default/mockz: base"}, "default/mockz is not a service of group",
                     id="unknown_service"),
        pytest.param({FALLBACK_CHAIN_ANNOTATION: "mockb: base; default/mockb: s2"}, "default/mockb has two chains",
                     id="service_named_twice"),
        pytest.param({SPILL_BELOW_ANNOTATION: "1.5"}, "expected a healthy fraction from 0 to 1, got '1.5'",
                     id="spill_above_one"),
        pytest.param({SPILL_BELOW_ANNOTATION: "half"}, "expected a healthy fraction from 0 to 1, got 'half'",
                     id="spill_not_a_number"),
    ],
)
def test_bad_fallback_annotations_are_reported_with_file_and_path(annotations, expected):
    reported = problems(documents(three_lanes(s3=annotations)))
    assert len(reported) == 1, reported
    assert reported[0].startswith("s3.yaml: ASMSwimLane(s3).metadata.annotations.laneproxy.dev/")
    assert expected in reported[0]


def test_a_fallback_chain_in_a_strict_group_is_refused_because_strict_lanes_never_fall_back():
    reported = problems(documents(three_lanes(s3=CHAIN, permissive=False)))
    assert any("is strict (isPermissive: false): lanes never fall back" in line for line in reported), reported


@pytest.mark.parametrize(
    "annotation, endpoints, lane_used, chain",
    [
        pytest.param("s2 -> base", {"base": ["10.0.0.1:80"], "s2": ["10.0.2.1:80"]}, "s2", ("s2", "base"),
                     id="empty_lane_takes_the_first_lane_of_its_chain"),
        pytest.param("s2 -> base", {"base": ["10.0.0.1:80"]}, "base", ("s2", "base"),
                     id="empty_lane_and_empty_first_fallback_take_the_next"),
        pytest.param("s2 -> base", {"s3": ["10.0.3.1:80"], "base": ["10.0.0.1:80"]}, "s3", ("s2", "base"),
                     id="lane_with_endpoints_serves_itself"),
        pytest.param("default/mockb: s2; *: base", {"base": ["10.0.0.1:80"], "s2": ["10.0.2.1:80"]}, "s2", ("s2",),
                     id="a_service_entry_beats_the_every_service_entry"),
        pytest.param("mocka: s2; *: base", {"base": ["10.0.0.1:80"], "s2": ["10.0.2.1:80"]}, "base", ("base",),
                     id="another_services_entry_does_not_apply"),
        pytest.param(None, {"base": ["10.0.0.1:80"], "s2": ["10.0.2.1:80"]}, "base", ("base",),
                     id="no_annotation_falls_back_to_the_fallback_target"),
        pytest.param("s2", {"base": ["10.0.0.1:80"]}, "s2", ("s2",),
                     id="a_chain_is_exactly_the_lanes_it_names"),
    ],
)
def test_the_table_precomputes_the_first_lane_of_the_chain_with_endpoints(annotation, endpoints, lane_used, chain):
    s3 = {FALLBACK_CHAIN_ANNOTATION: annotation} if annotation else None
    route = build(three_lanes(s3=s3, endpoints=endpoints)).routes[MOCKB].route_for(b"s3")
    assert (route.lane_asked, route.lane_used, route.chain) == ("s3", lane_used, chain)


@pytest.mark.parametrize(
    "spill, ejected, draw, lane_used, spilled",
    [
        pytest.param(None, set(), 0.99, "s3", False, id="all_healthy_stays"),
        pytest.param(None, {"10.0.3.1:80", "10.0.3.2:80", "10.0.3.3:80"}, 0.99, "s3", False,
                     id="one_healthy_endpoint_keeps_everything_without_spill"),
        pytest.param(None, {"10.0.3.1:80", "10.0.3.2:80", "10.0.3.3:80", "10.0.3.4:80"}, 0.1, "s2", False,
                     id="lane_fully_ejected_takes_the_first_fallback"),
        pytest.param(None, {"10.0.3.1:80", "10.0.3.2:80", "10.0.3.3:80", "10.0.3.4:80", "10.0.2.1:80", "10.0.2.2:80"},
                     0.1, "base", False, id="lane_and_first_fallback_ejected_take_the_second"),
        pytest.param("0.5", {"10.0.3.1:80"}, 0.99, "s3", False, id="above_the_threshold_nothing_spills"),
        pytest.param("0.5", {"10.0.3.1:80", "10.0.3.2:80"}, 0.99, "s3", False, id="at_the_threshold_nothing_spills"),
        # 1 of 4 healthy, threshold 0.5: the lane keeps 0.25 / 0.5 = half its traffic.
        pytest.param("0.5", {"10.0.3.1:80", "10.0.3.2:80", "10.0.3.3:80"}, 0.49, "s3", False,
                     id="below_the_threshold_the_lower_draws_stay"),
        pytest.param("0.5", {"10.0.3.1:80", "10.0.3.2:80", "10.0.3.3:80"}, 0.5, "s2", True,
                     id="below_the_threshold_the_upper_draws_spill_to_the_fallback"),
        pytest.param("0.5", {"10.0.3.1:80", "10.0.3.2:80", "10.0.3.3:80", "10.0.2.1:80", "10.0.2.2:80"}, 0.75, "base",
                     True, id="spill_skips_a_fallback_with_nothing_healthy"),
        pytest.param("0.5", {"10.0.3.1:80", "10.0.3.2:80", "10.0.3.3:80", "10.0.2.1:80", "10.0.2.2:80",
                             "10.0.0.1:80", "10.0.0.2:80"}, 0.75, "s3", False,
                     id="spill_with_no_healthy_fallback_stays_on_the_last_healthy_lane"),
    ],
)
def test_choose_lane_walks_the_chain_and_spills_by_healthy_fraction(spill, ejected, draw, lane_used, spilled):
    s3 = dict(CHAIN, **({SPILL_BELOW_ANNOTATION: spill} if spill else {}))
    table = build(three_lanes(s3=s3))
    routes = table.routes[MOCKB]

    def healthy(endpoints):
        return tuple(e for e in endpoints if e.address not in ejected)

    choice = choose_lane(routes.route_for(b"s3"), routes, healthy, draw)
    assert choice is not None
    assert (choice.route.lane_asked, choice.route.lane_used, choice.spilled) == ("s3", lane_used, spilled)
    own = routes.route_for(lane_used.encode())
    assert choice.route.endpoints == own.endpoints  # the served lane's whole set: outlier peers are the lane's
    assert choice.healthy == healthy(own.endpoints)
    assert choice.route.cluster == own.cluster
    assert choice.route.chain == ("s2", "base")  # a retry starts again from the lane asked


def test_spill_follows_the_healthy_fraction_over_every_draw():
    """At 1 of 4 healthy with spill below 0.5, exactly the draws at or above 0.5 leave the lane."""
    table = build(three_lanes(s3=dict(CHAIN, **{SPILL_BELOW_ANNOTATION: "0.5"})))
    routes = table.routes[MOCKB]
    ejected = {"10.0.3.1:80", "10.0.3.2:80", "10.0.3.3:80"}

    def healthy(endpoints):
        return tuple(e for e in endpoints if e.address not in ejected)

    draws = [i / 100 for i in range(100)]
    lanes = [choose_lane(routes.route_for(b"s3"), routes, healthy, draw).route.lane_used for draw in draws]
    assert lanes == ["s3"] * 50 + ["s2"] * 50


def test_nothing_healthy_anywhere_in_the_chain_is_no_choice():
    routes = build(three_lanes(s3=CHAIN)).routes[MOCKB]
    assert choose_lane(routes.route_for(b"s3"), routes, lambda endpoints: (), 0.3) is None


def test_a_strict_group_route_never_leaves_its_lane():
    routes = build(three_lanes(permissive=False)).routes[MOCKB]
    route = routes.route_for(b"s3")
    assert route.chain == ()
    only_one = choose_lane(route, routes, lambda endpoints: endpoints[:1], 0.9)
    assert only_one is not None and only_one.route.lane_used == "s3"
    assert choose_lane(route, routes, lambda endpoints: (), 0.3) is None


@pytest.mark.parametrize(
    "lane_asked, endpoints, already_ejected, candidate, allowed",
    [
        pytest.param("base", {"base": ["10.0.0.1:80"]}, set(), "10.0.0.1:80", False,
                     id="the_baselines_only_endpoint_stays"),
        pytest.param("base", {"base": ["10.0.0.1:80", "10.0.0.2:80"]}, set(), "10.0.0.1:80", True,
                     id="one_of_two_baseline_endpoints_may_go"),
        pytest.param("base", {"base": ["10.0.0.1:80", "10.0.0.2:80"]}, {"10.0.0.2:80"}, "10.0.0.1:80", False,
                     id="the_baselines_last_healthy_endpoint_stays"),
        pytest.param("s3", {"base": ["10.0.0.1:80"], "s3": ["10.0.3.1:80"]}, set(), "10.0.3.1:80", True,
                     id="a_lone_canary_may_go_its_requests_fall_back"),
        pytest.param("s3", {"base": ["10.0.0.1:80"], "s3": ["10.0.3.1:80"]}, {"10.0.0.1:80"}, "10.0.3.1:80", False,
                     id="a_lone_canary_stays_when_its_whole_chain_is_ejected"),
        pytest.param("s3", {"base": ["10.0.0.1:80"], "s2": ["10.0.2.1:80"], "s3": ["10.0.3.1:80"]}, {"10.0.0.1:80"},
                     "10.0.3.1:80", True, id="a_canary_may_go_when_a_later_lane_of_its_chain_is_healthy"),
        pytest.param("s3", {"base": ["10.0.0.1:80"]}, set(), "10.0.0.1:80", False,
                     id="a_fallback_serving_a_lane_without_endpoints_keeps_its_last_one"),
    ],
)
def test_an_ejection_never_leaves_a_lanes_requests_without_a_healthy_endpoint_along_their_chain(
        lane_asked, endpoints, already_ejected, candidate, allowed):
    routes = build(three_lanes(s3=CHAIN, endpoints=endpoints)).routes[MOCKB]
    route = routes.route_for(lane_asked.encode())
    chosen = choose_lane(route, routes, lambda found: found, 0.0)
    served = chosen.route  # as the selector serves it: the fallback's endpoints when the lane has none
    endpoint = next(e for lane in routes.by_lane.values() for e in lane.endpoints if e.address == candidate)

    def healthy(found):
        return tuple(e for e in found if e.address not in already_ejected)

    assert ejection_leaves_a_way(endpoint, served, routes, healthy) is allowed


def test_a_route_without_lanes_keeps_its_last_healthy_endpoint_and_may_lose_another():
    one, two = Endpoint("10.0.9.1", 80), Endpoint("10.0.9.2", 80)
    route = Route("default/plain", None, None, "outbound|80||plain.default.svc.cluster.local", (one, two))
    assert ejection_leaves_a_way(one, route, None, lambda found: found) is True
    assert ejection_leaves_a_way(one, route, None, lambda found: tuple(e for e in found if e != two)) is False
