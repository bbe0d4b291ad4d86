"""admin.lanes.explain_route: "where would this request go, and why", answered by the data plane's own rules."""

from __future__ import annotations

import pytest

from laneproxy.admin.lanes import explain_route
from laneproxy.core.model import Endpoint

from .manifests import build, seed_bodies

TAG = "x-asm-prefer-tag"


@pytest.mark.parametrize(
    ("listener", "host", "path", "headers", "lane", "reason_part", "cluster", "fallback"),
    [
        ("gateway", "shop", "/mock", {TAG: "canary"}, "canary", "rule:canary/canary",
         "outbound|8000|canary|mocka.default.svc.cluster.local", False),
        ("gateway", "shop", "/mock", {}, "base", "baseline", "outbound|8000|base|mocka.default.svc.cluster.local",
         False),
        ("outbound", "mockb", "/", {TAG: "canary"}, "canary", "falls back to base",
         "outbound|8000|base|mockb.default.svc.cluster.local", True),
        ("outbound", "mockc.default.svc.cluster.local:8000", "/", {"baggage": f"user=1, {TAG}=canary"}, "canary",
         "W3C baggage", "outbound|8000|canary|mockc.default.svc.cluster.local", False),
        ("outbound", "mockc", "/", {"my-request-id": "10002"}, None, "does not consult the trace table",
         "outbound|8000|base|mockc.default.svc.cluster.local", False),
    ],
    ids=["gateway-rule", "gateway-baseline", "sidecar-fallback", "sidecar-baggage", "sidecar-trace-id-only"],
)
def test_route_answer_names_the_lane_the_reason_and_the_cluster(listener, host, path, headers, lane, reason_part,
                                                                 cluster, fallback):
    answer = explain_route(build(seed_bodies()), listener=listener, host=host, path=path, headers=headers)
    assert (answer["lane"], answer["route"]["cluster"], answer["route"]["fallback"]) == (lane, cluster, fallback)
    assert reason_part in answer["reason"]


def test_the_lane_asked_travels_on_even_across_a_fallback_hop():
    answer = explain_route(build(seed_bodies()), listener="outbound", host="mockb", path="/", headers={TAG: "canary"})
    assert answer["headers_set_upstream"] == {TAG: "canary"}


@pytest.mark.parametrize(
    ("listener", "host", "path", "flag"),
    [("gateway", "shop", "/elsewhere", "NR"), ("outbound", "unknown", "/", "NR")],
)
def test_a_request_the_proxy_would_answer_itself_shows_that_local_reply(listener, host, path, flag):
    answer = explain_route(build(seed_bodies()), listener=listener, host=host, path=path, headers={})
    assert (answer["local_reply"]["status"], answer["local_reply"]["response_flags"]) == (404, flag)


def test_ejected_endpoints_are_pointed_out():
    ejected = frozenset({Endpoint("127.0.0.1", 16002)})
    answer = explain_route(build(seed_bodies()), listener="outbound", host="mockb", path="/", headers={},
                           ejected=ejected)
    assert answer["route"]["ejected_endpoints"] == ["127.0.0.1:16002"]


@pytest.mark.parametrize(
    ("ejected", "random_value", "lane_used", "spilled", "fractions"),
    [
        ({"127.0.0.1:16004", "127.0.0.1:16014"}, 0.5, "base", False, {"canary": 0.0, "base": 1.0}),
        ({"127.0.0.1:16004", "127.0.0.1:16014", "127.0.0.1:16001"}, 0.5, None, False, {"canary": 0.0, "base": 0.0}),
        # Half of canary healthy, spill below 0.8: canary keeps 0.5 / 0.8 = 0.625 of the draws.
        ({"127.0.0.1:16004"}, 0.6, "canary", False, {"canary": 0.5, "base": 1.0}),
        ({"127.0.0.1:16004"}, 0.65, "base", True, {"canary": 0.5, "base": 1.0}),
    ],
    ids=["canary-ejected-falls-back", "nothing-healthy", "spill-draw-stays", "spill-draw-leaves"],
)
def test_with_endpoints_ejected_the_answer_shows_each_chain_lanes_health_and_the_lane_the_draw_picks(
        ejected, random_value, lane_used, spilled, fractions):
    bodies = seed_bodies()
    bodies["canary"]["metadata"]["annotations"] = {"laneproxy.dev/spill-below": "0.8"}
    bodies["endpoints"]["services"]["default/mocka"]["lanes"]["canary"].append("127.0.0.1:16014")
    addresses = {Endpoint("127.0.0.1", int(address.rsplit(":", 1)[1])) for address in ejected}
    answer = explain_route(build(bodies), listener="gateway", host="shop", path="/mock", headers={TAG: "canary"},
                           ejected=frozenset(addresses), random_value=random_value)
    health = answer["health"]
    assert (health["lane_used"], health["spilled"], health["random"]) == (lane_used, spilled, random_value)
    assert {lane: entry["healthy_fraction"] for lane, entry in health["lanes"].items()} == fractions
    assert health["lanes"]["canary"]["spill_below"] == 0.8
    assert answer["route"]["fallback_chain"] == ["base"]


def test_without_ejections_the_answer_has_no_health_section():
    answer = explain_route(build(seed_bodies()), listener="outbound", host="mockb", path="/", headers={TAG: "canary"})
    assert "health" not in answer
