"""core.decision.decide: the one routing decision the gateway, both sidecar listeners and /route share."""

from __future__ import annotations

import pytest

from laneproxy.core.decision import GATEWAY, INBOUND, OUTBOUND, PASSTHROUGH_CLUSTER, RequestMeta, decide, reason
from laneproxy.core.errors import NoRouteError
from laneproxy.core.model import Endpoint, Route
from laneproxy.core.propagation import LaneSource, TraceLaneTable

from .manifests import build, seed_bodies

TAG = b"x-asm-prefer-tag"
TRACE = b"my-request-id"
APP = Route("inbound", None, None, "inbound|9000||", (Endpoint("127.0.0.1", 9000),))


def traces() -> TraceLaneTable:
    return TraceLaneTable(capacity=16, ttl=60.0, clock=lambda: 1000.0)


@pytest.mark.parametrize(
    ("listener", "host", "headers", "lane", "source", "cluster", "upstream"),
    [
        (GATEWAY, b"shop", [(TAG, b"canary")], b"canary", LaneSource.ROUTE_HEADER,
         "outbound|8000|canary|mocka.default.svc.cluster.local", {TAG: b"canary"}),
        (GATEWAY, b"shop", [], b"base", LaneSource.ROUTE_HEADER,
         "outbound|8000|base|mocka.default.svc.cluster.local", {TAG: b"base"}),
        (OUTBOUND, b"mockb", [(TAG, b"canary")], b"canary", LaneSource.ROUTE_HEADER,
         "outbound|8000|base|mockb.default.svc.cluster.local", {TAG: b"canary"}),
        (OUTBOUND, b"mockc", [(b"baggage", b"user=1, x-asm-prefer-tag=canary")], b"canary", LaneSource.BAGGAGE,
         "outbound|8000|canary|mockc.default.svc.cluster.local", {TAG: b"canary"}),
        (OUTBOUND, b"mockc", [], None, LaneSource.BASELINE,
         "outbound|8000|base|mockc.default.svc.cluster.local", {TAG: b"base"}),
    ],
    ids=["gateway-rule", "gateway-baseline", "sidecar-fallback", "sidecar-baggage", "sidecar-baseline"],
)
def test_decision_names_the_lane_its_source_the_cluster_and_the_header_set_upstream(
        listener, host, headers, lane, source, cluster, upstream):
    decision = decide(build(seed_bodies()), RequestMeta(listener, host, b"/mock", headers), traces(), 0.5)
    assert (decision.lane, decision.lane_source, decision.route.cluster, decision.upstream_headers) == (
        lane, source, cluster, upstream)


def test_a_trace_seen_inbound_with_a_lane_sends_the_next_outbound_call_of_that_trace_into_the_lane():
    table, shared = build(seed_bodies()), traces()
    inbound = decide(table, RequestMeta(INBOUND, b"mocka", b"/", [(TAG, b"canary"), (TRACE, b"10002")],
                                        local_route=APP), shared, 0.5)
    outbound = decide(table, RequestMeta(OUTBOUND, b"mockc", b"/", [(TRACE, b"10002")]), shared, 0.5)
    assert (inbound.route, inbound.trace) == (APP, b"10002")
    assert (outbound.lane, outbound.lane_source, outbound.route.lane_used) == (b"canary", LaneSource.TRACE_TABLE,
                                                                              "canary")


def test_without_a_trace_table_the_decision_neither_reads_nor_fills_it_and_says_so():
    table, shared = build(seed_bodies()), traces()
    shared.remember(b"10002", b"canary")
    request = RequestMeta(OUTBOUND, b"mockc", b"/", [(TRACE, b"10002")])
    decision = decide(table, request, None, 0.5)
    assert (decision.lane, decision.lane_source) == (None, LaneSource.BASELINE)
    assert "does not consult the trace table" in reason(decision, request)
    assert shared.counters.hits == 0


def test_strict_mode_takes_the_sidecars_own_lane_whatever_the_request_asks():
    bodies = seed_bodies()
    bodies["group"]["spec"]["isPermissive"] = False
    decision = decide(build(bodies), RequestMeta(OUTBOUND, b"mockc", b"/", [(TAG, b"base")], own_lane=b"canary"),
                      traces(), 0.5)
    assert (decision.lane, decision.lane_source) == (b"canary", LaneSource.OWN_LANE)


@pytest.mark.parametrize(("listener", "host"), [(GATEWAY, b"shop"), (OUTBOUND, b"unknown"), (OUTBOUND, None)])
def test_a_request_nothing_serves_is_a_no_route_error(listener, host):
    with pytest.raises(NoRouteError):
        decide(build(seed_bodies()), RequestMeta(listener, host, b"/elsewhere", []), traces(), 0.5)


def test_a_captured_call_for_no_known_host_goes_to_its_original_destination_and_only_then_asks_for_it():
    asked = []
    original = Endpoint("10.1.2.3", 6379)

    def destination() -> Endpoint:
        asked.append(True)
        return original

    table = build(seed_bodies())
    known = decide(table, RequestMeta(OUTBOUND, b"mockc", b"/", [], original_destination=destination), None, 0.5)
    assert asked == []
    unknown = decide(table, RequestMeta(OUTBOUND, b"redis", b"/", [], original_destination=destination), None, 0.5)
    assert (known.route.cluster, unknown.route.cluster, unknown.route.endpoints) == (
        "outbound|8000|base|mockc.default.svc.cluster.local", PASSTHROUGH_CLUSTER, (original,))
    assert asked == [True]
