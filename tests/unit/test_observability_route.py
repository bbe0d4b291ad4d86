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
